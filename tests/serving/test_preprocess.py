"""serving.preprocess: parity with open_clip's eval transform, decoding, and decode errors."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.errors import BundleError, ImageDecodeError
from serving.http_errors import http_status
from serving.preprocess import PreprocessConfig, decode_image, preprocess

open_clip_transform = pytest.importorskip("open_clip.transform")
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    """Random RGB image with a gradient under the noise (exercises every resampling tap)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.int64)
    grad = (np.arange(w)[None, :, None] * 255 // max(w - 1, 1) + np.arange(h)[:, None, None]) % 256
    return Image.fromarray(((noise + grad) // 2).astype(np.uint8), "RGB")


# (width, height): landscape, portrait, odd sizes, smaller than target, exact 224, tiny, extreme aspect.
IMAGE_SIZES = [(300, 200), (200, 300), (257, 311), (100, 50), (50, 100), (224, 224), (32, 32), (7, 5), (640, 97)]
TARGETS = [(224, 224), (32, 32), (224, 160), (48, 64)]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_noise_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES)]


def _reference(images: list[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    transform = open_clip_transform.image_transform_v2(
        open_clip_transform.PreprocessCfg(
            size=cfg.image_size,
            mean=cfg.mean,
            std=cfg.std,
            interpolation=cfg.interpolation,
            resize_mode=cfg.resize_mode,
            fill_color=cfg.fill_color,
        ),
        is_train=False,
    )
    return np.stack([transform(img).numpy() for img in images])


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_open_clip_eval_transform(images, target, resize_mode, interpolation) -> None:
    mean, std = (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD) if target[0] != 32 else INCEPTION
    cfg = PreprocessConfig(
        image_size=target, mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode,
        fill_color=127 if resize_mode == "longest" else 0,
    )
    got = preprocess(images, cfg)
    want = _reference(images, cfg)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    assert got.shape == (len(images), 3, *target) == want.shape
    max_diff = float(np.abs(got - want).max())
    assert max_diff <= 1e-5, max_diff
    assert np.array_equal(got, want)  # bit-exact in practice: same PIL resampling, same float32 ops


def test_longest_pads_with_fill_colour() -> None:
    cfg = PreprocessConfig((32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize_mode="longest", fill_color=255)
    out = preprocess([Image.new("RGB", (64, 16), (0, 0, 0))], cfg)[0]
    assert out.shape == (3, 32, 32)
    assert np.all(out[:, :12] == 1.0) and np.all(out[:, -12:] == 1.0)  # 32x8 content centred, rows padded
    assert np.all(out[:, 12:20] == 0.0)


def test_empty_batch_and_non_rgb_input() -> None:
    cfg = PreprocessConfig((32, 32), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert preprocess([], cfg).shape == (0, 3, 32, 32)
    grey = Image.new("L", (40, 40), 100)
    assert np.array_equal(preprocess([grey], cfg), preprocess([grey.convert("RGB")], cfg))
    with pytest.raises(TypeError):
        preprocess([np.zeros((4, 4, 3))], cfg)  # type: ignore[list-item]


def test_nearest_interpolation_is_supported() -> None:
    cfg = PreprocessConfig((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation="nearest", resize_mode="squash")
    img = Image.fromarray(np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((4, 4), np.uint8))).convert("RGB")
    out = preprocess([img], cfg)[0, 0]
    assert set(np.unique(out).tolist()) == {0.0, 1.0}


# -- PreprocessConfig -------------------------------------------------------------------------

MANIFEST = {
    "image_size": [224, 224],
    "resize_mode": "shortest",
    "interpolation": "bicubic",
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "fill_color": 0,
}


def test_manifest_round_trip() -> None:
    cfg = PreprocessConfig.from_manifest(MANIFEST)
    assert cfg.image_size == (224, 224) and cfg.mean == OPENAI_DATASET_MEAN
    d = cfg.to_manifest()
    assert d == MANIFEST and set(d) == set(MANIFEST)
    assert json.loads(json.dumps(d)) == d
    assert PreprocessConfig.from_manifest(d) == cfg


def test_manifest_defaults() -> None:
    cfg = PreprocessConfig.from_manifest({"image_size": [32, 48], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert (cfg.interpolation, cfg.resize_mode, cfg.fill_color) == ("bicubic", "shortest", 0)
    assert cfg.image_size == (32, 48)


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"image_size": [224]}, "image_size"),
        ({"image_size": [0, 224]}, "image_size"),
        ({"image_size": [224.0, 224]}, "image_size"),
        ({"image_size": "224"}, "image_size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"std": [0.5, float("nan"), 0.5]}, "std"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"resize_mode": "crop"}, "resize_mode"),
        ({"fill_color": 300}, "fill_color"),
        ({"fill_color": True}, "fill_color"),
    ],
)
def test_manifest_validation(patch: dict, needle: str) -> None:
    with pytest.raises(BundleError, match=needle):
        PreprocessConfig.from_manifest({**MANIFEST, **patch})


def test_manifest_missing_key_and_wrong_type() -> None:
    with pytest.raises(BundleError, match="std"):
        PreprocessConfig.from_manifest({k: v for k, v in MANIFEST.items() if k != "std"})
    with pytest.raises(BundleError, match="object"):
        PreprocessConfig.from_manifest([1, 2])  # type: ignore[arg-type]


# -- decode_image -----------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_decode_plain_rgb_png_is_lossless() -> None:
    img = _noise_image(31, 17, seed=5)
    out = decode_image(_encode(img, "PNG"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img))


def test_decode_applies_exif_orientation() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    pixels = np.asarray(out).astype(int)
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 60  # red is now on top
    assert pixels[-2, 10, 2] > 200  # blue at the bottom


def test_decode_rgba_transparency_becomes_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:, 3] = 255
    out = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert np.all(out[:, :4] == 255)
    assert np.all(out[:, 4:] == [255, 0, 0])


def test_decode_la_is_composited() -> None:
    la = Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)))
    assert np.all(np.asarray(decode_image(_encode(la, "PNG"))) == 255)


