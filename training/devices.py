"""Autocast contexts that work on every device type the training code runs on.

``torch.autocast`` refuses device types without autocast support (``meta``, which the device-correctness test
uses), even with ``enabled=False``. These helpers return a no-op context there, so one code path serves CUDA, the
CPU and the checks.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    device_type = torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def autocast_off(like: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast disabled on ``like``'s device (losses are computed in float32 even inside the loop's autocast)."""
    device_type = like.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
