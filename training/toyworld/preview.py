"""Contact sheets of the toy world: one row per style, one column per class, to look at the data."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.toyworld import world

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PREVIEW_CLASSES", "save_contact_sheet"]

#: A spread of colours and shapes (every colour and shape at least once).
DEFAULT_PREVIEW_CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("orange", "square"), ("yellow", "triangle"), ("green", "star"),
    ("teal", "diamond"), ("blue", "hexagon"), ("purple", "cross"), ("pink", "ring"),
    ("brown", "crescent"), ("black", "arrow"), ("red", "heart"), ("blue", "bar"),
)

_LABEL_W = 64
_HEADER_H = 14
_GAP = 2


def save_contact_sheet(
    path: str | os.PathLike,
    *,
    styles: Sequence[str] = (world.PRETRAIN_STYLE, *world.STYLES),
    classes: Sequence[tuple[str, str]] = DEFAULT_PREVIEW_CLASSES,
    size: int = 32,
    scale: int = 3,
    seed: int = 0,
) -> str:
    """Write a PNG grid (rows: ``styles``, columns: ``classes``), each image ``size`` px shown ``scale``x
    (nearest-neighbour); row labels name the style, column headers the class. Returns the path."""
    cell = int(size) * int(scale)
    rows, cols = len(styles), len(classes)
    width = _LABEL_W + cols * (cell + _GAP)
    height = _HEADER_H + rows * (cell + _GAP)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for j, (color, shape) in enumerate(classes):
        x = _LABEL_W + j * (cell + _GAP)
        draw.text((x + 1, 1), world.class_name(color, shape)[: max(4, cell // 6)], fill=(0, 0, 0), font=font)
    for i, style in enumerate(styles):
        y = _HEADER_H + i * (cell + _GAP)
        draw.text((2, y + cell // 2 - 5), style, fill=(0, 0, 0), font=font)
        for j, (color, shape) in enumerate(classes):
            rng = np.random.default_rng([int(seed), i, j])
            scene = world.sample_scene(rng, color, shape, style=style)
            im = world.render(scene, style=style, size=size, rng=rng)
            sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (_LABEL_W + j * (cell + _GAP), y))
    out = os.fspath(path)
    sheet.save(out, format="PNG")
    logger.info("wrote toy-world contact sheet (%d styles x %d classes) to %s", rows, cols, out)
    return out
