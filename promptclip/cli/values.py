"""Option strings to values, shared by the command groups (``--set key=value``, comma lists, class lists).

Torch-free: ``classify`` uses :func:`class_list`.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.errors import PromptclipError


def parse_value(text: str) -> Any:
    """JSON when it parses (``3``, ``false``, ``[1, 2]``), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set key=value`` options (repeatable) as a dict."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PromptclipError(f"--set expects key=value, got {item!r} (e.g. --set depth_text=3)")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def class_list(args: argparse.Namespace) -> list[str] | None:
    """Class names from ``--classes`` (comma-separated) and ``--classes-file`` (one per line); None when neither."""
    names: list[str] = []
    if getattr(args, "classes", None):
        text = args.classes.strip()
        if text.startswith("["):  # a JSON list, for names with commas
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PromptclipError(f"--classes starts like a JSON list but is not valid JSON ({exc}); give "
                                      'names separated by commas or a JSON list such as \'["a, b", "c"]\'') from None
            if not isinstance(parsed, list) or not all(isinstance(n, str) for n in parsed):
                raise PromptclipError("--classes as JSON must be a list of strings")
            names += parsed
        else:
            names += text.split(",")
    if getattr(args, "classes_file", None):
        path = Path(args.classes_file)
        if not path.is_file():
            raise PromptclipError(f"--classes-file {path} does not exist (expected one class name per line)")
        names += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names or None


def int_list(text: str) -> tuple[int, ...]:
    """``1,2,3`` -> ``(1, 2, 3)``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PromptclipError(f"expected comma-separated integers, got {text!r} (e.g. --seeds 1,2,3)") from None


def float_pair(text: str, option: str) -> tuple[float, float]:
    """``"0.7,1"`` -> ``(0.7, 1.0)``."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise PromptclipError(f"{option} expects two comma-separated numbers, got {text!r} (e.g. 0.7,1)") from None
    return low, high


def name_list(text: str) -> tuple[str, ...]:
    """``a, b,,c`` -> ``("a", "b", "c")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def method_specs(text: str) -> tuple[str, ...]:
    """Split on commas outside [...] (variants: disa[use_cir=false,use_dir=false])."""
    return tuple(m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if m.strip())
