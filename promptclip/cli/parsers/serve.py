"""Parsers of ``serve`` and ``classify`` (their handlers are torch-free too)."""
from __future__ import annotations

import argparse
import os

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.serve"


def _runtime_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--runtime", default=None, choices=["auto", "ort", "tensorrt"],
                   help="inference runtime: auto (a TensorRT engine of the bundle that matches this host, else "
                        "onnxruntime; logs its choice), ort, tensorrt (default: $PROMPTCLIP_RUNTIME or auto)")
    s.add_argument("--providers", default=None,
                   help="onnxruntime execution providers in order, e.g. cuda, cpu or cuda,cpu (with --runtime ort or "
                        "auto); a requested GPU provider that does not start is an error (default: "
                        "$PROMPTCLIP_PROVIDERS, else CUDA when available, then CPU)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a bundle over HTTP with BentoML (no torch needed)")
    s.add_argument("--bundle", required=True)
    s.add_argument("--state-dir", help="where runtime class additions are persisted")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--workers", type=int, help="number of API worker processes (several need --state-dir)")
    s.add_argument("--start-empty", action="store_true",
                   help="start again from the bundle's classes when the state dir's class file is missing "
                        "(refused otherwise: the classes added at runtime would be lost)")
    s.add_argument("--token", default=os.environ.get("PROMPTCLIP_API_TOKEN"),
                   help="bearer token required by /add_classes and /remove_classes (default: $PROMPTCLIP_API_TOKEN; "
                        "without one they are refused unless --open-writes)")
    s.add_argument("--open-writes", action="store_true",
                   help="without a token, let EVERY client that reaches the server add and remove classes")
    s.add_argument("--bundle-digest", default=os.environ.get("PROMPTCLIP_BUNDLE_DIGEST"),
                   help="refuse to serve unless the bundle's digest (printed by `promptclip export`) is this one "
                        "(default: $PROMPTCLIP_BUNDLE_DIGEST)")
    _runtime_options(s)
    s.set_defaults(handler=(HANDLERS, "cmd_serve"))

    s = sub.add_parser("classify", help="classify local images with a bundle (no server, no torch)")
    s.add_argument("--bundle", required=True)
    s.add_argument("images", nargs="+")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--classes", help="ad-hoc class list for this call: comma-separated, or a JSON list")
    s.add_argument("--classes-file")
    s.add_argument("--state-dir")
    s.add_argument("--bundle-digest", default=os.environ.get("PROMPTCLIP_BUNDLE_DIGEST"),
                   help="refuse a bundle whose digest is not this one (default: $PROMPTCLIP_BUNDLE_DIGEST)")
    s.add_argument("--keep-rate", type=float, default=None,
                   help="open-set answers: share of images of listed classes kept, 0 < r <= 1 (default: the bundle's)")
    s.add_argument("--open-set-rule", default=None, choices=["max_cosine", "msp"],
                   help="open-set score (default: the bundle's)")
    _runtime_options(s)
    s.set_defaults(handler=(HANDLERS, "cmd_classify"))
