"""The interface every prompt-learning method implements, and the shared pieces they use.

A method is an ``nn.Module`` that owns its trainable tensors and holds the frozen CLIP as ``self.clip``. It
encodes images and (templated, tokenised) class names into L2-normalised embeddings, and returns its training
loss as a dict of named parts (``"loss"`` is the total that is backpropagated). Everything that needs a second,
frozen CLIP (regularisers, teachers) is training-only and never reached by :meth:`encode_image` /
:meth:`encode_text`, which are what export traces.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from serving.format import canonical_class_name
from training.backbone import Backbone
from training.callbacks import Callback
from training.config import config_from_dict
from training.errors import ConfigError
from training.prompting.encoders import PromptedTextEncoder, PromptedVisionEncoder, l2_normalize

log = logging.getLogger(__name__)

#: Metadata key that marks a config option as a prompt depth (a number of encoder blocks that get prompts):
#: ``depth_text: int = field(default=9, metadata={PROMPT_DEPTH: True})``. :meth:`PromptMethod.config_for_backbone`
#: fits exactly the options marked so to a backbone (never options recognised by their name).
PROMPT_DEPTH = "prompt_depth"


@dataclass(frozen=True)
class Capabilities:
    """What a method's exported form looks like; export and serving read these, never method names."""

    #: text embeddings depend on the image (CoCoOp-like): class embeddings cannot be precomputed.
    text_depends_on_image: bool = False
    #: number of text prompt sets (GuiDG experts); one text graph per set.
    num_prompt_sets: int = 1
    #: trainable modules tied to the training class list (class names cannot be added at runtime).
    class_bound: bool = False
    #: the image tower itself is fine-tuned (its weights go into the artifact).
    finetuned_image_tower: bool = False
    #: the method has trainable tensors at all (zero-shot CLIP has none).
    trainable: bool = True


class InstanceCapabilities:
    """A ``capabilities`` descriptor for methods whose capabilities depend on their config.

    On an instance it returns ``self._capabilities`` (set in ``__init__``); on the class (CLI listing, docs) it
    returns ``default``, the capabilities of the default config.
    """

    def __init__(self, default: Capabilities) -> None:
        self.default = default

    def __get__(self, obj, owner) -> Capabilities:
        if obj is None:
            return self.default
        return obj._capabilities


