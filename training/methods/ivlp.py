"""IVLP, independent vision-language prompting (Khattak et al., MaPLe CVPR 2023 / PromptSRC ICCV 2023 baseline).

Follows the official code (muzairkhattak/PromptSRC ``clip/model.py``, ``trainers/independentVL.py``):
* text: layer-0 context ``[n_ctx_text, W_t]`` (init from ``ctx_init`` "a photo of a" or N(0, 0.02^2)) replacing
  the tokens after SOS; layers 1..depth_text-1 each own ``[n_ctx_text, W_t]`` N(0, 0.02^2) prompts that replace
  the same positions before the block;
* vision: layer-0 ``[n_ctx_vision, W_v]`` prompts appended after CLS + patches (before ``ln_pre``); layers
  1..depth_vision-1 each own prompts that replace those last tokens before the block;
* no coupling between the branches. Defaults: 4+4 tokens, depth 9 (PromptSRC's IVLP config); 46,080 parameters
  on ViT-B/16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.backbone import Backbone
from training.errors import ConfigError
from training.methods.base import PROMPT_DEPTH, Capabilities, MethodConfig, PromptMethod, init_prompt, token_init


@dataclass(frozen=True)
class IVLPConfig(MethodConfig):
    n_ctx_text: int = 4
    n_ctx_vision: int = 4
    #: number of text blocks that get prompts (1 = shallow, CoOp-like)
    depth_text: int = field(default=9, metadata={PROMPT_DEPTH: True})
    #: number of vision blocks that get prompts (0 = no vision prompts)
    depth_vision: int = field(default=9, metadata={PROMPT_DEPTH: True})
    ctx_init: str = "a photo of a"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx_text < 1 or self.depth_text < 1:
            raise ValueError("n_ctx_text and depth_text must be >= 1")
        if self.depth_vision < 0 or (self.depth_vision > 0 and self.n_ctx_vision < 1):
            raise ValueError("depth_vision must be >= 0, and n_ctx_vision >= 1 when depth_vision > 0")


class IVLP(PromptMethod):
    name = "ivlp"
    description = "IVLP: independent deep text + vision prompts (4+4 tokens, depth 9)"
    config_cls = IVLPConfig
    capabilities = Capabilities()

    def __init__(self, backbone: Backbone, config: IVLPConfig) -> None:
        super().__init__(backbone, config)
        t_layers, v_layers = self.text_encoder.num_layers, self.vision_encoder.num_layers
        if config.depth_text > t_layers or config.depth_vision > v_layers:
            raise ConfigError(
                f"ivlp: depth_text={config.depth_text}/depth_vision={config.depth_vision} exceed the backbone's "
                f"{t_layers} text / {v_layers} vision blocks; set depth_text/depth_vision <= those"
            )
        w_t, w_v = self.text_encoder.width, self.vision_encoder.width
        if config.ctx_init:
            ctx = token_init(backbone, config.ctx_init, config.n_ctx_text)
        else:
            ctx = torch.randn(config.n_ctx_text, w_t) * config.init_std
        self.text_ctx = nn.Parameter(ctx)  # [n_t, W_t]
        self.text_deep = nn.ParameterList(
            [init_prompt(config.n_ctx_text, w_t, config.init_std) for _ in range(config.depth_text - 1)]
        )  # depth_text-1 x [n_t, W_t]
        self.vision_deep = nn.ParameterList(
            [init_prompt(config.n_ctx_vision, w_v, config.init_std) for _ in range(config.depth_vision)]
        )  # depth_vision x [n_v, W_v]; entry 0 is appended, the others replace
        self.n_text_ctx = config.n_ctx_text

    def prompt_template(self, dataset_template: str) -> str:
        prefix = self.config.ctx_init or " ".join(["X"] * self.config.n_ctx_text)
        return prefix + " {}."

    def text_prompts(self, prompt_set: int = 0):
        return [self.text_ctx, *self.text_deep]

    def vision_prompts(self):
        return list(self.vision_deep) or None
