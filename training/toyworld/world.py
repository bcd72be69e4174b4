"""The toy world: procedural coloured shapes on textured backgrounds, with captions.

A small CLIP-like model is pretrained contrastively on :func:`pretrain_batch` (style ``"pretrain"``:
120 ``(colour, shape)`` classes, sizes, four background textures, an optional second object);
downstream *styles* (:data:`STYLES`) play the role of benchmark datasets and unseen domains.

This module samples scenes and captions, draws pretraining batches, picks each style's classes and writes
downstream datasets to disk. The vocabulary (colours, shapes, styles, :class:`Scene`) lives in
:mod:`training.toyworld.scene` and the drawing in :mod:`training.toyworld.render`; their public names are
re-exported here, so ``training.toyworld.world`` is the one import for users of the toy world.

Everything is deterministic for a seed (numpy generators seeded from integers and CRC32s of names,
never Python's ``hash``), so results do not depend on ``PYTHONHASHSEED``. numpy + PIL only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Collection, Sequence
from functools import lru_cache

import numpy as np

from training.data import DatasetSplits, read_image_folder
from training.errors import DatasetError
from training.toyworld.render import NOISE_STD, RENDER_UNIFORMS, check_size, draw_scene, palette_color, render, to_uint8
from training.toyworld.scene import (
    ALL_CLASSES,
    CAPTION_TEMPLATES,
    COLORS,
    OBJECT_SCALE,
    PRETRAIN_STYLE,
    SCALE_JITTER,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
    Scene,
    all_classes,
    check_combo,
    check_style,
    class_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "STYLES",
    "PRETRAIN_STYLE",
    "CAPTION_TEMPLATES",
    "Scene",
    "class_name",
    "all_classes",
    "sample_scene",
    "render",
    "caption",
    "pretrain_batch",
    "default_holdout",
    "style_classes",
    "disjoint_style_classes",
    "colour_split_classes",
    "write_style_dataset",
    "palette_color",
]

_SECOND_PROB = 0.3
_CAPTION_SECOND_PROB = 0.5
_DOWNSTREAM_TEXTURES = ("plain", "striped")

_STAMP = ".promptclip-toyworld.json"
_STAMP_VERSION = 1

# Per-scene uniforms (sample_scene); the per-render ones are render.RENDER_UNIFORMS.
_N_SCENE_U = 7


def _seeded_rng(*parts: int | str) -> np.random.Generator:
    """Generator from integers and names (names via CRC32, independent of PYTHONHASHSEED)."""
    entropy = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    return np.random.default_rng(np.random.SeedSequence(entropy))



# ----------------------------------------------------------------------------------------------- scenes

def _scene_from_u(
    u: np.ndarray,
    color: str,
    shape: str,
    style: str,
    pool: Sequence[tuple[str, str]],
    pool_index: dict[tuple[str, str], int],
) -> Scene:
    """A scene from ``_N_SCENE_U`` uniforms; ``pool`` holds the candidates of the second object."""
    size = SIZES[int(u[0] * len(SIZES))]
    pretrain = style == PRETRAIN_STYLE
    textures = TEXTURES if pretrain else _DOWNSTREAM_TEXTURES
    texture = textures[int(u[1] * len(textures))]
    r = OBJECT_SCALE[size] * SCALE_JITTER[-1] / 2 + 0.01
    x = r + float(u[2]) * (1 - 2 * r)
    y = r + float(u[3]) * (1 - 2 * r)
    rotation = float(u[4]) * 360.0
    second = None
    if pretrain and u[5] < _SECOND_PROB:
        own = pool_index.get((color, shape))
        n = len(pool) - (own is not None)
        if n > 0:
            k = min(int(u[6] * n), n - 1)
            if own is not None and k >= own:
                k += 1
            second = pool[k]
    return Scene(color, shape, size, texture, round(x, 4), round(y, 4), round(rotation, 2), second)


def sample_scene(rng: np.random.Generator, color: str, shape: str, *, style: str) -> Scene:
    """A random scene of ``(color, shape)`` for ``style``.

    Pretraining: random size, texture (all four), position, rotation and, with probability 0.3, a
    second object of another combo. Downstream styles: random size, position and rotation, texture
    plain or striped, no second object.
    """
    check_combo(color, shape)
    check_style(style, pretrain_ok=True)
    pool = ALL_CLASSES
    return _scene_from_u(rng.random(_N_SCENE_U), color, shape, style, pool, _pool_index(pool))


@lru_cache(maxsize=8)
def _pool_index(pool: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], int]:
    return {p: i for i, p in enumerate(pool)}


# ------------------------------------------------------------------------------------------- captions

def _caption_from_u(scene: Scene, u_template: float, u_second: float) -> str:
    template = CAPTION_TEMPLATES[min(int(u_template * len(CAPTION_TEMPLATES)), len(CAPTION_TEMPLATES) - 1)]
    text = template.format(size=scene.size, color=scene.color, shape=scene.shape, texture=scene.texture)
    if scene.second is not None and u_second < _CAPTION_SECOND_PROB:
        end = "." if text.endswith(".") else ""
        text = f"{text[:len(text) - len(end)]} next to a {scene.second[0]} {scene.second[1]}{end}"
    return text


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of ``scene`` (one of :data:`CAPTION_TEMPLATES`); with a second object, half the
    time ``" next to a {color2} {shape2}"`` is appended (before the final full stop)."""
    u = rng.random(2)
    return _caption_from_u(scene, float(u[0]), float(u[1]))


