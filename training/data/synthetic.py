"""A tiny procedural labelled image set ("red circle", "blue square", ...) for the offline demo
and tests. Deterministic for a seed: the same arguments give byte-identical PNG files."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from training.data.folder import read_image_folder
from training.data.samples import DatasetSplits
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "DEFAULT_CLASSES",
    "render_shape",
    "make_shapes_dataset",
]

DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (135, 50, 175),
    "orange": (250, 135, 20),
    "white": (252, 252, 252),
    "black": (12, 12, 12),
}

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")

#: Default ``(color, shape)`` classes: some share a colour or a shape, so both matter.
DEFAULT_CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("red", "square"),
    ("blue", "circle"),
    ("blue", "triangle"),
    ("green", "star"),
    ("yellow", "diamond"),
    ("purple", "hexagon"),
    ("orange", "cross"),
)

_STAMP = ".promptclip-synthetic.json"
_STAMP_VERSION = 1
_SUPERSAMPLE = 4


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` (circle excluded) around the origin, outer radius 1."""
    if shape == "square":
        return [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if shape == "diamond":  # an elongated rhombus, so it stays distinct from a rotated square
        return [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.33
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(DEFAULT_SHAPES)}")


def render_shape(
    shape: str,
    color: tuple[int, int, int],
    *,
    size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """Draw one filled ``shape`` of ``color`` at a random position, scale and rotation on a random
    light/grey background with mild noise; returns a ``size`` x ``size`` RGB image."""
    if shape not in DEFAULT_SHAPES:
        raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(DEFAULT_SHAPES)}")
    if int(size) < 8:
        raise DatasetError(f"image size must be >= 8 pixels, got {size!r}")
    size = int(size)
    big = size * _SUPERSAMPLE

    grey = int(rng.integers(105, 200))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)

    radius = float(rng.uniform(0.22, 0.38)) * big
    margin = radius * 1.02
    cx = float(rng.uniform(margin, big - margin))
    cy = float(rng.uniform(margin, big - margin))
    angle = float(rng.uniform(0.0, 2 * math.pi))
    fill = tuple(int(c) for c in color)

    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in _unit_polygon(shape)]
        draw.polygon(pts, fill=fill)

    small = canvas.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr + rng.normal(0.0, 5.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _folder_name(color: str, shape: str) -> str:
    return f"{color}_{shape}"


def _image_rng(seed: int, folder: str, split: str, index: int) -> np.random.Generator:
    """Generator of one image: depends on the seed, class, split and index only (not class order)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(folder.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _expected_files(root: str, folders: Sequence[str], counts: dict[str, int]) -> list[str]:
    return [
        os.path.join(root, split, folder, f"{i}.png")
        for split, n in counts.items()
        for folder in folders
        for i in range(n)
    ]


def make_shapes_dataset(
    root: str | os.PathLike,
    *,
    classes: Sequence[tuple[str, str]] | None = None,
    train_per_class: int = 8,
    test_per_class: int = 4,
    size: int = 64,
    seed: int = 0,
) -> DatasetSplits:
    """Write a coloured-shapes dataset under ``root`` and read it back with :func:`read_image_folder`.

    ``classes`` are ``(color, shape)`` pairs (names from :data:`DEFAULT_COLORS` and
    :data:`DEFAULT_SHAPES`; default :data:`DEFAULT_CLASSES`). Files go to
    ``root/{train,test}/<color>_<shape>/<i>.png`` so class names read as ``"red circle"``.
    A JSON stamp records the arguments: an existing set made with the same arguments is reused,
    one made with other arguments is replaced. A non-empty ``root`` without a stamp is refused.
    """
    pairs = [(str(c), str(s)) for c, s in (DEFAULT_CLASSES if classes is None else classes)]
    root_s = os.path.abspath(os.fspath(root))
    if not pairs:
        raise DatasetError(f"no classes given for the synthetic dataset at {root_s}")
    for color, shape in pairs:
        if color not in DEFAULT_COLORS:
            raise DatasetError(f"unknown colour {color!r}: expected one of {', '.join(DEFAULT_COLORS)}")
        if shape not in DEFAULT_SHAPES:
            raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(DEFAULT_SHAPES)}")
    if len(set(pairs)) != len(pairs):
        dupes = sorted({p for p in pairs if pairs.count(p) > 1})
        raise DatasetError(f"duplicate classes for the synthetic dataset at {root_s}: {dupes}")
    if int(train_per_class) < 1 or int(test_per_class) < 0:
        raise DatasetError(
            f"need train_per_class >= 1 and test_per_class >= 0, got {train_per_class} and {test_per_class}"
        )
    if int(size) < 8:
        raise DatasetError(f"image size must be >= 8 pixels, got {size!r}")

    stamp = {
        "version": _STAMP_VERSION,
        "classes": [list(p) for p in pairs],
        "train_per_class": int(train_per_class),
        "test_per_class": int(test_per_class),
        "size": int(size),
        "seed": int(seed),
    }
    folders = [_folder_name(c, s) for c, s in pairs]
    counts = {"train": int(train_per_class), "test": int(test_per_class)}
    stamp_path = os.path.join(root_s, _STAMP)

    if os.path.exists(root_s) and not os.path.isdir(root_s):
        raise DatasetError(f"synthetic dataset path {root_s} is not a directory")
    old_stamp = None
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as fh:
                old_stamp = json.load(fh)
        except (OSError, ValueError):
            old_stamp = {}
    elif os.path.isdir(root_s) and os.listdir(root_s):
        raise DatasetError(
            f"{root_s} is not empty and holds no synthetic dataset stamp ({_STAMP}); "
            "choose an empty or new folder"
        )

    if old_stamp == stamp and all(os.path.isfile(p) for p in _expected_files(root_s, folders, counts)):
        logger.info("reusing synthetic shapes dataset at %s", root_s)
    else:
        if old_stamp is not None:
            logger.info("replacing synthetic shapes dataset at %s (different arguments)", root_s)
            os.remove(stamp_path)
            for split in ("train", "val", "test"):
                shutil.rmtree(os.path.join(root_s, split), ignore_errors=True)
        _write(root_s, pairs, counts, int(size), int(seed))
        with open(stamp_path, "w", encoding="utf-8") as fh:
            json.dump(stamp, fh, indent=2, sort_keys=True)
        logger.info(
            "wrote synthetic shapes dataset to %s: %d classes, %d train + %d test images per class",
            root_s, len(pairs), counts["train"], counts["test"],
        )

    splits = read_image_folder(root_s)
    splits.name = "shapes"
    return splits


def _write(root: str, pairs: Sequence[tuple[str, str]], counts: dict[str, int], size: int, seed: int) -> None:
    for split, n in counts.items():
        if n == 0:
            continue  # no empty class folders: the reader would reject them
        for color, shape in pairs:
            folder = _folder_name(color, shape)
            out_dir = os.path.join(root, split, folder)
            os.makedirs(out_dir, exist_ok=True)
            for i in range(n):
                im = render_shape(shape, DEFAULT_COLORS[color], size=size, rng=_image_rng(seed, folder, split, i))
                im.save(os.path.join(out_dir, f"{i}.png"), format="PNG")
