"""Open-set answers on the toy world: does "none of these" catch images of classes left out of the list?

Per seed: 16 classes of one toy-world style, a seeded K of them known and the rest left out of the list. Train ``ivlp``
(and take ``zeroshot``) on the known classes with the toy-clip backbone, export each with calibration from held-out
images of the known classes (``export_bundle(calibration=...)``, the path ``promptclip export --calibration``
takes), then score through the exported bundle with the serving :class:`~serving.classifier.Classifier` (ONNX, not
torch) other test images of the known classes (positives) and test images of the left-out classes (negatives, same
style). Per method and rule (``max_cosine``, ``msp``):

* AUROC of known vs left-out by the rule's best-class score;
* FAR: share of left-out images accepted (``none_of_these`` false) at the calibrated keep rate (0.95);
* kept: share of known test images accepted (should be near 0.95: a check of the calibration);
* grey: whether a uniform grey image is answered ``none_of_these``.

    python benchmarks/bench_open_set.py --out bench_out/open_set [--seeds 0,1,2] [--steps 60]

Prints a markdown table (mean ± std over seeds) and writes ``results.json`` (every seed) into ``--out``.
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
os.environ.setdefault("TQDM_DISABLE", "1")

RULES = ("max_cosine", "msp")


def auroc(pos: list[float], neg: list[float]) -> float:
    """Area under the ROC curve of ``pos`` (known) above ``neg`` (left out): the Mann-Whitney statistic, ties 1/2."""
    import numpy as np

    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run_seed(seed: int, out: Path, *, style: str, known: int, total: int, steps: int, cal_per_class: int,
             test_per_class: int, keep_rate: float, methods: list[str]) -> list[dict]:
    """All methods and rules for one seed; one row per (method, rule)."""
    import numpy as np
    from PIL import Image

    from export.bundle import export_bundle
    from serving.classifier import Classifier
    from training.engine import TrainConfig
    from training.methods import method_config_for_backbone
    from training.toyworld import world
    from training.workflow import train_run

    rng = np.random.default_rng(seed)
    classes = world.style_classes(style, num_classes=total, seed=seed)
    order = rng.permutation(len(classes))
    known_pairs = sorted((classes[int(i)] for i in order[:known]), key=lambda p: world.class_name(*p))
    unknown_pairs = sorted((classes[int(i)] for i in order[known:]), key=lambda p: world.class_name(*p))
    per_class = cal_per_class + test_per_class
    known_splits = world.write_style_dataset(out / f"data-{seed}" / "known", style, classes=known_pairs,
                                             train_per_class=16, test_per_class=per_class, seed=seed)
    unknown_splits = world.write_style_dataset(out / f"data-{seed}" / "unknown", style, classes=unknown_pairs,
                                               train_per_class=1, test_per_class=test_per_class, seed=seed)
    by_class: dict[int, list[str]] = {}
    for s in known_splits.test:
        by_class.setdefault(s.label, []).append(s.path)
    calibration = [(p, known_splits.classnames[c]) for c, paths in by_class.items() for p in paths[:cal_per_class]]
    known_test = [p for paths in by_class.values() for p in paths[cal_per_class:]]
    known_labels = [label for label, paths in by_class.items() for _ in paths[cal_per_class:]]
    unknown_test = [s.path for s in unknown_splits.test]
    blobs_known = [Path(p).read_bytes() for p in known_test]
    blobs_unknown = [Path(p).read_bytes() for p in unknown_test]
    grey = _png(Image.new("RGB", (32, 32), (128, 128, 128)))

    rows = []
    for method in methods:
        t0 = time.monotonic()
        # the toy bench's recipe (training.protocols.toybench.BenchConfig), fewer steps
        cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=32, lr=0.005, optimizer="sgd", augment="flip",
                          precision="fp32", device="cpu", seed=seed, log_every=1000)
        run = train_run(method_name=method, data_root=out / f"data-{seed}" / "known",
                        out_dir=out / f"run-{seed}-{method}",
                        backbone_name="toy-clip", method_config=method_config_for_backbone(method, "toy-clip"),
                        train_config=cfg, shots=16, subsample="all", evaluate_splits=False, overwrite=True,
                        progress=False)
        bundle = export_bundle(run.artifact, out / f"bundle-{seed}-{method}", exporter="torchscript", overwrite=True,
                               calibration=calibration, keep_rate=keep_rate, progress=False)
        clf = Classifier.from_bundle(bundle)
        scale = clf.bundle.logit_scale
        for rule in RULES:
            kw = dict(top_k=1, keep_rate=keep_rate, open_set_rule=rule)
            rk = clf.classify_bytes_detailed(blobs_known, **kw)
            ru = clf.classify_bytes_detailed(blobs_unknown, **kw)
            rg = clf.classify_bytes_detailed([grey], **kw)

            def best(r, rule=rule, scale=scale):
                return [p[0]["score"] if rule == "msp" else p[0]["logit"] / scale for p in r.predictions]

            acc = float(np.mean([p[0]["name"] == known_splits.classnames[lab]
                                 for p, lab in zip(rk.predictions, known_labels)]))
            rows.append({
                "seed": seed, "method": method, "rule": rule, "known": known, "left_out": total - known,
                "auroc": auroc(best(rk), best(ru)),
                "far": float(np.mean([not u for u in ru.none_of_these])),
                "kept": float(np.mean([not u for u in rk.none_of_these])),
                "grey_none": bool(rg.none_of_these[0]),
                "closed_set_accuracy": acc,
                "threshold": rk.open_set["threshold"], "basis": rk.open_set["basis"],
                "calibration_images": rk.open_set["num_images"],
                "known_test_images": len(blobs_known), "left_out_test_images": len(blobs_unknown),
                "seconds": round(time.monotonic() - t0, 1),
            })
            print(f"seed {seed} {method:9s} {rule:10s} AUROC {rows[-1]['auroc']:.3f} FAR {rows[-1]['far']:.3f} "
                  f"kept {rows[-1]['kept']:.3f} grey->none {rows[-1]['grey_none']} acc {acc:.3f}", flush=True)
        clf.close()
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table, mean ± std over seeds per (method, rule)."""
    def ms(values: list[float]) -> str:
        m = statistics.mean(values)
        return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"

    keys = sorted({(r["method"], r["rule"]) for r in rows}, key=lambda k: (k[0] != "zeroshot", k))
    lines = ["| method | rule | AUROC (known vs left out) | FAR at 95% kept | kept (known test) | grey -> none | "
             "closed-set acc |", "|---|---|---|---|---|---|---|"]
    for method, rule in keys:
        sel = [r for r in rows if r["method"] == method and r["rule"] == rule]
        lines.append(f"| {method} | {rule} | {ms([r['auroc'] for r in sel])} | {ms([r['far'] for r in sel])} | "
                     f"{ms([r['kept'] for r in sel])} | {sum(r['grey_none'] for r in sel)}/{len(sel)} | "
                     f"{ms([r['closed_set_accuracy'] for r in sel])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/open_set")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--style", default="clean")
    p.add_argument("--classes", type=int, default=16, help="classes drawn per seed (known + left out)")
    p.add_argument("--known", type=int, default=10, help="classes on the list (the rest are left out)")
    p.add_argument("--steps", type=int, default=60, help="ivlp training steps")
    p.add_argument("--calibration-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--keep-rate", type=float, default=0.95)
    p.add_argument("--methods", default="zeroshot,ivlp")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rows: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows += run_seed(seed, out, style=args.style, known=args.known, total=args.classes, steps=args.steps,
                         cal_per_class=args.calibration_per_class, test_per_class=args.test_per_class,
                         keep_rate=args.keep_rate, methods=args.methods.split(","))
    text = table(rows)
    print(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                  "seconds": round(time.monotonic() - t0, 1)}, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
