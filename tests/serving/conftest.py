"""A small synthetic deploy bundle for the serving tests (built once per session, ~1 s).

The graphs are tiny torch modules exported to ONNX: an image encoder (conv -> linear -> L2
normalise) and a text encoder (token embedding -> mean over non-pad tokens -> linear -> L2
normalise). The class embeddings are computed by the same torch text module on the templated,
tokenised class names, so a class added at runtime must match a direct torch computation.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from serving.format import (  # noqa: E402
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    CLASS_EMBEDDINGS_FILE,
    IMAGE_GRAPH_FILE,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MANIFEST_FILE,
    READER_VERSION,
    TEXT_INPUT,
    TEXT_OUTPUT,
    VOCAB_FILE,
    text_graph_file,
)

TEMPLATE = "a photo of a {}."
CLASS_NAMES = ["cat", "dog", "red car", "tree", "airplane", "sailing boat"]
EMBED_DIM = 32
IMAGE_SIZE = 32
CONTEXT_LENGTH = 77
LOGIT_SCALE = 50.0


@dataclass
class SyntheticBundle:
    """The session bundle plus what tests need to recompute its numbers with torch."""

    path: Path
    class_names: list[str]
    template: str
    text_embed: Callable[[Sequence[str]], np.ndarray]  # torch text module on templated names
    image_embed: Callable[[np.ndarray], np.ndarray]  # torch image module on preprocessed pixels


def _build_modules(vocab_size: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(0)

    class TinyImageEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.fc = nn.Linear(8 * (IMAGE_SIZE // 4) ** 2, EMBED_DIM)

        def forward(self, pixel_values):
            x = torch.relu(self.conv(pixel_values)).flatten(1)
            return F.normalize(self.fc(x), dim=-1)

    class TinyTextEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, 16)
            self.fc = nn.Linear(16, EMBED_DIM)

        def forward(self, input_ids):
            mask = (input_ids != 0).unsqueeze(-1).to(torch.float32)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return F.normalize(self.fc(pooled), dim=-1)

    return TinyImageEncoder().eval(), TinyTextEncoder().eval()


def _export(module, example, path: Path, input_name: str, output_name: str) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=17, dynamo=False,
        )


def make_manifest(root: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """A format-1 manifest for the files in ``root`` (hashes computed from the files)."""
    from serving.bundle import sha256_file

    def spec(file: str, inp: str, dtype: str, shape: list, out: str) -> dict:
        return {"file": file, "sha256": sha256_file(root / file), "opset": 17, "exporter": "torchscript",
                "inputs": [{"name": inp, "dtype": dtype, "shape": shape}],
                "outputs": [{"name": out, "dtype": "float32", "shape": ["N", EMBED_DIM]}]}

    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "min_reader_version": READER_VERSION,
        "created_by": {"promptclip": "test", "torch": "test"},
        "method": {"name": "synthetic", "config": {},
                   "capabilities": {"text_depends_on_image": False, "num_prompt_sets": 1, "class_bound": False,
                                    "finetuned_image_tower": False}},
        "backbone": {"name": "tiny-synthetic", "pretrained": None, "weights_sha256": None},
        "embedding_dim": EMBED_DIM,
        "logit_scale": LOGIT_SCALE,
        "preprocessing": {"image_size": [IMAGE_SIZE, IMAGE_SIZE], "resize_mode": "shortest",
                          "interpolation": "bicubic", "mean": [0.48145466, 0.4578275, 0.40821073],
                          "std": [0.26862954, 0.26130258, 0.27577711], "fill_color": 0},
        "text": {"tokenizer": "clip-bpe", "vocab_file": VOCAB_FILE, "vocab_sha256": sha256_file(root / VOCAB_FILE),
                 "context_length": CONTEXT_LENGTH, "templates": [TEMPLATE], "max_name_tokens": CONTEXT_LENGTH - 2},
        "classes": {"names": list(class_names), "file": CLASS_EMBEDDINGS_FILE,
                    "sha256": sha256_file(root / CLASS_EMBEDDINGS_FILE)},
        "graphs": {
            "image": spec(IMAGE_GRAPH_FILE, IMAGE_INPUT, "float32", ["N", 3, IMAGE_SIZE, IMAGE_SIZE], IMAGE_OUTPUT),
            "text": [spec(text_graph_file(0, 1), TEXT_INPUT, "int64", ["N", CONTEXT_LENGTH], TEXT_OUTPUT)],
        },
        "engines": [],
        "parity": {},
    }


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory) -> SyntheticBundle:
    """Build the synthetic bundle once per session."""
    import torch
    from safetensors.numpy import save_file

    from serving.tokenizer import ClipTokenizer, default_vocab_path

    root = tmp_path_factory.mktemp("synthetic") / "bundle"
    root.mkdir()
    shutil.copyfile(default_vocab_path(), root / VOCAB_FILE)
    tokenizer = ClipTokenizer(root / VOCAB_FILE, context_length=CONTEXT_LENGTH)
    image_module, text_module = _build_modules(tokenizer.vocab_size)
    _export(image_module, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), root / IMAGE_GRAPH_FILE, IMAGE_INPUT,
            IMAGE_OUTPUT)
    _export(text_module, torch.from_numpy(tokenizer(["a", "b c"])), root / text_graph_file(0, 1), TEXT_INPUT,
            TEXT_OUTPUT)

    def text_embed(names: Sequence[str]) -> np.ndarray:
        ids = torch.from_numpy(tokenizer([TEMPLATE.format(n) for n in names]))
        with torch.no_grad():
            return text_module(ids).numpy().astype(np.float32)

    def image_embed(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return image_module(torch.from_numpy(pixels)).numpy().astype(np.float32)

    save_file({"class_embeddings": np.ascontiguousarray(text_embed(CLASS_NAMES))}, str(root / CLASS_EMBEDDINGS_FILE))
    (root / MANIFEST_FILE).write_text(json.dumps(make_manifest(root, CLASS_NAMES), indent=1))
    return SyntheticBundle(root, list(CLASS_NAMES), TEMPLATE, text_embed, image_embed)


@pytest.fixture
def bundle_copy(synthetic_bundle, tmp_path) -> Path:
    """A private copy of the synthetic bundle that a test may modify."""
    dst = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle.path, dst)
    return dst


def _edit_manifest(bundle_dir: Path, edit: Callable[[dict], Any]) -> None:
    """Apply ``edit`` to the manifest of ``bundle_dir`` in place."""
    path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _image_bytes(seed: int = 0, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """An encoded random RGB image."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _pil_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A random RGB PIL image."""
    return Image.open(io.BytesIO(_image_bytes(seed, size))).convert("RGB")


@pytest.fixture
def edit_manifest() -> Callable[[Path, Callable[[dict], Any]], None]:
    """``edit_manifest(bundle_dir, fn)``: apply ``fn`` to the bundle's manifest dict in place."""
    return _edit_manifest


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(seed=0, size=(48, 40), fmt="PNG")``: an encoded random RGB image."""
    return _image_bytes


@pytest.fixture
def pil_image() -> Callable[..., Image.Image]:
    """``pil_image(seed=0, size=(48, 40))``: a random RGB PIL image."""
    return _pil_image
