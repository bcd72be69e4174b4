"""Zero-shot CLIP: no trainable tensors, the dataset's hand-crafted template. The baseline every method must beat,
and the proof that the prompting wrappers change nothing when empty."""
from __future__ import annotations

from dataclasses import dataclass

from training.methods.base import Capabilities, MethodConfig, PromptMethod


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    """Zero-shot CLIP has no options."""


class ZeroShot(PromptMethod):
    name = "zeroshot"
    description = "zero-shot CLIP with the dataset's hand-crafted template (nothing trainable)"
    config_cls = ZeroShotConfig
    capabilities = Capabilities(trainable=False)
