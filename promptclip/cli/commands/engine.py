"""``engine build``: TensorRT engines for this host (torch-free; runs on the edge device)."""
from __future__ import annotations

import argparse
import json

from serving.bundle import load_bundle
from serving.tensorrt_engines import build_engines


def cmd_engine_build(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    built = build_engines(bundle, max_batch=args.max_batch, opt_batch=args.opt_batch, precision=args.precision,
                          workspace_bytes=int(args.workspace_gib * (1 << 30)), progress=print)
    print(json.dumps([{"key": e.key, "file": e.file, "profile": e.profile, "precision": e.precision}
                      for e in built], indent=2))
    print(f"serve with: promptclip serve --bundle {bundle.root} --runtime tensorrt")
    return 0
