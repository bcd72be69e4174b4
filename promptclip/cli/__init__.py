"""The ``promptclip`` command line.

Subcommands: ``train``, ``eval``, ``export``, ``serve``, ``classify``, ``classes``, ``demo``, ``reproduce``,
``toyworld``, ``bench``, and the listings ``methods`` and ``backbones``. A user mistake (any :class:`PromptclipError`)
prints one ``error:`` line and exits with status 2, no traceback.

Layout: :mod:`promptclip.cli.parsers` builds the parser, one module per command group, with the standard library
only; :mod:`promptclip.cli.commands` holds each group's handlers, which import their dependencies at module level.
:func:`run_handler` imports the chosen group's handler module, the one deferred import of the command line: that is
what keeps ``serve`` and ``classify`` torch-free on a serving host.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from promptclip.cli.parsers import GROUPS
from serving.errors import PromptclipError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "httpx", "bentoml", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``promptclip`` parser (imports no handler module)."""
    p = argparse.ArgumentParser(prog="promptclip", description=(
        "Few-shot prompt learning for CLIP: train prompts, export ONNX bundles, serve open-vocabulary "
        "classification with runtime-extensible class lists."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def run_handler(args: argparse.Namespace) -> int:
    """Run the handler the parsed command names: ``args.handler`` is ``(module, function)``.

    The module is imported here, and only here, so that a command loads its own group's dependencies and no other
    group's (``serve``/``classify`` must not import torch, which the training groups need).
    """
    module_name, function_name = args.handler
    handler = getattr(importlib.import_module(module_name), function_name)
    return int(handler(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``promptclip`` script and ``python -m promptclip``; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return run_handler(args)
    except PromptclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