@dataclass(frozen=True)
class TrainStage:
    """One stage of a method's training. Most methods have one; GuiDG has one per domain expert plus fine-tuning.

    The workflow picks the stage's training samples and settings from these fields; the method, in
    :meth:`PromptMethod.enter_stage`, decides which of its tensors train.
    """

    name: str
    #: train on the samples of these source domains only (``None``: every domain).
    domains: tuple[str, ...] | None = None
    #: ``all`` the training pool, or the ``first`` / ``second`` of two disjoint parts of each domain's pool
    #: (``second`` holds ``part_fraction`` of it), split before few-shot sampling (GuiDG: experts vs aggregation).
    part: str = "all"
    part_fraction: float = 0.5
    #: each step takes ``batch_size // n_domains`` images from every domain (one stream per domain, zipped).
    balanced_domains: bool = False
    #: :class:`~training.engine.TrainConfig` fields that differ in this stage (e.g. optimiser and lr).
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.part not in ("all", "first", "second"):
            raise ValueError(f"stage part must be all, first or second, got {self.part!r}")
        if not 0.0 < self.part_fraction < 1.0:
            raise ValueError(f"stage part_fraction must be in (0, 1), got {self.part_fraction}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of the frozen per-method config dataclasses (JSON round-trip, validated)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> MethodConfig:
        return config_from_dict(cls, values, cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainContext:
    """What a method may look at once before training (to precompute frozen-teacher features, prototypes, ...).

    ``image_loader`` yields (images [B,3,H,W] with the *eval* transform, labels [B]) over the few-shot training set;
    ``tokenize`` maps a list of strings to [N, L] token ids; ``out_dir`` is the run directory (for diagnostics).
    """

    classnames: list[str]
    dataset_template: str
    class_token_ids: torch.Tensor  # [C, L]
    image_loader: Any
    tokenize: Any
    device: torch.device
    out_dir: Any = None


@dataclass
class TrainBatch:
    """One training step's inputs.

    ``class_token_ids`` [C, L] are the templated, tokenised names of the training classes (same for every step).
    """

    images: torch.Tensor  # [B, 3, H, W]
    labels: torch.Tensor  # [B] int64 in 0..C-1
    class_token_ids: torch.Tensor  # [C, L] int64


class PromptMethod(nn.Module):
    """Base class: IVLP-style deep prompts on both towers, configured by subclasses.

    Subclasses set ``name``, ``config_cls``, ``capabilities``, ``description``, create their parameters in
    ``__init__`` and override :meth:`text_prompts` / :meth:`vision_prompts` (and :meth:`training_loss` for extra
    terms). The frozen CLIP lives in ``self.clip`` and is never trainable.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: the method is meant for several source domains (multi-source DG, GuiDG); single-source benchmarks skip it
    needs_domains: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, config: MethodConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"{self.name}: expected {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.backbone_name = backbone.name
        self.clip = backbone.model
        self.clip.requires_grad_(False)
        self.text_encoder = PromptedTextEncoder(self.clip)
        self.vision_encoder = PromptedVisionEncoder(self.clip.visual)
        self.register_buffer("logit_scale", self.clip.logit_scale.detach().exp().reshape(()).clone(), persistent=False)

    # ----------------------------------------------------------------- prompt text
    #: how many token positions after SOS the learned text context replaces (0 = none).
    n_text_ctx: int = 0

    def prompt_template(self, dataset_template: str) -> str:
        """The string template tokenised for each class (``{}`` = class name).

        Methods with a learned text context return a template whose first ``n_text_ctx`` tokens after SOS are
        placeholders replaced by the context; zero-shot returns the dataset's hand-crafted template.
        """
        return dataset_template

    def prompt_texts(self, classnames: list[str], dataset_template: str) -> list[str]:
        template = self.prompt_template(dataset_template)
        return [template.format(canonical_class_name(name)) for name in classnames]

    # ----------------------------------------------------------------- prompts per layer
    def text_prompts(self, prompt_set: int = 0) -> list[torch.Tensor | None] | None:
        """Per-layer text prompts ([n_ctx, W] each, or None)."""
        return None

    def vision_prompts(self) -> list[torch.Tensor | None] | None:
        """Per-layer vision prompts ([n, W] each, or None)."""
        return None

    # ----------------------------------------------------------------- encoders (what export traces)
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] float32 -> L2-normalised image embeddings [B, D]."""
        return l2_normalize(self.vision_encoder(pixels, self.vision_prompts()))

    def encode_text(self, token_ids: torch.Tensor, prompt_set: int = 0) -> torch.Tensor:
        """token_ids [N, L] int64 (from :meth:`prompt_texts`) -> L2-normalised text embeddings [N, D]."""
        return l2_normalize(self.text_encoder(token_ids, self.text_prompts(prompt_set), ctx_start=1))

    def encode_text_for_images(self, token_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """[N, L] + [B, 3, H, W] -> [B, N, D] text embeddings per image. Methods whose text depends on the image
        (``capabilities.text_depends_on_image``) override this; the default broadcasts :meth:`encode_text`."""
        return self.encode_text(token_ids).unsqueeze(0).expand(pixels.shape[0], -1, -1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[B, D] x [C, D] -> [B, C] scaled cosine logits."""
        return self.logit_scale * image_features @ text_features.t()

    def expert_weights(self, image_features: torch.Tensor, *, per_sample: bool | None = None) -> torch.Tensor | None:
        """[B, D] -> [B, S] per-image weights of the S prompt sets (each row a distribution), or ``None`` for
        single-set methods. ``per_sample=True`` forces per-image weights (what export uses) even where the method
        is configured otherwise (GuiDG's batch-mean reproduction mode)."""
        return None

    def prompt_set_names(self) -> list[str]:
        """Names of the prompt sets (GuiDG: its source domains); ``["default"]`` for single-set methods."""
        return ["default"]

    def combined_logits(self, image_features: torch.Tensor, text_sets: Sequence[torch.Tensor],
                        weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] x S x [C, D] (+ weights [B, S]) -> [B, C]: ``scale * sum_s w_s(x) f . T_s`` (the rule serving
        mirrors). One set without weights is plain :meth:`logits`."""
        if len(text_sets) == 1 and weights is None:
            return self.logits(image_features, text_sets[0])
        if weights is None:
            raise ValueError(f"{len(text_sets)} prompt sets need per-image weights [B, {len(text_sets)}]")
        per_set = torch.stack([image_features @ t.t() for t in text_sets], dim=1)  # [B, S, C]
        return self.logit_scale * torch.einsum("bsc,bs->bc", per_set, weights.to(per_set.dtype))

    # ----------------------------------------------------------------- training
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy over the training classes; subclasses add regularisers as further dict entries."""
        image_features = self.encode_image(batch.images)  # [B, D]
        text_features = self.encode_text(batch.class_token_ids)  # [C, D]
        logits = self.logits(image_features, text_features)  # [B, C]
        ce = F.cross_entropy(logits, batch.labels)
        return {"loss": ce, "ce": ce.detach(), "logits": logits.detach()}

    def prepare_training(self, ctx: TrainContext) -> None:
        """Hook run once before training (e.g. precompute frozen-teacher features). Default: nothing."""

    @classmethod
    def config_for_data(cls, config: Mapping[str, Any] | None, classnames: Sequence[str],
                        domains: Sequence[str]) -> dict[str, Any]:
        """Fill config options that follow from the training data (GuiDG: its source domains and class count).
        ``domains`` are the training samples' domain names, sorted (``[""]`` for data without domains). Default:
        the config unchanged."""
        return dict(config or {})

    @classmethod
    def config_for_backbone(cls, num_layers: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``overrides`` (a copy) plus, for every prompt-depth option of ``cls.config_cls`` (marked with
        ``metadata={PROMPT_DEPTH: True}``) that the user did not set and whose default exceeds ``num_layers``, that
        option set to ``num_layers`` (the papers' depth 9 assumes 12 blocks; a shallower backbone has fewer).

        ``num_layers`` is the layer count of the shallower tower (:attr:`~training.backbone.BackboneSpec.num_layers`).
        A value the user set is kept as it is, even when it is too deep (building the method then says so).
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"{cls.name}: num_layers must be an int >= 1 (the backbone's blocks), got {num_layers!r}")
        out = dict(overrides or {})
        for f in dataclasses.fields(cls.config_cls):
            if not f.metadata.get(PROMPT_DEPTH) or f.name in out:
                continue
            if isinstance(f.default, bool) or not isinstance(f.default, int):
                raise TypeError(f"{cls.config_cls.__name__}.{f.name} is marked as a prompt depth but its default "
                                f"{f.default!r} is not an int")
            if f.default > num_layers:
                log.info("%s: %s %d -> %d (the backbone has %d layers)", cls.name, f.name, f.default, num_layers,
                         num_layers)
                out[f.name] = num_layers
        return out

    def training_stages(self) -> list[TrainStage]:
        """The stages training runs, in order (each one pass of the shared loop). Default: one stage."""
        return [TrainStage("train")]

    def enter_stage(self, stage: TrainStage, ctx: TrainContext) -> None:
        """Before ``stage`` runs: choose which tensors train (``requires_grad``), precompute constants. Default:
        nothing (every method-owned tensor trains)."""

    def end_stage(self, stage: TrainStage, ctx: TrainContext) -> None:
        """After ``stage`` finished (and its callbacks ran). Default: nothing."""

    def training_callbacks(self) -> list[Callback]:
        """Engine callbacks this method needs (e.g. Gaussian prompt aggregation). Default: none."""
        return []

    def write_diagnostics(self, ctx: TrainContext) -> list[Any]:
        """Write method-specific pictures/figures for the run into ``ctx.out_dir``; returns the paths. Default: none."""
        return []

    # ----------------------------------------------------------------- state
    def learned_parameters(self) -> dict[str, nn.Parameter]:
        """Every method-owned parameter, by namespaced name, whether or not the current stage trains it (never
        frozen CLIP weights): what the artifact stores."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("clip.")}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The method-owned parameters the current stage trains (``requires_grad``), by namespaced name."""
        return {n: p for n, p in self.learned_parameters().items() if p.requires_grad}

    def parameter_lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers of some trainable parameters (by the names of
        :meth:`trainable_parameters`) for the current stage; the rest use the run's lr. Default: none."""
        return {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every method-owned learned tensor (:meth:`learned_parameters`), detached, contiguous, on CPU: what the
        artifact stores. For single-stage methods these are exactly the trainable parameters."""
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in self.learned_parameters().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`trainable_state_dict`; names and shapes must match exactly."""
        own = self.learned_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"{self.name}: prompt weights do not match the method config (missing: {missing or '-'}, "
                f"unexpected: {unexpected or '-'}); was the artifact trained with another config?"
            )
        with torch.no_grad():
            for n, p in own.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise ConfigError(f"{self.name}: tensor {n} has shape {tuple(state[n].shape)}, "
                                      f"expected {tuple(p.shape)}")
                p.copy_(state[n].to(p.device, p.dtype))

    def train(self, mode: bool = True) -> PromptMethod:
        super().train(mode)
        self.clip.eval()  # the frozen CLIP never leaves eval mode (dropout, patch dropout off)
        return self


def init_prompt(n: int, width: int, std: float = 0.02) -> nn.Parameter:
    """A [n, width] prompt parameter drawn from N(0, std^2)."""
    return nn.Parameter(torch.randn(n, width) * std)


def token_init(backbone: Backbone, text: str, n_ctx: int) -> torch.Tensor:
    """Token embeddings of ``text`` ([n_ctx, W]) to initialise a context from words (e.g. "a photo of a")."""
    tokenizer = backbone.tokenizer()
    ids = tokenizer.encode(text)
    if len(ids) != n_ctx:
        raise ConfigError(
            f"ctx_init {text!r} is {len(ids)} tokens long but n_ctx is {n_ctx}; make them agree "
            f"(or set ctx_init to '' for random init)"
        )
    with torch.no_grad():
        emb = backbone.model.token_embedding(torch.tensor(ids, device=backbone.model.token_embedding.weight.device))
    return emb.detach().float().cpu().clone()  # [n_ctx, W]
