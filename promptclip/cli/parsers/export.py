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
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="graph precision: fp16 halves the size (float32 inputs/outputs, LayerNorm, softmax and the "
                        "final normalisation kept in float32; for GPUs), int8 is dynamic quantisation (CPU only, "
                        "opt-in); parity against torch is measured and bounded per precision")
    s.add_argument("--optimize", action="store_true",
                   help="run onnxruntime's transformer optimiser (constant folding, fusions) on each graph; the "
                        "optimised graph uses onnxruntime-only operators, so TensorRT engines need a plain export")
    s.add_argument("--calibration", default="auto", metavar="DIR",
                   help="held-out labelled images of the exported classes for open-set answers (none_of_these): an "
                        "image folder (<class>/<image> or test/<class>/<image>; its held-out split is used). Default "
                        "'auto': the held-out split of the data root the artifact was trained on, when it is on "
                        "disk; 'none': no calibration (open-set answers are null)")
    s.add_argument("--keep-rate", type=float, default=0.95,
                   help="the bundle's default share of images of listed classes kept by the open-set threshold "
                        "(0 < r <= 1; requests and PROMPTCLIP_KEEP_RATE may override it)")
    s.add_argument("--open-set-rule", default="max_cosine", choices=["max_cosine", "msp"],
                   help="the bundle's default open-set score: best class's cosine or its softmax probability")
    s.add_argument("--calibration-per-class", type=int, default=50,
                   help="at most this many calibration images per class (a seeded choice)")
    s.add_argument("--calibration-max-images", type=int, default=5000,
                   help="at most about this many calibration images in all: with many classes the per-class cap is "
                        "lowered to fit (to at least 1 per class)")
    s.set_defaults(handler=(HANDLERS, "cmd_export"))
