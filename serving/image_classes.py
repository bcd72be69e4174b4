"""Classes built from a few example images: the row rule and their persisted truth (``class_images.npz``).

A class added from example images gets its row from the bundle's image graph instead of (or beside) its name:

1. each image -> the same decode + preprocessing as ``/classify`` -> image graph -> L2-normalised ``f_i [D]``;
2. prototype ``p = normalise(mean_i f_i)``;
3. modality shift (optional, per class): CLIP's image embeddings sit in another cone than its text embeddings, so
   ``p`` would outscore every text class for every image. With the bundle's calibration images
   (``bundle.calibration.image_embeds [S, N, D]``, written at export) ``p'_k = normalise(p - mean_image_k +
   mean_text_k)``, ``mean_text_k`` = mean of the bundle's class text embeddings of prompt set ``k``. A bundle
   without calibration images is served without the shift (logged once): a mean of the user's own examples would
   move every image class whenever another one is added, and equals ``p`` itself for the first one;
4. blend with the name: ``row_k = normalise(w * text_k(name) + (1 - w) * p'_k)``, ``w = text_weight`` in [0, 1]
   (``0``: images only). With several prompt sets the image side is the same for every set.

The per-image embeddings are the truth (they cannot be re-derived from the name), so they are stored, not derived:
``state_dir/class_images.npz`` holds ``meta`` (a JSON document, :class:`ImageClassFile`) and ``embeddings``
``[sum n_c, D]`` float32, the classes' example embeddings one after the other in ``meta.classes`` order. Each class
records the *image key* its examples were embedded under (:func:`image_encoder_key`: the image graph's hash and the
preprocessing); a class whose key is not the bundle's is never used (:class:`~serving.classes.ClassStateError`
naming it and what to do) and never deleted, except by removing the class. Writes are atomic (temp + fsync +
``os.replace``) and done under the class registry's file lock by the caller; an unreadable file is refused, never
overwritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from .bundle import Bundle
from .classes import ClassStateError, file_signature, replace_file
from .format import FormatModel, FormatSection, FormatSpec, is_int

__all__ = ["IMAGES_FILE", "ImageClass", "ImageClassStore", "ImageClassFile", "ImageClassEntry", "image_encoder_key",
           "image_class_row", "modality_shift_vectors", "DEFAULT_TEXT_WEIGHT", "DEFAULT_MODALITY_SHIFT",
           "DEFAULT_MAX_CLASS_IMAGES", "describe_stale", "check_image_classes", "SOURCE_TEXT", "SOURCE_IMAGES",
           "SOURCE_BOTH"]

logger = logging.getLogger(__name__)

IMAGES_FILE = "class_images.npz"
IMAGES_FORMAT = "promptclip.class_images"
IMAGES_FORMAT_VERSION = 1
#: Blend weight of the name's text embedding when the caller gives none (benchmarks/bench_image_classes.py).
DEFAULT_TEXT_WEIGHT = 0.0
#: Whether the modality shift is applied when the caller does not say (benchmarks/bench_image_classes.py).
DEFAULT_MODALITY_SHIFT = True
#: Most example images one class may be built from in one request (PROMPTCLIP_MAX_CLASS_IMAGES).
DEFAULT_MAX_CLASS_IMAGES = 32
SOURCE_TEXT, SOURCE_IMAGES, SOURCE_BOTH = "text", "images", "text+images"


def image_encoder_key(bundle: Bundle) -> str:
    """SHA-256 hex of what an example image's embedding depends on: the image graph and the preprocessing."""
    ident = {
        "image_graph": bundle.model.graphs.image.sha256,
        "preprocessing": bundle.preprocessing.to_manifest(),
        "embedding_dim": int(bundle.embedding_dim),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


def _normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis (float64 in, float64 out)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def image_class_row(image_embeds: np.ndarray, *, num_sets: int, text_embeds: np.ndarray | None = None,
                    text_weight: float = 0.0, shift: np.ndarray | None = None) -> np.ndarray:
    """The class row ``[S, D]`` float32 of a class built from ``image_embeds [n, D]`` (see the module docstring).

    Args:
        text_embeds: the name's text embedding per prompt set ``[S, D]``; needed when ``text_weight > 0``.
        text_weight: ``w`` of the blend, in [0, 1].
        shift: ``mean_text - mean_image`` per prompt set ``[S, D]``, or ``None`` for no modality shift.
    """
    embeds = np.asarray(image_embeds, dtype=np.float64)  # [n, D]
    proto = _normalise(embeds.mean(axis=0))  # [D]
    rows = np.broadcast_to(proto, (num_sets, proto.shape[0]))  # [S, D]
    if shift is not None:
        rows = _normalise(rows + np.asarray(shift, dtype=np.float64))
    w = float(text_weight)
    if w > 0.0:
        if text_embeds is None:
            raise ValueError("text_weight > 0 needs the name's text embeddings")
        rows = _normalise(w * np.asarray(text_embeds, dtype=np.float64) + (1.0 - w) * rows)
    return np.ascontiguousarray(rows, dtype=np.float32)


def modality_shift_vectors(bundle: Bundle, class_embeddings: np.ndarray) -> np.ndarray | None:
    """``mean_text - mean_image`` per prompt set ``[S, D]`` float64, or ``None`` when the bundle has no calibration
    images. ``class_embeddings`` is the bundle's ``[S, C, D]`` table."""
    calibration = getattr(bundle, "calibration", None)
    image_embeds = getattr(calibration, "image_embeds", None) if calibration is not None else None
    if image_embeds is None:
        return None
    img = np.asarray(image_embeds, dtype=np.float64)
    num_sets, _, dim = class_embeddings.shape
    if img.ndim == 2:  # [N, D]: the same images for every set
        img = img[None]
    if img.ndim != 3 or img.shape[-1] != dim or img.shape[0] not in (1, num_sets) or img.shape[1] == 0:
        logger.error("bundle calibration image_embeds has shape %s (expected [%d, N, %d]): image-built classes are "
                     "served WITHOUT the modality shift", img.shape, num_sets, dim)
        return None
    mean_image = img.mean(axis=1)  # [S or 1, D]
    mean_text = np.asarray(class_embeddings, dtype=np.float64).mean(axis=1)  # [S, D]
    return mean_text - mean_image  # [S, D]


# -- the file ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageClassEntry(FormatSection):
    """One image-built class in ``class_images.npz``'s ``meta``."""

    name: str
    num_images: int
    text_weight: float
    modality_shift: bool
    key: str  #: :func:`image_encoder_key` of the bundle the examples were embedded with


@dataclass(frozen=True, kw_only=True)
class ImageClassFile(FormatModel):
    """``meta`` of ``state_dir/class_images.npz`` (the embeddings are the ``embeddings`` array beside it)."""

    SPEC: ClassVar[FormatSpec] = FormatSpec(
        format=IMAGES_FORMAT, what="promptclip image-class file", newest=IMAGES_FORMAT_VERSION,
        advice="upgrade promptclip to serve from it", version_label="image-class format version")

    format: str = IMAGES_FORMAT
    format_version: int
    dim: int
    classes: list[ImageClassEntry] = field(default_factory=list)

    def check(self, invalid: Callable[[str], Exception]) -> None:
        if not is_int(self.dim) or self.dim < 1:
            raise invalid(f"dim must be a positive int, got {self.dim!r}")
        seen: set[str] = set()
        for c in self.classes:
            if not isinstance(c.name, str) or not c.name or c.name in seen:
                raise invalid(f"class name {c.name!r} is empty, not a string or repeated")
            seen.add(c.name)
            if not is_int(c.num_images) or c.num_images < 1:
                raise invalid(f"class {c.name!r}: num_images must be a positive int, got {c.num_images!r}")
            if isinstance(c.text_weight, bool) or not isinstance(c.text_weight, (int, float)) \
                    or not 0.0 <= c.text_weight <= 1.0:
                raise invalid(f"class {c.name!r}: text_weight must be a number in [0, 1], got {c.text_weight!r}")
            if not isinstance(c.modality_shift, bool) or not isinstance(c.key, str):
                raise invalid(f"class {c.name!r}: modality_shift must be a bool and key a string")


@dataclass(frozen=True)
class ImageClass:
    """An image-built class as stored: its example embeddings ``[n, D]`` and options."""

    name: str
    embeds: np.ndarray  # [n, D] float32
    text_weight: float
    modality_shift: bool
    key: str

    @property
    def num_images(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def source(self) -> str:
        return SOURCE_IMAGES if self.text_weight == 0.0 else SOURCE_BOTH


class ImageClassStore:
    """``state_dir/class_images.npz`` (``state_dir=None``: nothing is read or written)."""

    def __init__(self, state_dir: str | os.PathLike | None, *, dim: int) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.path = self.state_dir / IMAGES_FILE if self.state_dir is not None else None
        self.dim = int(dim)
        self._sig: tuple[int, ...] | None = None

    def changed(self) -> bool:
        """Whether the file differs from the one last read or written (one ``stat``)."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._sig is not None
        return file_signature(st) != self._sig

    def load(self) -> dict[str, ImageClass]:
        """``name -> ImageClass`` of the file (empty when there is none).

        Raises:
            ClassStateError: the file is unreadable or invalid (it is the only copy of those examples: never
                overwritten; the message says what to do).
        """
        if self.path is None:
            return {}
        fix = (f"It holds the example-image embeddings of the image-built classes and is never overwritten "
               f"automatically: restore a good copy, or move it away (`mv {self.path} {self.path}.bad`) and add "
               "those classes again from their images.")
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            self._sig = None
            return {}
        except OSError as exc:
            raise ClassStateError(f"Cannot read image-class file {self.path}: {exc}") from exc
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                meta_json = str(data["meta"])
                emb = np.asarray(data["embeddings"], dtype=np.float32)
            meta = json.loads(meta_json)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise ClassStateError(f"Image-class file {self.path} is corrupt ({type(exc).__name__}: {exc}). {fix}") \
                from exc

        def invalid(msg: str) -> ClassStateError:
            return ClassStateError(f"Image-class file {self.path} is invalid: {msg}. {fix}")

        doc = ImageClassFile.read(meta, source=f"Image-class file {self.path}", invalid=invalid,
                                  error=ClassStateError)
        total = sum(c.num_images for c in doc.classes)
        if emb.ndim != 2 or emb.shape != (total, doc.dim):
            raise invalid(f"embeddings has shape {emb.shape}, expected [{total}, {doc.dim}]")
        out: dict[str, ImageClass] = {}
        start = 0
        for c in doc.classes:
            out[c.name] = ImageClass(c.name, emb[start:start + c.num_images], float(c.text_weight),
                                     bool(c.modality_shift), c.key)
            start += c.num_images
        self._sig = file_signature(st)
        return out

    def save(self, classes: Mapping[str, ImageClass]) -> None:
        """Atomically replace the file with ``classes`` (call under the registry's file lock).

        Raises:
            ClassStateError: the file cannot be written (the change is not applied).
        """
        if self.path is None or self.state_dir is None:
            return
        entries = [ImageClassEntry(name=c.name, num_images=c.num_images, text_weight=float(c.text_weight),
                                   modality_shift=bool(c.modality_shift), key=c.key) for c in classes.values()]
        doc = ImageClassFile(format_version=IMAGES_FORMAT_VERSION, dim=self.dim, classes=entries)
        emb = (np.concatenate([np.asarray(c.embeds, dtype=np.float32) for c in classes.values()])
               if classes else np.zeros((0, self.dim), dtype=np.float32))  # [sum n, D]
        meta = np.array(json.dumps(doc.to_json(), ensure_ascii=False))
        try:
            st = replace_file(self.path, lambda fh: np.savez(fh, meta=meta, embeddings=emb))
        except OSError as exc:
            raise ClassStateError(f"Cannot write image-class file {self.path}: {exc}; the change was not applied -- "
                                  "check disk space and permissions") from exc
        self._sig = file_signature(st)


def check_image_classes(bundle: Bundle, state_dir: str | os.PathLike, registered: list[str]) -> list[str]:
    """Pre-flight check of ``state_dir/class_images.npz`` for ``bundle``: the registered image-built classes whose
    examples were embedded under another image key (they answer 503 until removed).

    Raises:
        ClassStateError: the file is unreadable or invalid.
    """
    stored = ImageClassStore(state_dir, dim=bundle.embedding_dim).load()
    key = image_encoder_key(bundle)
    listed = set(registered)
    return [n for n, c in stored.items() if n in listed and c.key != key]


def describe_stale(names: list[str]) -> str:
    """The message for image-built classes whose examples were embedded by another image encoder."""
    shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    return (f"class(es) {shown} were built from example images embedded by another image encoder or preprocessing "
            "(the bundle changed since they were added), so their rows cannot be used with this bundle. Remove them "
            "(`promptclip classes remove --names ...` or POST /remove_classes) and add them again from their images "
            "(`promptclip classes add --name ... --images ...`); nothing was deleted.")
