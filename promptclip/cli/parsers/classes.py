"""Parser of ``classes add|list|remove``: change a state directory's class list directly (a running server over
the same state directory sees the change at its next request)."""
from __future__ import annotations

import argparse

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.classes"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the deploy bundle the state directory serves")
    p.add_argument("--state-dir", required=True, help="the server's state directory (PROMPTCLIP_STATE_DIR)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("classes", help="add, list or remove the classes of a state directory (by name or from "
                                       "example images)")
    csub = c.add_subparsers(dest="classes_command", required=True)
    a = csub.add_parser("add", help="add classes by name (--names) or one class from example images (--name, "
                                    "--images)",
                        description="Works on the state directory under its file lock, as the server's workers do; "
                                    "a server running over it picks the change up at its next request.")
    _common(a)
    a.add_argument("--names", nargs="+", metavar="NAME", help="class names to add (each encoded from its name)")
    a.add_argument("--name", help="the class to build from --images")
    a.add_argument("--images", nargs="+", metavar="FILE", help="example image files of --name (1..N)")
    a.add_argument("--text-weight", type=float, default=None,
                   help="blend weight of the name's text embedding, 0 (images only, default) .. 1 (name only)")
    a.add_argument("--no-modality-shift", action="store_true",
                   help="do not shift the images' prototype into the text cone (default: shift when the bundle "
                        "has calibration images)")
    a.add_argument("--max-images", type=int, default=32, help="most example images per class (default 32)")
    a.set_defaults(handler=(HANDLERS, "cmd_classes_add"))
    ls = csub.add_parser("list", help="the class list with each class's provenance (JSON)")
    _common(ls)
    ls.set_defaults(handler=(HANDLERS, "cmd_classes_list"))
    r = csub.add_parser("remove", help="remove classes (their stored example images go with them)")
    _common(r)
    r.add_argument("--name", help="one class to remove")
    r.add_argument("--names", nargs="+", metavar="NAME", help="classes to remove")
    r.set_defaults(handler=(HANDLERS, "cmd_classes_remove"))