# ----------------------------------------------------------------------------------------- pretraining

def _check_holdout(holdout: Collection[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    held = set()
    for item in holdout:
        color, shape = item
        check_combo(color, shape)
        held.add((str(color), str(shape)))
    return frozenset(held)


@lru_cache(maxsize=16)
def _pretrain_pool(held: frozenset[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(p for p in ALL_CLASSES if p not in held)


def pretrain_batch(
    step_seed: int,
    batch: int,
    *,
    size: int = 32,
    holdout: Collection[tuple[str, str]] = (),
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """One pretraining batch: uint8 images ``[batch, size, size, 3]``, captions, ``(color, shape)`` per image.

    Main objects are uniform over the combos not in ``holdout``; held-out combos never appear, neither
    as main nor as second object. Deterministic in ``step_seed`` (and the other arguments).
    """
    held = _check_holdout(holdout)
    pool = _pretrain_pool(held)
    if len(pool) < 2:
        raise DatasetError(f"holdout leaves {len(pool)} combo(s) for pretraining; need at least 2")
    batch, size = int(batch), check_size(size)
    if batch < 1:
        raise DatasetError(f"batch must be >= 1, got {batch}")
    index = _pool_index(pool)
    rng = _seeded_rng("toyworld-pretrain", int(step_seed))
    picks = rng.integers(0, len(pool), size=batch)
    su = rng.random((batch, _N_SCENE_U))
    ru = rng.random((batch, RENDER_UNIFORMS))
    cu = rng.random((batch, 2))
    images = np.empty((batch, size, size, 3), np.float32)
    captions: list[str] = []
    labels: list[tuple[str, str]] = []
    for i in range(batch):
        color, shape = pool[int(picks[i])]
        scene = _scene_from_u(su[i], color, shape, PRETRAIN_STYLE, pool, index)
        draw_scene(scene, PRETRAIN_STYLE, size, ru[i], out=images[i])
        captions.append(_caption_from_u(scene, float(cu[i, 0]), float(cu[i, 1])))
        labels.append((color, shape))
    images += rng.standard_normal(images.shape, dtype=np.float32) * NOISE_STD
    return to_uint8(images), captions, labels


def default_holdout(seed: int = 0) -> list[tuple[str, str]]:
    """16 combos held out of pretraining (sorted by class name).

    Balanced: every colour is held out once or twice (of its 12 shapes) and every shape once or twice
    (of its 10 colours), so each colour and shape keeps at least 10 partners in pretraining while every
    colour and every shape also has an unseen combination to test composition on.
    """
    rng = _seeded_rng("toyworld-holdout", int(seed))
    colors, shapes, n = list(COLORS), list(SHAPES), 16
    for _ in range(10_000):
        # degree sequences: each colour/shape once, the rest of the 16 slots to distinct random ones
        color_slots = colors + [colors[int(i)] for i in rng.choice(len(colors), n - len(colors), replace=False)]
        shape_slots = shapes + [shapes[int(i)] for i in rng.choice(len(shapes), n - len(shapes), replace=False)]
        order = rng.permutation(n)
        pairs = {(color_slots[i], shape_slots[int(order[i])]) for i in range(n)}
        if len(pairs) == n:
            return sorted(pairs, key=lambda p: class_name(*p))
    raise RuntimeError("could not draw a balanced holdout")  # pragma: no cover


def style_classes(style: str, *, num_classes: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded subset of ``num_classes`` of the 120 combos for ``style``, sorted by class name.

    Different styles draw different (overlapping) subsets, like different datasets.
    """
    check_style(style, pretrain_ok=False)
    n = int(num_classes)
    classes = ALL_CLASSES
    if not 1 <= n <= len(classes):
        raise DatasetError(f"num_classes must be in 1..{len(classes)}, got {num_classes!r}")
    pick = _seeded_rng("toyworld-classes", style, int(seed)).choice(len(classes), size=n, replace=False)
    return [classes[int(i)] for i in sorted(pick)]


def disjoint_style_classes(style: str, *, num_classes: int = 20, seed: int = 0) -> list[tuple[str, str]]:
    """``num_classes`` seeded classes of ``style`` split by shape: the first ``ceil(n / 2)`` (base) use one seeded
    half of the 12 shapes, the rest (new) the other half, so no new class shares a shape with a base class. Each
    half is sorted by class name; the base half comes first."""
    check_style(style, pretrain_ok=False)
    n = int(num_classes)
    half = len(SHAPES) // 2
    limit = 2 * half * len(COLORS)
    if not 2 <= n <= limit:
        raise DatasetError(f"num_classes of the disjoint split must be in 2..{limit}, got {num_classes!r}")
    rng = _seeded_rng("toyworld-disjoint", style, int(seed))
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))]
    out: list[tuple[str, str]] = []
    for part, count in ((shapes[:half], (n + 1) // 2), (shapes[half:], n // 2)):
        pool = [(c, s) for (c, s) in ALL_CLASSES if s in part]
        pick = rng.choice(len(pool), size=count, replace=False)
        out += sorted((pool[int(i)] for i in pick), key=lambda p: class_name(*p))
    return out


def colour_split_classes(style: str, *, num_classes: int = 20, seed: int = 0) -> list[tuple[str, str]]:
    """``num_classes`` seeded classes of ``style`` in which the base classes differ only in shape and the new ones
    also in colour: the first ``ceil(n / 2)`` (base) are that many seeded shapes in one seeded colour; the rest
    (new) are the remaining shapes in the other colours, spread evenly over those shapes, so new classes that
    share a shape differ only in colour. A prompt fitted to the base classes never needs colour, so a context
    that overfits to them loses what the new classes need (the CoOp novel-class drop). Each half is sorted by
    class name; the base half comes first."""
    check_style(style, pretrain_ok=False)
    n = int(num_classes)
    base_n, new_n = (n + 1) // 2, n // 2
    def fits(k: int) -> bool:  # one shape per base class, the other shapes in the other colours for the new ones
        b = (k + 1) // 2
        return 2 <= k and b < len(SHAPES) and k // 2 <= (len(SHAPES) - b) * (len(COLORS) - 1)

    if not fits(n):
        limit = max(k for k in range(2, 2 * len(SHAPES)) if fits(k))
        raise DatasetError(f"num_classes of the colour split must be in 2..{limit} (each base class needs its own "
                           f"shape, and the shapes left over must hold the new classes), got {num_classes!r}")
    rng = _seeded_rng("toyworld-colour", style, int(seed))
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))]
    colors = [list(COLORS)[int(i)] for i in rng.permutation(len(COLORS))]
    base_color, others = colors[0], colors[1:]
    base = sorted(((base_color, s) for s in shapes[:base_n]), key=lambda p: class_name(*p))
    rest = shapes[base_n:]
    new: list[tuple[str, str]] = []
    for k, shape in enumerate(rest):  # new_n classes spread evenly over the remaining shapes
        count = new_n // len(rest) + (1 if k < new_n % len(rest) else 0)
        new += [(others[int(i)], shape) for i in rng.choice(len(others), size=count, replace=False)]
    return base + sorted(new, key=lambda p: class_name(*p))


# -------------------------------------------------------------------------------------------- datasets

def _folder_name(color: str, shape: str) -> str:
    return f"{color}_{shape}"


def write_style_dataset(
    root: str | os.PathLike,
    style: str,
    *,
    classes: Sequence[tuple[str, str]] | None = None,
    train_per_class: int = 16,
    test_per_class: int = 8,
    size: int = 32,
    seed: int = 0,
) -> DatasetSplits:
    """Write a downstream dataset of ``style`` under ``root`` and read it back with :func:`read_image_folder`.

    Layout ``root/{train,test}/<color>_<shape>/<i>.png`` (class names read as ``"red circle"``);
    ``classes`` defaults to :func:`style_classes` ``(style, seed=seed)``. A hidden JSON stamp records the
    arguments: a second call with the same arguments reuses the files, one with other arguments
    rewrites them. A non-empty ``root`` without a stamp is refused. Each image depends only on
    ``(seed, style, class, split, index)``.
    """
    check_style(style, pretrain_ok=False)
    pairs = [(str(c), str(s)) for c, s in (style_classes(style, seed=seed) if classes is None else classes)]
    root_s = os.path.abspath(os.fspath(root))
    if not pairs:
        raise DatasetError(f"no classes given for the toy-world dataset at {root_s}")
    for color, shape in pairs:
        check_combo(color, shape)
    if len(set(pairs)) != len(pairs):
        raise DatasetError(f"duplicate classes for the toy-world dataset at {root_s}")
    train_n, test_n, size = int(train_per_class), int(test_per_class), check_size(size)
    if train_n < 1 or test_n < 0:
        raise DatasetError(f"need train_per_class >= 1 and test_per_class >= 0, got {train_n} and {test_n}")

    stamp = {
        "version": _STAMP_VERSION,
        "style": style,
        "classes": [list(p) for p in pairs],
        "train_per_class": train_n,
        "test_per_class": test_n,
        "size": size,
        "seed": int(seed),
    }
    counts = {"train": train_n, "test": test_n}
    stamp_path = os.path.join(root_s, _STAMP)
    if os.path.exists(root_s) and not os.path.isdir(root_s):
        raise DatasetError(f"toy-world dataset path {root_s} is not a directory")
    old_stamp = None
    if os.path.isfile(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as fh:
                old_stamp = json.load(fh)
        except (OSError, ValueError):
            old_stamp = {}
    elif os.path.isdir(root_s) and os.listdir(root_s):
        raise DatasetError(
            f"{root_s} is not empty and holds no toy-world dataset stamp ({_STAMP}); choose an empty or new folder"
        )

    expected = [
        os.path.join(root_s, split, _folder_name(c, s), f"{i}.png")
        for split, n in counts.items() for c, s in pairs for i in range(n)
    ]
    if old_stamp == stamp and all(os.path.isfile(p) for p in expected):
        logger.info("reusing toy-world %s dataset at %s", style, root_s)
    else:
        if old_stamp is not None:
            logger.info("replacing toy-world dataset at %s (different arguments)", root_s)
            os.remove(stamp_path)
            for split in ("train", "val", "test"):
                shutil.rmtree(os.path.join(root_s, split), ignore_errors=True)
        for split, n in counts.items():
            for color, shape in pairs:
                folder = _folder_name(color, shape)
                out_dir = os.path.join(root_s, split, folder)
                if n:
                    os.makedirs(out_dir, exist_ok=True)
                for i in range(n):
                    rng = _seeded_rng("toyworld-image", int(seed), style, folder, split, i)
                    scene = sample_scene(rng, color, shape, style=style)
                    render(scene, style=style, size=size, rng=rng).save(os.path.join(out_dir, f"{i}.png"), format="PNG")
        with open(stamp_path, "w", encoding="utf-8") as fh:
            json.dump(stamp, fh, indent=2, sort_keys=True)
        logger.info("wrote toy-world %s dataset to %s: %d classes, %d train + %d test images per class",
                    style, root_s, len(pairs), train_n, test_n)
    return read_image_folder(root_s)
