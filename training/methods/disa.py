"""DiSa: Directional Saliency-Aware prompt learning (Alipour Talemi et al., KDD 2025, arXiv 2505.19373).

No official code exists and only the abstract plus third-party summaries could be read, so most of this module
is a *reconstruction* (spec: ``methods.md`` §3.2). Provenance tags: [P] the paper's own text (abstract),
[S] a third-party summary of the paper, [R] reconstructed by us (replace if the paper/code becomes available).

What follows the paper:
* base framework: IVLP deep text + vision prompts, independent branches [S]. Prompts, their initialisation,
  the saved tensors and the exported graphs are exactly :class:`~training.methods.ivlp.IVLP`'s (this class
  subclasses it and only adds training-time losses); defaults 4+4 tokens, depth 9, ctx "a photo of a" [R, from
  the IVLP/PromptSRC config];
* total loss L = L_CE + L_SR + L_CIR + lambda * L_DiR [S];
* L_CE over the prompted cosine logits with temperature tau [S]; tau = 1 / ``logit_scale.exp()`` of the
  backbone (100 for OpenAI CLIP), not an option;
* L_CIR = D_KL(q_{f_p g_o}, q_{f_o g_p}), the cross pairs prompted image x frozen text and frozen image x
  prompted text [S]; saliency-aware masking guided by the frozen text encoder drops uninformative patches of the
  prompted image view [P abstract + S];
* L_DiR aligns prompted image features with class prototypes of the frozen model by orientation [P + S].

What is reconstructed [R]:
* L_SR = PromptSRC's self-consistency (25 L1 text + 10 L1 image + KL on logits, template-ensemble text targets);
  the L1 terms are scaled by sqrt(D / 512) so their pull per unit angle does not depend on the embedding width
  (``sr_l1_scale``; no change at D = 512);
* masking: saliency (``saliency_source``) = by default the frozen tower's last-layer attention from the class
  token to each patch (heads averaged): the patches the frozen model pools from, which follow the object on real
  CLIP, where final-layer patch-text cosines are noisy and often favour the background (CLIP Surgery, MaskCLIP);
  option ``"text"``: the cosine between the frozen final patch tokens (after ``ln_post`` + ``proj``) and the
  frozen text feature of the label (or the mean over the frozen top-k predicted classes). The ``round(r * P)``
  lowest patches are removed (tokens and their positional embeddings) from the *prompted* view f_p^m; r = 0.25;
  grids of fewer than ``mask_small_grid`` patches drop at most ``mask_small_grid_ratio`` of them (one of 16 on a
  4 x 4 grid), so a small grid never loses object parts to a fixed ratio;
* L_CIR uses softmax over classes of 100*cos, KL(q(f_p^m, g_o) || q(f_o, g_p)) with PromptSRC's logit-KL scale
  (sum / numel, i.e. batchmean / C: ``cir_reduction="numel"``; ``"batchmean"`` is the earlier, C times stronger
  form), no stop-gradient; optional second term KL(q(f_p, g_p) || q(f_o, g_o)) (off by default);
* L_DiR = lambda * mean_i (1 - cos(f_p(x_i), mu_{y_i})), mu_c = normalise(mean of the normalised frozen image
  features of class c over the few-shot training set, eval transform), lambda = 1;
* Gaussian prompt aggregation (PromptSRC GPA, mean 15, std 1 epochs), on by default; the mean is clamped to the
  last epoch when fewer epochs run. GPA state is not in the resume checkpoint: a resumed run averages only the
  epochs seen after resuming (see :class:`training.callbacks.GaussianPromptAggregation`).

Everything beyond the IVLP prompts is training-only: the "frozen" model is the same CLIP towers run without
prompts (``self.text_encoder(ids, None)``, ``self.vision_encoder(x, None)``), never a second copy; inference is
``100 * cos(f_p(x), g_p[c])`` on the full image, with text embeddings precomputable.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from serving.format import canonical_class_name
from training.backbone import Backbone
from training.callbacks import Callback, GaussianPromptAggregation
from training.devices import autocast_off
from training.errors import ConfigError
from training.methods.base import Capabilities, TrainBatch, TrainContext
from training.methods.ivlp import IVLP, IVLPConfig
from training.prompting.encoders import l2_normalize

log = logging.getLogger(__name__)

#: Our own generic CLIP-style prompt templates for the frozen text ensemble ("ensemble" option). PromptSRC uses
#: the 60 ImageNet templates of its ``trainers/imagenet_templates.py``; this shorter list is ours [R].
TEMPLATE_ENSEMBLE: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a snapshot of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a painting of a {}.",
    "a rendering of a {}.",
    "a cartoon of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a photo of a small {}.",
    "a photo of the {}.",
)

_TEMPLATE_CHOICES = ("ensemble", "single")


@dataclass(frozen=True)
class DiSaConfig(IVLPConfig):
    """DiSa options. The IVLP fields (n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9,
    ctx_init="a photo of a", init_std=0.02) are inherited from :class:`IVLPConfig` [S: IVLP base; R: values from
    PromptSRC's IVLP config]. Every switch below turns one loss part on/off."""

    # --- L_SR, self-regulating consistency [S: a term named L_SR exists; R: its PromptSRC form below]
    use_sr: bool = True               #: [S/R] add L_SR
    sr_text_weight: float = 25.0      #: [R] PromptSRC TEXT_LOSS_WEIGHT: w_t * L1(g_p, g_o^SR)
    sr_image_weight: float = 10.0     #: [R] PromptSRC IMAGE_LOSS_WEIGHT: w_i * L1(f_p, f_o)
    sr_logit_weight: float = 1.0      #: [R] weight of KL(softmax(zs) || softmax(p)) (PromptSRC: 1)
    #: [R] width scaling of the two L1 terms: "width" multiplies them by sqrt(D / 512) (D = embedding width), so
    #: they pull as hard per unit angle as PromptSRC's weights do on ViT-B/16 (D = 512: unchanged there); a mean L1
    #: between unit vectors scales as 1 / sqrt(D), so on toy-clip (D = 64) the raw form is ~2.8x stronger
    #: | "none": PromptSRC's raw mean L1 at any width
    sr_l1_scale: str = "width"
    #: [R] L_SR text targets + zero-shot logits: "ensemble" (TEMPLATE_ENSEMBLE) | "single" (dataset template)
    sr_templates: str = "ensemble"
    # --- frozen text g_o used by CIR and saliency
    frozen_text_templates: str = "ensemble"  #: [R] g_o for CIR/saliency: "ensemble" | "single" (dataset template)
    # --- L_CIR, cross-interactive regularisation [S formula; R masked view and second term]
    use_cir: bool = True              #: [S] add L_CIR = KL(q(f_p^m, g_o) || q(f_o, g_p))
    cir_weight: float = 1.0           #: [R] weight of L_CIR (the summary's total loss has none: 1)
    #: [R] KL reduction of CIR: "numel" (sum / numel = batchmean / C, PromptSRC's logit KL, which DiSa builds on)
    #: | "batchmean" (C times stronger: its gradient on the vision prompts matched the CE's at the start)
    cir_reduction: str = "numel"
    #: [R] add KL(q(f_p, g_p) || q(f_o, g_o)) (the summary's cut-off "consistency" hint); part of CIR: only with
    #: use_cir
    cir_second_term: bool = False
    cir_second_weight: float = 1.0    #: [R] weight of that second term
    # --- saliency-aware masking inside CIR [P/S idea; R everything concrete]
    #: [P/S] CIR's prompted image view f_p^m drops low-saliency patches (off: f_p^m = f_p); only used by CIR
    use_masking: bool = True
    mask_ratio: float = 0.25          #: [R] fraction r of patches dropped (round(r * P), at least one kept); in [0, 1)
    #: [R] grids with fewer patches than this (ViT-B/32 at 224 px has 49) drop at most mask_small_grid_ratio of
    #: their patches: on a 4 x 4 toy grid, 4 dropped patches remove object parts; 0 = always mask_ratio
    mask_small_grid: int = 49
    mask_small_grid_ratio: float = 0.0625  #: [R] the bound on small grids (1 of 16 patches); in [0, 1)
    #: [R] "attention": the frozen tower's last-layer class-token attention to each patch (heads averaged; follows
    #: the object on real CLIP) | "text": cosine of the frozen final patch tokens with the frozen class text
    #: (noisy on real CLIP, often favouring background; the earlier default)
    saliency_source: str = "attention"
    #: [R] for saliency_source "text": "label": cos(z_j, g_o[y]) | "topk": mean cos over the frozen top-k classes
    saliency_target: str = "label"
    saliency_topk: int = 5            #: [R] k for "topk" (clamped to the number of classes)
    # --- L_DiR, directional regularisation [P/S intent; R exact form]
    use_dir: bool = True              #: [P/S] add lambda * L_DiR
    dir_weight: float = 1.0           #: [R] lambda: lambda * mean(1 - cos(f_p, mu_y))
    # --- GPA, Gaussian prompt aggregation [R: whether DiSa uses it is unknown; PromptSRC's]
    use_gpa: bool = True              #: [R] average the prompts over epochs with Gaussian weights at train end
    #: [R] mu in epochs (1-based); clamped to the last epoch run when fewer epochs run, so GPA never averages
    #: nothing
    gpa_mean: float = 15.0
    gpa_std: float = 1.0              #: [R] sigma in epochs, > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sr_text_weight", "sr_image_weight", "sr_logit_weight", "cir_weight", "cir_second_weight",
                     "dir_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("sr_templates", "frozen_text_templates"):
            if getattr(self, name) not in _TEMPLATE_CHOICES:
                raise ValueError(f"{name} must be one of {', '.join(_TEMPLATE_CHOICES)}, got {getattr(self, name)!r}")
        for name in ("mask_ratio", "mask_small_grid_ratio"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.mask_small_grid < 0:
            raise ValueError(f"mask_small_grid must be >= 0 (patches), got {self.mask_small_grid!r}")
        if self.sr_l1_scale not in ("width", "none"):
            raise ValueError(f"sr_l1_scale must be width or none, got {self.sr_l1_scale!r}")
        if self.cir_reduction not in ("numel", "batchmean"):
            raise ValueError(f"cir_reduction must be numel or batchmean, got {self.cir_reduction!r}")
        if self.saliency_source not in ("attention", "text"):
            raise ValueError(f"saliency_source must be attention or text, got {self.saliency_source!r}")
        if self.saliency_target not in ("label", "topk"):
            raise ValueError(f"saliency_target must be label or topk, got {self.saliency_target!r}")
        if self.saliency_topk < 1:
            raise ValueError(f"saliency_topk must be >= 1, got {self.saliency_topk!r}")
        if not (math.isfinite(self.gpa_std) and self.gpa_std > 0):
            raise ValueError(f"gpa_std must be > 0, got {self.gpa_std!r}")
        if not (math.isfinite(self.gpa_mean) and self.gpa_mean > 0):
            raise ValueError(f"gpa_mean must be > 0 (epochs, 1-based), got {self.gpa_mean!r}")


# --------------------------------------------------------------------------- pure loss terms (float32 tensors)
def promptsrc_logit_kl(logits_p: torch.Tensor, logits_zs: torch.Tensor) -> torch.Tensor:
    """KL(softmax(zs) || softmax(p)), exactly PromptSRC's reduction: sum over all entries / numel."""
    return F.kl_div(F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_zs, dim=-1), reduction="sum",
                    log_target=True) / logits_p.numel()


#: The embedding width PromptSRC's L1 weights were set on (CLIP ViT-B/16).
SR_REFERENCE_WIDTH = 512


def sr_l1_factor(width: int, mode: str) -> float:
    """The factor on L_SR's L1 terms: sqrt(width / 512) for ``"width"`` (1 on ViT-B/16), 1 for ``"none"``."""
    if mode == "width":
        return math.sqrt(width / SR_REFERENCE_WIDTH)
    if mode == "none":
        return 1.0
    raise ValueError(f"unknown L_SR L1 scale {mode!r}: use width or none")


def sr_terms(f_p: torch.Tensor, g_p: torch.Tensor, f_o: torch.Tensor, g_o_sr: torch.Tensor, logits_p: torch.Tensor,
             logits_zs: torch.Tensor, text_weight: float, image_weight: float, logit_weight: float,
             l1_factor: float = 1.0):
    """(w_t a L1(g_p, g_o^SR), w_i a L1(f_p, f_o), w_l KL(softmax(zs) || softmax(p))), L1 with mean reduction,
    a = ``l1_factor`` (:func:`sr_l1_factor`)."""
    return (text_weight * l1_factor * F.l1_loss(g_p, g_o_sr), image_weight * l1_factor * F.l1_loss(f_p, f_o),
            logit_weight * promptsrc_logit_kl(logits_p, logits_zs))


def kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) summed over rows, divided by B (``"batchmean"``) or by B x C
    (``"numel"``, PromptSRC's logit-KL scale)."""
    kl = F.kl_div(F.log_softmax(q_logits, dim=-1), F.log_softmax(p_logits, dim=-1), reduction="sum",
                  log_target=True)
    if reduction == "numel":
        return kl / q_logits.numel()
    if reduction == "batchmean":
        return kl / q_logits.shape[0]
    raise ValueError(f"unknown KL reduction {reduction!r}: use numel or batchmean")


def cir_loss(f_pm: torch.Tensor, g_o: torch.Tensor, f_o: torch.Tensor, g_p: torch.Tensor, scale,
             reduction: str = "batchmean") -> torch.Tensor:
    """L_CIR = KL( softmax(scale f_p^m g_o^T) || softmax(scale f_o g_p^T) ) over rows / B or / B C (features
    normalised)."""
    return kl_rows(scale * f_pm @ g_o.t(), scale * f_o @ g_p.t(), reduction)


def cir_second_loss(f_p: torch.Tensor, g_p: torch.Tensor, f_o: torch.Tensor, g_o: torch.Tensor, scale,
                    reduction: str = "batchmean") -> torch.Tensor:
    """Optional second CIR term: KL( softmax(scale f_p g_p^T) || softmax(scale f_o g_o^T) ), reduced as CIR."""
    return kl_rows(scale * f_p @ g_p.t(), scale * f_o @ g_o.t(), reduction)


def dir_loss(f_p: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_DiR without lambda: mean_i (1 - cos(f_p[i], prototypes[labels[i]]))."""
    return (1.0 - F.cosine_similarity(f_p, prototypes[labels], dim=-1)).mean()


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, D] normalised features + labels -> [C, D] normalise(class mean); a class without samples gets zeros."""
    sums = torch.zeros(num_classes, features.shape[-1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = class_counts(labels, num_classes).clamp_min(1).to(features.dtype)
    return l2_normalize(sums / counts.unsqueeze(-1))


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N] labels -> [C] int64 counts on the labels' device (fixed shape, no host sync, unlike ``bincount``)."""
    return torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(0, labels,
                                                                                       torch.ones_like(labels))


def label_saliency(tokens: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Patch saliency s[b, j] = cos(tokens[b, j], text[labels[b]]); tokens [B, P, D], text [C, D] -> [B, P]."""
    return torch.einsum("bpd,bd->bp", l2_normalize(tokens), l2_normalize(text)[labels])


def topk_saliency(tokens: torch.Tensor, text: torch.Tensor, frozen_logits: torch.Tensor, k: int) -> torch.Tensor:
    """s[b, j] = mean over the top-k classes of ``frozen_logits[b]`` of cos(tokens[b, j], text[c]) -> [B, P]."""
    k = min(k, text.shape[0])
    top = frozen_logits.topk(k, dim=-1).indices  # [B, k]
    sims = torch.einsum("bpd,bkd->bpk", l2_normalize(tokens), l2_normalize(text)[top])
    return sims.mean(dim=-1)


def cls_attention_saliency(attn: torch.nn.MultiheadAttention, hidden: torch.Tensor) -> torch.Tensor:
    """Class-token attention to each patch in ``attn`` (heads averaged): ``hidden`` is the block's attention
    input (after ``ln_1``) [B, 1 + P, W] with the class token first; returns [B, P] (softmax over all 1 + P keys)."""
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise ConfigError(f"saliency_source='attention' needs torch MultiheadAttention with a packed in_proj_weight "
                          f"in the last vision block, got {type(attn).__name__}; use saliency_source='text'")
    width, heads = hidden.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight.float(), attn.in_proj_bias
    bq, bk = (None, None) if b is None else (b[:width].float(), b[width:2 * width].float())
    h = hidden.float()
    q = F.linear(h[:, :1], w[:width], bq).view(h.shape[0], 1, heads, -1).transpose(1, 2)  # [B, H, 1, d]
    k = F.linear(h, w[width:2 * width], bk).view(h.shape[0], h.shape[1], heads, -1).transpose(1, 2)  # [B, H, T, d]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, 1, T]
    return att[:, :, 0, 1:].mean(dim=1)


def num_kept_patches(num_patches: int, mask_ratio: float, small_grid: int = 0, small_grid_ratio: float = 0.0) -> int:
    """K = P - round(r * P), at least 1; grids of fewer than ``small_grid`` patches use min(r, small_grid_ratio)."""
    if num_patches < small_grid:
        mask_ratio = min(mask_ratio, small_grid_ratio)
    return max(1, num_patches - int(round(mask_ratio * num_patches)))


def keep_top_patches(saliency: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, P] saliency -> [B, K] indices of the K most salient patches, in increasing index order."""
    return saliency.topk(keep, dim=-1).indices.sort(dim=-1).values


# --------------------------------------------------------------------------- the method
class DiSa(IVLP):
    name = "disa"
    description = "DiSa: IVLP prompts + L_SR + saliency-masked cross-interactive (CIR) + directional (DiR) losses"
    config_cls = DiSaConfig
    capabilities = Capabilities()

    def __init__(self, backbone: Backbone, config: DiSaConfig) -> None:
        super().__init__(backbone, config)
        pre = backbone.preprocess or {}
        self._pixel_mean = tuple(pre.get("mean", (0.0, 0.0, 0.0)))
        self._pixel_std = tuple(pre.get("std", (1.0, 1.0, 1.0)))
        # Training-only frozen targets, filled by prepare_training; non-persistent (never saved or exported).
        self.register_buffer("frozen_text", None, persistent=False)     # g_o   [C, D] (CIR, saliency)
        self.register_buffer("frozen_text_sr", None, persistent=False)  # g_o^SR [C, D] (L_SR targets, zs logits)
        self.register_buffer("prototypes", None, persistent=False)      # mu    [C, D] (DiR)
        self._warned_unprepared = False

    # ----------------------------------------------------------------- frozen targets
    def _templates(self, which: str, dataset_template: str) -> tuple[str, ...]:
        return TEMPLATE_ENSEMBLE if which == "ensemble" else (dataset_template,)

    @torch.no_grad()
    def frozen_text_features(self, classnames: list[str], templates: tuple[str, ...], tokenize, device,
                             chunk: int = 256) -> torch.Tensor:
        """normalise(mean over templates of the unprompted text features) [C, D] (PromptSRC: raw mean, then
        normalise)."""
        names = [canonical_class_name(c) for c in classnames]
        total = None
        for template in templates:
            ids = tokenize([template.format(n) for n in names])
            feats = torch.cat([self.text_encoder(ids[i:i + chunk].to(device), None).float()
                               for i in range(0, len(names), chunk)])
            total = feats if total is None else total + feats
        return l2_normalize(total / len(templates))

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor, return_tokens: bool = False):
        """Unprompted CLIP image features (normalised, float32), optionally with the patch tokens [B, P, D]."""
        out = self.vision_encoder(images, None, return_tokens=return_tokens)
        if return_tokens:
            pooled, tokens = out
            return l2_normalize(pooled.float()), tokens.float()
        return l2_normalize(out.float())

    @torch.no_grad()
    def frozen_image_features_and_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unprompted image features (normalised) and the last block's class-token attention to each patch [B, P]
        (the block's ``ln_1`` output is captured by a forward hook during the same frozen pass)."""
        block = self.vision_encoder.visual.transformer.resblocks[-1]
        seen: list[torch.Tensor] = []
        handle = block.ln_1.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            f_o = self.frozen_image_features(images)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"expected one pass through the last vision block, saw {len(seen)}")
        return f_o, cls_attention_saliency(block.attn, seen[0])

    def _saliency_keep(self, images: torch.Tensor, labels: torch.Tensor, g_o: torch.Tensor):
        """(f_o, [B, K] indices of the patches the masking keeps) from one frozen pass (no grad, float32)."""
        cfg = self.config
        if cfg.saliency_source == "attention":
            f_o, sal = self.frozen_image_features_and_attention(images)
        else:
            f_o, tokens = self.frozen_image_features(images, return_tokens=True)
            with autocast_off(f_o):
                if cfg.saliency_target == "label":
                    sal = label_saliency(tokens, g_o, labels)
                else:
                    sal = topk_saliency(tokens, g_o, f_o @ g_o.t(), cfg.saliency_topk)
        keep = num_kept_patches(sal.shape[1], cfg.mask_ratio, cfg.mask_small_grid, cfg.mask_small_grid_ratio)
        return f_o, keep_top_patches(sal, keep)

    def prepare_training(self, ctx: TrainContext) -> None:
        """Precompute g_o, g_o^SR and the class prototypes once, with no grad, on ``ctx.device``."""
        cfg = self.config
        self.to(ctx.device)
        was_training = self.training
        self.eval()
        try:
            g_o = self.frozen_text_features(ctx.classnames, self._templates(cfg.frozen_text_templates,
                                                                            ctx.dataset_template),
                                            ctx.tokenize, ctx.device)
            if cfg.sr_templates == cfg.frozen_text_templates:
                g_sr = g_o
            else:
                g_sr = self.frozen_text_features(ctx.classnames, self._templates(cfg.sr_templates,
                                                                                 ctx.dataset_template),
                                                 ctx.tokenize, ctx.device)
            feats, labels = [], []
            with torch.no_grad():
                for images, ys in ctx.image_loader:
                    feats.append(self.frozen_image_features(images.to(ctx.device)))
                    labels.append(torch.as_tensor(ys, device=ctx.device).long())
            num_classes = len(ctx.classnames)
            if feats:
                feats_t, labels_t = torch.cat(feats), torch.cat(labels)
                empty = (class_counts(labels_t, num_classes) == 0).cpu()  # one host copy, once per run
                missing = [c for c, none in enumerate(empty.tolist()) if none]
                if missing:
                    log.warning("disa: classes %s have no training images; their DiR prototype is zero", missing)
                protos = class_prototypes(feats_t, labels_t, num_classes)
            else:
                log.warning("disa: the training image loader is empty; DiR prototypes are zero")
                protos = torch.zeros_like(g_o)
        finally:
            self.train(was_training)
        self.frozen_text = g_o.detach()
        self.frozen_text_sr = g_sr.detach()
        self.prototypes = protos.detach()

    def _frozen_targets(self, batch: TrainBatch):
        """(g_o, g_o^SR, prototypes or None). Without prepare_training (direct calls, the registry contract
        test) falls back to the unprompted features of the batch's own prompt texts and per-batch prototypes."""
        if self.frozen_text is not None:
            return self.frozen_text, self.frozen_text_sr, self.prototypes
        if not self._warned_unprepared:
            log.warning("disa: prepare_training was not run; using the frozen features of the batch's prompt texts "
                        "as g_o and per-batch class means as DiR prototypes (train_run always prepares)")
            self._warned_unprepared = True
        with torch.no_grad():
            g = l2_normalize(self.text_encoder(batch.class_token_ids, None).float())
        return g, g, None

    # ----------------------------------------------------------------- training loss
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """CE + L_SR + L_CIR (+ second term) + lambda L_DiR, each switchable; no host syncs.

        The encoders run under the loop's autocast; every logit, saliency and loss is computed in float32 with
        autocast disabled. Entries other than ``loss``/``logits`` are the detached *weighted* terms (they sum to
        ``loss``).
        """
        cfg = self.config
        labels = batch.labels
        vision_prompts = self.vision_prompts()
        # --- encoder passes (ambient autocast)
        f_p = l2_normalize(self.vision_encoder(batch.images, vision_prompts).float())  # [B, D]
        g_p = l2_normalize(self.text_encoder(batch.class_token_ids, self.text_prompts(), ctx_start=1).float())  # [C, D]
        g_o, g_sr, protos = self._frozen_targets(batch)
        need_tokens = cfg.use_cir and cfg.use_masking
        f_o = None
        if need_tokens:  # one frozen pass gives f_o and the saliency
            f_o, keep = self._saliency_keep(batch.images, labels, g_o)  # keep: [B, K]
        elif cfg.use_sr or cfg.use_cir or (cfg.use_dir and protos is None):
            f_o = self.frozen_image_features(batch.images)
        f_pm = f_p
        if need_tokens:
            f_pm = l2_normalize(self.vision_encoder(batch.images, vision_prompts, keep_index=keep).float())

        # --- losses (float32, autocast off)
        with autocast_off(f_p):
            scale = self.logit_scale.float()
            logits = scale * f_p @ g_p.t()  # [B, C]
            terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(logits, labels)}
            if cfg.use_sr:
                zs = scale * f_o @ g_sr.t()
                t, i, kl = sr_terms(f_p, g_p, f_o, g_sr, logits, zs, cfg.sr_text_weight, cfg.sr_image_weight,
                                    cfg.sr_logit_weight, sr_l1_factor(f_p.shape[-1], cfg.sr_l1_scale))
                terms.update(sr_text=t, sr_image=i, sr_logits=kl)
            if cfg.use_cir:
                terms["cir"] = cfg.cir_weight * cir_loss(f_pm, g_o, f_o, g_p, scale, cfg.cir_reduction)
                if cfg.cir_second_term:
                    terms["cir2"] = cfg.cir_second_weight * cir_second_loss(f_p, g_p, f_o, g_o, scale,
                                                                            cfg.cir_reduction)
            if cfg.use_dir:
                if protos is None:  # unprepared fallback: per-batch class means of the frozen features
                    protos = class_prototypes(f_o, labels, g_p.shape[0])
                terms["dir"] = cfg.dir_weight * dir_loss(f_p, protos.float(), labels)
            total = sum(terms.values())
        out = {"loss": total}
        out.update({k: v.detach() for k, v in terms.items()})
        out["logits"] = logits.detach()
        return out

    # ----------------------------------------------------------------- callbacks / diagnostics
    def training_callbacks(self) -> list[Callback]:
        if not self.config.use_gpa:
            return []
        return [GaussianPromptAggregation(self.config.gpa_mean, self.config.gpa_std)]

    @torch.no_grad()
    def saliency_keep_index(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The [B, K] patch indices the masking keeps for ``images`` (needs prepare_training)."""
        return self._saliency_keep(images, labels, self.frozen_text)[1]

    def write_diagnostics(self, ctx: TrainContext) -> list[Any]:
        """``saliency_masks.png``: up to 8 training images next to their masked view (dropped patches hatched)."""
        if ctx.out_dir is None or not (self.config.use_cir and self.config.use_masking) or self.frozen_text is None:
            return []
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        images, labels = [], []
        for xb, yb in ctx.image_loader:
            images.append(xb)
            labels.append(torch.as_tensor(yb).long())
            if sum(len(x) for x in images) >= 8:
                break
        if not images:
            return []
        x = torch.cat(images)[:8].to(ctx.device)
        y = torch.cat(labels)[:8].to(ctx.device)
        was_training = self.training
        self.eval()
        try:
            keep = self.saliency_keep_index(x, y).cpu()
        finally:
            self.train(was_training)
        visual = self.vision_encoder.visual
        ph, pw = visual.conv1.kernel_size
        n_patches = self.vision_encoder.num_patches
        gw = x.shape[-1] // pw
        mean = torch.tensor(self._pixel_mean).view(3, 1, 1)
        std = torch.tensor(self._pixel_std).view(3, 1, 1)
        pix = (x.float().cpu() * std + mean).clamp(0, 1)
        n = pix.shape[0]
        fig = Figure(figsize=(4.4, 2.2 * n), dpi=100)
        for r in range(n):
            img = pix[r].permute(1, 2, 0).numpy()
            dropped = sorted(set(range(n_patches)) - set(keep[r].tolist()))
            masked = img.copy()
            for j in dropped:
                top, left = (j // gw) * ph, (j % gw) * pw
                masked[top:top + ph, left:left + pw] = 0.5 * masked[top:top + ph, left:left + pw] + 0.25
            name = ctx.classnames[int(y[r])] if int(y[r]) < len(ctx.classnames) else str(int(y[r]))
            kept = keep.shape[1] / n_patches
            ax0 = fig.add_subplot(n, 2, 2 * r + 1)
            ax0.imshow(img, interpolation="nearest")
            ax0.set_title(name, fontsize=8)
            ax1 = fig.add_subplot(n, 2, 2 * r + 2)
            ax1.imshow(masked, interpolation="nearest")
            for j in dropped:
                top, left = (j // gw) * ph, (j % gw) * pw
                ax1.add_patch(Rectangle((left - 0.5, top - 0.5), pw, ph, fill=False, hatch="///",
                                        edgecolor="0.35", linewidth=0.0))
            ax1.set_title(f"{name}: kept {kept:.0%} ({keep.shape[1]}/{n_patches})", fontsize=8)
            for ax in (ax0, ax1):
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "saliency_masks.png"
        fig.savefig(path)
        return [path]
