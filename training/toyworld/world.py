"""The toy world: procedural coloured shapes on textured backgrounds, with captions.

A small CLIP-like model is pretrained contrastively on :func:`pretrain_batch` (style ``"pretrain"``:
120 ``(colour, shape)`` classes, sizes, four background textures, an optional second object);
downstream *styles* (:data:`STYLES`) play the role of benchmark datasets and unseen domains.

Rendering works at 4x resolution and downsamples once with LANCZOS: each object's coverage mask
(per shape, size bucket and 15-degree rotation bucket) is drawn with PIL at 4x, downsampled to the
output resolution and cached, then alpha-composited in numpy over the background. Compositing an
antialiased mask equals drawing the filled shape at 4x and downsampling the whole image, up to the
(mild, low-contrast) background texture under the edge pixels; positions snap to whole output pixels.

Everything is deterministic for a seed (numpy generators seeded from integers and CRC32s of names,
never Python's ``hash``), so results do not depend on ``PYTHONHASHSEED``. numpy + PIL only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from training.data.folder import read_image_folder
from training.data.samples import DatasetSplits
from training.errors import DatasetError

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
    "write_style_dataset",
    "palette_color",
]

#: The 10 object colours (RGB). None is grey or white, so objects stand out from the grey backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 15),
    "yellow": (240, 220, 30),
    "green": (40, 165, 55),
    "teal": (0, 150, 150),
    "blue": (35, 75, 225),
    "purple": (135, 55, 190),
    "pink": (245, 125, 195),
    "brown": (125, 75, 30),
    "black": (15, 15, 15),
}

#: The 12 shapes.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "diamond", "hexagon",
    "cross", "ring", "crescent", "arrow", "heart", "bar",
)

SIZES: tuple[str, ...] = ("small", "large")

#: Background textures (grey tones).
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

#: Downstream styles (the "datasets" / domains) with a one-line description each.
STYLES: dict[str, str] = {
    "clean": "filled shapes on plain or striped grey backgrounds, as in pretraining",
    "sketch": "2 px coloured outlines only, on a white background",
    "noisy": "strong Gaussian pixel noise (std 45/255) and a random colour cast on the background",
    "lowres": "rendered at 8x8 (area-averaged) and upscaled with nearest-neighbour (blocky)",
    "palette": "dark navy background, object colours remapped (gamma 0.6 + warm tint, see palette_color)",
}

PRETRAIN_STYLE = "pretrain"

#: Caption templates; slots: {size} {color} {shape} {texture}.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {size} {color} {shape}.",
    "a {color} {shape} on a {texture} background.",
    "a {color} {shape}.",
    "a {size} {color} {shape} on a {texture} background.",
    "a picture of a {color} {shape}.",
    "{color} {shape}",
    "a photo of a {color} {shape}.",
    "a {size} {color} {shape}.",
)

_SUPERSAMPLE = 4
_SCALE = {"small": 0.35, "large": 0.70}  # object diameter / image side
_SECOND_SCALE = 0.30
_SCALE_JITTER = (0.92, 1.0, 1.08)
_ROT_STEP = 15.0  # degrees per cached rotation bucket
_ROT_FREE = frozenset({"circle", "ring"})
_LOWRES = 8
_NOISE_STD = 4.0
_NOISY_STD = 45.0
_SECOND_PROB = 0.3
_CAPTION_SECOND_PROB = 0.5
_DOWNSTREAM_TEXTURES = ("plain", "striped")
_PALETTE_GAMMA = 0.6
_PALETTE_GAIN = (1.0, 0.95, 0.66)
_PALETTE_OFFSET = (22.0, 0.0, 0.0)
_RIM_COLOR = (175.0, 175.0, 185.0)

_STAMP = ".promptclip-toyworld.json"
_STAMP_VERSION = 1

# Per-scene uniforms (sample_scene) and per-render uniforms (render): one vector each, so a batch can
# draw them all at once.
_N_SCENE_U = 7
_N_RENDER_U = 16


@dataclass(frozen=True)
class Scene:
    """What one image shows; the rendering adds background tones, jitter and noise from its own generator."""

    color: str
    shape: str
    size: str
    texture: str
    x: float  #: object centre, [0, 1] image coordinates
    y: float
    rotation: float  #: degrees
    second: tuple[str, str] | None = None  #: optional second object (colour, shape), drawn small elsewhere


def class_name(color: str, shape: str) -> str:
    """``"red circle"``."""
    return f"{color} {shape}"


@lru_cache(maxsize=1)
def _all_classes() -> tuple[tuple[str, str], ...]:
    return tuple(sorted(((c, s) for c in COLORS for s in SHAPES), key=lambda p: class_name(*p)))


def all_classes() -> list[tuple[str, str]]:
    """All 120 ``(color, shape)`` pairs, sorted by :func:`class_name`."""
    return list(_all_classes())


def _check_combo(color: str, shape: str) -> None:
    if color not in COLORS:
        raise DatasetError(f"unknown colour {color!r}: expected one of {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def _check_style(style: str, *, pretrain_ok: bool) -> None:
    if style == PRETRAIN_STYLE and pretrain_ok:
        return
    if style not in STYLES:
        known = ", ".join(([PRETRAIN_STYLE] if pretrain_ok else []) + list(STYLES))
        raise DatasetError(f"unknown toy-world style {style!r}: expected one of {known}")


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
    r = _SCALE[size] * _SCALE_JITTER[-1] / 2 + 0.01
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
    _check_combo(color, shape)
    _check_style(style, pretrain_ok=True)
    pool = _all_classes()
    return _scene_from_u(rng.random(_N_SCENE_U), color, shape, style, pool, _pool_index(pool))


@lru_cache(maxsize=8)
def _pool_index(pool: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], int]:
    return {p: i for i, p in enumerate(pool)}


# ------------------------------------------------------------------------------------------- geometry

@lru_cache(maxsize=1)
def _heart_polygon() -> tuple[tuple[float, float], ...]:
    t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x -= (x.max() + x.min()) / 2
    y -= (y.max() + y.min()) / 2
    r = float(np.sqrt(x**2 + y**2).max())
    return tuple(zip((x / r).tolist(), (y / r).tolist()))


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
    raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit polygon (outer radius about 1, y down) of a polygonal shape."""
    if shape in ("square", "triangle", "star", "diamond", "hexagon", "cross"):
        return _unit_polygon(shape)
    if shape == "arrow":
        return [(-1.0, -0.2), (0.15, -0.2), (0.15, -0.58), (1.0, 0.0), (0.15, 0.58), (0.15, 0.2), (-1.0, 0.2)]
    if shape == "heart":
        return list(_heart_polygon())
    if shape == "bar":
        return [(-1.0, -0.24), (1.0, -0.24), (1.0, 0.24), (-1.0, 0.24)]
    raise DatasetError(f"shape {shape!r} is not a polygon")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float) -> None:
    """Draw ``shape`` filled (255) on an ``L`` canvas; ``angle`` in radians."""
    def disc(x: float, y: float, r: float, fill: int) -> None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == "circle":
        disc(cx, cy, radius, 255)
    elif shape == "ring":
        disc(cx, cy, radius, 255)
        disc(cx, cy, radius * 0.52, 0)
    elif shape == "crescent":
        disc(cx, cy, radius, 255)
        off = radius * 0.5
        disc(cx + off * math.cos(angle), cy + off * math.sin(angle), radius * 0.82, 0)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in _polygon(shape)]
        draw.polygon(pts, fill=255)


