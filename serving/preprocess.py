"""Torch-free image decoding and CLIP preprocessing.

:func:`preprocess` reproduces open_clip's eval transform
(``open_clip.transform.image_transform_v2(cfg, is_train=False)``) with PIL and numpy only, bit for
bit on RGB input (``tests/serving/test_preprocess.py`` checks it). What open_clip does, and
therefore what this module mirrors:

* ``shortest``, square target: torchvision ``Resize(size)`` -- the shorter side becomes ``size``,
  the longer ``int(size * long / short)`` (truncated) -- then ``CenterCrop``.
* ``shortest``, non-square target: ``ResizeKeepRatio(size)``, which scales both sides by the
  smaller of the two side ratios with Python ``round`` and **always uses bicubic** (open_clip does
  not forward the configured interpolation there), then ``CenterCrop``.
* ``longest``: ``ResizeKeepRatio(size, longest=1)`` (the longer side fits, ``round``), then
  ``CenterCropOrPad`` padding the short side with ``fill_color`` (left/top get the smaller half).
* ``squash``: resize to exactly ``(H, W)``.
* Resizing is PIL's (antialiased) ``Image.resize``; a resize to the current size is a no-op.
* ``ToTensor`` + ``Normalize`` in float32: ``(uint8 / 255 - mean) / std``.

Deviations: images that are not RGB are converted to RGB *before* resizing (open_clip converts
after), which only matters when callers bypass :func:`decode_image` (it always returns RGB).
``interpolation="nearest"`` is accepted here but open_clip's eval transform refuses it.
"""
from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BundleError, ImageDecodeError

__all__ = ["PreprocessConfig", "decode_image", "preprocess", "INTERPOLATIONS", "RESIZE_MODES"]

logger = logging.getLogger(__name__)

