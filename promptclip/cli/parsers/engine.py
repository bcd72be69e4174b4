"""Parser of ``engine build`` (TensorRT engines of a bundle, built on the device that will run them)."""
from __future__ import annotations

import argparse

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.engine"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("engine", help="TensorRT engines of a bundle (build them on the target device)")
    esub = e.add_subparsers(dest="engine_command", required=True)
    s = esub.add_parser("build", help="build TensorRT engines of the image graph and each text graph for this GPU",
                        description="Builds on this host (engines are not portable across GPUs or TensorRT "
                                    "versions), stores them in the bundle under engines/ keyed by TensorRT version, "
                                    "GPU and graph hash, and records them in manifest.json. Needs TensorRT >= 10 "
                                    "and cuda-python ('promptclip[trt]'; on Jetson: JetPack's TensorRT).")
    s.add_argument("--bundle", required=True)
    s.add_argument("--max-batch", type=int, default=64, help="largest batch of the dynamic profile (default 64)")
    s.add_argument("--opt-batch", type=int, default=None,
                   help="batch TensorRT tunes kernels for (default: --max-batch; 1 for latency)")
    s.add_argument("--precision", default="fp16", choices=["fp16", "fp32"],
                   help="fp16 (default): builder flag on TensorRT 10; TensorRT 11 needs a bundle exported with "
                        "--precision fp16 (strongly typed)")
    s.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit (GiB)")
    s.set_defaults(handler=(HANDLERS, "cmd_engine_build"))
