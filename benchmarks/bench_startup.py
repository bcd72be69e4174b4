"""Start-up time of a serving worker with many runtime classes: stored embeddings vs re-encoding (issue 16).

Builds (once) a random-init IVLP bundle of ``--backbone``, registers ``--classes`` runtime classes in a state dir
(through ``Classifier.add_classes``, which stores their embeddings next to the class list), then measures:

* in-process: ``Classifier.from_bundle(..., state_dir)`` with warm-up (what a worker does before it is ready), with
  the stored embeddings (median of ``--runs``) and once without them (the file removed: every class re-encoded, the
  behaviour before issue 16; it writes the file again);
* a real server: seconds from starting ``promptclip serve`` until ``GET /readyz`` answers 200, with the stored
  embeddings (``--server``; start-up of BentoML itself included).

Run it alone on the machine (2 cores shared give meaningless times):

    python benchmarks/bench_startup.py --backbone ViT-B-16 --classes 10000 --server --out bench_out
    python benchmarks/bench_startup.py --backbone tiny-test --classes 300 --runs 2      # a seconds-long check
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_bundle(out: Path, backbone: str) -> Path:
    """A random-init IVLP bundle of ``backbone`` under ``out`` (reused when present)."""
    bundle = out / f"bundle-{backbone}"
    if (bundle / "manifest.json").exists():
        return bundle
    from export.bundle import export_bundle
    from training.artifact import save_prompt_artifact
    from training.backbone import create_backbone
    from training.methods import create_method, method_config_for_backbone

    bb = create_backbone(backbone, "none")
    method = create_method("ivlp", bb, method_config_for_backbone("ivlp", backbone))
    classes = [f"class number {i}" for i in range(100)]
    art = save_prompt_artifact(out / f"artifact-{backbone}", method, bb, overwrite=True,
                               trained_on={"classnames": classes})
    export_bundle(art, bundle)
    return bundle


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--bundle", help="an existing bundle instead of building one")
    p.add_argument("--classes", type=int, default=10000, help="runtime classes to register")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server", action="store_true", help="also time a real `promptclip serve` until ready")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from serving.classifier import Classifier
    from serving.embedding_store import EMBEDDINGS_FILE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else build_bundle(out, args.backbone)
    state = out / f"state-{args.classes}"
    limits = {"max_classes": args.classes + 10_000, "max_add_names": args.classes}
    if state.exists():
        shutil.rmtree(state)
    clf = Classifier.from_bundle(bundle, state_dir=state, warmup=False, **limits)
    names = [f"runtime class {i}" for i in range(args.classes)]
    t = time.perf_counter()
    for start in range(0, len(names), 1000):
        clf.add_classes(names[start:start + 1000])
    encode_s = time.perf_counter() - t
    print(f"registered {args.classes} runtime classes in {encode_s:.1f}s (encoding included)")

    def start_worker() -> float:
        t = time.perf_counter()
        Classifier.from_bundle(bundle, state_dir=state, **limits)
        return time.perf_counter() - t

    stored = [start_worker() for _ in range(args.runs)]
    (state / EMBEDDINGS_FILE).unlink()
    reencode = start_worker()  # writes the file again
    results = {"backbone": args.backbone, "bundle": str(bundle), "runtime_classes": args.classes,
               "register_s": encode_s, "worker_start_stored_s": statistics.median(stored),
               "worker_start_stored_runs_s": stored, "worker_start_reencode_s": reencode}
    print(f"worker start-up with stored embeddings: {statistics.median(stored):.2f}s (median of {args.runs}); "
          f"re-encoding every class: {reencode:.2f}s")

    if args.server:
        from promptclip.server import free_port, wait_ready

        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PROMPTCLIP_MAX_CLASSES": str(limits["max_classes"])}
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "promptclip", "serve", "--bundle", str(bundle), "--state-dir",
                                 str(state), "--port", str(port), "--token", "bench"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, timeout=3600)
            results["server_ready_s"] = time.perf_counter() - t
            print(f"promptclip serve ready after {results['server_ready_s']:.1f}s")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    (out / "bench_startup.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
