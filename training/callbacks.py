"""Reusable engine callbacks (see :class:`training.engine.Callback`): weight-averaging schemes over training.

:class:`GaussianPromptAggregation` is PromptSRC's GPA (Khattak et al., ICCV 2023; muzairkhattak/PromptSRC
``trainers/promptsrc.py``): after every epoch the method's trainable tensors are recorded, and at the end of
training the method is loaded with their Gaussian-weighted average over the epochs. Any method can use it by
returning one from :meth:`~training.methods.base.PromptMethod.training_callbacks`; it only touches
``trainable_state_dict()`` / ``load_trainable_state_dict()``, never the frozen CLIP.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


def gaussian_epoch_weights(epochs: Sequence[int], mean: float, std: float) -> tuple[list[float], float]:
    """Normalised GPA weights of the (1-based) ``epochs`` actually run, and the mean really used.

    Weight of epoch ``e``: N(e; mean', std) / sum over the given epochs, where mean' = min(mean, last epoch) (the
    mean is clamped to the last epoch run, so a short run is not averaged over epochs that never happened and
    the weights never all underflow to zero). Computed in float64 in log space (max-subtracted), so the result is
    always a proper convex combination.
    """
    if not epochs:
        raise ValueError("no epochs to weight")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    eff_mean = min(float(mean), float(max(epochs)))
    logs = [-0.5 * ((e - eff_mean) / std) ** 2 for e in epochs]
    top = max(logs)
    raw = [math.exp(v - top) for v in logs]
    total = sum(raw)
    return [r / total for r in raw], eff_mean


class GaussianPromptAggregation:
    """Gaussian prompt aggregation (GPA), as a :class:`~training.engine.Callback`.

    Semantics (PromptSRC's, per epoch): epochs are numbered from 1 (the engine's 0-based ``epoch`` + 1). At the
    end of each epoch the method's trainable tensors (``trainable_state_dict()``: CPU copies, so the memory cost is
    epochs x trainable size on the host, tiny for prompts) are recorded. At train end the method is loaded with
    sum_e w_e * theta_e, w_e = N(e; mean, std) normalised over the epochs actually run (PromptSRC normalises over
    ``MAX_EPOCH``; with ``max_steps`` cutting training short we normalise over what really ran). When training
    runs fewer epochs than ``mean``, the mean is clamped to the last epoch run (see :func:`gaussian_epoch_weights`),
    so GPA never averages nothing. A final partial epoch (``max_steps`` reached mid-epoch) counts as an epoch.

    Resume: this state is NOT part of the engine's resume checkpoint. A run interrupted and then resumed averages
    only the epochs seen after resuming (weighted with their true epoch numbers, normalised over those epochs).
    """

    def __init__(self, mean: float = 15.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"GPA std must be > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, float] = {}   #: filled at train end: epoch -> weight used
        self.effective_mean: float | None = None

    def on_train_start(self, method: Any, total_steps: int) -> None:
        self.snapshots, self.weights, self.effective_mean = {}, {}, None

    def on_step_end(self, method: Any, step: int) -> None:
        pass

    def on_epoch_end(self, method: Any, epoch: int) -> None:
        self.snapshots[int(epoch) + 1] = method.trainable_state_dict()

    def on_train_end(self, method: Any) -> None:
        if not self.snapshots:
            log.warning("GPA: no epoch ended during this run; keeping the final weights")
            return
        epochs = sorted(self.snapshots)
        weights, self.effective_mean = gaussian_epoch_weights(epochs, self.mean, self.std)
        self.weights = dict(zip(epochs, weights))
        if self.effective_mean != self.mean:
            log.info("GPA: mean %.3g clamped to the last epoch %d (only %d epoch(s) ran)", self.mean, epochs[-1],
                     len(epochs))
        averaged = average_states([self.snapshots[e] for e in epochs], weights)
        method.load_trainable_state_dict(averaged)
        log.info("GPA: loaded the Gaussian average of %d epoch(s) (mean %.3g, std %.3g)", len(epochs),
                 self.effective_mean, self.std)


def average_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i], accumulated in float64, returned in each tensor's own dtype."""
    if len(states) != len(weights) or not states:
        raise ValueError("need as many weights as states, and at least one")
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += float(w) * state[name].to(torch.float64)
        out[name] = acc.to(ref.dtype)
    return out