def test_decode_grayscale() -> None:
    out = decode_image(_encode(Image.new("L", (5, 6), 77), "PNG"))
    assert out.mode == "RGB" and out.size == (5, 6) and np.all(np.asarray(out) == 77)


def test_decode_palette_and_palette_with_transparency() -> None:
    pal = Image.new("P", (6, 6), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 3, 6))
    out = np.asarray(decode_image(_encode(pal, "PNG")))
    assert np.all(out[:, :3] == [200, 100, 50]) and np.all(out[:, 3:] == [10, 20, 30])

    out_t = np.asarray(decode_image(_encode(pal, "PNG", transparency=1)))
    assert np.all(out_t[:, :3] == 255) and np.all(out_t[:, 3:] == [10, 20, 30])

    gif = np.asarray(decode_image(_encode(pal, "GIF", transparency=0)))
    assert np.all(gif[:, 3:] == 255) and np.all(gif[:, :3] == [200, 100, 50])


def test_decode_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_encode(cmyk, "JPEG", quality=100))).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.all(out[..., 0] > 230) and np.all(out[..., 1:] < 30)


def test_decode_16bit_png_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = np.asarray(decode_image(_encode(img, "PNG")))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255, 128]


def test_decode_32bit_int_and_float_tiff() -> None:
    as_int = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(decode_image(_encode(as_int, "TIFF")))[0, :, 0].tolist() == [0, 255, 255, 0]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(decode_image(_encode(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.4, 300.0]], dtype=np.float32))
    assert np.asarray(decode_image(_encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 100, 255]


def test_decode_1bit() -> None:
    bits = Image.new("1", (8, 2), 0)
    bits.paste(1, (0, 0, 4, 2))
    out = np.asarray(decode_image(_encode(bits, "PNG")))
    assert np.all(out[:, :4] == 255) and np.all(out[:, 4:] == 0)


def test_decode_then_preprocess() -> None:
    cfg = PreprocessConfig((32, 32), OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    img = decode_image(_encode(_noise_image(50, 40, seed=9), "WEBP", lossless=True))
    assert preprocess([img], cfg).shape == (1, 3, 32, 32)


# -- decode errors ----------------------------------------------------------------------------


def _assert_decode_error(data: bytes, needle: str, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert needle.lower() in str(info.value).lower(), str(info.value)
    assert info.value.field == "image" and http_status(info.value) == 400
    return info.value


def test_error_empty() -> None:
    _assert_decode_error(b"", "empty")


def test_error_not_bytes() -> None:
    _assert_decode_error("a string", "must be bytes")  # type: ignore[arg-type]


def test_error_random_bytes() -> None:
    _assert_decode_error(np.random.default_rng(0).bytes(4096), "not a recognised image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_error_truncated(fmt: str) -> None:
    data = _encode(_noise_image(64, 64, seed=1), fmt)
    _assert_decode_error(data[: len(data) // 2], "truncated")


def test_error_too_many_bytes() -> None:
    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    _assert_decode_error(data, "limit is 10", max_bytes=10)


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched (CRC fixed) to declare ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_error_bomb_over_max_pixels() -> None:
    err = _assert_decode_error(_png_with_declared_size(9_000, 9_000), "pixels")  # < PIL limit
    assert "81,000,000" in str(err) and "Downscale" in str(err)


def test_error_bomb_beyond_pil_limit() -> None:
    # PIL itself refuses this in Image.open (DecompressionBombError) before our own check runs.
    _assert_decode_error(_png_with_declared_size(50_000, 50_000), "too many pixels", max_pixels=10**10)


def test_error_bomb_pil_warning_is_refused() -> None:
    # Between PIL's warning and error thresholds; a generous max_pixels lets PIL's warning decide.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    _assert_decode_error(_png_with_declared_size(side, side), "too many pixels", max_pixels=10**10)


def test_error_bomb_cheap_real_image_with_low_limit() -> None:
    data = _encode(Image.new("1", (400, 300)), "PNG")
    _assert_decode_error(data, "120,000 pixels", max_pixels=100_000)
    assert decode_image(data, max_pixels=120_000).size == (400, 300)


def test_error_corrupt_png_body() -> None:
    data = bytearray(_encode(_noise_image(32, 32, seed=2), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = b"\x00" * 32  # garbage in the zlib stream (CRC now wrong too)
    _assert_decode_error(bytes(data), "could not be decoded")


def test_import_does_not_pull_torch() -> None:
    from promptclip_testing import assert_torch_free

    assert_torch_free("import serving.preprocess")
