"""Options shared by the parsers of ``train`` and ``reproduce`` (standard library only)."""
from __future__ import annotations

import argparse


def add_training_options(s: argparse.ArgumentParser) -> None:
    """``--set`` and the TrainConfig overrides (each ``None`` unless given, so defaults and recipes stay in force)."""
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config option (repeatable)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--optimizer", choices=["sgd", "adamw"])
    s.add_argument("--momentum", type=float, help="SGD momentum (0: plain SGD)")
    s.add_argument("--weight-decay", type=float)
    s.add_argument("--warmup-epochs", type=int, help="epochs at constant --warmup-lr before the cosine schedule")
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--warmup-lr", type=float)
    s.add_argument("--augment", choices=["crop_flip", "flip", "none"])
    s.add_argument("--crop-scale", metavar="MIN,MAX", help="area range of the random resized crop, e.g. 0.7,1")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    s.add_argument("--num-workers", type=int)