@lru_cache(maxsize=None)
def _mask(shape: str, diameter_q: int, rot_idx: int, edge_q: int) -> np.ndarray:
    """Coverage mask in [0, 1] at output resolution, side ``ceil(diameter) + 4``, object centred.

    ``diameter_q`` and ``edge_q`` are in quarter output pixels (the 4x grid). ``edge_q > 0`` keeps only
    an inner outline that wide (the filled shape minus its erosion); else the filled shape.
    """
    diameter = diameter_q / _SUPERSAMPLE
    side = int(math.ceil(diameter)) + 4
    big = side * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, big / 2, big / 2, diameter_q / 2, math.radians(rot_idx * _ROT_STEP))
    if edge_q > 0:
        eroded = canvas
        left = edge_q
        while left > 0:  # square erosion by edge_q 4x-pixels, in steps of at most 4
            step = min(left, 4)
            eroded = eroded.filter(ImageFilter.MinFilter(2 * step + 1))
            left -= step
        canvas = ImageChops.subtract(canvas, eroded)
    small = canvas.resize((side, side), Image.Resampling.LANCZOS)
    out = np.clip(np.asarray(small, dtype=np.float32) / 255.0, 0.0, 1.0)[..., None]
    out.setflags(write=False)
    return out


def _paste(img: np.ndarray, mask: np.ndarray, cx: float, cy: float, color: np.ndarray) -> None:
    """Alpha-composite ``color`` through ``mask`` (centred at pixel coords ``cx, cy``) into ``img`` in place."""
    h, w = img.shape[:2]
    m = mask.shape[0]
    x0 = int(round(cx - m / 2))
    y0 = int(round(cy - m / 2))
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + m, w), min(y0 + m, h)
    if ix1 <= ix0 or iy1 <= iy0:
        return
    a = mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
    region = img[iy0:iy1, ix0:ix1]
    region += (color - region) * a


