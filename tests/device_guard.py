"""A dispatch-level check that training code keeps every tensor on the model's device (no GPU needed).

The model is moved to PyTorch's ``meta`` device (shapes and dtypes, no data) and training runs for real under
:class:`DeviceGuard`, a ``TorchDispatchMode`` that sees every ATen op:

* everywhere: an op whose tensor arguments live on different devices is a violation (0-dim CPU tensors are
  allowed, as CUDA kernels accept them as scalars); device transfers (``.to``, ``copy_``) are not ops that mix;
* inside :attr:`strict` regions (the engine's ``train_step``: loss, backward, optimizer step): creating a tensor
  on another device than the model's (``torch.arange(n)``, ``torch.tensor([...])``, ``torch.zeros(n)`` without
  ``device=``) and reading a device value on the host (``.item()``, ``float(t)``, ``.cpu()``: a sync per step)
  are violations too.

Host reads of meta tensors (checkpoints, logged numbers, GPA's CPU snapshots) get zeros, so the host-side code
around the steps runs as well; the numbers mean nothing, the placement is what is checked.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_LIFTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}  # torch.tensor(...) / as_tensor of host data
_HOST_READS = {aten._local_scalar_dense.default}


@dataclass(frozen=True)
class Violation:
    kind: str     #: "mixes devices" | "creates a tensor on the host" | "reads a device value on the host"
    op: str
    devices: str
    where: str    #: the innermost frame in the project's code

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} ({self.devices}) at {self.where}"


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3]
              if ("/training/" in f.filename or "/tests/" in f.filename) and "device_guard" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class DeviceGuard(TorchDispatchMode):
    """Records device-placement violations of the ops run under it (see the module docstring)."""

    def __init__(self, device: str | torch.device = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.strict = False
        self.violations: list[Violation] = []
        self.ops = 0          #: ops seen in total
        self.strict_ops = 0   #: ops seen inside strict regions

    def _record(self, kind: str, func, devices) -> None:
        self.violations.append(Violation(kind, str(func), ", ".join(sorted(str(d) for d in devices)), _where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self.ops += 1
        self.strict_ops += self.strict
        on_device = [t for t in tensors if t.device == self.device]
        if func in _HOST_READS and on_device:
            if self.strict:
                self._record("reads a device value on the host", func, {self.device})
            return False if on_device[0].dtype == torch.bool else 0 if not on_device[0].is_floating_point() else 0.0
        if func is aten._to_copy.default and on_device and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]) != self.device:
            if self.strict:
                self._record("reads a device value on the host", func, {self.device, kwargs["device"]})
            src = on_device[0]
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=kwargs["device"])
        if func not in _TRANSFERS:
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                self._record("mixes devices", func, devices)
        out = func(*args, **kwargs)
        if self.strict and (not tensors or func in _LIFTS):
            made = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if any(t.device != self.device and t.dim() > 0 for t in made):
                self._record("creates a tensor on the host", func, {t.device for t in made})
        return out
