"""What several prompt sets cost at serving time: a GuiDG bundle (S experts) next to an IVLP bundle, same backbone.

One process, interleaved runs, median ms (read the ratios; absolute times on a shared 2-core machine are noisy):
* ``classify`` of one image (decode + preprocess + image graph + ranking) against the bundle's classes: GuiDG's
  image graph adds the expert-weighting head and ranking combines S class tables;
* adding one class at runtime: one text-graph pass for IVLP, S passes (one per expert) for GuiDG.

Both bundles are built from random-init weights (the cost does not depend on the values).

    python benchmarks/bench_multiset.py --out bench_out [--backbone ViT-B-16] [--experts 3] [--classes 100]
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from export.bundle import export_bundle
    from serving.classifier import Classifier
    from training.artifact import save_prompt_artifact
    from training.backbone import create_backbone
    from training.methods import create_method

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = [f"class number {i}" for i in range(args.classes)]
    domains = [f"domain{i}" for i in range(args.experts)]
    backbone = create_backbone(args.backbone, "none")
    bundles = {}
    for label, method in (("ivlp", create_method("ivlp", backbone)),
                          ("guidg", create_method("guidg", backbone, {"domains": domains,
                                                                      "num_classes": args.classes}))):
        art = save_prompt_artifact(out / f"artifact-{label}", method, backbone, trained_on={"classnames": classes},
                                   overwrite=True)
        t = time.perf_counter()
        bundles[label] = export_bundle(art, out / f"bundle-{label}", exporter="torchscript", overwrite=True)
        print(f"{label}: exported in {time.perf_counter() - t:.1f} s")
    clfs = {k: Classifier.from_bundle(v) for k, v in bundles.items()}
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG")
    blob = buf.getvalue()
    times: dict[str, dict[str, list[float]]] = {k: {"classify": [], "add_class": []} for k in clfs}
    for i in tqdm(range(args.runs), desc="interleaved runs"):
        for k, clf in clfs.items():
            t = time.perf_counter()
            clf.classify_bytes([blob], top_k=5)
            times[k]["classify"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            clf.add_classes([f"runtime class {i}"])
            times[k]["add_class"].append((time.perf_counter() - t) * 1000)
    result = {k: {m: round(statistics.median(v), 2) for m, v in d.items()} for k, d in times.items()}
    result["ratio_guidg_over_ivlp"] = {m: round(result["guidg"][m] / result["ivlp"][m], 2)
                                       for m in ("classify", "add_class")}
    result["config"] = {"backbone": args.backbone, "experts": args.experts, "classes": args.classes, "runs": args.runs}
    print(json.dumps(result, indent=2))
    (out / "bench_multiset.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
