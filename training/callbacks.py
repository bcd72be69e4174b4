"""Engine callbacks: the :class:`Callback` hooks of the training loop and the weight-averaging schemes built on them.

This module imports nothing from the rest of ``training``: a callback sees the method only through
:class:`TrainableMethod` (the few calls weight averaging needs), so the engine and the methods can both import it.

:class:`GaussianPromptAggregation` is PromptSRC's GPA (Khattak et al., ICCV 2023; muzairkhattak/PromptSRC
``trainers/promptsrc.py``): after every epoch the method's trainable tensors are recorded, and at the end of
training the method is loaded with their Gaussian-weighted average over the epochs. Any method can use it by
returning one from :meth:`~training.methods.base.PromptMethod.training_callbacks`; it only touches
``trainable_state_dict()`` / ``load_trainable_state_dict()``, never the frozen CLIP.

:class:`BetaMovingAverage` is CLIPood's per-step Beta moving average (BMA), and :class:`WiseFT` is WiSE-FT's
interpolation between the initial and the fine-tuned weights; both are the weight-averaging schemes of GuiDG's
step 2 (methods.md §5.3) and work on ``trainable_parameters()`` in place, on the parameters' device.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class TrainableMethod(Protocol):
    """What a callback may use of a method (every :class:`~training.methods.base.PromptMethod` provides it)."""

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The tensors the current stage trains, by name."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable tensors, by name."""
        ...

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`trainable_state_dict`."""
        ...


class Callback:
    """Hooks of the training loop (no-ops here; subclasses override what they need). Weight averaging (GPA, BMA,
    WiSE-FT) is written as one of these."""

    def on_train_start(self, method: TrainableMethod, total_steps: int) -> None:
        """Before the first step; ``total_steps`` is the schedule length."""

    def on_step_end(self, method: TrainableMethod, step: int) -> None:
        """After optimisation step ``step`` (counted from 1)."""

    def on_epoch_end(self, method: TrainableMethod, epoch: int) -> None:
        """After epoch ``epoch`` (counted from 0), before the resume checkpoint is written."""

    def on_train_end(self, method: TrainableMethod) -> None:
        """After the last step."""


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


class GaussianPromptAggregation(Callback):
    """Gaussian prompt aggregation (GPA), as a :class:`Callback`.

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

    def on_train_start(self, method: TrainableMethod, total_steps: int) -> None:
        self.snapshots, self.weights, self.effective_mean = {}, {}, None


    def on_epoch_end(self, method: TrainableMethod, epoch: int) -> None:
        self.snapshots[int(epoch) + 1] = method.trainable_state_dict()

    def on_train_end(self, method: TrainableMethod) -> None:
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


