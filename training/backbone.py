"""Backbone registry: which frozen CLIP the prompts are learned for.

A backbone is an open_clip model name plus where its weights come from:

* ``pretrained="openai"`` (or another open_clip tag): open_clip downloads and caches the weights.
* ``pretrained="/path/to/weights.{pt,bin,safetensors}"``: a local file (what offline users do).
* ``pretrained="none"``: random weights, seeded by ``init_seed`` so that an artifact trained on them can be
  re-created for export. Only for tests and demos; a warning says so every time.

Weights are never silently replaced: a tag that cannot be fetched is one :class:`BackboneError` that names the
local-file option. Custom configs (e.g. ``tiny-test``) are registered here explicitly with their open_clip
model config dict; nothing is added to open_clip's global config table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.errors import PromptclipError
from training.errors import BackboneError, RegistryError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Exactly one of ``open_clip_name`` (a built-in open_clip config) or ``model_cfg`` (an open_clip model config
    dict, for configs open_clip does not ship) is set.
    """

    name: str
    description: str
    open_clip_name: str | None = None
    model_cfg: Mapping[str, Any] | None = None
    default_pretrained: str = "openai"
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    #: local weight files shipped with (or produced by) promptclip, by tag: {"toyworld": "training/toyworld/..."}
    weights_files: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.open_clip_name is None) == (self.model_cfg is None):
            raise ValueError(f"backbone {self.name!r}: set exactly one of open_clip_name / model_cfg")

    @property
    def num_layers(self) -> int | None:
        """Layers of the shallower tower when the spec knows its architecture (``model_cfg`` given, or an open_clip
        config it can read), else ``None`` (e.g. a ResNet image tower or a Hugging Face text tower)."""
        cfg = self.model_cfg
        if cfg is None:
            import open_clip  # heavy (torch); only built-in configs need it

            cfg = open_clip.get_model_config(self.open_clip_name)
            if cfg is None:
                return None
        layers = [(cfg.get(tower) or {}).get("layers") for tower in ("vision_cfg", "text_cfg")]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in layers):
            return None
        return min(layers)


#: Tiny random-init config for tests: 32 px images, patch 8 (16 patches), 2-layer towers of width 64,
#: the real CLIP BPE vocabulary and context length, so every tokenizer/export path is the real one.
TINY_TEST_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


#: The toy world's CLIP (issue 3): embed 64, 4-layer width-128 ViT (patch 8, 32 px), 4-layer width-128 text tower
#: with the real BPE vocabulary and context length. Weights: ``promptclip toyworld pretrain``.
TOY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
TOY_CLIP_WEIGHTS = "toyworld/weights/toy-clip.safetensors"  # relative to the training package


def _build_registry() -> dict[str, BackboneSpec]:
    specs = [
        BackboneSpec("ViT-B-16", "OpenAI CLIP ViT-B/16 (the papers' backbone)", open_clip_name="ViT-B-16",
                     quick_gelu=True),
        BackboneSpec("ViT-B-32", "OpenAI CLIP ViT-B/32", open_clip_name="ViT-B-32", quick_gelu=True),
        BackboneSpec("ViT-L-14", "OpenAI CLIP ViT-L/14", open_clip_name="ViT-L-14", quick_gelu=True),
        BackboneSpec("tiny-test", "2-layer random-init CLIP for tests (32 px, width 64, real BPE vocab)",
                     model_cfg=TINY_TEST_CFG, default_pretrained="none"),
        BackboneSpec("toy-clip", "8M-param CLIP pretrained offline on the procedural toy world (32 px)",
                     model_cfg=TOY_CLIP_CFG, default_pretrained="toyworld",
                     weights_files={"toyworld": TOY_CLIP_WEIGHTS}),
    ]
    registry: dict[str, BackboneSpec] = {}
    for spec in specs:
        if spec.name in registry:
            raise RegistryError(f"duplicate backbone name {spec.name!r}")
        registry[spec.name] = spec
    return registry


BACKBONES: dict[str, BackboneSpec] = _build_registry()


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``; an unknown name raises with the known list."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise RegistryError(
            f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}"
        ) from None


