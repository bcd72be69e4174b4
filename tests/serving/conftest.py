"""A small synthetic deploy bundle for the serving tests (built once per session, ~1 s).

The graphs are tiny torch modules exported to ONNX: an image encoder (conv -> linear -> L2
normalise) and a text encoder (token embedding -> mean over non-pad tokens -> linear -> L2
normalise). The class embeddings are computed by the same torch text module on the templated,
tokenised class names, so a class added at runtime must match a direct torch computation.

A second session bundle (:func:`multiset_bundle`) has three prompt sets (bundle format 2): its image
module also returns softmax expert weights ``[B, 3]`` (second ONNX output ``expert_weights``) and
each set has its own text module (different weights) and template.

Both manifests are built as :class:`serving.manifest.BundleManifest` and written by
:func:`serving.manifest.write_manifest`, the writer ``export`` uses.
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
    CLASS_EMBEDDINGS_FILE,
    COMBINE_WEIGHTED_SUM,
    EXPERT_WEIGHTS_OUTPUT,
    IMAGE_GRAPH_FILE,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MANIFEST_FILE,
    TEXT_INPUT,
    TEXT_OUTPUT,
    VOCAB_FILE,
    class_embeddings_key,
    text_graph_file,
)
from serving.manifest import (  # noqa: E402
    BackboneInfo,
    BundleManifest,
    Capabilities,
    ClassesInfo,
    Graphs,
    GraphSpec,
    MethodInfo,
    Preprocessing,
    PromptSets,
    TensorSpec,
    TextInfo,
    bundle_versions,
    sha256_file,
    write_manifest,
)

TEMPLATE = "a photo of a {}."
CLASS_NAMES = ["cat", "dog", "red car", "tree", "airplane", "sailing boat"]
EMBED_DIM = 32
IMAGE_SIZE = 32
CONTEXT_LENGTH = 77
LOGIT_SCALE = 50.0
#: Templates and names of the three prompt sets of the multi-set bundle; set 1's template is the longest.
MULTISET_TEMPLATES = ["a photo of a {}.", "a blurry sketch of a {}.", "art of a {}."]
MULTISET_NAMES = ["photo", "sketch", "art"]


@dataclass
class SyntheticBundle:
    """The session bundle plus what tests need to recompute its numbers with torch."""

    path: Path
    class_names: list[str]
    template: str
    text_embed: Callable[[Sequence[str]], np.ndarray]  # torch text module on templated names
    image_embed: Callable[[np.ndarray], np.ndarray]  # torch image module on preprocessed pixels


@dataclass
class MultiSetBundle:
    """The session bundle with three prompt sets plus its torch modules."""

    path: Path
    class_names: list[str]
    templates: list[str]
    prompt_set_names: list[str]
    text_embed: Callable[[Sequence[str], int], np.ndarray]  # set k's torch text module on names in set k's template
    image_embed: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # pixels -> (embeds [B,D], weights [B,S])


def _build_modules(vocab_size: int, seed: int = 0):
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(seed)

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


def _build_expert_image_module():
    """Image module of the multi-set bundle: (L2-normalised embeds [B,D], softmax expert weights [B,S])."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(1)
    num_sets = len(MULTISET_TEMPLATES)

    class TinyExpertImageEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.fc = nn.Linear(8 * (IMAGE_SIZE // 4) ** 2, EMBED_DIM)
            self.gate = nn.Linear(8 * (IMAGE_SIZE // 4) ** 2, num_sets)

        def forward(self, pixel_values):
            x = torch.relu(self.conv(pixel_values)).flatten(1)
            # x4 so that the weights are far from uniform and differ between images.
            return F.normalize(self.fc(x), dim=-1), torch.softmax(4.0 * self.gate(x), dim=-1)

    return TinyExpertImageEncoder().eval()


def _export(module, example, path: Path, input_name: str, output_name: str | Sequence[str]) -> None:
    import torch

    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=output_names,
            dynamic_axes={input_name: {0: "batch"}, **{o: {0: "batch"} for o in output_names}}, opset_version=17,
            dynamo=False,
        )


def make_manifest(root: Path, class_names: Sequence[str], templates: Sequence[str] = (TEMPLATE,),
                  prompt_set_names: Sequence[str] | None = None) -> BundleManifest:
    """The manifest model for the files in ``root`` (hashes computed from the files): format 1 for one template,
    format 2 (``prompt_sets``, ``expert_weights`` output) for several."""
    num_sets = len(templates)

    def spec(file: str, inp: str, dtype: str, shape: list, out: str) -> GraphSpec:
        return GraphSpec(file=file, sha256=sha256_file(root / file), opset=17, exporter="torchscript",
                         inputs=[TensorSpec(name=inp, dtype=dtype, shape=shape)],
                         outputs=[TensorSpec(name=out, dtype="float32", shape=["N", EMBED_DIM])])

    image_spec = spec(IMAGE_GRAPH_FILE, IMAGE_INPUT, "float32", ["N", 3, IMAGE_SIZE, IMAGE_SIZE], IMAGE_OUTPUT)
    prompt_sets = None
    if num_sets > 1:
        image_spec.outputs.append(TensorSpec(name=EXPERT_WEIGHTS_OUTPUT, dtype="float32", shape=["N", num_sets]))
        prompt_sets = PromptSets(names=list(prompt_set_names or [f"set{k}" for k in range(num_sets)]),
                                 combine=COMBINE_WEIGHTED_SUM)
    return BundleManifest(
        **bundle_versions(num_sets),
        prompt_sets=prompt_sets,
        created_by={"promptclip": "test", "torch": "test"},
        method=MethodInfo(name="synthetic", config={},
                          capabilities=Capabilities(text_depends_on_image=False, num_prompt_sets=num_sets,
                                                    class_bound=False, finetuned_image_tower=False)),
        backbone=BackboneInfo(name="tiny-synthetic", pretrained=None, weights_sha256=None),
        embedding_dim=EMBED_DIM,
        logit_scale=LOGIT_SCALE,
        preprocessing=Preprocessing(image_size=[IMAGE_SIZE, IMAGE_SIZE], resize_mode="shortest",
                                    interpolation="bicubic", mean=[0.48145466, 0.4578275, 0.40821073],
                                    std=[0.26862954, 0.26130258, 0.27577711], fill_color=0),
        text=TextInfo(tokenizer="clip-bpe", vocab_file=VOCAB_FILE, vocab_sha256=sha256_file(root / VOCAB_FILE),
                      context_length=CONTEXT_LENGTH, templates=list(templates), max_name_tokens=CONTEXT_LENGTH - 2),
        classes=ClassesInfo(names=list(class_names), file=CLASS_EMBEDDINGS_FILE,
                            sha256=sha256_file(root / CLASS_EMBEDDINGS_FILE)),
        graphs=Graphs(image=image_spec,
                      text=[spec(text_graph_file(k, num_sets), TEXT_INPUT, "int64", ["N", CONTEXT_LENGTH], TEXT_OUTPUT)
                            for k in range(num_sets)]),
        engines=[],
        parity={},
    )


def _new_bundle_dir(tmp_path_factory, name: str):
    """An empty bundle directory holding the CLIP vocabulary, and the tokenizer reading it."""
    from serving.tokenizer import ClipTokenizer, default_vocab_path

    root = tmp_path_factory.mktemp(name) / "bundle"
    root.mkdir()
    shutil.copyfile(default_vocab_path(), root / VOCAB_FILE)
    return root, ClipTokenizer(root / VOCAB_FILE, context_length=CONTEXT_LENGTH)


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory) -> SyntheticBundle:
    """Build the synthetic bundle once per session."""
    import torch
    from safetensors.numpy import save_file

    root, tokenizer = _new_bundle_dir(tmp_path_factory, "synthetic")
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
    write_manifest(root, make_manifest(root, CLASS_NAMES))
    return SyntheticBundle(root, list(CLASS_NAMES), TEMPLATE, text_embed, image_embed)


@pytest.fixture(scope="session")
def multiset_bundle(tmp_path_factory) -> MultiSetBundle:
    """Build the three-prompt-set (format 2) bundle once per session."""
    import torch
    from safetensors.numpy import save_file

    root, tokenizer = _new_bundle_dir(tmp_path_factory, "multiset")
    num_sets = len(MULTISET_TEMPLATES)
    image_module = _build_expert_image_module()
    text_modules = [_build_modules(tokenizer.vocab_size, seed=10 + k)[1] for k in range(num_sets)]
    _export(image_module, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), root / IMAGE_GRAPH_FILE, IMAGE_INPUT,
            [IMAGE_OUTPUT, EXPERT_WEIGHTS_OUTPUT])
    for k, module in enumerate(text_modules):
        _export(module, torch.from_numpy(tokenizer(["a", "b c"])), root / text_graph_file(k, num_sets), TEXT_INPUT,
                TEXT_OUTPUT)

    def text_embed(names: Sequence[str], prompt_set: int) -> np.ndarray:
        ids = torch.from_numpy(tokenizer([MULTISET_TEMPLATES[prompt_set].format(n) for n in names]))
        with torch.no_grad():
            return text_modules[prompt_set](ids).numpy().astype(np.float32)

    def image_embed(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            embeds, weights = image_module(torch.from_numpy(pixels))
        return embeds.numpy().astype(np.float32), weights.numpy().astype(np.float32)

    save_file({class_embeddings_key(k, num_sets): np.ascontiguousarray(text_embed(CLASS_NAMES, k))
               for k in range(num_sets)}, str(root / CLASS_EMBEDDINGS_FILE))
    write_manifest(root, make_manifest(root, CLASS_NAMES, MULTISET_TEMPLATES, MULTISET_NAMES))
    return MultiSetBundle(root, list(CLASS_NAMES), list(MULTISET_TEMPLATES), list(MULTISET_NAMES), text_embed,
                          image_embed)


@pytest.fixture
def multiset_copy(multiset_bundle, tmp_path) -> Path:
    """A private copy of the multi-set bundle that a test may modify."""
    dst = tmp_path / "multiset"
    shutil.copytree(multiset_bundle.path, dst)
    return dst


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


@pytest.fixture
def build_manifest() -> Callable[..., BundleManifest]:
    """``build_manifest(root, class_names, templates=(TEMPLATE,), prompt_set_names=None)``: the manifest model the
    session bundles are written with, for the files in ``root``."""
    return make_manifest


class CountingRuntime:
    """Wraps a runtime and counts ``run_text`` calls and texts (what a test of "nothing was encoded" reads)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.texts = 0

    def run_text(self, ids: np.ndarray, prompt_set: int = 0) -> np.ndarray:
        self.calls += 1
        self.texts += len(ids)
        return self.inner.run_text(ids, prompt_set)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def counting_runtime() -> type[CountingRuntime]:
    return CountingRuntime
