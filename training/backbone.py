"""Backbone registry: which frozen CLIP the prompts are learned for.

A backbone is an open_clip model name plus where its weights come from:

* ``pretrained="openai"`` (or another open_clip tag): open_clip downloads and caches the weights.
* ``pretrained="/path/to/weights.{pt,bin,safetensors}"``: a local file (what offline users do).
* ``pretrained="none"``: random weights, seeded by ``init_seed`` so that an artifact trained on them can be
  re-created for export. Only for tests and demos; a warning says so every time.

Weights are never silently replaced: a tag that cannot be fetched is one :class:`BackboneError` that names the
local-file option. Custom configs (e.g. ``tiny-test``) are registered here explicitly with their open_clip
model config dict; nothing is added to open_clip's global config table. Any other open_clip model name
(``open_clip.list_models()``, e.g. ``ViT-B-16-quickgelu`` or ``ViT-L-14-336``) is a backbone too.

The activation comes from the weights (:func:`weights_activation`): an open_clip pretrained tag says whether its
weights were trained with QuickGELU (open_clip's pretrained config, e.g. every ``openai`` tag); a local file or
random weights are built as the named model says (``ViT-B-16``: GELU, ``ViT-B-16-quickgelu``: QuickGELU). open_clip
3.3.0's own ``create_model("ViT-B-16", pretrained="openai")`` builds GELU and only warns of the "QuickGELU
mismatch"; we build what the weights were trained with, i.e. open_clip's ``create_model("ViT-B-16-quickgelu",
pretrained="openai")``. The activation, the open_clip model name and the weights' sha256 are recorded in the
artifact and the bundle manifest.
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

GELU = "gelu"
QUICK_GELU = "quick_gelu"
#: The activations a CLIP transformer can be built with (``nn.GELU`` / open_clip's ``QuickGELU``).
ACTIVATIONS = (GELU, QUICK_GELU)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Exactly one of ``open_clip_name`` (a built-in open_clip config) or ``model_cfg`` (an open_clip model config
    dict, for configs open_clip does not ship) is set. ``quick_gelu`` is the activation of a ``model_cfg`` spec
    (an open_clip name's own config decides for it). ``legacy_quick_gelu``: artifacts written before the activation
    was recorded were built with QuickGELU (every ViT entry of the registry then).
    """

    name: str
    description: str
    open_clip_name: str | None = None
    model_cfg: Mapping[str, Any] | None = None
    default_pretrained: str = "openai"
    quick_gelu: bool = False
    legacy_quick_gelu: bool = False
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
        BackboneSpec("ViT-B-16", "CLIP ViT-B/16 (the papers' backbone with --pretrained openai; GELU for a local "
                     "file: use ViT-B-16-quickgelu for OpenAI weights in a file)", open_clip_name="ViT-B-16",
                     legacy_quick_gelu=True),
        BackboneSpec("ViT-B-32", "CLIP ViT-B/32 (as ViT-B-16)", open_clip_name="ViT-B-32", legacy_quick_gelu=True),
        BackboneSpec("ViT-L-14", "CLIP ViT-L/14 (as ViT-B-16)", open_clip_name="ViT-L-14", legacy_quick_gelu=True),
        BackboneSpec("tiny-test", "2-layer random-init CLIP for tests (32 px, width 64, real BPE vocab)",
                     model_cfg=TINY_TEST_CFG, default_pretrained="none"),
        BackboneSpec("tiny-test-quickgelu", "tiny-test with QuickGELU (as open_clip's *-quickgelu models; tests)",
                     model_cfg=TINY_TEST_CFG, default_pretrained="none", quick_gelu=True),
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
    """The spec of backbone ``name``: a registry entry, else any open_clip model name (built as open_clip's config
    says); an unknown name raises with the known list."""
    if name in BACKBONES:
        return BACKBONES[name]
    import open_clip  # heavy (torch); only names outside the registry need it

    if open_clip.get_model_config(name) is not None:
        return BackboneSpec(name, f"open_clip model {name}", open_clip_name=name)
    raise RegistryError(
        f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}, or any open_clip model name "
        f"(python -c 'import open_clip; print(open_clip.list_models())')"
    )


def _tag_config(spec: BackboneSpec, pretrained: str | None) -> dict[str, Any]:
    """open_clip's pretrained config of tag ``pretrained`` for ``spec`` ({} for files, none, or unknown tags)."""
    if spec.open_clip_name is None or not pretrained or pretrained.lower() == "none" or os.path.isfile(pretrained):
        return {}
    import open_clip

    return dict(open_clip.get_pretrained_cfg(spec.open_clip_name, pretrained) or {})


def weights_activation(spec: BackboneSpec, pretrained: str | None) -> str:
    """The activation the weights ``pretrained`` of ``spec`` need (see the module docstring): an open_clip tag's
    own ``quick_gelu``, else the model config's."""
    if spec.model_cfg is not None:
        return QUICK_GELU if spec.quick_gelu else GELU
    tag = _tag_config(spec, pretrained)
    if tag:
        return QUICK_GELU if tag.get("quick_gelu", False) else GELU
    import open_clip

    cfg = open_clip.get_model_config(spec.open_clip_name) or {}
    return QUICK_GELU if cfg.get("quick_gelu", False) else GELU


