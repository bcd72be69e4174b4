"""THE training loop, shared by every method and stage.

Methods plug in through :meth:`PromptMethod.training_loss` (and ``prepare_training``); weight-averaging schemes
(GPA, BMA, WiSE-FT) plug in as :class:`~training.callbacks.Callback` objects. Nothing here knows a method by name.

Features: SGD or AdamW over the method's trainable tensors only; linear/constant warmup then cosine decay
(per step); bf16 autocast on CUDA; seeding; resume from the last finished epoch (safetensors + JSON checkpoint,
no pickles); a tqdm progress bar with loss and running accuracy; evaluation helpers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from training import distributed
from training.callbacks import Callback
from training.config import config_from_dict
from training.devices import autocast
from training.errors import ConfigError
from training.methods.base import PromptMethod, TrainBatch

log = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the CoOp/PromptSRC family's SGD recipe)."""

    epochs: int = 10
    max_steps: int | None = None   #: stop after this many steps in total (overrides epochs when smaller)
    batch_size: int = 32
    optimizer: str = "sgd"         #: sgd | adamw
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0          #: steps at constant ``warmup_lr`` before the cosine schedule (CoOp: 1 epoch)
    warmup_lr: float = 1e-5
    warmup_epochs: int = 0         #: epochs at constant ``warmup_lr`` (added to ``warmup_steps``; the papers: 1)
    crop_scale: tuple[float, float] = (0.08, 1.0)  #: RandomResizedCrop area range of ``crop_flip`` (GuiDG: 0.7-1)
    scheduler: str = "cosine"      #: cosine | constant
    precision: str = "auto"        #: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"           #: auto | cpu | cuda | cuda:N
    seed: int = 1
    num_workers: int = 0
    augment: str = "crop_flip"     #: crop_flip (random resized crop + flip, as the CoOp family) | flip | none
    log_every: int = 10
    grad_clip: float | None = None
    compile: bool = False          #: torch.compile the training loss (first steps slower; CUDA throughput)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be cosine or constant, got {self.scheduler!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.augment not in ("crop_flip", "flip", "none"):
            raise ValueError(f"augment must be crop_flip, flip or none, got {self.augment!r}")
        if self.batch_size < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError("batch_size and epochs must be >= 1 and lr > 0")
        scale = tuple(self.crop_scale) if isinstance(self.crop_scale, (list, tuple)) else ()
        if len(scale) != 2 or not all(isinstance(x, (int, float)) for x in scale) or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must be two numbers 0 < min <= max <= 1, got {self.crop_scale!r}")
        object.__setattr__(self, "crop_scale", (float(scale[0]), float(scale[1])))  # JSON gives a list
        if self.warmup_epochs < 0 or self.warmup_steps < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("warmup_epochs, warmup_steps, momentum and weight_decay must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        return config_from_dict(cls, values, "training config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    steps: int
    epochs: int
    final_loss: float
    train_accuracy: float
    seconds: float
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available (logged), else CPU. Asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device: %s (auto)", dev)
        return dev
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        log.warning("bf16 autocast requested on %s: running bf16 on CPU (slow, for checks only)", device)
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): constant warmup, then cosine from ``lr`` to 0 over the rest."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig,
                    lr_scales: Sequence[float] | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params``; ``lr_scales`` (one per parameter, default 1) puts parameters with another
    scale in their own group, whose ``lr_scale`` multiplies the schedule's lr."""
    if not params:
        raise ConfigError("this method has no trainable tensors; nothing to train (use it directly with eval/export)")
    scales = [1.0] * len(params) if lr_scales is None else [float(x) for x in lr_scales]
    groups = [{"params": [p for p, s in zip(params, scales) if s == scale], "lr_scale": scale}
              for scale in dict.fromkeys(scales)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def stage_tensors(method: PromptMethod) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors the current stage trains (what checkpoints and finished-stage files hold)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in method.trainable_parameters().items()}


