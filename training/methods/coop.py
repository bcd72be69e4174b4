"""CoOp (Zhou et al., IJCV 2022): a shared learnable text context replacing the tokens after SOS.

Follows the official code (KaiyangZhou/CoOp ``trainers/coop.py``): context ``[n_ctx, W]``, random N(0, 0.02^2)
init or initialised from the token embeddings of ``ctx_init``; class token at the end ("X X ... X {name}.").
Only the shared-context, class-token-at-end variant is implemented (class-specific contexts would make the
method class-bound).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from training.backbone import Backbone
from training.errors import ConfigError
from training.methods.base import Capabilities, MethodConfig, PromptMethod, init_prompt, token_init


@dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    n_ctx: int = 16          #: number of learnable context tokens (CoOp: 16; 4 with ctx_init "a photo of a")
    ctx_init: str = ""       #: words to initialise the context from ("" = random N(0, init_std^2))
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError("n_ctx must be >= 1")


class CoOp(PromptMethod):
    name = "coop"
    description = "CoOp: shallow learnable text context (Zhou et al. 2022)"
    config_cls = CoOpConfig
    capabilities = Capabilities()

    def __init__(self, backbone: Backbone, config: CoOpConfig) -> None:
        super().__init__(backbone, config)
        width = self.text_encoder.width
        if config.ctx_init:
            self.ctx = nn.Parameter(token_init(backbone, config.ctx_init, config.n_ctx))  # [n_ctx, W]
        else:
            self.ctx = init_prompt(config.n_ctx, width, config.init_std)  # [n_ctx, W]
        self.n_text_ctx = config.n_ctx
        if config.n_ctx + 3 > backbone.context_length:
            raise ConfigError(f"n_ctx={config.n_ctx} leaves no room for class names in a "
                              f"{backbone.context_length}-token context")

    def prompt_template(self, dataset_template: str) -> str:
        prefix = self.config.ctx_init or " ".join(["X"] * self.config.n_ctx)
        return prefix + " {}."

    def text_prompts(self, prompt_set: int = 0):
        return [self.ctx]
