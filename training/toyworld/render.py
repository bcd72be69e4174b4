"""Drawing toy-world scenes (:class:`~training.toyworld.scene.Scene`) as images, in each style.

Rendering works at 4x resolution and downsamples once with LANCZOS: each object's coverage mask
(per shape, size bucket and 15-degree rotation bucket) is drawn with PIL at 4x, downsampled to the
output resolution and cached, then alpha-composited in numpy over the background. Compositing an
antialiased mask equals drawing the filled shape at 4x and downsampling the whole image, up to the
(mild, low-contrast) background texture under the edge pixels; positions snap to whole output pixels.
numpy + PIL only; every random draw comes from the generator (or uniforms) the caller passes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from training.errors import DatasetError
from training.toyworld.scene import (
    COLORS,
    OBJECT_SCALE,
    SCALE_JITTER,
    SHAPES,
    TEXTURES,
    Scene,
    check_combo,
    check_style,
)

_SUPERSAMPLE = 4
_SECOND_SCALE = 0.30
_ROT_STEP = 15.0  # degrees per cached rotation bucket
_ROT_FREE = frozenset({"circle", "ring"})
_NOISY_STD = 45.0
_PALETTE_GAMMA = 0.6
_PALETTE_GAIN = (1.0, 0.95, 0.66)
_PALETTE_OFFSET = (22.0, 0.0, 0.0)
_RIM_COLOR = (175.0, 175.0, 185.0)

#: The ``lowres`` style's resolution, and the smallest image size.
LOWRES = 8
#: Std of the pixel noise of every style but ``noisy``.
NOISE_STD = 4.0
#: Uniforms one rendering draws (:func:`draw_scene`), one vector per image so a batch can draw them at once.
RENDER_UNIFORMS = 16


def check_size(size: int) -> int:
    """``size`` as an int; raises ``DatasetError`` below :data:`LOWRES` pixels."""
    size = int(size)
    if size < LOWRES:
        raise DatasetError(f"toy-world image size must be >= {LOWRES} pixels, got {size}")
    return size


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
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
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


@cache
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

@cache
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

def draw_scene(scene: Scene, style: str, size: int, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Noise-free float32 [size, size, 3] rendering of ``scene`` in ``style`` from ``RENDER_UNIFORMS`` uniforms.

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
    scale = OBJECT_SCALE[scene.size] * SCALE_JITTER[min(int(u[9] * 3), 2)]
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


def to_uint8(arr: np.ndarray) -> np.ndarray:
    np.clip(arr, 0.0, 255.0, out=arr)
    return np.rint(arr).astype(np.uint8)


def render(scene: Scene, *, style: str, size: int = 32, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as a ``size`` x ``size`` RGB image in ``style`` (``"pretrain"`` or one of :data:`STYLES`).

    ``rng`` draws the background tones, small colour/scale jitter and pixel noise.
    """
    check_style(style, pretrain_ok=True)
    check_combo(scene.color, scene.shape)
    if scene.second is not None:
        check_combo(*scene.second)
    size = check_size(size)
    u = rng.random(RENDER_UNIFORMS)
    if style == "lowres":  # draw at full size, area-average down to 8x8, add noise there, upscale blocky
        full = Image.fromarray(to_uint8(draw_scene(scene, style, size, u)))
        small = np.asarray(full.resize((LOWRES, LOWRES), Image.Resampling.BOX), dtype=np.float32)
        small = small + rng.standard_normal(small.shape, dtype=np.float32) * NOISE_STD
        return Image.fromarray(to_uint8(small)).resize((size, size), Image.Resampling.NEAREST)
    img = draw_scene(scene, style, size, u)
    std = _NOISY_STD if style == "noisy" else NOISE_STD
    img += rng.standard_normal(img.shape, dtype=np.float32) * std
    return Image.fromarray(to_uint8(img))
