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
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import Backbone
from training.config import config_from_dict
from training.errors import ConfigError
from training.prompting.encoders import PromptedTextEncoder, PromptedVisionEncoder, l2_normalize

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class MethodConfig:
    """Base of the frozen per-method config dataclasses (JSON round-trip, validated)."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "MethodConfig":
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
        return [template.format(name.replace("_", " ")) for name in classnames]

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

    def training_callbacks(self) -> list[Any]:
        """Engine callbacks this method needs (e.g. Gaussian prompt aggregation). Default: none."""
        return []

    def write_diagnostics(self, ctx: TrainContext) -> list[Any]:
        """Write method-specific pictures/figures for the run into ``ctx.out_dir``; returns the paths. Default: none."""
        return []

    # ----------------------------------------------------------------- state
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The method-owned trainable parameters, by namespaced name (never frozen CLIP weights)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("clip.")}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the method-owned trainable tensors, detached, contiguous, on CPU (what the artifact stores)."""
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in self.trainable_parameters().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`trainable_state_dict`; names and shapes must match exactly."""
        own = self.trainable_parameters()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ConfigError(
                f"{self.name}: prompt weights do not match the method config (missing: {missing or '-'}, "
                f"unexpected: {unexpected or '-'}); was the artifact trained with another config?"
            )
        with torch.no_grad():
            for n, p in own.items():
                if tuple(state[n].shape) != tuple(p.shape):
                    raise ConfigError(f"{self.name}: tensor {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[n].to(p.device, p.dtype))

    def train(self, mode: bool = True) -> "PromptMethod":
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