def load_stage_tensors(method: PromptMethod, saved: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Copy ``saved`` (from :func:`stage_tensors`) into the current stage's tensors; names and shapes must match."""
    own = method.trainable_parameters()
    if set(saved) != set(own) or any(tuple(saved[n].shape) != tuple(p.shape) for n, p in own.items()):
        raise ConfigError(f"{source} holds {what} of other tensors than this run trains (another method config or "
                          f"stage); use another --out directory or delete {source}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def save_checkpoint(out_dir: Path, method: PromptMethod, opt: torch.optim.Optimizer, *, epoch: int, step: int,
                    history: list[dict[str, float]]) -> None:
    """Atomically write the resume checkpoint (the tensors this stage trains + optimizer state + counters)."""
    from safetensors.torch import save_file

    tensors = {f"param.{k}": v for k, v in stage_tensors(method).items()}
    tensors.update(_optimizer_tensors(opt))
    tmp = out_dir / (CHECKPOINT_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out_dir / CHECKPOINT_WEIGHTS)
    state = {"epoch": epoch, "step": step, "history": history, "method": method.name}
    tmp_json = out_dir / (CHECKPOINT_STATE + ".tmp")
    tmp_json.write_text(json.dumps(state))
    os.replace(tmp_json, out_dir / CHECKPOINT_STATE)


def load_checkpoint(out_dir: Path, method: PromptMethod, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    wpath, spath = out_dir / CHECKPOINT_WEIGHTS, out_dir / CHECKPOINT_STATE
    if not (wpath.exists() and spath.exists()):
        return None
    state = json.loads(spath.read_text())
    if state.get("method") != method.name:
        raise ConfigError(f"{out_dir} holds a checkpoint of method {state.get('method')!r}, not {method.name!r}; "
                          f"use another --out directory")
    tensors = load_file(str(wpath))
    saved = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    load_stage_tensors(method, saved, out_dir, "a checkpoint")
    _load_optimizer_tensors(opt, tensors)
    return state


def train_step(method: PromptMethod, opt: torch.optim.Optimizer, batch: TrainBatch, *,
               amp_dtype: torch.dtype | None, grad_clip: float | None = None,
               loss_module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step: the method's loss (under autocast), backward, optional clipping, optimizer step.

    ``loss_module``: a module whose ``forward(batch)`` is the method's loss, wrapped in DDP (several processes: its
    backward averages the stage's trainable gradients) and/or ``torch.compile``. Everything here runs on the batch's
    device (no host tensors, no host syncs); the device-correctness test runs exactly this function with the model
    on PyTorch's ``meta`` device."""
    with autocast(batch.images.device, amp_dtype):
        parts = loss_module(batch) if loss_module is not None else method.training_loss(batch)
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], grad_clip)
    opt.step()
    return parts


def train(
    method: PromptMethod,
    loader_factory,
    class_token_ids: torch.Tensor,
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``method``'s trainable tensors.

    Args:
        loader_factory: ``epoch -> DataLoader`` of (images [B,3,H,W], labels [B]); seeded per epoch so that a
            resumed run sees the same batches as an uninterrupted one.
        class_token_ids: [C, L] tokenised prompt texts of the training classes.
        out_dir: where the resume checkpoint lives (None: no checkpointing).
    """
    from tqdm.auto import tqdm

    device = distributed.device_for(resolve_device(cfg.device))
    dist_state = distributed.state()
    amp_dtype = autocast_dtype(cfg.precision, device)
    seed_everything(cfg.seed)
    method.to(device)
    named = method.trainable_parameters()
    scales = method.parameter_lr_scales()
    opt = build_optimizer(list(named.values()), cfg, [scales.get(n, 1.0) for n in named])
    callbacks = list(callbacks)
    steps_per_epoch = len(loader_factory(0))
    if steps_per_epoch == 0:
        raise ConfigError(f"no training batches: fewer training images than batch_size={cfg.batch_size} with drop_last")
    if cfg.warmup_epochs:  # warmup in epochs becomes steps once the epoch length is known
        cfg = dataclasses.replace(cfg, warmup_steps=cfg.warmup_steps + cfg.warmup_epochs * steps_per_epoch,
                                  warmup_epochs=0)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    epochs = math.ceil(total / steps_per_epoch)

    start_epoch, step, history = 0, 0, []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            state = load_checkpoint(out, method, opt)
            if state is not None:
                start_epoch, step, history = state["epoch"], state["step"], state["history"]
                log.info("resumed from %s at epoch %d (step %d)", out, start_epoch, step)
    loss_module = distributed.wrap_ddp(method, method.trainable_parameters(), device) if dist_state.enabled else None
    if cfg.compile:
        loss_module = torch.compile(loss_module or distributed.TrainingLoss(method))
    for cb in callbacks:
        cb.on_train_start(method, total)

    class_token_ids = class_token_ids.to(device)
    t0, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count, n_since = 0, 0
    last_loss, last_acc = float("nan"), float("nan")
    bar = tqdm(total=total, initial=step, desc=f"train {method.name}", disable=not (progress and dist_state.is_main),
               dynamic_ncols=True)
    method.train()
    for epoch in range(start_epoch, epochs):
        # augmentation randomness per epoch (resumable) and per process (rank 0: the single-process seed)
        torch.manual_seed(cfg.seed * 1000 + epoch + 1_000_003 * dist_state.rank)
        for images, labels in loader_factory(epoch):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg) * group.get("lr_scale", 1.0)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            batch = TrainBatch(images=images, labels=labels, class_token_ids=class_token_ids)
            parts = train_step(method, opt, batch, amp_dtype=amp_dtype, grad_clip=cfg.grad_clip,
                               loss_module=loss_module)
            loss = parts["loss"]
            step += 1
            seen += images.shape[0]
            loss_sum += loss.detach().float()
            n_since += 1
            if "logits" in parts:
                correct += (parts["logits"].argmax(-1) == labels).sum()
            count += images.shape[0]
            for cb in callbacks:
                cb.on_step_end(method, step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:  # host sync only every log_every steps
                totals = distributed.all_reduce_sum(  # over the processes (one process: as is)
                    torch.stack([loss_sum / max(1, n_since), correct.float(), torch.full_like(loss_sum, count)]))
                last_loss = float(totals[0]) / dist_state.world_size
                last_acc = float(totals[1]) / max(1.0, float(totals[2]))
                bar.set_postfix(loss=f"{last_loss:.4f}", acc=f"{100 * last_acc:.1f}%",
                                lr=f"{opt.param_groups[0]['lr']:.2e}")
                history.append({"step": step, "loss": last_loss, "acc": last_acc})
                loss_sum.zero_()
                correct.zero_()
                count, n_since = 0, 0
        for cb in callbacks:
            cb.on_epoch_end(method, epoch)
        if out is not None and dist_state.is_main:  # rank 0 alone writes
            save_checkpoint(out, method, opt, epoch=epoch + 1, step=step, history=history)
        if step >= total:
            break
    bar.close()
    for cb in callbacks:
        cb.on_train_end(method)
    method.eval()
    seconds = time.perf_counter() - t0
    seen *= dist_state.world_size  # images of all processes (equal shares)
    return TrainResult(steps=step, epochs=epochs, final_loss=last_loss, train_accuracy=last_acc, seconds=seconds,
                       images_per_second=seen / seconds if seconds > 0 else 0.0, history=history)


@torch.no_grad()
def encode_classes(method: PromptMethod, class_token_ids: torch.Tensor, *, prompt_set: int = 0,
                   chunk: int = 256) -> torch.Tensor:
    """[C, L] token ids -> [C, D] normalised class embeddings, in chunks."""
    device = next(method.parameters()).device
    outs = [method.encode_text(class_token_ids[i:i + chunk].to(device), prompt_set)
            for i in range(0, len(class_token_ids), chunk)]
    return torch.cat(outs).float()


@torch.no_grad()
def evaluate(method: PromptMethod, loader: DataLoader, class_token_ids: torch.Tensor, *, device: str = "auto",
             progress: bool = False, desc: str = "eval", keep_logits: bool = False) -> dict[str, Any]:
    """Top-1 accuracy of ``method`` over ``loader`` against the classes in ``class_token_ids`` (``keep_logits``:
    also every image's logits, ``"logits"`` [N, C], in loader order).

    Under torchrun each process scores its share of every batch and the counts are summed; kept logits are this
    process's share only."""
    from tqdm.auto import tqdm

    dev = distributed.device_for(resolve_device(device))
    loader = distributed.shard_loader(loader, drop_remainder=False)
    method.to(dev).eval()
    image_conditioned = method.capabilities.text_depends_on_image
    num_sets = method.capabilities.num_prompt_sets
    texts = None if image_conditioned else [encode_classes(method, class_token_ids, prompt_set=s)
                                            for s in range(num_sets)]  # S x [C, D], once
    correct, total, kept = 0, 0, []
    for images, labels in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        images = images.to(dev)
        feats = method.encode_image(images).float()  # [B, D]
        if image_conditioned:  # class text encoded per image (B x C text passes)
            per_image = method.encode_text_for_images(class_token_ids.to(dev), images).float()  # [B, C, D]
            logits = method.logit_scale * torch.einsum("bd,bcd->bc", feats, per_image)
        else:
            logits = method.combined_logits(feats, texts, method.expert_weights(feats))  # [B, C]
        pred = logits.argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += int(labels.numel())
        kept.extend([logits.float().cpu()] if keep_logits else [])
    if distributed.state().enabled:
        correct, total = (int(v) for v in distributed.all_reduce_sum(torch.tensor([correct, total], device=dev)))
    out: dict[str, Any] = {"accuracy": correct / total if total else float("nan"), "num_images": total}
    return {**out, "logits": torch.cat(kept)} if keep_logits and kept else out