#: Interpolation names and their PIL resampling filters.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "longest", "squash")
_MANIFEST_KEYS = ("image_size", "resize_mode", "interpolation", "mean", "std", "fill_color")
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class PreprocessConfig:
    """Eval preprocessing of a bundle (the manifest's ``preprocessing`` object)."""

    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        size = self.image_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(_is_int(v) and v > 0 for v in size)
        ):
            raise ValueError(f"image_size must be two positive ints [H, W], got {size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 3
                or not all(_is_number(v) and math.isfinite(v) for v in value)
            ):
                raise ValueError(f"{name} must be three finite numbers (one per RGB channel), got {value!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not _is_int(self.fill_color) or not 0 <= self.fill_color <= 255:
            raise ValueError(f"fill_color must be an int in [0, 255], got {self.fill_color!r}")
        # Normalise sequences to tuples of the right element types (frozen: bypass __setattr__).
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "fill_color", int(self.fill_color))

    @classmethod
    def from_manifest(cls, d: Mapping) -> PreprocessConfig:
        """Build from a manifest's ``preprocessing`` mapping.

        ``image_size``, ``mean`` and ``std`` are required; the other keys default to open_clip's
        defaults. Raises :class:`BundleError` on missing or invalid values.
        """
        if not isinstance(d, Mapping):
            raise BundleError(f"manifest 'preprocessing' must be an object, got {type(d).__name__}")
        missing = [k for k in ("image_size", "mean", "std") if k not in d]
        if missing:
            raise BundleError(f"manifest 'preprocessing' lacks required key(s) {missing}; re-export the bundle")
        unknown = sorted(set(d) - set(_MANIFEST_KEYS))
        if unknown:
            logger.warning("ignoring unknown manifest 'preprocessing' keys %s", unknown)
        size = d["image_size"]
        if _is_int(size):  # tolerate a bare int for square inputs
            size = (size, size)
        kwargs = {k: d[k] for k in ("interpolation", "resize_mode", "fill_color") if k in d}
        try:
            return cls(
                image_size=tuple(size) if isinstance(size, (list, tuple)) else size,
                mean=tuple(d["mean"]) if isinstance(d["mean"], (list, tuple)) else d["mean"],
                std=tuple(d["std"]) if isinstance(d["std"], (list, tuple)) else d["std"],
                **kwargs,
            )
        except ValueError as exc:
            raise BundleError(f"invalid manifest 'preprocessing': {exc}") from exc

    def to_manifest(self) -> dict:
        """JSON-serialisable manifest ``preprocessing`` object (inverse of :meth:`from_manifest`)."""
        return {
            "image_size": list(self.image_size),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "fill_color": self.fill_color,
        }


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# -- decoding ---------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 64_000_000,
                 draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode uploaded bytes into an upright RGB image.

    Applies the EXIF orientation, composites transparency onto white and converts every common
    mode (L, P, CMYK, 1, 16-bit, 32-bit int, float) to 8-bit RGB. The whole file is decoded, so a
    truncated upload is refused rather than returned half grey.
    ``draft_to`` (width, height): let the codec decode at a reduced scale that keeps both sides at least that
    large, where the format allows it (JPEG, see :func:`draft_image`); ``max_pixels`` then applies to the reduced
    size.

    Raises:
        ImageDecodeError: empty, too large (bytes or pixels), not an image, truncated or corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageDecodeError("The image is empty (0 bytes); upload the file's contents.")
    if size > max_bytes:
        raise ImageDecodeError(
            f"The image is {size:,} bytes; the limit is {max_bytes:,}. Upload a smaller or recompressed file."
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set globally; truncated uploads may go undetected")

    try:
        # Turn PIL's bomb *warning* into an error too. (catch_warnings edits process-global state;
        # a concurrent request at worst keeps this filter, which is the behaviour we want anyway.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            draft_image(img, draft_to)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(_too_many_pixels(width, height, max_pixels))
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "The upload is not a recognised image file (expected JPEG, PNG, WebP, GIF, BMP, TIFF, ...)."
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            f"The image declares too many pixels to decode safely ({exc}); upload a smaller image."
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncation as OSError("image file is truncated ...") and broken streams
        # as OSError / SyntaxError / ValueError depending on the codec.
        hint = "it looks truncated; upload the complete file" if "truncat" in str(exc).lower() else (
            "it is corrupt or uses an unsupported encoding; re-save it as JPEG or PNG")
        raise ImageDecodeError(f"The image could not be decoded: {hint} ({type(exc).__name__}: {exc}).") from exc
    except Exception as exc:  # any other PIL failure is still the upload's fault
        raise ImageDecodeError(
            f"The image could not be decoded ({type(exc).__name__}: {exc}); re-save it as JPEG or PNG."
        ) from exc

    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # broken EXIF: keep the pixels as stored rather than refuse the image
        logger.warning("ignoring unreadable EXIF orientation: %s: %s", type(exc).__name__, exc)

    try:
        return _to_rgb(img)
    except Exception as exc:
        raise ImageDecodeError(
            f"The image's colour mode {img.mode!r} cannot be converted to RGB ({exc}); "
            "re-save it as an RGB JPEG or PNG."
        ) from exc


def draft_image(img: Image.Image, draft_to: tuple[int, int] | None) -> None:
    """Ask a lazily opened JPEG to decode at 1/2, 1/4 or 1/8 scale while both sides stay >= ``draft_to`` (PIL's
    ``draft``: the DCT is reduced while decoding, so the full-size image never exists in memory). No-op for other
    formats and for ``None``."""
    if draft_to is not None and img.format == "JPEG":
        img.draft(img.mode, (int(draft_to[0]), int(draft_to[1])))


def decoded_size(data: bytes, *, draft_to: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """``(width, height)`` :func:`decode_image` will decode ``data`` at (after :func:`draft_image`), read from the
    header alone; ``None`` when the header is not a recognised image (:func:`decode_image` then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            draft_image(img, draft_to)
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image reports it properly
        return None


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return (
        f"The image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}. "
        "Downscale it before uploading."
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded PIL image to 8-bit RGB, compositing transparency onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8-bit ``L``.

    PIL's own conversion clips these to [0, 255], which turns a typical 16-bit image white.
    Integer modes are taken as 16-bit (0..65535 -> 0..255); float images as [0, 1] when all
    values lie in it, otherwise as [0, 255] (NaN -> 0).
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
    else:
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


# -- preprocessing ----------------------------------------------------------------------------


def preprocess(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """Resize, crop/pad and normalise ``images`` like open_clip's eval transform.

    Returns:
        float32 C-contiguous array ``[B, 3, H, W]``.
    """
    height, width = cfg.image_size
    out = np.empty((len(images), 3, height, width), dtype=np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = _to_rgb(img)
        img = _resize_and_fit(img, cfg)
        pixels = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
        # Same float32 arithmetic as ToTensor (x / 255) and Normalize ((x - mean) / std).
        normalised = (pixels.astype(np.float32) / np.float32(255.0) - mean) / std
        out[i] = normalised.transpose(2, 0, 1)
    return out


def _resize(img: Image.Image, size_hw: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """torchvision ``F.resize`` on PIL: a no-op at the current size, else ``Image.resize``."""
    h, w = size_hw
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), resample)


def _keep_ratio_size(img: Image.Image, target_hw: tuple[int, int], longest: bool) -> tuple[int, int]:
    """open_clip ``ResizeKeepRatio.get_params`` (no random scale/aspect): ``(h, w)`` after resizing."""
    h, w = img.height, img.width
    ratio_h, ratio_w = h / target_hw[0], w / target_hw[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(h / ratio), round(w / ratio)


def _resize_and_fit(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize to the target geometry of ``cfg.resize_mode`` (before normalisation)."""
    target = cfg.image_size
    resample = INTERPOLATIONS[cfg.interpolation]
    if cfg.resize_mode == "squash":
        return _resize(img, target, resample)
    if cfg.resize_mode == "longest":
        img = _resize(img, _keep_ratio_size(img, target, longest=True), resample)
        return _center_crop_or_pad(img, target, cfg.fill_color)
    # shortest
    if target[0] == target[1]:
        # torchvision Resize(int): shorter side -> size, longer side truncated.
        h, w = img.height, img.width
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = target[0], int(target[0] * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        img = _resize(img, (new_h, new_w), resample)
    else:
        # open_clip builds ResizeKeepRatio(image_size) here without the interpolation: bicubic.
        img = _resize(img, _keep_ratio_size(img, target, longest=False), Image.Resampling.BICUBIC)
    return _center_crop_or_pad(img, target, 0)  # torchvision CenterCrop pads with 0


def _center_crop_or_pad(img: Image.Image, target_hw: tuple[int, int], fill: int) -> Image.Image:
    """open_clip ``center_crop_or_pad`` / torchvision ``center_crop`` on a PIL image."""
    crop_h, crop_w = target_hw
    h, w = img.height, img.width
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        padded = Image.new("RGB", (w + left + right, h + top + bottom), (fill,) * 3)
        padded.paste(img, (left, top))
        img, h, w = padded, padded.height, padded.width
        if (h, w) == (crop_h, crop_w):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))
