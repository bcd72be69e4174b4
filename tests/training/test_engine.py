from __future__ import annotations

import json

import pytest
import torch

from promptclip_testing import TINY, tiny_method_config
from training.artifact import load_prompt_artifact, read_prompt_config, save_prompt_artifact
from training.backbone import create_backbone
from training.engine import TrainConfig, lr_at, train
from training.errors import ArtifactError, ConfigError
from training.methods import create_method


def _toy_loader_factory(n=16, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 2

    def factory(epoch):
        gen = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(n, generator=gen)
        return [(x[perm[i:i + batch]], y[perm[i:i + batch]]) for i in range(0, n, batch)]

    return factory


def _ids(method):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(method.prompt_texts(["red circle", "blue square"], "a photo of a {}."))


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=0.1, warmup_steps=2, warmup_lr=1e-5)
    assert lr_at(0, 10, cfg) == 1e-5 and lr_at(1, 10, cfg) == 1e-5
    assert lr_at(2, 10, cfg) == pytest.approx(0.1)
    assert lr_at(10, 10, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(6, 10, cfg) == pytest.approx(0.05)


def test_bad_train_config_is_clear():
    with pytest.raises(ConfigError, match="optimizer must be sgd or adamw"):
        TrainConfig.from_dict({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="training config: unknown option"):
        TrainConfig.from_dict({"epoch": 3})


def test_cuda_request_without_cuda_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    m = create_method("coop", create_backbone(TINY), {"n_ctx": 4})
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(m, _toy_loader_factory(), _ids(m), TrainConfig(device="cuda", epochs=1), progress=False)


def test_training_reduces_loss_and_touches_only_prompts():
    m = create_method("coop", create_backbone(TINY), {"n_ctx": 4})
    before = {k: v.clone() for k, v in m.clip.state_dict().items()}
    ctx0 = m.ctx.detach().clone()
    res = train(m, _toy_loader_factory(), _ids(m), TrainConfig(epochs=15, lr=0.05, device="cpu", log_every=2,
                                                                  augment="none"), progress=False)
    assert res.steps == 30
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert not torch.equal(ctx0, m.ctx.detach())
    after = m.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.05, device="cpu", seed=3)
    a = create_method("ivlp", create_backbone(TINY), tiny_method_config("ivlp"))
    train(a, _toy_loader_factory(), _ids(a), cfg, out_dir=tmp_path / "a", progress=False)

    b = create_method("ivlp", create_backbone(TINY), tiny_method_config("ivlp"))
    factory = _toy_loader_factory()

    def interrupted(epoch):  # the process dies when epoch 2 starts
        if epoch == 2 and interrupted.armed:
            raise KeyboardInterrupt
        return factory(epoch)

    interrupted.armed = True
    with pytest.raises(KeyboardInterrupt):
        train(b, interrupted, _ids(b), cfg, out_dir=tmp_path / "b", progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 4
    c = create_method("ivlp", create_backbone(TINY), tiny_method_config("ivlp"))
    res = train(c, _toy_loader_factory(), _ids(c), cfg, out_dir=tmp_path / "b", progress=False)
    assert res.steps == 8
    for (ka, va), (kc, vc) in zip(a.trainable_state_dict().items(), c.trainable_state_dict().items()):
        assert ka == kc
        torch.testing.assert_close(va, vc, atol=1e-6, rtol=1e-5)


def test_zeroshot_has_nothing_to_train():
    m = create_method("zeroshot", create_backbone(TINY))
    with pytest.raises(ConfigError, match="no trainable tensors"):
        train(m, _toy_loader_factory(), _ids(m), TrainConfig(device="cpu"), progress=False)


def test_artifact_round_trip_holds_only_trainable_tensors(tmp_path):
    bb = create_backbone(TINY)
    m = create_method("ivlp", bb, tiny_method_config("ivlp"))
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(1.0)
    path = save_prompt_artifact(tmp_path / "art", m, bb, trained_on={"classnames": ["a", "b"]})
    from safetensors.torch import load_file

    keys = set(load_file(str(path / "prompt_weights.safetensors")))
    assert keys == set(m.trainable_parameters())
    cfg = read_prompt_config(path)
    assert cfg.format_version == 1 and cfg.method.name == "ivlp"
    assert cfg.backbone.weights_sha256 == bb.weights_sha256
    art = load_prompt_artifact(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(art.method.encode_image(x), m.eval().encode_image(x))
    with pytest.raises(ArtifactError, match="already exists"):
        save_prompt_artifact(tmp_path / "art", m, bb)


def test_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_prompt_config(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "prompt_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_prompt_config(tmp_path / "a")
    (tmp_path / "a" / "prompt_config.json").write_text(
        json.dumps({"format": "promptclip.prompt", "format_version": 99}))
    with pytest.raises(ArtifactError, match="upgrade promptclip"):
        read_prompt_config(tmp_path / "a")


def test_artifact_with_other_weights_is_refused(tmp_path):
    bb = create_backbone(TINY, init_seed=0)
    m = create_method("coop", bb, {"n_ctx": 4})
    path = save_prompt_artifact(tmp_path / "art", m, bb)
    cfg = json.loads((path / "prompt_config.json").read_text())
    cfg["backbone"]["init_seed"] = 5
    (path / "prompt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="differ from the ones it was trained on"):
        load_prompt_artifact(path)


def test_train_run_reports_base_new_and_harmonic_mean(trained):
    for run in trained.values():
        m = run.metrics
        assert 0.0 <= m["base_accuracy"] <= 1.0 and 0.0 <= m["new_accuracy"] <= 1.0
        assert m["base_num_images"] == 8 and m["new_num_images"] == 8
        assert "RANDOM" in m["weights"]
        cfg = read_prompt_config(run.artifact)
        assert cfg.trained_on["classnames"] == sorted(cfg.trained_on["classnames"])
        assert len(cfg.trained_on["classnames"]) == 4


def test_evaluate_scores_image_conditioned_text_per_image():
    """For a method whose text depends on the image, evaluate uses encode_text_for_images (B x C), not one text
    matrix: predictions equal a direct per-image computation."""
    from promptclip_testing import tiny_method_config
    from training.engine import evaluate

    m = create_method("isp", create_backbone(TINY), {**tiny_method_config("isp"), "csp_variant": "B"}).eval()
    with torch.no_grad():
        for name, p in m.trainable_parameters().items():
            if "gate" in name:
                p.fill_(0.5)
    ids = _ids(m)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    res = evaluate(m, [(x, y)], ids, device="cpu")
    with torch.no_grad():
        f = m.encode_image(x)
        g = m.encode_text_for_images(ids, x)  # [B, C, D]
        pred = torch.einsum("bd,bcd->bc", f, g).argmax(-1)
    assert res["accuracy"] == pytest.approx(float((pred == y).float().mean()))


def test_warmup_epochs_become_steps_and_guidg_experts_get_plain_sgd(monkeypatch):
    import training.engine as engine
    from training.methods import get_method_class

    seen, real = [], engine.lr_at
    monkeypatch.setattr(engine, "lr_at", lambda step, total, cfg: seen.append(real(step, total, cfg)) or seen[-1])
    m = create_method("coop", create_backbone(TINY), {"n_ctx": 4})
    train(m, _toy_loader_factory(n=16, batch=8), _ids(m),
          TrainConfig(epochs=3, warmup_epochs=1, lr=0.01, device="cpu"), progress=False)
    assert seen[:2] == [1e-5, 1e-5] and seen[2] == pytest.approx(0.01)  # 2 steps per epoch: epoch 1 warms up
    cfg = get_method_class("guidg").config_cls.from_dict({"domains": ["a", "b"], "num_classes": 2,
                                                          "expert_momentum": 0.0, "expert_lr": 1e-4})
    stages = get_method_class("guidg").training_stages(type("M", (), {"config": cfg})())
    assert stages[0].overrides["momentum"] == 0.0 and "momentum" not in stages[-1].overrides
