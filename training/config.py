"""Building frozen config dataclasses from plain dicts (CLI ``--set``, JSON artifacts) with clear errors."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from training.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """``cls(**values)``; unknown keys and invalid values raise :class:`ConfigError` naming ``what`` and the valid keys."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc
