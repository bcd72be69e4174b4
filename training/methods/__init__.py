"""Method registry: an explicit table built here (no registration by import side effect).

``list_methods()`` lists them; ``create_method(name, backbone, config_dict)`` builds one. Adding a method = one
module with a :class:`~training.methods.base.PromptMethod` subclass plus one line in ``_METHOD_CLASSES``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.backbone import Backbone, get_backbone_spec
from training.errors import RegistryError
from training.methods.base import (
    PROMPT_DEPTH,
    Capabilities,
    MethodConfig,
    PromptMethod,
    TrainBatch,
    TrainContext,
    TrainStage,
)
from training.methods.coop import CoOp
from training.methods.disa import DiSa
from training.methods.guidg import GuiDG
from training.methods.isp import ISP
from training.methods.ivlp import IVLP
from training.methods.zeroshot import ZeroShot

_METHOD_CLASSES: tuple[type[PromptMethod], ...] = (ZeroShot, CoOp, IVLP, DiSa, ISP, GuiDG)


def _build_registry() -> dict[str, type[PromptMethod]]:
    registry: dict[str, type[PromptMethod]] = {}
    for cls in _METHOD_CLASSES:
        if cls.name in registry:
            raise RegistryError(f"duplicate method name {cls.name!r} ({registry[cls.name].__name__}, {cls.__name__})")
        registry[cls.name] = cls
    return registry


METHODS: dict[str, type[PromptMethod]] = _build_registry()


def list_methods() -> list[str]:
    """Registered method names, in registry order."""
    return list(METHODS)


def get_method_class(name: str) -> type[PromptMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise RegistryError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}") from None


def create_method(name: str, backbone: Backbone,
                  config: Mapping[str, Any] | MethodConfig | None = None) -> PromptMethod:
    """Build method ``name`` over ``backbone`` with ``config`` (a dict of overrides of the defaults, or a config)."""
    cls = get_method_class(name)
    cfg = config if isinstance(config, MethodConfig) else cls.config_cls.from_dict(config)
    return cls(backbone, cfg)


def method_config_for_backbone(method: str, backbone: str, overrides: Mapping[str, Any] | None = None
                               ) -> dict[str, Any]:
    """``overrides`` plus ``method``'s prompt depths fitted to the backbone named ``backbone`` (through the method's
    :meth:`~training.methods.base.PromptMethod.config_for_backbone` hook; unchanged when its depth is unknown)."""
    num_layers = get_backbone_spec(backbone).num_layers
    if num_layers is None:
        return dict(overrides or {})
    return get_method_class(method).config_for_backbone(num_layers, overrides)


__all__ = [
    "PROMPT_DEPTH", "Capabilities", "METHODS", "MethodConfig", "PromptMethod", "TrainBatch", "TrainContext",
    "create_method", "get_method_class", "list_methods", "method_config_for_backbone", "TrainStage",
]
