"""Parser of ``export``."""
from __future__ import annotations

import argparse

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.export"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("export", help="export a prompt artifact to a deploy bundle (ONNX graphs + class embeddings)",
                       description="Writes image_encoder.onnx, text_encoder.onnx, class_embeddings.safetensors and "
                                   "manifest.json; checks each graph (onnx.checker, ORT-vs-torch parity at batch 1 "
                                   "and 3) and fails past tolerance.")
    s.add_argument("--artifact", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--classes", help="comma-separated class names (default: the training classes)")
    s.add_argument("--classes-file", help="a file with one class name per line")
    s.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    s.add_argument("--opset", type=int, default=18)
    s.add_argument("--pretrained", default=None)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(handler=(HANDLERS, "cmd_export"))
