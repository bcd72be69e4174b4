"""The toy world's vocabulary: colours, shapes, sizes, textures, styles, caption templates, and the :class:`Scene`
record every image is drawn from. Shared by :mod:`training.toyworld.world` (scenes, captions, datasets) and
:mod:`training.toyworld.render` (drawing); import the public names from ``training.toyworld.world``.
"""
from __future__ import annotations

from dataclasses import dataclass

from training.errors import DatasetError

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

#: Object diameter / image side per size, and the small per-image jitter of it.
OBJECT_SCALE = {"small": 0.35, "large": 0.70}
SCALE_JITTER = (0.92, 1.0, 1.08)


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



#: All 120 ``(color, shape)`` pairs, sorted by :func:`class_name`.
ALL_CLASSES: tuple[tuple[str, str], ...] = tuple(sorted(((c, s) for c in COLORS for s in SHAPES),
                                                        key=lambda p: class_name(*p)))


def all_classes() -> list[tuple[str, str]]:
    """All 120 ``(color, shape)`` pairs, sorted by :func:`class_name`."""
    return list(ALL_CLASSES)


def check_combo(color: str, shape: str) -> None:
    if color not in COLORS:
        raise DatasetError(f"unknown colour {color!r}: expected one of {', '.join(COLORS)}")
    if shape not in SHAPES:
        raise DatasetError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def check_style(style: str, *, pretrain_ok: bool) -> None:
    if style == PRETRAIN_STYLE and pretrain_ok:
        return
    if style not in STYLES:
        known = ", ".join(([PRETRAIN_STYLE] if pretrain_ok else []) + list(STYLES))
        raise DatasetError(f"unknown toy-world style {style!r}: expected one of {known}")
