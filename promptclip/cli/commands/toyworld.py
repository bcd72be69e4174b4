"""``toyworld pretrain``, ``toyworld preview`` and ``bench toyworld``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from promptclip.cli.values import int_list, method_specs, name_list
from serving.errors import PromptclipError
from training.methods import get_method_class
from training.protocols.toybench import PROTOCOLS, BenchConfig, parse_method_spec, run_bench
from training.toyworld.pretrain import DEFAULT_WEIGHTS_PATH, PretrainConfig, pretrain
from training.toyworld.preview import save_contact_sheet
from training.toyworld.provider import SPLITS


def cmd_toyworld_pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    info = pretrain(cfg, args.out or DEFAULT_WEIGHTS_PATH)
    print(json.dumps({k: info[k] for k in ("file", "sha256", "seconds", "zero_shot_all120_by_style")}, indent=2))
    return 0


def cmd_toyworld_preview(args: argparse.Namespace) -> int:
    path = save_contact_sheet(args.out)
    print(f"wrote {path}")
    return 0


def _checked_method_specs(text: str) -> tuple[str, ...]:
    """``--methods``-style list; an unknown method name is a clear error before any work."""
    specs = method_specs(text)
    for spec in specs:
        get_method_class(parse_method_spec(spec)[0])
    return specs


def cmd_bench_toyworld(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {"shots": args.shots, "steps": args.steps, "backbone": args.backbone,
                              "pretrained": args.pretrained}
    if args.methods:
        values["methods"] = _checked_method_specs(args.methods)
    if args.loso_methods:
        values["loso_methods"] = _checked_method_specs(args.loso_methods)
    if args.loso_targets:
        values["loso_targets"] = name_list(args.loso_targets)
    if args.seeds:
        values["seeds"] = int_list(args.seeds)
    if args.styles:
        values["styles"] = name_list(args.styles)
    if args.num_classes:
        values["num_classes"] = args.num_classes
    if args.splits:
        values["splits"] = name_list(args.splits)
        bad = set(values["splits"]) - set(SPLITS)
        if bad:
            raise PromptclipError(f"unknown split(s) {sorted(bad)}; choose from {', '.join(SPLITS)}")
    if args.protocols:
        values["protocols"] = name_list(args.protocols)
        bad = set(values["protocols"]) - set(PROTOCOLS)
        if bad:
            raise PromptclipError(f"unknown protocol(s) {sorted(bad)}; choose from {', '.join(PROTOCOLS)}")
    cfg = BenchConfig(**{k: v for k, v in values.items() if v is not None})
    summary = run_bench(cfg, args.out, progress=args.progress)
    print((Path(args.out) / "results.md").read_text())
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    return 0
