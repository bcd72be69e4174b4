"""Building frozen config dataclasses from plain dicts (CLI ``--set``, JSON artifacts) with clear errors."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from training.errors import ConfigError

T = TypeVar("T")


def config_from_dict(cls: type[T], values: Mapping[str, Any] | None, what: str, *,
                     on_unknown: Callable[[list[str]], None] | None = None) -> T:
    """``cls(**values)``; invalid values raise :class:`ConfigError` naming ``what``.

    Unknown keys raise :class:`ConfigError` naming them and the valid keys (options a user gives), unless
    ``on_unknown`` is given (a stored file read tolerantly): then it is called with their sorted names and they
    are dropped.
    """
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        if on_unknown is None:
            raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}; "
                              f"valid options: {', '.join(sorted(names))}")
        on_unknown(unknown)
        values = {k: v for k, v in values.items() if k in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc
