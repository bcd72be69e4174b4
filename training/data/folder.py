"""Read an ImageFolder-style directory into :class:`DatasetSplits`.

Two layouts are accepted::

    root/train/<class>/<image>        root/<class>/<image>
    root/val/<class>/<image>   (opt)  (split per class into train/val/test
    root/test/<class>/<image>  (opt)   by val_fraction / test_fraction)
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Sequence

from training.data.samples import DatasetSplits, Sample, class_name_from_folder
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "read_image_folder", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_SPLITS = ("train", "val", "test")
_IGNORED_NAMES = frozenset({"__MACOSX"})


def _layout(root: str) -> str:
    """A short drawing of the accepted layouts, with ``root`` filled in."""
    return (
        "expected one of these layouts:\n"
        f"  {root}/train/<class>/<image>  (optional {root}/val/<class>/..., {root}/test/<class>/...)\n"
        f"  {root}/<class>/<image>        (split per class into train/val/test)\n"
        f"  {root}/test/<class>/<image>   (test only: evaluation)\n"
        f"  with <image> one of {', '.join(IMAGE_EXTENSIONS)}"
    )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_NAMES


def _is_image(name: str) -> bool:
    return not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``path``."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())
    except OSError as exc:
        raise DatasetError(f"cannot list dataset folder {path}: {exc}") from exc


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted absolute paths of the images under ``folder`` (recursive, hidden entries skipped)."""
    folder = os.path.abspath(os.fspath(folder))
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def _class_folders(split_dir: str, root: str) -> dict[str, list[str]]:
    """``{folder name: sorted image paths}`` of one split directory; errors on empty class folders."""
    folders = _subdirs(split_dir)
    if not folders:
        raise DatasetError(f"no class folders found in {split_dir}\n{_layout(root)}")
    out: dict[str, list[str]] = {}
    empty: list[str] = []
    for name in folders:
        images = list_images(os.path.join(split_dir, name))
        if not images:
            empty.append(os.path.join(split_dir, name))
        out[name] = images
    if empty:
        raise DatasetError(
            f"class folder(s) without images: {', '.join(empty)}\n{_layout(root)}"
        )
    return out


def _classnames(folders: Sequence[str], split_dir: str, root: str) -> list[str]:
    """Class names of sorted ``folders``; errors on empty names or duplicates after normalisation."""
    seen: dict[str, str] = {}
    names: list[str] = []
    for folder in folders:
        name = class_name_from_folder(folder)
        if not name:
            raise DatasetError(
                f"class folder {os.path.join(split_dir, folder)!r} gives an empty class name\n{_layout(root)}"
            )
        if name in seen:
            raise DatasetError(
                f"class folders {os.path.join(split_dir, seen[name])!r} and "
                f"{os.path.join(split_dir, folder)!r} both give the class name {name!r}; rename one\n"
                f"{_layout(root)}"
            )
        seen[name] = folder
        names.append(name)
    return names


