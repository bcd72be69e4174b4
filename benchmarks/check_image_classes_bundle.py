"""Classes from example images through the real path: an exported, calibrated bundle and the service's own code.

``bench_image_classes.py`` sweeps shots, blends and names with the row rule applied in the benchmark; this check
runs the path a user takes: toy-clip exported zero-shot on 12 ``clean`` toy classes with ``calibration="auto"``
(their held-out images), then per seed 6 other classes added to a fresh state dir through
:meth:`serving.classifier.Classifier.add_image_class` (4 example images each; the modality shift from
``bundle.calibration``, and without it) or :meth:`~serving.classifier.Classifier.add_classes` (by name), and their
20 test images per class classified (``classify_bytes_detailed``: top-1 and ``none_of_these`` at the bundle's
keep rate). Images are drawn by ``training.toyworld.world.write_style_dataset`` in ``--style``.

Run: ``python benchmarks/check_image_classes_bundle.py --style clean --seeds 0,1,2,3,4`` (about a minute per style
on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.bundle import export_bundle  # noqa: E402
from serving.classifier import Classifier  # noqa: E402
from training.engine import TrainConfig  # noqa: E402
from training.methods import method_config_for_backbone  # noqa: E402
from training.toyworld import world  # noqa: E402
from training.workflow import train_run  # noqa: E402

NUM_KNOWN, NUM_ADDED, SHOTS, TEST_PER_CLASS = 12, 6, 4, 20


def _bundle(tmp: Path, style: str) -> tuple[Path, list[tuple[str, str]]]:
    known = world.style_classes("clean", num_classes=NUM_KNOWN, seed=0)
    world.write_style_dataset(tmp / "known", style, classes=known, train_per_class=1, test_per_class=8, seed=0)
    cfg = TrainConfig(epochs=1, max_steps=1, batch_size=4, precision="fp32", device="cpu", seed=0)
    run = train_run(method_name="zeroshot", data_root=tmp / "known", out_dir=tmp / "run", backbone_name="toy-clip",
                    method_config=method_config_for_backbone("zeroshot", "toy-clip"), train_config=cfg, shots=1,
                    subsample="all", evaluate_splits=False, progress=False)
    return export_bundle(run.artifact, tmp / "bundle", exporter="torchscript", calibration="auto",
                         progress=False), known


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--style", default="clean", choices=list(world.STYLES))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bundle, known = _bundle(tmp, args.style)
        for seed in seeds:
            rng = np.random.default_rng(1000 + seed)
            pool = [c for c in world.ALL_CLASSES if c not in set(known)]
            added = [pool[int(i)] for i in rng.choice(len(pool), NUM_ADDED, replace=False)]
            add = world.write_style_dataset(tmp / f"added{seed}", args.style, classes=added, train_per_class=SHOTS,
                                            test_per_class=TEST_PER_CLASS, seed=100 + seed)
            blobs = [open(s.path, "rb").read() for s in add.test]
            for how in ("4 images, shift", "4 images, no shift", "name"):
                clf = Classifier.from_bundle(bundle, state_dir=tmp / f"state-{seed}-{how.replace(' ', '')}")
                for label, name in enumerate(add.classnames):
                    if how == "name":
                        clf.add_classes([name])
                    else:
                        examples = [open(s.path, "rb").read() for s in add.train if s.label == label]
                        clf.add_image_class(name, examples, modality_shift=how.endswith(", shift"))
                r = clf.classify_bytes_detailed(blobs, top_k=1)
                hits = [p[0]["name"] == add.classnames[s.label] for p, s in zip(r.predictions, add.test)]
                res.setdefault(f"{how}: top-1 on the added classes", []).append(float(np.mean(hits)))
                res.setdefault(f"{how}: none_of_these on their images", []).append(
                    float(np.mean([bool(u) for u in r.none_of_these])))
    print(f"style {args.style}, seeds {seeds}: {NUM_KNOWN} exported classes + {NUM_ADDED} added, "
          f"{TEST_PER_CLASS} test images each (mean +- std over seeds, %)")
    for key, vals in res.items():
        print(f"  {key:48s} {100 * np.mean(vals):5.1f} +- {100 * np.std(vals):4.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
