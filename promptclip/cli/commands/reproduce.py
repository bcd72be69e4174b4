"""``reproduce``: a paper protocol from a data folder to a paper-style table."""
from __future__ import annotations

import argparse
from pathlib import Path

from promptclip.cli.values import float_pair, int_list, name_list, parse_sets
from training import distributed
from training.methods import get_method_class
from training.protocols.recipes import format_recipe
from training.protocols.reproduce import ReproduceConfig, run_reproduce


def cmd_reproduce(args: argparse.Namespace) -> int:
    get_method_class(args.method)
    train = {k: v for k, v in {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                               "lr": args.lr, "device": args.device, "precision": args.precision,
                               "num_workers": args.num_workers, "optimizer": args.optimizer,
                               "momentum": args.momentum, "weight_decay": args.weight_decay,
                               "warmup_epochs": args.warmup_epochs, "warmup_steps": args.warmup_steps,
                               "warmup_lr": args.warmup_lr, "augment": args.augment,
                               "crop_scale": float_pair(args.crop_scale, "--crop-scale") if args.crop_scale else None,
                               }.items() if v is not None}
    shots = int_list(args.shots) if args.shots is not None else (
        (1, 2, 4, 8, 16) if args.protocol == "few-shot" else (16,))
    cfg = ReproduceConfig(protocol=args.protocol, method=args.method, root=args.root,
                          datasets=name_list(args.datasets or ""), seeds=int_list(args.seeds), shots=shots,
                          source=args.source, backbone=args.backbone, pretrained=args.pretrained,
                          method_config=parse_sets(args.set), train=train,
                          recipe=None if args.recipe == "none" else args.recipe)
    with distributed.session(args.device or "auto"):  # torchrun: one process per GPU; alone: a no-op
        if distributed.is_main_process():
            print(format_recipe(cfg.resolved_recipe()), flush=True)
        run_reproduce(cfg, args.out, progress=not args.no_progress)
        if distributed.is_main_process():
            print((Path(args.out) / "results.md").read_text())
    return 0
