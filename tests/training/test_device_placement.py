"""Device correctness without a GPU: every registered method trains with its model on PyTorch's ``meta`` device
under :class:`device_guard.DeviceGuard` (every stage, the callbacks, prepare_training, the shared loop, the
checkpoints), and no op may mix devices, create a host tensor inside a step or read a device value in a step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from device_guard import DeviceGuard

import training.engine as engine
from promptclip_testing import TINY, tiny_method_config
from training.callbacks import Callback
from training.engine import TrainConfig
from training.methods import get_method_class, list_methods
from training.methods.ivlp import IVLP
from training.workflow import train_run

CFG = TrainConfig(epochs=1, max_steps=2, batch_size=4, lr=0.01, precision="fp32", device="meta", seed=1)


def guarded_run(monkeypatch, tmp_path, data, name: str, guard: DeviceGuard | None = None,
                text_rows: list[tuple[int, int, int]] | None = None,
                **method_overrides) -> tuple[DeviceGuard, list[str]]:
    """``train_run`` of ``name`` with the model on ``meta`` under a guard; strict inside every engine step.
    ``text_rows`` collects (text rows encoded, classes, batch size) per step."""
    guard = guard or DeviceGuard("meta")
    steps: list[str] = []
    real_step = engine.train_step

    def strict_step(method, opt, batch, **kwargs):
        # the step really runs on meta: the trainable tensors and the batch live there
        assert all(p.is_meta for p in method.trainable_parameters().values()) and batch.images.is_meta
        rows = [0]
        def count(_module, args):
            rows[0] += len(args[0])

        hook = method.text_encoder.register_forward_pre_hook(count)
        guard.strict = True
        try:
            return real_step(method, opt, batch, **kwargs)
        finally:
            guard.strict = False
            hook.remove()
            steps.append(getattr(method, "_stage", None).name if getattr(method, "_stage", None) else "train")
            if text_rows is not None:
                text_rows.append((rows[0], len(batch.class_token_ids), len(batch.labels)))

    monkeypatch.setattr(engine, "train_step", strict_step)
    # per-step callback work (BMA's running average) is in the hot path too: strict as well
    for cb_cls in _callback_classes():
        if "on_step_end" in vars(cb_cls):
            monkeypatch.setattr(cb_cls, "on_step_end", _strict(guard, vars(cb_cls)["on_step_end"]))
    with guard:
        train_run(method_name=name, data_root=data, out_dir=tmp_path / name, backbone_name=TINY,
                  method_config={**tiny_method_config(name), **method_overrides}, train_config=CFG, shots=2,
                  subsample="all", progress=False)
    return guard, steps


def _callback_classes() -> list[type[Callback]]:
    out, todo = [], [Callback]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def _strict(guard: DeviceGuard, fn):
    def wrapped(*args, **kwargs):
        guard.strict, before = True, guard.strict
        try:
            return fn(*args, **kwargs)
        finally:
            guard.strict = before
    return wrapped


@pytest.fixture(scope="module")
def domain_data(two_domain_shapes):
    return two_domain_shapes


METHOD_CASES = [pytest.param(m, {}, id=m) for m in list_methods()] + [
    pytest.param("disa", {"saliency_target": "topk", "cir_second_term": True}, id="disa-topk"),
    pytest.param("isp", {"csp_variant": "B", "probing_mix": 0.5}, id="isp-csp-B"),
    pytest.param("guidg", {"averaging": "wiseft", "loss": "erm", "weighting": "batch_mean"}, id="guidg-wiseft"),
    pytest.param("guidg", {"use_experts": False}, id="guidg-no-experts"),
]


@pytest.mark.parametrize(("name", "overrides"), METHOD_CASES)
def test_every_method_stage_and_callback_stays_on_the_model_device(monkeypatch, tmp_path, shapes_root, domain_data,
                                                                    name, overrides):
    cls = get_method_class(name)
    data = domain_data if cls.needs_domains else shapes_root
    text_rows: list[tuple[int, int, int]] = []
    guard, steps = guarded_run(monkeypatch, tmp_path, data, name, text_rows=text_rows, **overrides)
    assert not guard.violations, "\n".join(str(v) for v in guard.violations)
    # the text side per step: at most one pass over the classes (frozen targets are precomputed once), per image
    # only where the text depends on the image (ISP's CSP variant B)
    per_image = overrides.get("csp_variant") == "B"
    assert all(rows <= classes * (batch if per_image else 1) for rows, classes, batch in text_rows), text_rows
    if cls.capabilities.trainable and overrides.get("use_experts", True):
        assert any(rows > 0 for rows, _, _ in text_rows)  # the hook sees the prompted text pass
    if cls.capabilities.trainable:
        # every stage ran real steps (2 each) under the strict check
        expected_stages = 3 if name == "guidg" and overrides.get("use_experts", True) else 1
        assert len(set(steps)) == expected_stages and len(steps) == 2 * expected_stages, steps
        assert guard.strict_ops > 100
    assert guard.ops > 100


def test_guard_catches_a_planted_host_arange_in_a_loss(monkeypatch, tmp_path, shapes_root):
    """``torch.arange(n)`` without ``device=`` in a loss: created on the host while the model is elsewhere."""
    real = IVLP.training_loss

    def planted(self, batch):
        parts = real(self, batch)
        ranks = torch.arange(batch.labels.shape[0]).float()  # planted: no device=
        parts["loss"] = parts["loss"] + 0.0 * ranks.sum()
        return parts

    monkeypatch.setattr(IVLP, "training_loss", planted)
    guard, steps = guarded_run(monkeypatch, tmp_path, shapes_root, "ivlp")
    assert len(steps) == 2
    hits = [v for v in guard.violations if v.kind == "creates a tensor on the host"]
    assert hits and "arange" in hits[0].op and "test_device_placement.py" in hits[0].where, guard.violations


def test_guard_catches_a_planted_device_mix(monkeypatch, tmp_path, shapes_root):
    """A host index tensor used against device logits (what crashes or syncs on CUDA)."""
    real = IVLP.training_loss

    def planted(self, batch):
        parts = real(self, batch)
        logits = parts["logits"]
        targets = torch.arange(logits.shape[0]) % logits.shape[1]  # planted: host labels
        parts["loss"] = parts["loss"] + 0.0 * F.cross_entropy(logits, targets)
        return parts

    monkeypatch.setattr(IVLP, "training_loss", planted)
    guard = DeviceGuard("meta")
    with pytest.raises(RuntimeError, match="device"):  # meta kernels refuse it too; the guard names the line
        guarded_run(monkeypatch, tmp_path, shapes_root, "ivlp", guard)
    assert any(v.kind == "mixes devices" and "meta" in v.devices and "cpu" in v.devices for v in guard.violations), \
        guard.violations


def test_guard_catches_a_host_sync_in_a_step(monkeypatch, tmp_path, shapes_root):
    real = IVLP.training_loss

    def planted(self, batch):
        parts = real(self, batch)
        if float(parts["loss"]) > 1e9:  # planted: a host read per step
            raise AssertionError
        return parts

    monkeypatch.setattr(IVLP, "training_loss", planted)
    guard, _ = guarded_run(monkeypatch, tmp_path, shapes_root, "ivlp")
    assert [v.kind for v in guard.violations] == ["reads a device value on the host"] * 2, guard.violations