def _split_seed(seed: int, folder: str) -> int:
    digest = hashlib.sha256(f"promptclip-split:{int(seed)}:{folder}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(n_val, n_test)`` for a class of ``n`` images; train always keeps at least one image."""
    n_test = 0
    if test_fraction > 0 and n >= 2:
        n_test = min(n - 1, max(1, math.floor(n * test_fraction + 0.5)))
    n_val = 0
    if val_fraction > 0 and n - n_test >= 2:
        n_val = min(n - n_test - 1, max(1, math.floor(n * val_fraction + 0.5)))
    return n_val, n_test


def _check_fraction(name: str, value: float, root: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise DatasetError(f"{name} must be in [0, 1), got {value!r} (dataset {root})")


def read_image_folder(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    test_fraction: float = 0.2,
    seed: int = 0,
    allow_test_only: bool = False,
) -> DatasetSplits:
    """Read an image-folder dataset.

    With ``root/train/`` present, its class folders (sorted) define the classes and the optional
    ``root/val/`` and ``root/test/`` give those splits (missing ones stay empty; the fractions are
    not used). Otherwise ``root/<class>/`` folders are split per class, deterministically for
    ``seed``, into train/val/test by ``val_fraction`` and ``test_fraction`` (each class with at
    least two images gives at least one test image when ``test_fraction > 0``).
    Labels follow sorted folder names; class names come from :func:`class_name_from_folder`.
    Hidden entries and non-image files are ignored. ``allow_test_only`` (evaluation): a folder with ``root/test/``
    and no ``root/train/`` is read with the classes of ``root/test/`` and an empty train split.
    """
    root_s = os.path.abspath(os.fspath(root))
    if not os.path.exists(root_s):
        raise DatasetError(f"dataset folder {root_s} does not exist\n{_layout(root_s)}")
    if not os.path.isdir(root_s):
        raise DatasetError(f"dataset path {root_s} is not a directory\n{_layout(root_s)}")
    _check_fraction("val_fraction", val_fraction, root_s)
    _check_fraction("test_fraction", test_fraction, root_s)
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction} (dataset {root_s})"
        )

    name = os.path.basename(root_s.rstrip(os.sep)) or root_s
    train_dir = os.path.join(root_s, "train")
    test_only = not os.path.isdir(train_dir) and os.path.isdir(os.path.join(root_s, "test"))
    if os.path.isdir(train_dir) or (test_only and allow_test_only):
        splits = _read_split_layout(root_s)
        logger.info(
            "read %s (train/val/test folders): %d classes, %d/%d/%d train/val/test images",
            root_s, len(splits.classnames), len(splits.train), len(splits.val), len(splits.test),
        )
    else:
        stray = [os.path.join(root_s, d) for d in ("val", "test") if os.path.isdir(os.path.join(root_s, d))]
        if stray:
            raise DatasetError(
                f"found {', '.join(stray)} but no {train_dir}: training needs a train folder (a test-only folder "
                f"can only be evaluated: promptclip eval)\n{_layout(root_s)}"
            )
        splits = _read_flat_layout(root_s, val_fraction, test_fraction, seed)
        logger.info(
            "read %s (class folders, split with seed %d): %d classes, %d/%d/%d train/val/test images",
            root_s, seed, len(splits.classnames), len(splits.train), len(splits.val), len(splits.test),
        )
    splits.name = name
    return splits


def _read_split_layout(root: str) -> DatasetSplits:
    """``train/`` (its class folders define the classes) with optional ``val/`` and ``test/``; or, for evaluation,
    a test-only folder: ``test/`` defines the classes and the train split is empty."""
    train_dir = os.path.join(root, "train")
    defining = "train" if os.path.isdir(train_dir) else "test"
    class_dir = os.path.join(root, defining)
    first = _class_folders(class_dir, root)
    folders = list(first)  # sorted
    classnames = _classnames(folders, class_dir, root)
    label_of = {f: i for i, f in enumerate(folders)}

    lists: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    lists[defining] = [Sample(p, label_of[f]) for f in folders for p in first[f]]
    if defining == "test":
        logger.info("%s has no train folder: test-only data (evaluation), classes from %s", root, class_dir)
    for split in [s for s in ("val", "test") if s != defining]:
        split_dir = os.path.join(root, split)
        if not os.path.exists(split_dir):
            logger.debug("no %s folder in %s", split, root)
            continue
        if not os.path.isdir(split_dir):
            raise DatasetError(f"{split_dir} is not a directory\n{_layout(root)}")
        per_class = _class_folders(split_dir, root)
        unknown = [os.path.join(split_dir, f) for f in per_class if f not in label_of]
        if unknown:
            raise DatasetError(
                f"{split} class folder(s) not in {class_dir}: {', '.join(unknown)}\n"
                f"known classes: {', '.join(folders)}\n{_layout(root)}"
            )
        lists[split] = [Sample(p, label_of[f]) for f in sorted(per_class) for p in per_class[f]]
    return DatasetSplits(classnames=classnames, train=lists["train"], val=lists["val"], test=lists["test"])


def _read_flat_layout(root: str, val_fraction: float, test_fraction: float, seed: int) -> DatasetSplits:
    per_class = _class_folders(root, root)
    folders = list(per_class)  # sorted
    classnames = _classnames(folders, root, root)
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, folder in enumerate(folders):
        paths = list(per_class[folder])  # sorted
        random.Random(_split_seed(seed, folder)).shuffle(paths)
        n_val, n_test = _split_counts(len(paths), val_fraction, test_fraction)
        test.extend(Sample(p, label) for p in paths[:n_test])
        val.extend(Sample(p, label) for p in paths[n_test:n_test + n_val])
        train.extend(Sample(p, label) for p in paths[n_test + n_val:])
    key = lambda s: (s.label, s.path)  # noqa: E731
    return DatasetSplits(
        classnames=classnames, train=sorted(train, key=key), val=sorted(val, key=key), test=sorted(test, key=key)
    )
