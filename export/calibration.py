"""Calibration images for open-set answers (:mod:`serving.open_set`), written into a bundle by ``export``.

Held-out labelled images of the bundle's classes come from an image folder (the training data layout and class-name
rule: ``<class>/*.jpg`` split per class, or ``test/<class>/*.jpg``; read by :func:`training.data.read_image_folder`)
or as ``(path, class name)`` pairs. They are capped per class (seeded), decoded and preprocessed exactly as the
service does (:func:`serving.preprocess.decode_image` with the service's JPEG draft rule, then
:func:`serving.preprocess.preprocess`) and embedded by the exported ONNX image graph, so a calibration image scores
what the same upload would score.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.classifier import DRAFT_MARGIN
from serving.format import IMAGE_INPUT, class_name_key
from serving.preprocess import PreprocessConfig, decode_image, preprocess
from training.errors import DatasetError, ExportError

log = logging.getLogger(__name__)

#: Default cap of calibration images per class.
DEFAULT_PER_CLASS = 50
#: Default cap of calibration images in all (a 1,000-class export at 50 per class would embed 50,000 images: about
#: 40 minutes of ViT-B/16 on a CPU); the per-class cap is lowered to fit it.
DEFAULT_MAX_IMAGES = 5000
#: Images per image-graph run.
_BATCH = 32

#: What ``export_bundle(calibration=...)`` takes: a folder, ``"auto"`` (the artifact's recorded data root),
#: ``(path, class name)`` pairs, or None (no calibration).
CalibrationSource = str | os.PathLike | Sequence[tuple[str, str]] | None


def samples_from_folder(root: str | os.PathLike) -> list[tuple[str, str]]:
    """``(image path, class name)`` of the held-out split of the image folder ``root``: its ``test/`` split (or
    the per-class test share of a flat ``<class>/`` folder, as training split it), else its ``val/`` split.

    Raises:
        ExportError: the folder is unreadable or has no held-out images.
    """
    from training.data import read_image_folder

    try:
        splits = read_image_folder(root, allow_test_only=True)
    except DatasetError as exc:
        raise ExportError(f"cannot read calibration images from {root}: {exc}") from exc
    held_out = splits.test or splits.val
    if not held_out:
        raise ExportError(f"{root} has no held-out (test or val) images to calibrate on; pass a folder of labelled "
                          "images of the exported classes (<class>/<image> or test/<class>/<image>)")
    return [(s.path, splits.classnames[s.label]) for s in held_out]


def resolve_samples(source: CalibrationSource, recorded_root: str | None) -> tuple[list[tuple[str, str]], str] | None:
    """The calibration samples and where they came from, or None (logged loudly) when there are none.

    ``"auto"`` uses ``recorded_root`` (the data root the artifact was trained on) when it is a folder on disk."""
    if source is None:
        log.warning("no calibration images: the bundle has no open-set calibration, so none_of_these and confidence "
                    "will be null (export with --calibration DIR to add it)")
        return None
    if isinstance(source, str) and source == "auto":
        if not recorded_root or not Path(recorded_root).is_dir():
            log.warning("no --calibration given and the artifact's recorded data root %r is not a folder here: the "
                        "bundle has no open-set calibration, so none_of_these and confidence will be null (pass "
                        "--calibration DIR)", recorded_root)
            return None
        samples = samples_from_folder(recorded_root)
        log.info("calibration: the held-out split of the artifact's data root %s (%d images)", recorded_root,
                 len(samples))
        return samples, str(recorded_root)
    if isinstance(source, (str, os.PathLike)):
        return samples_from_folder(source), str(source)
    pairs = [(str(p), str(c)) for p, c in source]
    return pairs, f"{len(pairs)} given images"


def pick(samples: Sequence[tuple[str, str]], class_names: Sequence[str], *, per_class: int = DEFAULT_PER_CLASS,
         seed: int = 0, max_images: int = DEFAULT_MAX_IMAGES) -> list[tuple[str, int]]:
    """``(path, label)`` of at most ``per_class`` images per exported class (a seeded choice; labels index
    ``class_names``, matched by :func:`serving.format.class_name_key`); images of other classes are left out. With
    many classes the per-class cap is lowered (to at least 1) so that about ``max_images`` are embedded in all."""
    if per_class < 1:
        raise ExportError(f"calibration images per class must be >= 1, got {per_class}")
    if max_images < 1:
        raise ExportError(f"calibration images in all must be >= 1, got {max_images}")
    label_of = {class_name_key(n): i for i, n in enumerate(class_names)}
    by_label: dict[int, list[str]] = {}
    skipped = 0
    for path, name in samples:
        label = label_of.get(class_name_key(name))
        if label is None:
            skipped += 1
            continue
        by_label.setdefault(label, []).append(path)
    if skipped:
        log.info("calibration: %d image(s) of classes not in the bundle left out", skipped)
    if not by_label:
        raise ExportError(f"none of the calibration images belongs to an exported class (exported: "
                          f"{', '.join(list(class_names)[:8])}{'...' if len(class_names) > 8 else ''}); pass "
                          "held-out images of the bundle's classes")
    missing = [class_names[i] for i in range(len(class_names)) if i not in by_label]
    if missing:
        log.warning("calibration: no held-out images of %d exported class(es): %s", len(missing),
                    ", ".join(missing[:8]) + ("..." if len(missing) > 8 else ""))
    if per_class * len(by_label) > max_images:
        lowered = max(1, max_images // len(by_label))
        log.info("calibration: %d classes x %d images would exceed %d images in all; taking %d per class "
                 "(--calibration-max-images)", len(by_label), per_class, max_images, lowered)
        per_class = lowered
    out: list[tuple[str, int]] = []
    for label in sorted(by_label):
        paths = sorted(by_label[label])
        random.Random(f"calibration:{seed}:{label}").shuffle(paths)
        out.extend((p, label) for p in sorted(paths[:per_class]))
    return out


def embed(image_graph: Path, picked: Sequence[tuple[str, int]], cfg: PreprocessConfig, num_sets: int,
          precision: str = "fp32", *, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run the exported image graph on the picked images: ``(image_embeds [S, N, D], weights [N, S] or None,
    labels [N])``."""
    from tqdm.auto import tqdm

    from export.onnx_export import ort_session

    sess = ort_session(image_graph, precision)
    h, w = cfg.image_size
    draft_to = (DRAFT_MARGIN * int(w), DRAFT_MARGIN * int(h))
    feats, weights = [], []
    bar = tqdm(total=len(picked), desc="calibration images", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(picked), _BATCH):
        chunk = picked[start:start + _BATCH]
        images = []
        for path, _ in chunk:
            try:
                images.append(decode_image(Path(path).read_bytes(), draft_to=draft_to))
            except Exception as exc:
                raise ExportError(f"calibration image {path} cannot be read: {exc}") from exc
        outs = sess.run(None, {IMAGE_INPUT: preprocess(images, cfg)})  # [b, D] (+ [b, S])
        feats.append(outs[0])
        if num_sets > 1:
            weights.append(outs[1])
        bar.update(len(chunk))
    bar.close()
    f = np.concatenate(feats).astype(np.float32)  # [N, D], L2-normalised by the graph (as the service gets it)
    image_embeds = np.ascontiguousarray(np.broadcast_to(f, (num_sets, *f.shape)))  # [S, N, D]
    w_all = np.concatenate(weights).astype(np.float32) if num_sets > 1 else None  # [N, S]
    labels = np.array([label for _, label in picked], dtype=np.int64)  # [N]
    return image_embeds, w_all, labels