@dataclass
class Backbone:
    """A built, frozen CLIP model plus everything export and serving need to know about it."""

    spec: BackboneSpec
    model: torch.nn.Module
    pretrained: str
    weights_sha256: str
    init_seed: int
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def context_length(self) -> int:
        return int(self.model.context_length) if hasattr(self.model, "context_length") else 77

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def tokenizer(self):
        """open_clip's tokenizer for this backbone (training side; serving has its own numpy twin)."""
        import open_clip

        return open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    def describe_weights(self) -> str:
        """One line that says plainly which weights are loaded."""
        if self.pretrained == "none":
            return f"{self.name} with RANDOM weights (--pretrained none, init seed {self.init_seed})"
        return f"{self.name} with pretrained weights {self.pretrained!r} (sha256 {self.weights_sha256[:12]})"


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's state (names, shapes, float32 bytes): identifies the weights whatever their source."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def create_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    init_seed: int = 0,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build backbone ``name`` frozen and in eval mode.

    Args:
        name: a registered backbone name (:func:`list_backbones`).
        pretrained: an open_clip tag (``"openai"``), a local weights file, or ``"none"`` for random weights.
            ``None`` uses the spec's default.
        init_seed: seed of the random initialisation (matters only for ``"none"``).
        device: where to put the model.
    """
    import open_clip

    spec = get_backbone_spec(name)
    pretrained = spec.default_pretrained if pretrained is None else str(pretrained)
    torch.manual_seed(init_seed)  # random init is reproducible: an artifact on random weights can be re-created
    if pretrained.lower() == "none":
        log.warning(
            "Backbone %s uses RANDOM weights (--pretrained none): results mean nothing beyond code paths. "
            "Pass --pretrained openai or --pretrained /path/to/weights for real use.", name,
        )
        model = _instantiate(spec, open_clip)
        pretrained = "none"
    elif pretrained in spec.weights_files or os.path.isfile(pretrained):
        if pretrained in spec.weights_files:
            path = Path(__file__).resolve().parent / spec.weights_files[pretrained]
            if not path.is_file():
                raise BackboneError(
                    f"{name} weights {pretrained!r} are not built yet ({path} is missing); run "
                    f"'promptclip toyworld pretrain' once (about 15 minutes on 2 CPU cores)"
                )
            pretrained_path = str(path)
        else:
            pretrained_path = pretrained
        model = _instantiate(spec, open_clip)
        try:
            load_weights_file(model, pretrained_path)
        except Exception as exc:  # open_clip raises RuntimeError/KeyError/pickle errors for bad files
            raise BackboneError(
                f"could not load weights file {pretrained_path!r} into backbone {name!r}: {exc}. "
                f"Pass an open_clip/OpenAI checkpoint (.pt/.bin/.safetensors) of the same architecture."
            ) from exc
    elif _looks_like_path(pretrained):
        raise BackboneError(f"weights file {pretrained!r} does not exist; check the path given to --pretrained")
    else:
        if spec.open_clip_name is None:
            raise BackboneError(
                f"backbone {name!r} has no downloadable tag {pretrained!r}; pass a local weights file "
                f"(--pretrained /path/to/weights.safetensors) or --pretrained none"
            )
        known = open_clip.list_pretrained_tags_by_model(spec.open_clip_name)
        if pretrained not in known:
            raise BackboneError(
                f"unknown pretrained tag {pretrained!r} for {name}; known tags: {', '.join(known)} "
                f"(or a local weights file path, or none)"
            )
        try:
            model = open_clip.create_model(
                spec.open_clip_name, pretrained=pretrained, force_quick_gelu=spec.quick_gelu
            )
        except (RuntimeError, OSError) as exc:
            raise BackboneError(
                f"could not fetch pretrained weights {pretrained!r} for {name} (offline, or the hub is unreachable). "
                f"Download them where you have internet and pass the file: --pretrained /path/to/{name}.pt "
                f"(an OpenAI/open_clip checkpoint). Original error: {str(exc).splitlines()[0][:300]}"
            ) from exc
    model = model.to(device).eval()
    model.requires_grad_(False)
    _check_supported(model, name)
    size = model.visual.image_size
    size = list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)]
    preprocess = {
        "image_size": [int(s) for s in size],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "resize_mode": spec.resize_mode,
        "fill_color": 0,
    }
    backbone = Backbone(spec=spec, model=model, pretrained=pretrained, weights_sha256=state_fingerprint(model),
                        init_seed=init_seed, preprocess=preprocess)
    log.info("Backbone: %s", backbone.describe_weights())
    return backbone


SPARSE_ROWS_KEY = "token_embedding.rows"
SPARSE_VALUES_KEY = "token_embedding.values"


def load_weights_file(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint strictly. Besides open_clip's formats, reads promptclip's compact safetensors format in
    which the token embedding is stored as the rows that were ever trained (``token_embedding.rows`` ids +
    ``token_embedding.values``); all other rows are zero (they were zero-initialised and never updated)."""
    import open_clip

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
        if SPARSE_ROWS_KEY in state:
            rows, values = state.pop(SPARSE_ROWS_KEY), state.pop(SPARSE_VALUES_KEY)
            emb = torch.zeros_like(model.token_embedding.weight)
            emb[rows.long()] = values.to(emb.dtype)
            state["token_embedding.weight"] = emb
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            model.load_state_dict(state, strict=True)
            return
    open_clip.load_checkpoint(model, path, strict=True)


def save_compact_weights(model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype = torch.float16,
                         metadata: dict[str, str] | None = None) -> Path:
    """Save ``model`` in the compact format of :func:`load_weights_file` (only non-zero token-embedding rows)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight")
    rows = torch.nonzero(emb.abs().sum(-1) > 0).flatten()
    state[SPARSE_ROWS_KEY] = rows.to(torch.int64)
    state[SPARSE_VALUES_KEY] = emb[rows]
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata entry at most: safetensors writes a multi-key metadata map in hash order, so the file bytes (and
    # its sha256) would differ between identical saves
    save_file(state, str(path), metadata={"promptclip": json.dumps(metadata, sort_keys=True)} if metadata else None)
    return path


def _instantiate(spec: BackboneSpec, open_clip) -> torch.nn.Module:
    if spec.model_cfg is not None:
        cfg = dict(spec.model_cfg)
        return open_clip.model.CLIP(**cfg, quick_gelu=spec.quick_gelu)
    return open_clip.create_model(spec.open_clip_name, pretrained=None, force_quick_gelu=spec.quick_gelu)


def _check_supported(model: torch.nn.Module, name: str) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(getattr(model, "visual", None), VisionTransformer):
        raise BackboneError(
            f"backbone {name!r} has a {type(getattr(model, 'visual', None)).__name__} image tower; prompt learning "
            f"here needs an open_clip VisionTransformer (ViT-*) backbone"
        )
    if not hasattr(model, "token_embedding"):
        raise BackboneError(f"backbone {name!r} has a custom (HF) text tower; use a CLIP text transformer backbone")


def save_backbone_weights(backbone: Backbone, path: str | Path) -> Path:
    """Write the backbone's full state dict as safetensors (usable later as ``--pretrained <path>``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    return path


__all__ = [
    "Backbone", "BackboneSpec", "BACKBONES", "PromptclipError", "create_backbone", "get_backbone_spec",
    "list_backbones", "save_backbone_weights", "state_fingerprint",
]
