"""Parser of ``demo``."""
from __future__ import annotations

import argparse

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.demo"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="offline end-to-end demo: data -> train ivlp -> export -> HTTP serve -> classify")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--backbone", default="toy-clip", help="toy-clip (pretrained offline on the toy world) or tiny-test")
    s.add_argument("--pretrained", default=None)
    s.set_defaults(handler=(HANDLERS, "cmd_demo"))