def _object_mask(shape: str, scale: float, rotation: float, size: int, edge_px: float = 0.0) -> np.ndarray:
    rot_idx = 0 if shape in _ROT_FREE else int(round(rotation / _ROT_STEP)) % int(360 / _ROT_STEP)
    diameter_q = max(4, int(round(scale * size * _SUPERSAMPLE)))
    edge_q = int(round(edge_px * _SUPERSAMPLE))
    return _mask(shape, diameter_q, rot_idx, edge_q)


# ------------------------------------------------------------------------------------------- textures

@lru_cache(maxsize=None)
def _texture_pattern(texture: str, size: int, variant: int) -> np.ndarray:
    """Pattern in [0, 1] of shape [size, size, 1] for one of 32 variants (orientation/period/phase)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = max(2.0, size * (0.125, 0.1875)[variant % 2])
    phase = ((variant // 2) % 4) / 4.0
    if texture == "plain":
        pat = np.zeros((size, size), np.float32)
    elif texture == "striped":
        ang = math.radians(45.0 * ((variant // 8) % 4))
        t = (xx * math.cos(ang) + yy * math.sin(ang)) / period + phase
        pat = (np.mod(t, 1.0) < 0.5).astype(np.float32)
    elif texture == "dotted":
        px = np.mod(xx / period + phase, 1.0) - 0.5
        py = np.mod(yy / period + phase, 1.0) - 0.5
        pat = (px**2 + py**2 < 0.27**2).astype(np.float32)
    elif texture == "checkered":
        pat = np.mod(np.floor(xx / period + phase) + np.floor(yy / period + phase), 2).astype(np.float32)
    else:
        raise DatasetError(f"unknown texture {texture!r}: expected one of {', '.join(TEXTURES)}")
    out = pat[..., None]
    out.setflags(write=False)
    return out


# -------------------------------------------------------------------------------------------- colours

def palette_color(rgb: Sequence[float]) -> np.ndarray:
    """The ``palette`` style's colour remap, a fixed monotone curve per channel.

    ``c' = 255 * (c / 255) ** 0.6`` (gamma 0.6: brightens and flattens), then a warm tint
    ``(R, G, B) -> (R' + 22, 0.95 G', 0.66 B')``. Order within each channel is kept, so the
    colours stay distinguishable from each other, but they look unlike pretraining: pastel, warm and on
    a dark navy background. Returns float32 RGB.
    """
    c = np.asarray(rgb, dtype=np.float32)
    g = 255.0 * np.power(np.clip(c, 0, 255) / 255.0, _PALETTE_GAMMA)
    return np.clip(g * np.asarray(_PALETTE_GAIN, np.float32) + np.asarray(_PALETTE_OFFSET, np.float32), 0, 255)


# ------------------------------------------------------------------------------------------ rendering

def _draw(scene: Scene, style: str, size: int, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Noise-free float32 [size, size, 3] rendering of ``scene`` in ``style`` from ``_N_RENDER_U`` uniforms.

    ``lowres`` is drawn like ``clean`` here (:func:`render` then reduces it to 8x8 and upscales).
    """
    img = np.empty((size, size, 3), np.float32) if out is None else out
    variant = int(u[2] * 32)
    # background
    if style == "sketch":
        level = 238.0 + 17.0 * float(u[0])
        img[...] = level + (u[3:6].astype(np.float32) - 0.5) * 6.0
    elif style == "palette":
        base = np.array([10.0, 13.0, 30.0], np.float32) + u[3:6].astype(np.float32) * np.array([12, 12, 28], np.float32)
        pat = _texture_pattern(scene.texture, size, variant)
        img[...] = base + pat * (6.0 + 6.0 * float(u[1]))
    else:
        grey = 95.0 + 100.0 * float(u[0])
        contrast = (14.0 + 22.0 * float(u[1])) * (1.0 if grey < 145 else -1.0)
        tint = (u[3:6].astype(np.float32) - 0.5) * 16.0
        if style == "noisy":
            tint = tint + (u[13:16].astype(np.float32) - 0.5) * 70.0  # random colour cast
        pat = _texture_pattern(scene.texture, size, variant)
        img[...] = grey + tint + pat * contrast
    # second object (under the main one), in the image corner farthest from the main object
    if scene.second is not None:
        c2, s2 = scene.second
        sx = (0.17 if scene.x > 0.5 else 0.83) + (float(u[11]) - 0.5) * 0.06
        sy = (0.17 if scene.y > 0.5 else 0.83) + (float(u[12]) - 0.5) * 0.06
        m2 = _object_mask(s2, _SECOND_SCALE, float(u[10]) * 360.0, size)
        col2 = np.asarray(COLORS[c2], np.float32)
        if style == "palette":
            col2 = palette_color(col2)
        _paste(img, m2, sx * size, sy * size, col2)
    # main object
    scale = _SCALE[scene.size] * _SCALE_JITTER[min(int(u[9] * 3), 2)]
    color = np.asarray(COLORS[scene.color], np.float32) + (u[6:9].astype(np.float32) - 0.5) * 20.0
    cx, cy = scene.x * size, scene.y * size
    if style == "sketch":
        mask = _object_mask(scene.shape, scale, scene.rotation, size, edge_px=max(1.0, 2.0 * size / 32))
        _paste(img, mask, cx, cy, np.clip(color, 0, 255))
    else:
        if style == "palette":
            color = palette_color(color)
        _paste(img, _object_mask(scene.shape, scale, scene.rotation, size), cx, cy, np.clip(color, 0, 255))
        if style == "palette" and scene.color == "black":  # keep black visible on the dark background
            rim = _object_mask(scene.shape, scale, scene.rotation, size, edge_px=0.75 * size / 32)
            _paste(img, rim, cx, cy, np.asarray(_RIM_COLOR, np.float32))
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    np.clip(arr, 0.0, 255.0, out=arr)
    return np.rint(arr).astype(np.uint8)


def render(scene: Scene, *, style: str, size: int = 32, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image in ``style`` (``"pretrain"`` or one of :data:`STYLES`).

    ``rng`` draws the background tones, small colour/scale jitter and pixel noise.
    """
    _check_style(style, pretrain_ok=True)
    _check_combo(scene.color, scene.shape)
    if scene.second is not None:
        _check_combo(*scene.second)
    size = int(size)
    if size < _LOWRES:
        raise DatasetError(f"toy-world image size must be >= {_LOWRES} pixels, got {size}")
    u = rng.random(_N_RENDER_U)
    if style == "lowres":  # draw at full size, area-average down to 8x8, add noise there, upscale blocky
        full = Image.fromarray(_to_uint8(_draw(scene, style, size, u)))
        small = np.asarray(full.resize((_LOWRES, _LOWRES), Image.Resampling.BOX), dtype=np.float32)
        small = small + rng.standard_normal(small.shape, dtype=np.float32) * _NOISE_STD
        return Image.fromarray(_to_uint8(small)).resize((size, size), Image.Resampling.NEAREST)
    img = _draw(scene, style, size, u)
    std = _NOISY_STD if style == "noisy" else _NOISE_STD
    img += rng.standard_normal(img.shape, dtype=np.float32) * std
    return Image.fromarray(_to_uint8(img))


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
        _check_combo(color, shape)
        held.add((str(color), str(shape)))
    return frozenset(held)


@lru_cache(maxsize=16)
def _pretrain_pool(held: frozenset[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(p for p in _all_classes() if p not in held)


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
    batch, size = int(batch), int(size)
    if batch < 1:
        raise DatasetError(f"batch must be >= 1, got {batch}")
    if size < _LOWRES:
        raise DatasetError(f"toy-world image size must be >= {_LOWRES} pixels, got {size}")
    index = _pool_index(pool)
    rng = _seeded_rng("toyworld-pretrain", int(step_seed))
    picks = rng.integers(0, len(pool), size=batch)
    su = rng.random((batch, _N_SCENE_U))
    ru = rng.random((batch, _N_RENDER_U))
    cu = rng.random((batch, 2))
    images = np.empty((batch, size, size, 3), np.float32)
    captions: list[str] = []
    labels: list[tuple[str, str]] = []
    for i in range(batch):
        color, shape = pool[int(picks[i])]
        scene = _scene_from_u(su[i], color, shape, PRETRAIN_STYLE, pool, index)
        _draw(scene, PRETRAIN_STYLE, size, ru[i], out=images[i])
        captions.append(_caption_from_u(scene, float(cu[i, 0]), float(cu[i, 1])))
        labels.append((color, shape))
    images += rng.standard_normal(images.shape, dtype=np.float32) * _NOISE_STD
    return _to_uint8(images), captions, labels


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
    _check_style(style, pretrain_ok=False)
    n = int(num_classes)
    classes = _all_classes()
    if not 1 <= n <= len(classes):
        raise DatasetError(f"num_classes must be in 1..{len(classes)}, got {num_classes!r}")
    pick = _seeded_rng("toyworld-classes", style, int(seed)).choice(len(classes), size=n, replace=False)
    return [classes[int(i)] for i in sorted(pick)]


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
    _check_style(style, pretrain_ok=False)
    pairs = [(str(c), str(s)) for c, s in (style_classes(style, seed=seed) if classes is None else classes)]
    root_s = os.path.abspath(os.fspath(root))
    if not pairs:
        raise DatasetError(f"no classes given for the toy-world dataset at {root_s}")
    for color, shape in pairs:
        _check_combo(color, shape)
    if len(set(pairs)) != len(pairs):
        raise DatasetError(f"duplicate classes for the toy-world dataset at {root_s}")
    train_n, test_n, size = int(train_per_class), int(test_per_class), int(size)
    if train_n < 1 or test_n < 0:
        raise DatasetError(f"need train_per_class >= 1 and test_per_class >= 0, got {train_n} and {test_n}")
    if size < _LOWRES:
        raise DatasetError(f"toy-world image size must be >= {_LOWRES} pixels, got {size}")

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
