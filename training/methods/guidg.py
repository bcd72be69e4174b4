"""GuiDG (Li et al., AAAI 2026): domain-expert prompts guide the fine-tuning of CLIP's image tower.

Specified from the official code (TL-UESTC/GuiDG ``phase1.py``, ``phase2.py``, ``models.py``, ``engine.py``) and
its appendix (methods.md §5); nothing here is reconstructed, but two things differ from the code on purpose:

* **Stage 1 (one stage per source domain d)**: a CoOp expert -- a shared text context ``[n_ctx, W]`` (16 tokens,
  random N(0, 0.02^2) init, class token at the end: "X X ... X {name}.") -- trained with plain cross-entropy on
  domain d's part of the data, through the frozen text and image towers. Only that expert's context trains.
* **Stage 2 (one stage over all source domains, one stream per domain zipped per step)**: the image tower is
  fully fine-tuned together with the cross-modal attention head (CMAttn, :class:`CrossModalAttention`). The
  experts are frozen: their class embeddings T_d = norm(TextEnc(expert_d prompts)) are constants [S, C, D]. With
  f = norm(E_v(x)) and the head's weights w(x) (computed from *detached* inputs), the loss is

      L = mean_b sum_d w_d(x_b) * CE(logits_d(x_b), y_b),  logits_d = scale * (f - lambda * T_d[y]) . T_d^T

  (CLIPood's margin metric softmax as a feature shift, ``loss="mms"``, lambda = ``margin``; ``loss="erm"`` drops
  the margin). Weight averaging (``averaging``): CLIPood's Beta moving average of the tower and the head (default)
  or WiSE-FT of the tower (the official ``wise_ft`` interpolates the visual encoder), as callbacks of the shared
  loop.
* **Inference**: logits = sum_d w_d(x) * scale * f . T_d^T. The head's keys k_{h,d} = a_h^T T_d + c_h are fixed
  from the training classes when stage 2 ends (``head.keys``), so the weights depend on the image only and a class
  name added later is encoded by every expert and scored like the others.

Deliberate differences from the official code:

* ``weighting="per_sample"`` (default): w(x) per image, as the appendix's Eq. 19 defines it. The official code
  averages w over the batch (``weights.mean(0)``) in training and evaluation, which makes a prediction depend on
  the other images of the batch; ``weighting="batch_mean"`` reproduces that. Export always writes per-image weights.
* The fine-tuned image tower, the experts, the head and its keys are all saved (``phase2.py`` never saves the
  fine-tuned encoder).
* Ablations (not in the paper): ``weighting="uniform"`` replaces the head by 1/S (a plain ensemble of the experts);
  ``finetune_tower=False`` trains only the head in stage 2 (the experts with CLIP's own image tower).
* ``use_experts=False`` turns the method into the DG fine-tuning baseline GuiDG plugs into: no experts, no head,
  the image tower fine-tuned against the frozen zero-shot class embeddings of the dataset template (``loss="erm"``:
  ERM fine-tuning; ``loss="mms"`` with BMA: CLIPood).

Official hyperparameters (for reproduction; the defaults here are the package's): stage 1 SGD lr 1e-4 without
weight decay, 31 epochs, batch 32; stage 2 AdamW lr 5e-6, weight decay 0.1, 10 x 400 steps, 12 images per domain
per step, lambda 0.3, BMA beta 0.1 in the script (0.5 in the appendix's text). Augmentation is the run's
(``TrainConfig.augment``) in both stages; the official stage 2 uses resize + center crop + RandAugment.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.backbone import Backbone
from training.callbacks import BetaMovingAverage, Callback, WiseFT
from training.errors import ConfigError
from training.methods.base import (
    Capabilities,
    InstanceCapabilities,
    MethodConfig,
    PromptMethod,
    TrainBatch,
    TrainContext,
    TrainStage,
    init_prompt,
)
from training.prompting.encoders import PromptedVisionEncoder

log = logging.getLogger(__name__)

WEIGHTINGS = ("per_sample", "batch_mean", "uniform")
LOSSES = ("mms", "erm")
AVERAGINGS = ("bma", "wiseft", "none")


@dataclass(frozen=True)
class GuiDGConfig(MethodConfig):
    #: source domain names, one expert each, in order (filled from the training data by ``promptclip train``).
    domains: tuple[str, ...] = ()
    #: number of training classes (the head's class-axis weights a_h are [C]); filled from the training data.
    num_classes: int = 0
    use_experts: bool = True     #: False: the fine-tuning baseline without experts (ERM / CLIPood)
    n_ctx: int = 16              #: context tokens per expert (official: 16, random init)
    init_std: float = 0.02
    num_heads: int = 4           #: CMAttn heads (official: 4)
    loss: str = "mms"            #: mms (CLIPood's margin metric softmax) | erm
    margin: float = 0.3          #: lambda of the MMS loss (official --lam 0.3)
    #: per_sample (appendix Eq. 19) | batch_mean (official code's weights.mean(0)) | uniform (ablation: 1/S, no head)
    weighting: str = "per_sample"
    finetune_tower: bool = True  #: False (ablation): stage 2 trains only the head; the image tower stays CLIP's
    averaging: str = "bma"       #: bma (CLIPood's Beta moving average) | wiseft | none
    bma_beta: float = 0.5        #: BMA's Beta(beta, beta) (appendix: 0.5; official script: 0.1)
    wiseft_alpha: float = 0.5    #: WiSE-FT interpolation (0: initial tower, 1: fine-tuned)
    holdout_fraction: float = 0.5  #: share of each domain's pool that goes to stage 2 (few-shot: 0.5; full data: 0.7)
    #: stage-1 settings (None: the run's training config; official: sgd, lr 1e-4, weight decay 0)
    expert_optimizer: str | None = None
    expert_lr: float | None = None
    expert_weight_decay: float | None = None
    expert_momentum: float | None = None  #: SGD momentum of stage 1 (official: plain SGD, 0)
    expert_epochs: int | None = None
    #: stage-2 settings (official: adamw, lr 5e-6, weight decay 0.1; epochs None: the run's)
    finetune_optimizer: str = "adamw"
    finetune_lr: float = 5e-6
    finetune_weight_decay: float = 0.1
    finetune_epochs: int | None = None
    #: [R] the CMAttn head's own stage-2 lr (None: the stage's, as the official code). At the tower's lr (5e-6,
    #: AdamW) no head parameter moves more than ~2.5e-4 over a run and the weights stay uniform (0.25 +- 0.01
    #: for 4 experts); beyond the official code
    head_lr: float | None = None
    #: [R] temperature tau of the head's cosines: w = mean_h softmax_d(cos / tau) (official: 1, which caps the
    #: weights near uniform since cos is in [-1, 1]); beyond the official code
    head_temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be unique, got {list(self.domains)}")
        if self.n_ctx < 1 or self.num_heads < 1 or self.num_classes < 0:
            raise ValueError("n_ctx and num_heads must be >= 1 and num_classes >= 0")
        for name, value, allowed in (("weighting", self.weighting, WEIGHTINGS), ("loss", self.loss, LOSSES),
                                     ("averaging", self.averaging, AVERAGINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.margin < 0 or self.bma_beta <= 0 or not 0.0 <= self.wiseft_alpha <= 1.0:
            raise ValueError("margin must be >= 0, bma_beta > 0 and wiseft_alpha in [0, 1]")
        if not self.finetune_tower and (self.weighting == "uniform" or not self.use_experts):
            raise ValueError("finetune_tower=false leaves nothing to train in stage 2 without experts or with "
                             "uniform weighting")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.finetune_lr <= 0 or any(lr is not None and lr <= 0 for lr in (self.expert_lr, self.head_lr)):
            raise ValueError("learning rates must be > 0")
        if not (math.isfinite(self.head_temperature) and self.head_temperature > 0):
            raise ValueError(f"head_temperature must be > 0, got {self.head_temperature!r}")


class CrossModalAttention(nn.Module):
    """GuiDG's CMAttn head (``CrossModalAttn(512, C, n_head=4)`` in the official ``models.py``).

    Per head h: q_h = W_h f + b_h; keys k_{h,d} = sum_c a_{h,c} T_d[c] + c_h (a ``Linear(C, 1)`` over the class
    axis of expert d's class embeddings); w(x) = mean_h softmax_d(cos(q_h, k_{h,d}) / tau) (tau = ``temperature``,
    1 in the official code). Initialised like
    ``nn.Linear`` (uniform in +-1/sqrt(fan_in)). ``keys`` [H, S, D] holds the keys fixed from the training classes
    (:meth:`freeze_keys`); it is zero (uniform weights) until then.
    """

    def __init__(self, dim: int, num_classes: int, num_experts: int, num_heads: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        bq, bk = 1.0 / math.sqrt(dim), 1.0 / math.sqrt(max(1, num_classes))
        self.q_weight = nn.Parameter(torch.empty(num_heads, dim, dim).uniform_(-bq, bq))  # [H, D_out, D_in]
        self.q_bias = nn.Parameter(torch.empty(num_heads, dim).uniform_(-bq, bq))  # [H, D]
        self.class_weight = nn.Parameter(torch.empty(num_heads, num_classes).uniform_(-bk, bk))  # a_h: [H, C]
        self.class_bias = nn.Parameter(torch.empty(num_heads).uniform_(-bk, bk))  # c_h: [H]
        # fixed keys for inference: learned state (saved), never optimised directly
        self.keys = nn.Parameter(torch.zeros(num_heads, num_experts, dim), requires_grad=False)  # [H, S, D]

    def compute_keys(self, expert_text: torch.Tensor) -> torch.Tensor:
        """expert_text [S, C, D] -> keys [H, S, D] (differentiable in a_h, c_h)."""
        if expert_text.shape[1] != self.class_weight.shape[1]:
            raise ConfigError(f"the head was built for {self.class_weight.shape[1]} training classes but got "
                              f"{expert_text.shape[1]}; set num_classes to the training class count")
        keys = torch.einsum("hc,scd->hsd", self.class_weight.to(expert_text.dtype), expert_text)
        return keys + self.class_bias.to(keys.dtype)[:, None, None]

    def forward(self, image_features: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """image_features [B, D] (+ keys [H, S, D], default the fixed ones) -> weights [B, S], rows sum to 1.

        Written with MatMul / ReduceL2 / Softmax / ReduceMean only (no Einsum), so the exported head stays
        TensorRT-friendly."""
        keys = self.keys if keys is None else keys
        heads, dim, _ = self.q_weight.shape
        f = image_features.to(self.q_weight.dtype)  # [B, D]
        q = (f @ self.q_weight.reshape(heads * dim, -1).t()).reshape(-1, heads, dim) + self.q_bias  # [B, H, D]
        qn = F.normalize(q, dim=-1).transpose(0, 1)  # [H, B, D]
        kn = F.normalize(keys.to(q.dtype), dim=-1).transpose(1, 2)  # [H, D, S]
        cos = torch.matmul(qn, kn)  # [H, B, S]
        if self.temperature != 1.0:
            cos = cos / self.temperature
        return cos.softmax(dim=-1).mean(dim=0)  # [B, S]

    @torch.no_grad()
    def freeze_keys(self, expert_text: torch.Tensor) -> None:
        """Fix the inference keys from the training classes' expert embeddings [S, C, D]."""
        self.keys.copy_(self.compute_keys(expert_text.to(self.keys.device)).to(self.keys.dtype))


