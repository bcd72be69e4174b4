from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from training.callbacks import BetaMovingAverage, WiseFT, beta_pdf, bma_weight


class _Stub:
    """Stand-in for a method: just the two small trainable tensors the callbacks touch."""

    def __init__(self) -> None:
        self.params = {"a": nn.Parameter(torch.zeros(3)), "b": nn.Parameter(torch.zeros(2, 2))}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return self.params

    def set(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in values.items():
                self.params[k].copy_(v)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}


def _direct_pdf(x: float, a: float, b: float) -> float:
    return x ** (a - 1) * (1 - x) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


@pytest.mark.parametrize("beta", [0.5, 0.1, 2.0])
def test_beta_pdf_matches_direct_formula_and_is_symmetric(beta):
    T = 9
    for t in (0, 1, 4, 9):
        x = (t + 0.5) / (T + 1)
        assert bma_weight(t, T, beta) == pytest.approx(_direct_pdf(x, beta, beta), rel=1e-12)
        assert bma_weight(t, T, beta) == pytest.approx(bma_weight(T - t, T, beta), rel=1e-12)  # x_t + x_{T-t} = 1
    assert beta_pdf(0.3, 2.0, 3.0) == pytest.approx(12 * 0.3 * 0.7 ** 2)  # Beta(2,3): 12 x (1-x)^2
    assert beta_pdf(0.0, 0.5, 0.5) == 0.0 and beta_pdf(1.2, 0.5, 0.5) == 0.0
    if beta < 1:  # U-shaped: the ends weigh more than the middle
        assert bma_weight(0, T, beta) > bma_weight(4, T, beta)


@pytest.mark.parametrize("include_initial", [True, False])
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_bma_equals_direct_weighted_average(beta, include_initial):
    T = 6
    m = _Stub()
    states = {t: _state(t) for t in range(T + 1)}
    m.set(states[0])
    bma = BetaMovingAverage(beta=beta, include_initial=include_initial)
    bma.on_train_start(m, T)
    for t in range(1, T + 1):
        m.set(states[t])
        bma.on_step_end(m, t)
        if t % 3 == 0:
            bma.on_epoch_end(m, t // 3 - 1)
    bma.on_train_end(m)

    ts = range(0 if include_initial else 1, T + 1)
    w = {t: _direct_pdf((t + 0.5) / (T + 1), beta, beta) for t in ts}
    total = sum(w.values())
    for name in ("a", "b"):
        expected = sum(w[t] * states[t][name].double() for t in ts) / total
        torch.testing.assert_close(m.params[name].detach().double(), expected, rtol=1e-5, atol=1e-6)
        assert m.params[name].dtype == torch.float32 and m.params[name].requires_grad
    assert bma.weight_sum == pytest.approx(total)
    assert bma.steps_seen == len(ts)


def test_bma_explicit_total_steps_overrides_engine_and_ignores_steps_past_it():
    m = _Stub()
    states = {t: _state(10 + t) for t in range(4)}
    m.set(states[0])
    bma = BetaMovingAverage(beta=0.5, total_steps=2, include_initial=False)
    bma.on_train_start(m, 100)
    for t in (1, 2, 3):  # step 3 > T = 2: outside the Beta support, weight 0
        m.set(states[t])
        bma.on_step_end(m, t)
    bma.on_train_end(m)
    w1, w2 = (_direct_pdf((t + 0.5) / 3, 0.5, 0.5) for t in (1, 2))
    expected = (w1 * states[1]["a"] + w2 * states[2]["a"]) / (w1 + w2)
    torch.testing.assert_close(m.params["a"].detach(), expected)


def test_bma_without_steps_keeps_weights():
    m = _Stub()
    m.set(_state(3))
    before = m.params["a"].detach().clone()
    bma = BetaMovingAverage(include_initial=False)
    bma.on_train_start(m, 5)
    bma.on_train_end(m)
    torch.testing.assert_close(m.params["a"].detach(), before)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_wise_ft_interpolates(alpha):
    m = _Stub()
    s0, s1 = _state(0), _state(1)
    m.set(s0)
    cb = WiseFT(alpha)
    cb.on_train_start(m, 4)
    m.set(s1)
    cb.on_step_end(m, 1)
    cb.on_epoch_end(m, 0)
    cb.on_train_end(m)
    for name in ("a", "b"):
        expected = (1 - alpha) * s0[name] + alpha * s1[name]
        torch.testing.assert_close(m.params[name].detach(), expected)
    if alpha in (0.0, 1.0):  # exact ends
        src = s0 if alpha == 0.0 else s1
        assert all(torch.equal(m.params[k].detach(), src[k]) for k in ("a", "b"))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5"])
def test_wise_ft_bad_alpha(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        WiseFT(bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bma_bad_beta(bad):
    with pytest.raises(ValueError, match="> 0"):
        BetaMovingAverage(beta=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bma_bad_total_steps(bad):
    with pytest.raises(ValueError, match=">= 1"):
        BetaMovingAverage(total_steps=bad)


def test_wise_ft_zero_in_real_training_loop_restores_initial_prompts():
    from open_clip.tokenizer import SimpleTokenizer

    from training.backbone import create_backbone
    from training.engine import TrainConfig, train
    from training.methods import create_method

    method = create_method("coop", create_backbone("tiny-test"), {"n_ctx": 4})
    initial = {k: v.detach().clone() for k, v in method.trainable_parameters().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    ids = SimpleTokenizer()(method.prompt_texts(["a", "b"], "a photo of a {}."))

    class _Spy:  # records that training really moved the prompts before WiSE-FT undid it
        moved = False

        def on_train_start(self, m, total_steps): pass
        def on_step_end(self, m, step): pass
        def on_epoch_end(self, m, epoch): pass

        def on_train_end(self, m):
            _Spy.moved = any(not torch.equal(p.detach(), initial[k]) for k, p in m.trainable_parameters().items())

    result = train(method, lambda epoch: batches, ids, TrainConfig(epochs=2, device="cpu", lr=0.1),
                   callbacks=[_Spy(), WiseFT(0.0)], progress=False)
    assert result.steps == 4
    assert _Spy.moved
    for k, p in method.trainable_parameters().items():
        assert torch.equal(p.detach(), initial[k]), k


def test_callbacks_import_nothing_of_the_engine_or_the_methods():
    """No hidden circle: the engine and the methods import the callbacks, never the other way round."""
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, training.callbacks\n"
            "bad = [m for m in sys.modules if m.startswith('training.') and m != 'training.callbacks']\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
