"""The parsers of the command groups, one module each, standard library only (argparse, os).

Each module has ``add_parsers(sub)``, which adds its subcommands to the top-level subparsers and sets each one's
``handler`` default to ``(module, function)``: the handler module of the group, imported only when a command of the
group runs (see :func:`promptclip.cli.run_handler`). Building the whole parser therefore imports no torch.
"""
from __future__ import annotations

from . import classes, demo, engine, export, reproduce, serve, toyworld, train

#: the groups in the order their subcommands appear in ``promptclip --help``
GROUPS = (train, export, serve, classes, engine, demo, reproduce, toyworld)