def beta_pdf(x: float, a: float, b: float) -> float:
    """Beta(a, b) density at ``x``: x^(a-1) (1-x)^(b-1) / B(a, b), B(a, b) = Γ(a)Γ(b)/Γ(a+b) (via ``math.lgamma``).

    Zero outside the open interval (0, 1) (the support; the endpoints are excluded so a < 1 never gives inf).
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be > 0, got a={a}, b={b}")
    if not 0.0 < x < 1.0:
        return 0.0
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)


def bma_weight(t: int, total_steps: int, beta: float) -> float:
    """CLIPood's BMA weight of step ``t`` out of ``T = total_steps``: α_t = Beta(β, β).pdf((t + 0.5) / (T + 1)).

    For t = 0..T the arguments are symmetric about 1/2 (x_t + x_{T-t} = 1), hence α_t = α_{T-t}; with β < 1 the
    ends of training get the most weight.
    """
    return beta_pdf((t + 0.5) / (total_steps + 1), beta, beta)


class BetaMovingAverage(Callback):
    """CLIPood's Beta moving average (BMA; Shu et al., ICML 2023; GuiDG's ``GeneralMovingAverage``), a
    :class:`Callback`.

    With T total optimisation steps and step t counted from 1 (the engine's ``step`` after ``opt.step()``), the
    averaged weights are the normalised weighted mean

        θ_BMA = Σ_t α_t θ_t / Σ_t α_t,   α_t = Beta(β, β).pdf((t + 0.5) / (T + 1)),

    kept as a running mean: after step t, θ_BMA ← (S·θ_BMA + α_t·θ_t) / (S + α_t), S ← S + α_t. At train end the
    method's trainable parameters are loaded with θ_BMA (evaluation uses the BMA model, as in CLIPood/GuiDG).

    ``include_initial`` (default True, as the official ``GeneralMovingAverage``, which starts its average from a
    copy of the model with weight α_0 = pdf(0.5 / (T + 1))): the weights at train start count as θ_0, so the sum
    runs over t = 0..T and the weights are exactly symmetric (α_t = α_{T-t}). False: only the post-step weights
    t = 1..T are averaged.

    β: 0.5 is the value the GuiDG appendix gives as CLIPood's hyperparameter; the official GuiDG script uses
    ``--beta 0.1`` (more weight on the very start and end). T: ``total_steps`` if given, else the engine's
    ``total_steps`` from ``on_train_start``. A step beyond T lies outside the Beta support and gets weight 0.

    Cost: one float32 copy of the trainable tensors, on their own device; the weights are Python floats, so a
    step adds two in-place tensor ops and no host sync.

    Resume: this state is NOT part of the engine's resume checkpoint. A resumed run averages only the steps after
    resuming (with their true step numbers; θ_0 is then the resumed weights, weighted as step 0).
    """

    def __init__(self, beta: float = 0.5, total_steps: int | None = None, include_initial: bool = True) -> None:
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"BMA beta must be a finite number > 0 (0.5: appendix, 0.1: official script), got {beta}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"BMA total_steps must be an int >= 1 or None (use the engine's), got {total_steps!r}")
        self.beta = float(beta)
        self.total_steps = total_steps
        self.include_initial = bool(include_initial)
        self.average: dict[str, torch.Tensor] = {}
        self.weight_sum = 0.0
        self.steps_seen = 0
        self._T: int | None = None
        self._warned_past_end = False

    def _accumulate(self, method: TrainableMethod, t: int) -> None:
        assert self._T is not None
        a = bma_weight(t, self._T, self.beta)
        if a <= 0.0:
            if not self._warned_past_end:
                log.warning("BMA: step %d is past T=%d (outside the Beta support); it gets weight 0", t, self._T)
                self._warned_past_end = True
            return
        total = self.weight_sum + a
        keep, new = self.weight_sum / total, a / total
        with torch.no_grad():
            for name, p in method.trainable_parameters().items():
                acc = self.average.get(name)
                if acc is None or self.weight_sum == 0.0:
                    self.average[name] = p.detach().to(torch.float32, copy=True)
                else:
                    acc.mul_(keep).add_(p.detach().to(torch.float32), alpha=new)
        self.weight_sum = total
        self.steps_seen += 1

    def on_train_start(self, method: TrainableMethod, total_steps: int) -> None:
        self._T = self.total_steps if self.total_steps is not None else int(total_steps)
        if self._T < 1:
            raise ValueError(f"BMA needs total_steps >= 1, got {self._T}")
        self.average, self.weight_sum, self.steps_seen, self._warned_past_end = {}, 0.0, 0, False
        if self.include_initial:
            self._accumulate(method, 0)

    def on_step_end(self, method: TrainableMethod, step: int) -> None:
        self._accumulate(method, int(step))


    def on_train_end(self, method: TrainableMethod) -> None:
        if not self.average:
            log.warning("BMA: nothing was averaged during this run; keeping the final weights")
            return
        with torch.no_grad():
            for name, p in method.trainable_parameters().items():
                p.copy_(self.average[name].to(device=p.device, dtype=p.dtype))
        log.info("BMA: loaded the Beta(%.3g, %.3g) average of %d state(s) (T=%d)", self.beta, self.beta,
                 self.steps_seen, self._T)


class WiseFT(Callback):
    """WiSE-FT weight-space ensembling (Wortsman et al., CVPR 2022; GuiDG's ``wise_ft``), a
    :class:`Callback`.

    At train start the method's trainable tensors θ_0 are snapshotted (detached copies on their own device); at
    train end they are replaced by

        θ ← (1 − α)·θ_0 + α·θ

    α = 0.5 (GuiDG's baselines) is halfway; α = 0 restores θ_0 exactly; α = 1 keeps the fine-tuned weights.
    Only the method-owned trainable tensors are touched (the frozen CLIP is, by construction, its own θ_0);
    ``prefixes`` restricts it further to the tensors whose names start with one of them (GuiDG: ``("visual.",)``,
    the fine-tuned tower; a freshly initialised head has no meaningful θ_0).

    Resume: θ_0 is whatever the method holds at train start, i.e. the resumed weights for a resumed run.
    """

    def __init__(self, alpha: float = 0.5, prefixes: Sequence[str] | None = None) -> None:
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"WiSE-FT alpha must be in [0, 1] (0: initial weights, 1: fine-tuned), got {alpha}")
        self.alpha = float(alpha)
        self.prefixes = tuple(prefixes) if prefixes is not None else None
        self.initial: dict[str, torch.Tensor] = {}

    def _selected(self, method: TrainableMethod) -> dict[str, torch.Tensor]:
        params = method.trainable_parameters()
        if self.prefixes is None:
            return params
        return {n: p for n, p in params.items() if n.startswith(self.prefixes)}

    def on_train_start(self, method: TrainableMethod, total_steps: int) -> None:
        self.initial = {name: p.detach().clone() for name, p in self._selected(method).items()}
        if not self.initial:
            log.warning("WiSE-FT: no trainable tensor matches prefixes %s; nothing will be interpolated", self.prefixes)



    def on_train_end(self, method: TrainableMethod) -> None:
        if not self.initial:
            log.warning("WiSE-FT: no initial snapshot (on_train_start not called); keeping the final weights")
            return
        with torch.no_grad():
            for name, p in self._selected(method).items():
                theta0 = self.initial[name].to(device=p.device, dtype=p.dtype)
                # lerp(θ0, θ, α) = θ0 + α(θ − θ0); exact at α = 0 (θ0) and α = 1 (θ).
                p.copy_(torch.lerp(theta0, p.detach(), self.alpha))
        log.info("WiSE-FT: interpolated the trainable tensors with alpha=%.3g", self.alpha)
