"""Several processes through ``torchrun``: process group, rank checks, sharded batches, DDP.

``torchrun --nproc_per_node=N $(which promptclip) train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` set; :func:`session` joins them into one process
group (NCCL on CUDA, gloo on the CPU) and each process drives ``cuda:LOCAL_RANK``. Without those variables (or with
``WORLD_SIZE=1``) everything here is a no-op and training runs in one process as before.

The rules, and why:

* **Batches**: every process builds the same single-process batch sequence (same seeded shuffle, or GuiDG's
  domain-balanced batches) and takes every N-th item of each global batch (:class:`ShardedBatches`). The union of
  the N per-process batches of a step is exactly the batch one process would see, so ``--batch-size`` stays the
  *global* batch (logged with the per-process size) and results match a single-process run with the same batch.
* **Gradients**: :func:`wrap_ddp` puts the method's training loss in :class:`~torch.nn.parallel.DistributedDataParallel`
  built per stage (after ``enter_stage`` has set ``requires_grad``), so only the learned tensors of the stage are
  all-reduced (averaged), in buckets overlapping the backward pass. The frozen CLIP is neither reduced nor
  re-broadcast (it is identical by construction: same weights file or seeded init); the stage's trainable tensors
  are broadcast from rank 0 once when the wrapper is built. ``find_unused_parameters`` stays off: the method
  contract test asserts that every trainable tensor of every stage gets a gradient from the loss.
* **Writes**: rank 0 alone writes checkpoints, stage results, artifacts, diagnostics, run logs and progress bars;
  the others wait at a barrier where they would read what rank 0 wrote (:func:`main_process_first`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from training.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistState:
    """Where this process stands: ``world_size`` processes in all, this one is ``rank`` (``local_rank`` on its
    node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = DistState()


def state() -> DistState:
    """The current process's place in the process group (one process: rank 0 of 1)."""
    return _STATE


def is_main_process() -> bool:
    return _STATE.is_main


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistState:
    """Join the process group ``torchrun`` describes in the environment (no-op without it); idempotent.

    ``device``: the run's ``--device``. CUDA (``auto`` on a CUDA host, ``cuda``) uses NCCL and binds this process
    to ``cuda:LOCAL_RANK``; the CPU uses gloo. Asking for CUDA without it is an error, not a fallback."""
    global _STATE
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return _STATE
    if dist.is_initialized():
        return _STATE
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                              f"start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if wants_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    _STATE = DistState(rank=rank, world_size=world, local_rank=local_rank)
    if not _STATE.is_main:  # one voice: the other ranks log warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), this is rank %d (local %d)", world, backend, rank, local_rank)
    return _STATE


def teardown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still writes)."""
    global _STATE
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _STATE = DistState()


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistState]:
    """:func:`setup` ... :func:`teardown` around a command (a no-op in one process)."""
    st = setup(device)
    try:
        yield st
    finally:
        if st.enabled:
            teardown()


def barrier() -> None:
    if _STATE.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache file), the others run it after it finished (and read)."""
    if not _STATE.is_main:
        barrier()
    yield
    if _STATE.is_main:
        barrier()


def device_for(device: torch.device) -> torch.device:
    """``cuda`` without an index -> this process's ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if _STATE.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", _STATE.local_rank)
    return device


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the processes (itself in one process)."""
    if _STATE.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values


# --------------------------------------------------------------------------- batches
class ShardedBatches(Sampler[list[int]]):
    """This process's share of each global batch of ``batches``: items ``rank, rank + N, ...`` of it.

    A global batch is cut to a multiple of N first (at most N-1 images of an epoch's last, smaller batch are
    dropped), so that every process gets the same number of images and DDP's plain average of the per-process
    mean losses equals the mean over the global batch; a last batch smaller than N is dropped whole.
    ``drop_remainder=False`` (evaluation: every image counts once, no collective per batch) keeps every item, so
    the shares may differ by one and a process may get one batch fewer."""

    def __init__(self, batches: Any, rank: int, world_size: int, *, drop_remainder: bool = True) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.drop_remainder = drop_remainder

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            batch = list(batch)
            usable = len(batch) - len(batch) % self.world_size if self.drop_remainder else len(batch)
            share = batch[self.rank:usable:self.world_size]
            if share:
                yield share

    def __len__(self) -> int:
        n, last = len(self.batches), self._last_size()
        if self.drop_remainder:
            return n - (1 if last < self.world_size else 0)
        full = self._full_size()
        return (n - 1) * (full > self.rank) + (last > self.rank) if n else 0

    def _full_size(self) -> int:
        size = getattr(self.batches, "batch_size", None)
        return size if size is not None else self.batches.per_domain * len(self.batches.groups)

    def _last_size(self) -> int:
        """Size of the last global batch, without iterating (that would draw from the loader's generator)."""
        size = getattr(self.batches, "batch_size", None)
        if size is None:  # fixed-size batches (GuiDG's domain-balanced ones)
            size = self.batches.per_domain * len(self.batches.groups)
            if size < self.world_size and self.drop_remainder:
                raise ConfigError(f"a batch of {size} images cannot be shared by {self.world_size} processes; "
                                  f"raise --batch-size to at least {self.world_size}")
            return size
        if size < self.world_size and self.drop_remainder:
            raise ConfigError(f"--batch-size {size} is smaller than the {self.world_size} processes; it is the "
                              f"global batch, raise it to a multiple of {self.world_size}")
        rest = 0 if self.batches.drop_last else len(self.batches.sampler) % size
        return rest or size


def shard_loader(loader: DataLoader, st: DistState | None = None, *, drop_remainder: bool = True) -> DataLoader:
    """``loader`` (built exactly as for one process) with this process's share of every batch (no-op alone)."""
    st = st or _STATE
    if not st.enabled:
        return loader
    if loader.batch_sampler is None:
        raise ConfigError("cannot shard a DataLoader without a batch sampler (batch_size=None)")
    batches = ShardedBatches(loader.batch_sampler, st.rank, st.world_size, drop_remainder=drop_remainder)
    return DataLoader(loader.dataset, batch_sampler=batches,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
                      generator=loader.generator,  # same generator: the same base seed and shuffle as one process
                      prefetch_factor=loader.prefetch_factor if loader.num_workers else None)


# --------------------------------------------------------------------------- gradients
class TrainingLoss(nn.Module):
    """``forward(batch) = method.training_loss(batch)``, so DDP can hook the method's training step."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.method.training_loss(batch)


def wrap_ddp(method: nn.Module, trainable: dict[str, nn.Parameter], device: torch.device) -> nn.Module:
    """DDP over ``method``'s training loss, reducing only ``trainable`` (the current stage's learned tensors)."""
    module = TrainingLoss(method)
    keep = {id(p) for p in trainable.values()}
    ignore = [f"method.{n}" for n, p in method.named_parameters() if id(p) not in keep]
    ignore += [f"method.{n}" for n, _ in method.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=False)
