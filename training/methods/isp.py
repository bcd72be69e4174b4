"""ISP: Integrated Structural Prompt learning (Wang, Xu, Jiang, Luo, arXiv 2507.05677, 2025).

No official code exists and only the abstract and one figure caption could be read, so almost all of this module
is a *reconstruction* (spec: ``methods.md`` §4.2). Provenance tags: [P] the paper's own text (abstract, figure
caption), [R] reconstructed by us (replace if the paper/code becomes available).

What follows the paper [P]:
* learnable prompts are concatenated with the text tokens and with the visual tokens, and the frozen encoders
  "add the integrated structural prompt";
* a *self-structural* and a *cross-structural* prompt module "model the structural relationships between
  learnable prompts and frozen tokens within and across modalities";
* a *sample probing* module "dynamically adjusts loss coefficients based on sample difficulty", the difficulty
  being "calculated by the prediction probability of frozen clip a[nd ...]" (the caption is cut off there).

What is reconstructed [R] (everything concrete):
* base prompts = IVLP's (this class subclasses :class:`~training.methods.ivlp.IVLP`; same parameter names):
  4 text + 4 vision tokens, depth 9, text context initialised from "a photo of a";
* low-rank attention ``A(Q, X) = softmax((Q W_q)(X W_k)^T / sqrt(r)) (X W_v) W_o`` with ``W_q, W_k, W_v``
  ``[W_in, r]`` and ``W_o`` ``[r, W_out]``, shared across layers, one set per module and direction;
* SSP, per branch and prompted layer ``l``: ``P_l <- P_l + a_l * A(P_l, X_l)`` with ``X_l`` the frozen tokens of the
  same modality at that layer (the hidden states the prompts are inserted into). Text: SOS, the class-name tokens,
  "." and EOT (the context positions and the padding after EOT are masked out of the keys); vision: CLS + patches
  (not the prompt tokens). Text prompts become per-sequence ``[N, n, W_t]`` (class-specific, image-independent),
  vision prompts per-image ``[B, n, W_v]``;
* CSP variant "A" (default): ``P_t,l <- P_t,l + c_t,l * A_tv(P_t,l, P_v,l)`` and
  ``P_v,l <- P_v,l + c_v,l * A_vt(P_v,l, P_t,l)`` over the learnable prompt *parameters* only (input independent;
  separate maps per direction since W_t != W_v). Text features stay precomputable;
* CSP variant "B": ``P_t,l <- P_t,l + c_t,l * A_tv(P_t,l, Z_l(x))`` with ``Z_l(x)`` the image's patch tokens (no CLS,
  no prompts) at vision layer ``l`` of the same (prompted) image pass. Text features then depend on the image:
  ``encode_text_for_images`` gives ``[B, N, D]``, training logits are per image against its own class features;
* SSP and CSP are applied in parallel from the layer's raw prompt (``P + a*S + c*C``), on the prompted layers of
  each branch; CSP only on layers ``l < min(depth_text, depth_vision)`` (both prompts / both streams exist);
* gates ``a_l``, ``c_l``: one learnable scalar per layer and per module, initialised to 0, so training starts
  exactly at IVLP ("feature stability"). Note: at gate 0 the projections receive no gradient on the first step
  (the gates do, and open first, as in ReZero/Flamingo gating);
* sample probing: ``d_i = 1 - [(1 - alpha) p_zs(y_i|x_i) + alpha p_prompted(y_i|x_i).detach()]``, ``p_zs`` =
  softmax over the training classes of ``logit_scale * f_o g_o^T`` with frozen (unprompted) image features ``f_o`` and
  frozen zero-shot text features ``g_o`` of the dataset template; weights, no gradient through them:
  "softmax" ``w_i = B softmax_i(d_i / T_s)`` (sum B, mean 1), or "power" ``w_i = (1 + d_i)^gamma`` divided by its
  batch mean (mean 1); then (``probing_normalize="class"``, the default) divided by their mean over the samples of
  the same class in the batch, so every class keeps its share of the loss and only samples *within* a class are
  re-weighted (zero-shot difficulty is mostly a property of the class: batch-normalised weights up-weight whole
  classes and shift the learned class prior; ``"batch"`` is that earlier form); ``L = (1/B) sum_i w_i CE_i``.
  No extra consistency regulariser.

Defaults: see :class:`ISPConfig` (4+4 tokens, depth 9, rank 32 for SSP and CSP, gates 0, CSP "A", probing
"softmax" with T_s = 1, alpha = 0).

Serving: variant A needs nothing beyond the two prompted encoders (the frozen CLIP is used by sample probing at
training time only); the image graph contains the SSP/CSP ops and the text graph the SSP/CSP ops, and class
embeddings are precomputed once per class list. Variant B makes every class embedding a function of the image:
the text encoder must run once per (image, class) pair (B x C text passes per batch instead of C once, the
CoCoOp cost), so class embeddings cannot be precomputed and the exporter (which precomputes them) refuses it;
the artifact declares ``capabilities.text_depends_on_image = True`` and :attr:`ISP.text_image_dependency` names
the option.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.format import canonical_class_name
from training.backbone import Backbone
from training.devices import autocast_off
from training.errors import ConfigError
from training.methods.base import Capabilities, InstanceCapabilities, TrainBatch, TrainContext
from training.methods.ivlp import IVLP, IVLPConfig
from training.prompting.encoders import l2_normalize

log = logging.getLogger(__name__)

_CSP_VARIANTS = ("A", "B")
_PROBING_MODES = ("softmax", "power")


@dataclass(frozen=True)
class ISPConfig(IVLPConfig):
    """ISP options. The IVLP fields (n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9,
    ctx_init="a photo of a", init_std=0.02) are inherited from :class:`IVLPConfig` [P: deep prompts on both
    streams; R: the values, from PromptSRC's IVLP config]."""

    # --- self-structural prompts [P: the module exists; R: its form]
    use_ssp: bool = True          #: [P/R] prompts attend to the frozen tokens of their own modality, per layer
    ssp_rank: int = 32            #: [R] rank r of the low-rank q/k/v/o maps, shared across layers, one set per modality
    # --- cross-structural prompts [P: the module exists; R: its form and the variants]
    #: [P/R] prompts of one modality attend to the other modality (needs depth_vision >= 1)
    use_csp: bool = True
    #: [R] "A": text prompts <- vision prompts and vision prompts <- text prompts of the same layer (input
    #: independent, exportable); "B": text prompts <- the image's patch tokens (text depends on the image, not
    #: exportable)
    csp_variant: str = "A"
    csp_rank: int = 32            #: [R] rank of the CSP maps (one set per direction)
    #: [R] initial value of every gate (one learnable scalar per layer and module); 0 = start exactly at IVLP
    gate_init: float = 0.0
    # --- sample probing [P: difficulty from frozen-CLIP probabilities reweights the loss; R: the formulas]
    use_probing: bool = True      #: [P] weight each sample's CE by its difficulty (training only)
    #: [R] "softmax": w = B softmax(d / T_s) (sum B); "power": w = (1 + d)^gamma / mean((1 + d)^gamma) (mean 1)
    probing_mode: str = "softmax"
    probing_temperature: float = 1.0  #: [R] T_s of the softmax mode, > 0
    probing_gamma: float = 1.0    #: [R] gamma of the power mode, >= 0
    #: [R] alpha in [0, 1]: d = 1 - [(1 - alpha) p_zs(y|x) + alpha p_prompted(y|x).detach()]
    probing_mix: float = 0.0
    #: [R] "class": weights divided by their mean over the batch's samples of the same class (mean 1 per class:
    #: hard samples up-weighted without shifting class priors) | "batch": mean 1 over the batch (the earlier form,
    #: which up-weights whole zero-shot-hard classes: sketch HM 61.1 vs 72.3 with "class", 3 seeds, issue 13)
    probing_normalize: str = "class"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ssp_rank", "csp_rank"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.csp_variant not in _CSP_VARIANTS:
            raise ValueError(f"csp_variant must be one of {', '.join(_CSP_VARIANTS)}, got {self.csp_variant!r}")
        if self.use_csp and self.depth_vision < 1:
            raise ValueError("use_csp needs vision prompts (depth_vision >= 1); "
                             "set use_csp to false for text-only prompts")
        if self.probing_mode not in _PROBING_MODES:
            raise ValueError(f"probing_mode must be one of {', '.join(_PROBING_MODES)}, got {self.probing_mode!r}")
        if not (math.isfinite(self.probing_temperature) and self.probing_temperature > 0):
            raise ValueError(f"probing_temperature must be > 0, got {self.probing_temperature!r}")
        if not (math.isfinite(self.probing_gamma) and self.probing_gamma >= 0):
            raise ValueError(f"probing_gamma must be a finite number >= 0, got {self.probing_gamma!r}")
        if self.probing_normalize not in ("class", "batch"):
            raise ValueError(f"probing_normalize must be class or batch, got {self.probing_normalize!r}")
        if not (0.0 <= self.probing_mix <= 1.0):
            raise ValueError(f"probing_mix must be in [0, 1], got {self.probing_mix!r}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init must be finite, got {self.gate_init!r}")

    @property
    def text_depends_on_image(self) -> bool:
        return self.use_csp and self.csp_variant == "B"


# --------------------------------------------------------------------------- pure functions
def low_rank_attention(queries: torch.Tensor, tokens: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                       w_v: torch.Tensor, w_o: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((Q W_q)(X W_k)^T / sqrt(r)) (X W_v) W_o.

    queries [..., n, W_q] (a shared [n, W_q] broadcasts over the batch of ``tokens``), tokens [..., M, W_k],
    key_mask [..., M] bool (True = may be attended; each row needs at least one True) -> [..., n, W_o].
    """
    rank = w_q.shape[-1]
    queries = queries.to(tokens.dtype)
    q = queries @ w_q.to(queries.dtype)  # [..., n, r]
    k = tokens @ w_k.to(tokens.dtype)  # [..., M, r]
    v = tokens @ w_v.to(tokens.dtype)  # [..., M, r]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(rank)  # [..., n, M]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.unsqueeze(-2), torch.finfo(scores.dtype).min)
    attn = scores.softmax(dim=-1)
    return (attn.to(v.dtype) @ v) @ w_o.to(v.dtype)  # [..., n, W_o]


def text_key_mask(token_ids: torch.Tensor, eot_index: torch.Tensor, ctx_start: int, n_ctx: int) -> torch.Tensor:
    """[N, L] ids -> [N, L] bool: the frozen text tokens SSP may attend to.

    True at positions ``<= EOT`` (SOS, class-name tokens, ".", EOT) except the context positions
    ``[ctx_start, ctx_start + n_ctx)``; padding after EOT and the context are masked out.
    """
    pos = torch.arange(token_ids.shape[-1], device=token_ids.device)  # [L]
    not_ctx = (pos < ctx_start) | (pos >= ctx_start + n_ctx)  # [L]
    return (pos.unsqueeze(0) <= eot_index.unsqueeze(-1)) & not_ctx.unsqueeze(0)  # [N, L]


def true_class_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[i, labels[i]] -> [B] (float32 in, float32 out)."""
    return logits.softmax(dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def sample_difficulty(p_zs: torch.Tensor, p_prompted: torch.Tensor | None, mix: float) -> torch.Tensor:
    """d_i = 1 - [(1 - mix) p_zs_i + mix p_prompted_i] ([B]; p_prompted may be None when mix == 0)."""
    if p_prompted is None or mix == 0.0:
        return 1.0 - p_zs
    return 1.0 - ((1.0 - mix) * p_zs + mix * p_prompted)


def probing_weights(difficulty: torch.Tensor, mode: str, temperature: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """Per-sample loss weights from d [B] (no gradient): "softmax": B softmax(d / T) (sums to B);
    "power": (1 + d)^gamma / mean((1 + d)^gamma) (mean 1)."""
    d = difficulty.detach()
    if mode == "softmax":
        return d.shape[0] * (d / temperature).softmax(dim=-1)
    if mode == "power":
        w = (1.0 + d).pow(gamma)
        return w / w.mean()
    raise ValueError(f"unknown probing mode {mode!r}")


def class_normalized_weights(weights: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``weights`` [B] divided by their mean over the samples of the same label (mean 1 within every class present;
    fixed shapes, no host sync)."""
    w = weights.detach()
    sums = torch.zeros(num_classes, dtype=w.dtype, device=w.device).index_add_(0, labels, w)
    counts = torch.zeros(num_classes, dtype=w.dtype, device=w.device).index_add_(0, labels, torch.ones_like(w))
    return w / (sums / counts.clamp_min(1)).clamp_min(torch.finfo(w.dtype).tiny)[labels]


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i w_i CE_i."""
    return (weights * F.cross_entropy(logits, labels, reduction="none")).mean()


# --------------------------------------------------------------------------- modules
class LowRankAttention(nn.Module):
    """The SSP/CSP map ``A(Q, X) = softmax((Q W_q)(X W_k)^T / sqrt(r)) (X W_v) W_o``, shared across layers [R].

    Init [R]: every matrix N(0, 1/fan_in) (fan_in = W_q / W_k for the input maps, r for W_o).
    """

    def __init__(self, query_width: int, key_width: int, rank: int) -> None:
        super().__init__()
        self.w_q = nn.Parameter(torch.randn(query_width, rank) / math.sqrt(query_width))  # [W_q, r]
        self.w_k = nn.Parameter(torch.randn(key_width, rank) / math.sqrt(key_width))  # [W_k, r]
        self.w_v = nn.Parameter(torch.randn(key_width, rank) / math.sqrt(key_width))  # [W_k, r]
        self.w_o = nn.Parameter(torch.randn(rank, query_width) / math.sqrt(rank))  # [r, W_q]

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return low_rank_attention(queries, tokens, self.w_q, self.w_k, self.w_v, self.w_o, key_mask)


# --------------------------------------------------------------------------- the method
class ISP(IVLP):
    name = "isp"
    description = "ISP: IVLP prompts + self-/cross-structural prompt attention (gated) + sample-probing loss weights"
    config_cls = ISPConfig
    capabilities = InstanceCapabilities(Capabilities())  # class level: the defaults (variant A)

    def __init__(self, backbone: Backbone, config: ISPConfig) -> None:
        super().__init__(backbone, config)
        w_t, w_v = self.text_encoder.width, self.vision_encoder.width
        d_t, d_v = config.depth_text, config.depth_vision
        self.n_cross = min(d_t, d_v) if config.use_csp else 0

        def gates(n: int) -> nn.Parameter:
            return nn.Parameter(torch.full((n,), float(config.gate_init)))

        if config.use_ssp:
            self.ssp_text = LowRankAttention(w_t, w_t, config.ssp_rank)
            self.ssp_text_gate = gates(d_t)  # [depth_text]
            if d_v:
                self.ssp_vision = LowRankAttention(w_v, w_v, config.ssp_rank)
                self.ssp_vision_gate = gates(d_v)  # [depth_vision]
        if config.use_csp:
            self.csp_text = LowRankAttention(w_t, w_v, config.csp_rank)  # text prompts <- vision prompts / patches
            self.csp_text_gate = gates(self.n_cross)
            if config.csp_variant == "A":
                self.csp_vision = LowRankAttention(w_v, w_t, config.csp_rank)  # vision prompts <- text prompts
                self.csp_vision_gate = gates(self.n_cross)
        self._capabilities = Capabilities(text_depends_on_image=config.text_depends_on_image)
        # Training-only frozen zero-shot text features of the training classes (sample probing); never saved.
        self.register_buffer("frozen_text", None, persistent=False)  # g_o [C, D]
        self._warned_unprepared = False

    @property
    def text_image_dependency(self) -> str | None:
        """Why text features depend on the image (names the option), or None."""
        if not self.config.text_depends_on_image:
            return None
        return ("isp csp_variant='B' lets the text prompts attend to the image's patch tokens, so every class "
                "embedding depends on the image (the text encoder runs per image x class) and cannot be precomputed; "
                "train with csp_variant='A' (or use_csp=false) to get an exportable artifact")

    # ----------------------------------------------------------------- hooks
    def _text_layer_param(self, i: int) -> torch.Tensor:
        return self.text_ctx if i == 0 else self.text_deep[i - 1]

    def _text_hook(self, image_tokens: dict[int, torch.Tensor] | None = None, images: int = 1) -> Callable | None:
        """Text prompt hook: P + a_l A_ssp(P, X_l[mask]) + c_l A_csp(P, P_v,l | Z_l(x)).

        ``image_tokens`` (variant B): layer -> patch tokens [B, K, W_v]; the sequences are then image-major
        (sequence s = b * N + c) and each image's CSP output is repeated over its N sequences.
        """
        cfg = self.config
        if not cfg.use_ssp and not cfg.use_csp:
            return None
        variant_b = cfg.text_depends_on_image
        if variant_b and image_tokens is None:
            raise ConfigError(self.text_image_dependency + " (call encode_text_for_images(token_ids, pixels))")
        cache: dict[str, torch.Tensor] = {}

        def hook(i: int, prompts: torch.Tensor, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
            out = prompts
            if cfg.use_ssp:
                if "mask" not in cache:
                    cache["mask"] = text_key_mask(token_ids, self.text_encoder.eot_index(token_ids), 1,
                                                  prompts.shape[-2])
                out = out + self.ssp_text_gate[i] * self.ssp_text(prompts, hidden, cache["mask"])  # [N, n, W_t]
            if cfg.use_csp and i < self.n_cross:
                if variant_b:
                    c = self.csp_text(prompts, image_tokens[i])  # [B, n, W_t]
                    c = c.repeat_interleave(hidden.shape[0] // images, dim=0)  # [B * N, n, W_t]
                else:
                    c = self.csp_text(prompts, self.vision_deep[i])  # [n, W_t], input independent
                out = out + self.csp_text_gate[i] * c
            return out

        return hook

    def _vision_hook(self, capture: dict[int, torch.Tensor] | None = None) -> Callable | None:
        """Vision prompt hook: P + a_l A_ssp(P, [CLS, patches]_l) (+ c_l A_csp(P, P_t,l) for variant A).
        ``capture`` (variant B) receives layer -> patch tokens [B, K, W_v] of the hidden states."""
        cfg = self.config
        csp_a = cfg.use_csp and cfg.csp_variant == "A"
        if not cfg.use_ssp and not csp_a and capture is None:
            return None

        def hook(i: int, prompts: torch.Tensor, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
            n = prompts.shape[-2]
            frozen = hidden[:, : hidden.shape[1] - n]  # CLS + patches [B, 1 + K, W_v]
            if capture is not None:
                capture[i] = frozen[:, 1:]
            out = prompts
            if cfg.use_ssp:
                out = out + self.ssp_vision_gate[i] * self.ssp_vision(prompts, frozen)  # [B, n, W_v]
            if csp_a and i < self.n_cross:
                out = out + self.csp_vision_gate[i] * self.csp_vision(prompts, self._text_layer_param(i))
            return out

        return hook

    # ----------------------------------------------------------------- encoders (what export traces)
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.vision_encoder(pixels, self.vision_prompts(), prompt_hook=self._vision_hook()))

    def encode_text(self, token_ids: torch.Tensor, prompt_set: int = 0) -> torch.Tensor:
        """[N, L] -> [N, D]; variant B refuses (its text needs the image: :meth:`encode_text_for_images`)."""
        return l2_normalize(self.text_encoder(token_ids, self.text_prompts(prompt_set), ctx_start=1,
                                              prompt_hook=self._text_hook()))

    def _image_pass(self, pixels: torch.Tensor, capture: bool):
        """Prompted vision pass -> (unnormalised features [B, D], layer -> patch tokens [B, K, W_v] or None)."""
        tokens: dict[int, torch.Tensor] | None = {} if capture else None
        feats = self.vision_encoder(pixels, self.vision_prompts(), prompt_hook=self._vision_hook(tokens))
        return feats, tokens

    def _text_for_image_tokens(self, token_ids: torch.Tensor, tokens: dict[int, torch.Tensor],
                               num_images: int) -> torch.Tensor:
        """Variant B text features [B, N, D] (unnormalised): every (image, class) sequence through the text tower."""
        n = token_ids.shape[0]
        ids = token_ids.repeat(num_images, 1)  # [B * N, L], image-major
        feats = self.text_encoder(ids, self.text_prompts(), ctx_start=1,
                                  prompt_hook=self._text_hook(tokens, images=num_images))
        return feats.reshape(num_images, n, -1)

    def encode_text_for_images(self, token_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """token_ids [N, L] + pixels [B, 3, H, W] -> L2-normalised text embeddings [B, N, D] per image.

        Variant B: text prompts attend to each image's patch tokens (B x N text passes). Otherwise the
        image-independent :meth:`encode_text` broadcast over the images.
        """
        if not self.config.text_depends_on_image:
            return self.encode_text(token_ids).unsqueeze(0).expand(pixels.shape[0], -1, -1)
        _, tokens = self._image_pass(pixels, capture=True)
        return l2_normalize(self._text_for_image_tokens(token_ids, tokens, pixels.shape[0]))

    # ----------------------------------------------------------------- frozen targets (sample probing)
    @torch.no_grad()
    def frozen_text_features(self, classnames: list[str], template: str, tokenize, device,
                             chunk: int = 256) -> torch.Tensor:
        """Normalised unprompted text features [C, D] of ``template.format(name)`` (float32)."""
        ids = tokenize([template.format(canonical_class_name(c)) for c in classnames])
        return l2_normalize(torch.cat([self.text_encoder(ids[i:i + chunk].to(device), None).float()
                                       for i in range(0, len(classnames), chunk)]))

    def prepare_training(self, ctx: TrainContext) -> None:
        """Precompute g_o (frozen zero-shot text features of the training classes, dataset template) once."""
        if not self.config.use_probing:
            return
        self.to(ctx.device)
        was_training = self.training
        self.eval()
        try:
            g_o = self.frozen_text_features(ctx.classnames, ctx.dataset_template, ctx.tokenize, ctx.device)
        finally:
            self.train(was_training)
        self.frozen_text = g_o.detach()

    def _frozen_text(self, batch: TrainBatch) -> torch.Tensor:
        """g_o; without prepare_training (direct calls, the registry contract test) the unprompted features of the
        batch's own prompt texts."""
        if self.frozen_text is not None:
            return self.frozen_text
        if not self._warned_unprepared:
            log.warning("isp: prepare_training was not run; sample probing uses the frozen features of the batch's "
                        "prompt texts as zero-shot classifier (train_run always prepares)")
            self._warned_unprepared = True
        with torch.no_grad():
            return l2_normalize(self.text_encoder(batch.class_token_ids, None).float())

    # ----------------------------------------------------------------- training loss
    def training_loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """(Probing-weighted) CE over the prompted logits; no host syncs.

        Encoders run under the loop's autocast; logits, probabilities, weights and the loss are float32 with
        autocast off. Variant B: logits[b, c] = scale * f_p[b] . g_p[b, c] (each image against its own class
        features). Parts: ``ce`` (unweighted mean CE), ``probing_weight_mean``/``probing_weight_max`` (detached).
        """
        cfg = self.config
        labels = batch.labels
        if cfg.text_depends_on_image:
            feats, tokens = self._image_pass(batch.images, capture=True)
            f_p = l2_normalize(feats.float())  # [B, D]
            g_p = l2_normalize(self._text_for_image_tokens(batch.class_token_ids, tokens,
                                                           batch.images.shape[0]).float())  # [B, C, D]
        else:
            f_p = l2_normalize(self._image_pass(batch.images, capture=False)[0].float())  # [B, D]
            g_p = l2_normalize(self.text_encoder(batch.class_token_ids, self.text_prompts(), ctx_start=1,
                                                 prompt_hook=self._text_hook()).float())  # [C, D]
        f_o = None
        if cfg.use_probing:
            g_o = self._frozen_text(batch)
            with torch.no_grad():
                f_o = l2_normalize(self.vision_encoder(batch.images, None).float())  # frozen image features
        with autocast_off(f_p):
            scale = self.logit_scale.float()
            if g_p.dim() == 3:
                logits = scale * torch.einsum("bd,bcd->bc", f_p, g_p)  # [B, C]
            else:
                logits = scale * f_p @ g_p.t()  # [B, C]
            ce = F.cross_entropy(logits, labels)
            out: dict[str, torch.Tensor] = {}
            if cfg.use_probing:
                with torch.no_grad():
                    p_zs = true_class_probability(scale * f_o @ g_o.float().t(), labels)
                    p_pr = true_class_probability(logits.detach(), labels) if cfg.probing_mix > 0 else None
                    w = probing_weights(sample_difficulty(p_zs, p_pr, cfg.probing_mix), cfg.probing_mode,
                                        cfg.probing_temperature, cfg.probing_gamma)
                    if cfg.probing_normalize == "class":
                        w = class_normalized_weights(w, labels, logits.shape[-1])
                loss = weighted_cross_entropy(logits, labels, w)
                out.update(probing_weight_mean=w.mean(), probing_weight_max=w.max())
            else:
                loss = ce
        return {"loss": loss, "ce": ce.detach(), **out, "logits": logits.detach()}
