"""Classes from a few example images against classes from their names, on the toy world (issue 17).

Setup: toy-clip (the pretrained toy CLIP shipped with the repo) exported zero-shot as a bundle whose class list is 12
toy-world classes. Per seed, 6 other classes are added at runtime, in a list mixed with the bundle's 12 text classes
(so the modality gap matters); example, calibration and test images are of one style (``clean``: as in toy-clip's
pretraining; ``sketch``: outlines only, a domain toy-clip never saw):

* by name alone: (c) their ordinary names ("green crescent"), (d) out-of-vocabulary names (random letter strings
  toy-clip's text encoder cannot place: the name carries no information);
* from k = 1, 2, 4, 8 example images: images only (``text_weight`` 0) with and without the modality shift, and
  blended with the name (``text_weight`` 0.25, 0.5; with the shift), ordinary and OOV names.

Every row is built by the service's own code: :meth:`serving.classifier.Classifier.embed_images` (the bundle's
image graph after ``/classify``'s preprocessing), :meth:`~serving.classifier.Classifier.encode_text` and
:func:`serving.image_classes.image_class_row`. The modality shift's ``mean_image`` is the mean embedding of 8 held-out
images per bundle class (what the export's calibration images give a bundle), ``mean_text`` the mean of the bundle's
class text embeddings. Reported: top-1 accuracy on 20 held-out test images per added class (ranked against the whole
list of 18) and on the test images of all 18 classes, mean +- std over seeds.

Run: ``python benchmarks/bench_image_classes.py --out bench_image_classes`` (``make bench-image-classes``); writes
``results.json``, ``results.md`` and ``accuracy_vs_images_<style>.png``. About 35 s on 2 CPU cores (33 s measured,
export included).
"""
from __future__ import annotations

import argparse
import json
import logging
import string
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.classifier import Classifier  # noqa: E402
from serving.image_classes import image_class_row  # noqa: E402

log = logging.getLogger("bench_image_classes")

STYLE = "clean"  # the bundle's classes are drawn from this style's; the test images may be of any style
NUM_BUNDLE, NUM_ADDED = 12, 6
TEST_PER_CLASS, MAX_SHOTS, CALIB_PER_CLASS = 20, 8, 8
SHOTS = (1, 2, 4, 8)
BLEND_WEIGHTS = (0.25, 0.5)


def _export_bundle(out: Path, bundle_classes: list[tuple[str, str]]) -> Path:
    """toy-clip zero-shot with ``bundle_classes`` as its class list (torchscript export: fast)."""
    from export.bundle import export_bundle
    from training.engine import TrainConfig
    from training.toyworld import world
    from training.workflow import train_run

    bundle = out / "bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    splits = world.write_style_dataset(out / "data", STYLE, classes=bundle_classes, train_per_class=1,
                                       test_per_class=0, seed=0)
    cfg = TrainConfig(epochs=1, max_steps=0, batch_size=8, precision="fp32", device="cpu", seed=0)
    res = train_run(method_name="zeroshot", data_root=splits, out_dir=out / "run", backbone_name="toy-clip",
                    train_config=cfg, shots=1, subsample="all", evaluate_splits=False, overwrite=True,
                    progress=False)
    return export_bundle(res.artifact, bundle, class_names=[world.class_name(*c) for c in bundle_classes],
                         exporter="torchscript", overwrite=True)


def _render(classes: list[tuple[str, str]], per_class: int, seed: int, style: str) -> tuple[list, np.ndarray]:
    from training.toyworld import world

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, (color, shape) in enumerate(classes):
        for _ in range(per_class):
            images.append(world.render(world.sample_scene(rng, color, shape, style=style), style=style, size=32,
                                       rng=rng))
            labels.append(label)
    return images, np.asarray(labels)


def _oov_names(rng: np.random.Generator, n: int) -> list[str]:
    """Made-up words (8 random lowercase letters): nothing toy-clip's text encoder was trained on."""
    letters = np.array(list(string.ascii_lowercase))
    return ["".join(rng.choice(letters, 8)) for _ in range(n)]


def _accuracy(test_embeds: np.ndarray, test_labels: np.ndarray, matrix: np.ndarray, added_from: int) -> tuple[float,
                                                                                                            float]:
    """(accuracy on the added classes' test images, accuracy on all test images); ``matrix [C, D]``."""
    pred = np.argmax(test_embeds @ matrix.T, axis=1)  # [N]
    correct = pred == test_labels
    return float(correct[test_labels >= added_from].mean()), float(correct.mean())