class GuiDG(PromptMethod):
    name = "guidg"
    description = "GuiDG: CoOp domain experts + CMAttn-guided full fine-tuning of the image tower (Li et al. 2026)"
    config_cls = GuiDGConfig
    capabilities = InstanceCapabilities(Capabilities(num_prompt_sets=2, finetuned_image_tower=True))
    needs_domains = True

    def __init__(self, backbone: Backbone, config: GuiDGConfig) -> None:
        super().__init__(backbone, config)
        if config.use_experts and (not config.domains or config.num_classes < 1):
            raise ConfigError(
                "guidg needs its source domains and training class count (one expert per domain): train it with "
                "'promptclip train' on data whose samples carry domains (they are filled in), or set "
                "domains=[...] and num_classes=N in the method config")
        num_sets = len(config.domains) if config.use_experts else 1
        self._capabilities = Capabilities(num_prompt_sets=num_sets, finetuned_image_tower=True)
        # the fine-tuned image tower: a trainable copy; self.clip (and its tower) stays frozen and untouched
        del self.vision_encoder  # re-registered after ``visual`` so the tower's tensors are named ``visual.*``
        self.visual = copy.deepcopy(self.clip.visual)
        self.visual.requires_grad_(False)
        self.vision_encoder = PromptedVisionEncoder(self.visual)
        width = self.text_encoder.width
        if config.use_experts:
            self.experts = nn.ParameterList([init_prompt(config.n_ctx, width, config.init_std) for _ in config.domains])
            if config.n_ctx + 3 > backbone.context_length:
                raise ConfigError(f"n_ctx={config.n_ctx} leaves no room for class names in a "
                                  f"{backbone.context_length}-token context")
            self.n_text_ctx = config.n_ctx
            dim = int(self.clip.text_projection.shape[-1])  # embedding dim D
            self.head = CrossModalAttention(dim, config.num_classes, num_sets, config.num_heads,
                                            config.head_temperature)
            self.head.requires_grad_(False)
            for p in self.experts:
                p.requires_grad_(False)
        self.register_buffer("train_text", None, persistent=False)  # [S, C, D] constants of stage 2
        self._stage: TrainStage | None = None
        self.enter_stage(self.training_stages()[0], None)

    # ----------------------------------------------------------------- data-dependent config
    @classmethod
    def config_for_data(cls, config: Mapping[str, Any] | None, classnames: Sequence[str],
                        domains: Sequence[str]) -> dict[str, Any]:
        out = dict(config or {})
        names = [d or "all" for d in domains]
        if out.get("domains"):
            given = [str(d) for d in out["domains"]]
            if sorted(given) != sorted(names):
                raise ConfigError(f"guidg: the method config names domains {given} but the training data has "
                                  f"{names}; drop the domains option or train on those domains")
        else:
            out["domains"] = names
        if out.get("num_classes") and int(out["num_classes"]) != len(classnames):
            raise ConfigError(f"guidg: num_classes={out['num_classes']} but the training data has {len(classnames)} "
                              f"classes; drop the option")
        out["num_classes"] = len(classnames)
        if len(names) < 2 and out.get("use_experts", True):
            raise ConfigError(
                f"guidg trains one expert per source domain and needs at least two, but the training data has one "
                f"domain ({names[0]!r}); train on ROOT/<domain>/<class>/ images with --target-domain (or a DomainBed "
                f"set with --dataset), or use --set use_experts=false to fine-tune without experts")
        return out

    # ----------------------------------------------------------------- prompts
    def prompt_template(self, dataset_template: str) -> str:
        if not self.config.use_experts:
            return dataset_template
        return " ".join(["X"] * self.config.n_ctx) + " {}."

    def text_prompts(self, prompt_set: int = 0):
        if not self.config.use_experts:
            return None
        return [self.experts[prompt_set]]

    # ----------------------------------------------------------------- inference
    def prompt_set_names(self) -> list[str]:
        return list(self.config.domains) if self.config.use_experts else ["default"]

    def expert_weights(self, image_features: torch.Tensor, *, per_sample: bool | None = None) -> torch.Tensor | None:
        """[B, D] -> [B, S] weights from the fixed keys (batch-mean mode averages them over the batch)."""
        if not self.config.use_experts:
            return None
        if self.config.weighting == "uniform":
            num_sets = self.capabilities.num_prompt_sets
            return image_features.new_full((image_features.shape[0], num_sets), 1.0 / num_sets)  # [B, S]
        w = self.head(image_features)  # [B, S]
        if per_sample is None:
            per_sample = self.config.weighting == "per_sample"
        return w if per_sample else w.mean(dim=0, keepdim=True).expand_as(w)

    # ----------------------------------------------------------------- stages
    def training_stages(self) -> list[TrainStage]:
        cfg = self.config
        finetune = {"optimizer": cfg.finetune_optimizer, "lr": cfg.finetune_lr,
                    "weight_decay": cfg.finetune_weight_decay}
        if cfg.finetune_epochs is not None:
            finetune["epochs"] = cfg.finetune_epochs
        if not cfg.use_experts:
            return [TrainStage("finetune", balanced_domains=True, overrides=finetune)]
        expert = {k: v for k, v in (("optimizer", cfg.expert_optimizer), ("lr", cfg.expert_lr),
                                    ("weight_decay", cfg.expert_weight_decay), ("epochs", cfg.expert_epochs),
                                    ("momentum", cfg.expert_momentum))
                  if v is not None}
        stages = [TrainStage(f"expert-{i}", domains=(d,), part="first", part_fraction=cfg.holdout_fraction,
                             overrides=expert) for i, d in enumerate(cfg.domains)]
        return stages + [TrainStage("finetune", part="second", part_fraction=cfg.holdout_fraction,
                                    balanced_domains=True, overrides=finetune)]

    def enter_stage(self, stage: TrainStage, ctx: TrainContext | None) -> None:
        """Expert stages train only their context; the fine-tuning stage trains the image tower and the head."""
        self._stage = stage
        self.visual.requires_grad_(stage.name == "finetune" and self.config.finetune_tower)
        if self.config.use_experts:
            for i, p in enumerate(self.experts):
                p.requires_grad_(stage.name == f"expert-{i}")
            self.head.requires_grad_(stage.name == "finetune" and self.config.weighting != "uniform")
            self.head.keys.requires_grad_(False)
        if stage.name == "finetune" and ctx is not None:
            self.train_text = self._class_text(ctx.class_token_ids.to(self.logit_scale.device))

    def parameter_lr_scales(self) -> dict[str, float]:
        """Stage 2 with ``head_lr``: the head's parameters at head_lr (a multiple of the stage's finetune_lr)."""
        cfg = self.config
        if (self._stage is None or self._stage.name != "finetune" or not cfg.use_experts or cfg.head_lr is None
                or cfg.weighting == "uniform"):
            return {}
        return {f"head.{n}": cfg.head_lr / cfg.finetune_lr for n, p in self.head.named_parameters() if p.requires_grad}

    def end_stage(self, stage: TrainStage, ctx: TrainContext | None) -> None:
        if (stage.name == "finetune" and self.config.use_experts and self.config.weighting != "uniform"
                and self.train_text is not None):
            self.head.freeze_keys(self.train_text)
            log.info("guidg: head keys fixed from the %d training classes", self.train_text.shape[1])

    @torch.no_grad()
    def _class_text(self, class_token_ids: torch.Tensor) -> torch.Tensor:
        """[C, L] -> [S, C, D] frozen class embeddings of every expert (or the zero-shot ones without experts)."""
        sets = self.capabilities.num_prompt_sets
        return torch.stack([self.encode_text(class_token_ids, s).float() for s in range(sets)])

    def training_callbacks(self) -> list[Callback]:
        if self._stage is None or self._stage.name != "finetune" or self.config.averaging == "none":
            return []
        if self.config.averaging == "bma":
            return [BetaMovingAverage(beta=self.config.bma_beta)]
        return [WiseFT(alpha=self.config.wiseft_alpha, prefixes=("visual.",))]  # the tower, as GuiDG's wise_ft

    # ----------------------------------------------------------------- losses
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        stage = self._stage.name if self._stage is not None else "finetune"
        if stage.startswith("expert-"):
            return self._expert_loss(batch, int(stage.split("-", 1)[1]))
        return self._finetune_loss(batch)

    def _expert_loss(self, batch: TrainBatch, k: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            image = self.encode_image(batch.images)  # [B, D], frozen tower
        text = self.encode_text(batch.class_token_ids, k)  # [C, D]
        logits = self.logits(image, text)  # [B, C]
        ce = F.cross_entropy(logits, batch.labels)
        return {"loss": ce, "ce": ce.detach(), "logits": logits.detach()}

    def _finetune_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        text = self.train_text
        if text is None:  # fine-tuning entered without a context (direct use): encode the batch's classes once
            text = self.train_text = self._class_text(batch.class_token_ids)
        image = self.encode_image(batch.images).float()  # [B, D]
        labels = batch.labels
        if self.config.loss == "mms":  # CLIPood's MMS: shift f by -lambda * T_d[y] per expert
            feats = image.unsqueeze(0) - self.config.margin * text[:, labels, :]  # [S, B, D]
        else:
            feats = image.unsqueeze(0).expand(text.shape[0], -1, -1)  # [S, B, D]
        per_set = self.logit_scale * torch.einsum("sbd,scd->sbc", feats, text)  # [S, B, C]
        num_sets, batch = per_set.shape[:2]
        ce = F.cross_entropy(per_set.flatten(0, 1), labels.repeat(num_sets), reduction="none").view(num_sets, batch)
        plain = self.logit_scale * torch.einsum("bd,scd->sbc", image.detach(), text)  # [S, B, C], for accuracy
        if not self.config.use_experts:
            loss = ce[0].mean()
            return {"loss": loss, "ce": loss.detach(), "logits": plain[0]}
        if self.config.weighting == "uniform":
            weights = torch.full_like(ce.t(), 1.0 / ce.shape[0])  # [B, S]
        else:
            keys = self.head.compute_keys(text)  # [H, S, D]
            weights = self.head(image.detach(), keys)  # [B, S]; detached inputs: no gradient to the tower through it
        if self.config.weighting == "batch_mean":
            weights = weights.mean(dim=0, keepdim=True).expand_as(weights)
        loss = (weights.t() * ce).sum(dim=0).mean()
        logits = torch.einsum("sbc,bs->bc", plain, weights.detach())
        return {"loss": loss, "ce": ce.mean().detach(), "logits": logits,
                "expert_weight_entropy": -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean().detach()}

    def train(self, mode: bool = True) -> GuiDG:
        super().train(mode)
        self.visual.eval()  # CLIP's towers have no dropout/batch-norm; eval keeps patch dropout etc. off
        return self
