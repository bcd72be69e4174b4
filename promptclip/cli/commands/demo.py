"""``demo``: the offline end-to-end demo (:mod:`promptclip.demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from promptclip.demo import run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), port=args.port, steps=args.steps, backbone=args.backbone,
                    pretrained=args.pretrained)