def run_seed(clf: Classifier, bundle_classes: list[tuple[str, str]], seed: int, style: str) -> list[dict]:
    from training.toyworld import world

    rng = np.random.default_rng(1000 + seed)
    pool = [c for c in world.ALL_CLASSES if c not in set(bundle_classes)]
    added = [pool[int(i)] for i in rng.choice(len(pool), NUM_ADDED, replace=False)]
    all_classes = list(bundle_classes) + added
    test_images, test_labels = _render(all_classes, TEST_PER_CLASS, seed=10_000 + seed, style=style)
    test_embeds = clf.embed_images(test_images)  # [N, D]
    shot_images, _ = _render(added, MAX_SHOTS, seed=20_000 + seed, style=style)
    shots = clf.embed_images(shot_images).reshape(NUM_ADDED, MAX_SHOTS, -1)  # [A, 8, D]
    calib_images, _ = _render(list(bundle_classes), CALIB_PER_CLASS, seed=30_000 + seed, style=style)
    mean_image = clf.embed_images(calib_images).astype(np.float64).mean(axis=0)  # [D]
    bundle_rows = clf._bundle_embeddings[0]  # [C, D]: the bundle's class text embeddings
    shift = (bundle_rows.astype(np.float64).mean(axis=0) - mean_image)[None]  # [1, D]
    names = {"ordinary": [world.class_name(*c) for c in added], "oov": _oov_names(rng, NUM_ADDED)}
    text = {kind: clf.encode_text(n, prompt_set=0) for kind, n in names.items()}  # [A, D] each

    rows: list[dict] = []

    def record(method: str, kind: str, k: int, added_rows: np.ndarray, **extra: object) -> None:
        matrix = np.concatenate([bundle_rows, added_rows])  # [C + A, D]
        acc_added, acc_all = _accuracy(test_embeds, test_labels, matrix, NUM_BUNDLE)
        rows.append({"style": style, "seed": seed, "method": method, "names": kind, "shots": k, "acc_added": acc_added,
                     "acc_all": acc_all, **extra})

    for kind in names:
        record("name", kind, 0, text[kind])
        for k in SHOTS:
            for shift_on in (False, True):
                r = np.stack([image_class_row(shots[a, :k], num_sets=1, shift=shift if shift_on else None)[0]
                              for a in range(NUM_ADDED)])
                record("images+shift" if shift_on else "images", kind, k, r)
            for w in BLEND_WEIGHTS:
                for shift_on in (True, False):
                    r = np.stack([image_class_row(shots[a, :k], num_sets=1, text_embeds=text[kind][a:a + 1],
                                                  text_weight=w, shift=shift if shift_on else None)[0]
                                  for a in range(NUM_ADDED)])
                    record(f"blend w={w}" + ("+shift" if shift_on else ""), kind, k, r)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["style"], r["method"], r["names"], r["shots"]), []).append(r)
    out = []
    for (style, method, kind, k), rs in groups.items():
        a = np.array([r["acc_added"] for r in rs])
        b = np.array([r["acc_all"] for r in rs])
        out.append({"style": style, "method": method, "names": kind, "shots": k, "seeds": len(rs),
                    "acc_added": float(a.mean()), "acc_added_std": float(a.std()),
                    "acc_all": float(b.mean()), "acc_all_std": float(b.std())})
    return out


def markdown(summary: list[dict], seeds: list[int], style: str) -> str:
    methods = ["images", "images+shift"] + [f"blend w={w}+shift" for w in BLEND_WEIGHTS] \
        + [f"blend w={w}" for w in BLEND_WEIGHTS]
    by = {(s["method"], s["names"], s["shots"]): s for s in summary if s["style"] == style}
    lines = [f"Style `{style}`: top-1 accuracy (%) on the added classes' test images (mean +- std over seeds "
             f"{seeds}) / on all {NUM_BUNDLE + NUM_ADDED} classes' test images (mean).", "",
             "| names | method | " + " | ".join(f"{k} image{'s' if k > 1 else ''}" for k in SHOTS) + " |",
             "|---|---|" + "---|" * len(SHOTS)]

    def cell(s: dict) -> str:
        return (f"{100 * s['acc_added']:.1f} +- {100 * s['acc_added_std']:.1f} / "
                f"{100 * s['acc_all']:.1f}")

    for kind in ("ordinary", "oov"):
        s = by[("name", kind, 0)]
        lines.append(f"| {kind} | name alone | " + " | ".join([cell(s)] * 1 + ["(same)"] * (len(SHOTS) - 1)) + " |")
        for m in methods:
            lines.append(f"| {kind} | {m} | " + " | ".join(cell(by[(m, kind, k)]) for k in SHOTS) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, style: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(s["method"], s["names"], s["shots"]): s for s in summary if s["style"] == style}
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    lines = {"images+shift": ("C0", "images only (shift)"), "images": ("C2", "images only (no shift)"),
             "blend w=0.25+shift": ("C1", "blend w=0.25 (shift)")}
    for row, metric in enumerate(("acc_added", "acc_all")):
        for col, kind in enumerate(("ordinary", "oov")):
            ax = axes[row, col]
            for method, (color, label) in lines.items():
                ax.plot(SHOTS, [100 * by[(method, kind, k)][metric] for k in SHOTS], "o-", color=color, label=label)
            ax.axhline(100 * by[("name", kind, 0)][metric], color="k", ls="--", label="name alone")
            ax.set_xscale("log", base=2)
            ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{style}: " + ("ordinary names" if kind == "ordinary" else "out-of-vocabulary names"))
            else:
                ax.set_xlabel("example images per added class")
        axes[row, 0].set_ylabel("accuracy (%), " + ("added classes" if metric == "acc_added"
                                                    else f"all {NUM_BUNDLE + NUM_ADDED} classes"))
    axes[0, 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_image_classes")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--styles", default="clean,sketch", help="toy-world styles of the test and example images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from training.toyworld import world

    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    bundle_classes = world.style_classes(STYLE, num_classes=NUM_BUNDLE, seed=0)
    bundle = _export_bundle(out, bundle_classes)
    clf = Classifier.from_bundle(bundle, warmup=False)
    styles = args.styles.split(",")
    rows = [r for style in styles for seed in seeds for r in run_seed(clf, bundle_classes, seed, style)]
    summary = summarise(rows)
    table = "\n".join(markdown(summary, seeds, style) for style in styles)
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    (out / "results.md").write_text(table)
    for style in styles:
        plot(summary, out / f"accuracy_vs_images_{style}.png", style)
    print(table)
    print(f"wrote {out}/results.md, results.json, accuracy_vs_images_<style>.png in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
