"""Helpers shared by the tests (importable: tests/ is on sys.path via the root conftest)."""
from __future__ import annotations

import dataclasses

TINY = "tiny-test"


def tiny_method_config(method_name: str) -> dict:
    """Method config overrides that fit the 2-layer tiny backbone (depth options clamped to 2)."""
    from training.methods import get_method_class

    cls = get_method_class(method_name)
    out = {}
    for f in dataclasses.fields(cls.config_cls):
        if f.name.startswith("depth") and isinstance(f.default, int) and f.default > 2:
            out[f.name] = 2
    return out
