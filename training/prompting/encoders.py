"""Method-agnostic deep-prompt wrappers composed over open_clip's towers (no fork, no monkeypatching).

Both wrappers hold references to the frozen open_clip submodules and re-run the towers' forward passes with
prompt tokens inserted between blocks:

* :class:`PromptedTextEncoder` *replaces* the hidden states of the context positions
  ``[ctx_start, ctx_start + n_ctx)`` before block ``i`` with ``layer_prompts[i]`` (layer 0 = the token embeddings,
  before the positional embedding is added), as CoOp (layer 0 only) and IVLP/MaPLe (layers 0..depth-1) do.
* :class:`PromptedVisionEncoder` *appends* ``n`` prompt tokens after CLS + patches (after the positional
  embedding, before ``ln_pre``) and replaces those last ``n`` tokens before each deeper block ``i`` with
  ``layer_prompts[i]``, as VPT-deep/IVLP do. Prompt tokens are removed before pooling.

With no prompts (all ``None``) both reproduce open_clip's ``encode_text``/``encode_image`` exactly.

Input-dependent prompts (``prompt_hook``)
-----------------------------------------
Both ``forward`` methods take an optional ``prompt_hook(layer_index, prompts, hidden_states, token_ids) -> prompts``
that lets a method (ISP's structural prompts) rewrite layer ``i``'s prompts from the current hidden states just
before they are inserted, without forking the wrappers. It is called once per block ``i`` whose
``layer_prompts[i]`` is not ``None`` (in block order, so layer ``i``'s hidden states already reflect the rewritten
prompts of layers ``< i``), with:

* ``layer_index``: ``i`` (0 = the token-embedding / ``ln_pre`` level);
* ``prompts``: ``layer_prompts[i]`` as given (``[n, W]`` or per-sequence / per-image ``[N|B, n, W]``);
* ``hidden_states``: the input of block ``i`` just before layer ``i``'s prompts are inserted. Text: ``[N, L, W]``
  (layer 0: token embeddings + positional embedding; deeper: the output of block ``i - 1``). Vision:
  ``[B, 1 + K + n, W]`` = CLS, the ``K`` kept patches, then ``n`` prompt slots (layer 0: after ``ln_pre``;
  deeper: the output of block ``i - 1``). The prompt positions (text ``[ctx_start, ctx_start + n)``, vision the
  last ``n``) do *not* hold frozen tokens: at layer 0 they hold the un-rewritten layer-0 prompts, deeper they hold
  the previous block's prompt outputs; a hook that wants the frozen tokens masks/slices them out;
* ``token_ids``: the text input ``[N, L]`` (text tower) or ``None`` (vision tower).

It returns the prompts to insert: the same ``n``, shared ``[n, W]`` or per-sequence ``[N, n, W]`` (text) /
per-image ``[B, n, W]`` (vision). The hook is part of the traced graph (export-safe if its ops are). With
``prompt_hook=None`` (the default) nothing changes: the computation is exactly the hook-free one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LayerPrompts = Sequence[torch.Tensor | None]
#: ``(layer_index, prompts, hidden_states, token_ids_or_None) -> prompts`` (see the module docstring).
PromptHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _check_layers(layer_prompts: LayerPrompts | None, n_layers: int, tower: str) -> list[torch.Tensor | None]:
    if layer_prompts is None:
        return [None] * n_layers
    prompts = list(layer_prompts)
    if len(prompts) > n_layers:
        raise ValueError(f"{tower}: {len(prompts)} prompt layers given but the tower has {n_layers} blocks")
    return prompts + [None] * (n_layers - len(prompts))


class PromptedTextEncoder(nn.Module):
    """open_clip text tower with per-layer context replacement. Holds no parameters of its own."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        # Submodules are shared with the frozen CLIP (registered here so .to(device) keeps working).
        self.token_embedding = clip.token_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type
        self.eos_id = getattr(clip, "text_eos_id", None)
        if not getattr(self.transformer, "batch_first", True):
            raise ValueError("PromptedTextEncoder needs a batch_first open_clip transformer")

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @staticmethod
    def _replace(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
        # x: [N, L, W]; prompt: [n, W] (shared) or [N, n, W] (per sequence)
        n = prompt.shape[-2]
        prompt = prompt.to(x.dtype)
        if prompt.dim() == 2:
            prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :start], prompt, x[:, start + n:]], dim=1)

    def eot_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N] position of the end-of-text token (what ``argmax``/``eos`` pooling reads)."""
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)  # EOT has the largest id

    def forward(
        self,
        token_ids: torch.Tensor,
        layer_prompts: LayerPrompts | None = None,
        ctx_start: int = 1,
        prompt_hook: PromptHook | None = None,
    ) -> torch.Tensor:
        """token_ids [N, L] int64 -> unnormalised text features [N, D].

        Args:
            layer_prompts: per block, ``None`` or context prompts [n, W] (shared) / [N, n, W] (per sequence) that
                replace positions ``[ctx_start, ctx_start + n)`` before the block.
            prompt_hook: optional ``(i, prompts, hidden [N, L, W], token_ids) -> prompts`` rewriting layer ``i``'s
                prompts before insertion (see the module docstring); ``None`` = unchanged behaviour.
        """
        prompts = _check_layers(layer_prompts, self.num_layers, "text")
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(token_ids).to(cast_dtype)  # [N, L, W]
        if prompts[0] is not None:
            p0 = prompts[0]
            if prompt_hook is not None:  # block-0 input with the un-rewritten layer-0 prompts in place
                pos = self.positional_embedding.to(cast_dtype)
                p0 = prompt_hook(0, p0, self._replace(x, p0, ctx_start) + pos, token_ids)
            x = self._replace(x, p0, ctx_start)
        x = x + self.positional_embedding.to(cast_dtype)
        for i, block in enumerate(self.transformer.resblocks):
            if i > 0 and prompts[i] is not None:
                p = prompts[i] if prompt_hook is None else prompt_hook(i, prompts[i], x, token_ids)
                x = self._replace(x, p, ctx_start)
            x = block(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)  # [N, L, W]
        if self.pool_type in ("argmax", "eos"):
            pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_index(token_ids)]
        elif self.pool_type == "first":
            pooled = x[:, 0]
        elif self.pool_type == "last":
            pooled = x[:, -1]
        else:
            raise ValueError(f"unsupported text pool type {self.pool_type!r}")
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection  # [N, D]


class PromptedVisionEncoder(nn.Module):
    """open_clip ``VisionTransformer`` with appended (deep) prompt tokens and optional patch keeping."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("PromptedVisionEncoder does not support attentional-pool vision towers")

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.class_embedding.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.visual.positional_embedding.shape[0]) - 1

    @staticmethod
    def _per_image(prompt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[n, W] (shared) or [B, n, W] prompts -> [B, n, W] in ``x``'s dtype."""
        prompt = prompt.to(x.dtype)
        return prompt.unsqueeze(0).expand(x.shape[0], -1, -1) if prompt.dim() == 2 else prompt

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> CLS + patch tokens with positional embedding [B, 1 + P, W]."""
        v = self.visual
        x = v.conv1(pixels)  # [B, W, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, P, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + P, W]
        return x + v.positional_embedding.to(x.dtype)

    def forward(
        self,
        pixels: torch.Tensor,
        layer_prompts: LayerPrompts | None = None,
        keep_index: torch.Tensor | None = None,
        return_tokens: bool = False,
        prompt_hook: PromptHook | None = None,
    ):
        """pixels [B, 3, H, W] -> unnormalised image features [B, D].

        Args:
            layer_prompts: per block, ``None`` or prompts [n, W] / [B, n, W]; entry 0 is appended, deeper ones replace.
            keep_index: optional [B, K] indices (0..P-1) of the patches to keep (saliency masking); CLS always kept.
            return_tokens: also return the final patch tokens after ``ln_post`` and ``proj`` [B, K, D].
            prompt_hook: optional ``(i, prompts, hidden [B, 1 + K + n, W], None) -> prompts`` rewriting layer ``i``'s
                prompts before insertion (see the module docstring); ``None`` = unchanged behaviour.
        """
        v = self.visual
        prompts = _check_layers(layer_prompts, self.num_layers, "vision")
        if prompts[0] is None and any(p is not None for p in prompts[1:]):
            raise ValueError("vision deep prompts need layer-0 prompts to set the number of prompt tokens")
        x = self.patch_tokens(pixels.to(v.conv1.weight.dtype))  # [B, 1 + P, W]
        if keep_index is not None:  # drop patches (training-time masking); positions keep their embeddings
            idx = keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]) + 1
            x = torch.cat([x[:, :1], torch.gather(x, 1, idx)], dim=1)  # [B, 1 + K, W]
        x = v.patch_dropout(x)
        n_prompt = 0
        if prompts[0] is not None:
            p0 = prompts[0]
            if prompt_hook is not None:  # block-0 input (after ln_pre) with the un-rewritten prompts appended
                p0 = prompt_hook(0, p0, v.ln_pre(torch.cat([x, self._per_image(p0, x)], dim=1)), None)
            p0 = self._per_image(p0, x)
            n_prompt = p0.shape[1]
            x = torch.cat([x, p0], dim=1)  # [B, 1 + K + n, W]
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if i > 0 and prompts[i] is not None:
                p = prompts[i] if prompt_hook is None else prompt_hook(i, prompts[i], x, None)
                p = p.to(x.dtype)
                p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if p.dim() == 2 else p
                x = torch.cat([x[:, : x.shape[1] - n_prompt], p], dim=1)
            x = block(x)
        if n_prompt:
            x = x[:, : x.shape[1] - n_prompt]  # drop prompt tokens before pooling
        pooled, tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj  # [B, D]
        if not return_tokens:
            return pooled
        if v.proj is not None:
            tokens = tokens @ v.proj
        return pooled, tokens


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (export-friendly; same as ``F.normalize``)."""
    return F.normalize(x, dim=-1)