def model_activation(model: torch.nn.Module) -> str:
    """The activation a built CLIP really uses, read from its modules (``QuickGELU`` or ``nn.GELU``); raises
    :class:`BackboneError` when its blocks mix them or use another one."""
    from open_clip.transformer import CustomResidualAttentionBlock, QuickGELU, ResidualAttentionBlock

    found = set()
    for block in model.modules():
        if isinstance(block, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
            act = block.mlp.gelu
            found.add(QUICK_GELU if isinstance(act, QuickGELU) else GELU if isinstance(act, torch.nn.GELU)
                      else type(act).__name__)
    if len(found) != 1 or not found <= set(ACTIVATIONS):
        raise BackboneError(f"the backbone's transformer blocks use the activation(s) {sorted(found)}; expected "
                            f"one of {', '.join(ACTIVATIONS)}")
    return found.pop()


@dataclass
class Backbone:
    """A built, frozen CLIP model plus everything export and serving need to know about it."""

    spec: BackboneSpec
    model: torch.nn.Module
    pretrained: str
    weights_sha256: str
    init_seed: int
    preprocess: dict[str, Any] = field(default_factory=dict)
    activation: str = GELU

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def open_clip_model(self) -> str | None:
        """open_clip's model name this backbone was built from (``None`` for a custom ``model_cfg``)."""
        return self.spec.open_clip_name

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
            return f"{self.name} with RANDOM weights (--pretrained none, init seed {self.init_seed}, {self.activation})"
        return (f"{self.name} with pretrained weights {self.pretrained!r} (sha256 {self.weights_sha256[:12]}, "
                f"{self.activation})")


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
    activation: str | None = None,
) -> Backbone:
    """Build backbone ``name`` frozen and in eval mode.

    Args:
        name: a registered backbone name (:func:`list_backbones`) or any open_clip model name.
        pretrained: an open_clip tag (``"openai"``), a local weights file, or ``"none"`` for random weights.
            ``None`` uses the spec's default.
        init_seed: seed of the random initialisation (matters only for ``"none"``).
        device: where to put the model.
        activation: build with this activation (``gelu`` / ``quick_gelu``: how an artifact records it) instead of
            the one the weights need (:func:`weights_activation`).
    """
    import open_clip

    spec = get_backbone_spec(name)
    pretrained = spec.default_pretrained if pretrained is None else str(pretrained)
    if activation is not None and activation not in ACTIVATIONS:
        raise BackboneError(f"unknown activation {activation!r} for backbone {name}; expected one of "
                            f"{', '.join(ACTIVATIONS)}")
    activation = activation or weights_activation(spec, pretrained)
    quick_gelu = activation == QUICK_GELU
    torch.manual_seed(init_seed)  # random init is reproducible: an artifact on random weights can be re-created
    if pretrained.lower() == "none":
        log.warning(
            "Backbone %s uses RANDOM weights (--pretrained none): results mean nothing beyond code paths. "
            "Pass --pretrained openai or --pretrained /path/to/weights for real use.", name,
        )
        model = _instantiate(spec, open_clip, quick_gelu)
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
        model = _instantiate(spec, open_clip, quick_gelu)
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
            model = open_clip.create_model(spec.open_clip_name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                           quick_gelu=quick_gelu)
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
    tag = _tag_config(spec, pretrained)  # an open_clip tag's preprocessing (e.g. SigLIP's mean/std) wins
    preprocess = {
        "image_size": [int(s) for s in size],
        "mean": [float(x) for x in tag.get("mean", spec.mean)],
        "std": [float(x) for x in tag.get("std", spec.std)],
        "interpolation": tag.get("interpolation", spec.interpolation),
        "resize_mode": tag.get("resize_mode", spec.resize_mode),
        "fill_color": 0,
    }
    backbone = Backbone(spec=spec, model=model, pretrained=pretrained, weights_sha256=state_fingerprint(model),
                        init_seed=init_seed, preprocess=preprocess, activation=model_activation(model))
    if backbone.activation != activation:
        raise BackboneError(f"backbone {name} was asked for {activation} but open_clip built {backbone.activation}")
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


def _instantiate(spec: BackboneSpec, open_clip, quick_gelu: bool) -> torch.nn.Module:
    if spec.model_cfg is not None:
        cfg = dict(spec.model_cfg)
        return open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu)
    return open_clip.create_model(spec.open_clip_name, pretrained=None, quick_gelu=quick_gelu)


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
    "ACTIVATIONS", "GELU", "QUICK_GELU", "Backbone", "BackboneSpec", "BACKBONES", "PromptclipError",
    "create_backbone", "get_backbone_spec", "list_backbones", "model_activation", "save_backbone_weights",
    "state_fingerprint", "weights_activation",
]
