"""GuiDG: each stage touches only what it trains, the head's weights, per-sample vs batch-mean weighting, the loss
against a direct computation, weight averaging through the loop, domain-balanced batches, and the whole path
train -> artifact -> format-2 bundle -> serving with a class added at runtime (tiny-test backbone)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptclip_testing import TINY
from training.backbone import create_backbone
from training.engine import TrainConfig, train
from training.errors import ConfigError
from training.methods import TrainBatch, TrainContext, create_method
from training.methods.guidg import GuiDG

CLASSES = ["red circle", "blue square", "green star"]
TEMPLATE = "a photo of a {}."


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY)


def build(backbone, **overrides) -> GuiDG:
    cfg = GuiDG.config_for_data({"n_ctx": 4, **overrides}, CLASSES, ["a", "b"])
    return create_method("guidg", backbone, cfg)


def class_ids(method, backbone, names=CLASSES) -> torch.Tensor:
    return backbone.tokenizer()(method.prompt_texts(list(names), TEMPLATE))


def context(method, backbone) -> TrainContext:
    return TrainContext(classnames=CLASSES, dataset_template=TEMPLATE, class_token_ids=class_ids(method, backbone),
                        image_loader=None, tokenize=backbone.tokenizer(), device=torch.device("cpu"))


def random_batches(n: int = 3, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, len(CLASSES), (batch,), generator=gen))
            for _ in range(n)]
    return lambda epoch: data


def snapshot(method) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.named_parameters()}


def changed(method, before) -> set[str]:
    return {n for n, p in method.named_parameters() if not torch.equal(p.detach(), before[n])}


def run_stage(method, backbone, name: str, **cfg) -> None:
    stage = next(s for s in method.training_stages() if s.name == name)
    ctx = context(method, backbone)
    method.enter_stage(stage, ctx)
    tc = TrainConfig(**{"epochs": 1, "batch_size": 6, "lr": 0.05, "precision": "fp32", "device": "cpu", **cfg})
    train(method, random_batches(), ctx.class_token_ids, tc, callbacks=method.training_callbacks(), progress=False)
    method.end_stage(stage, ctx)


# ------------------------------------------------------------------------------------------------ config
def test_needs_domains_and_class_count(backbone):
    with pytest.raises(ConfigError, match="source domains and training class count"):
        create_method("guidg", backbone)
    cfg = GuiDG.config_for_data({}, CLASSES, ["sketch", "clean"])
    assert cfg["domains"] == ["sketch", "clean"] and cfg["num_classes"] == 3
    with pytest.raises(ConfigError, match="training data has"):
        GuiDG.config_for_data({"domains": ["x", "y"]}, CLASSES, ["sketch", "clean"])
    with pytest.raises(ConfigError, match="needs at least two.*--target-domain.*use_experts=false"):
        GuiDG.config_for_data({}, CLASSES, [""])
    assert GuiDG.config_for_data({"use_experts": False}, CLASSES, [""])["domains"] == ["all"]
    with pytest.raises(ConfigError, match="unknown option"):
        create_method("guidg", backbone, {"domains": ["a"], "num_classes": 3, "lam": 0.3})
    with pytest.raises(ConfigError, match="weighting must be one of"):
        build(backbone, weighting="mean")
    m = build(backbone)
    assert m.capabilities.num_prompt_sets == 2 and m.capabilities.finetuned_image_tower
    assert [s.name for s in m.training_stages()] == ["expert-0", "expert-1", "finetune"]
    assert m.prompt_set_names() == ["a", "b"] and m.prompt_template(TEMPLATE) == "X X X X {}."
    base = create_method("guidg", backbone, {"use_experts": False})
    assert base.capabilities.num_prompt_sets == 1 and base.prompt_template(TEMPLATE) == TEMPLATE
    assert [s.name for s in base.training_stages()] == ["finetune"]


# ------------------------------------------------------------------------------------------------ stages
def test_expert_stage_touches_only_its_context(backbone):
    m = build(backbone)
    before = snapshot(m)
    run_stage(m, backbone, "expert-1")
    assert changed(m, before) == {"experts.1"}


def test_finetune_stage_touches_only_the_tower_and_the_head(backbone):
    m = build(backbone, averaging="none", finetune_lr=1e-3)
    before = snapshot(m)
    stage = m.training_stages()[-1]
    ctx = context(m, backbone)
    m.enter_stage(stage, ctx)
    tc = TrainConfig(epochs=1, batch_size=6, lr=1e-3, optimizer="adamw", precision="fp32", device="cpu")
    train(m, random_batches(), ctx.class_token_ids, tc, progress=False)
    moved = changed(m, before)
    assert {"head.q_weight", "head.q_bias", "head.class_weight", "head.class_bias"} <= moved
    assert any(n.startswith("visual.") for n in moved)
    assert all(n.startswith("visual.") or n.startswith("head.") for n in moved), moved
    assert "head.keys" not in moved and not any(n.startswith(("experts.", "clip.")) for n in moved)
    m.end_stage(stage, ctx)  # the keys are fixed from the training classes when fine-tuning ends
    torch.testing.assert_close(m.head.keys, m.head.compute_keys(m.train_text))
    assert not torch.equal(m.head.keys, before["head.keys"])


def test_ablations_train_what_they_say(backbone):
    frozen_tower = build(backbone, finetune_tower=False, averaging="none")
    before = snapshot(frozen_tower)
    run_stage(frozen_tower, backbone, "finetune", optimizer="adamw", lr=1e-3)
    assert {n.split(".")[0] for n in changed(frozen_tower, before)} == {"head"}
    uniform = build(backbone, weighting="uniform", averaging="none")
    before = snapshot(uniform)
    run_stage(uniform, backbone, "finetune", optimizer="adamw", lr=1e-3)
    assert {n.split(".")[0] for n in changed(uniform, before)} == {"visual"}
    torch.testing.assert_close(uniform.expert_weights(torch.randn(3, 32)), torch.full((3, 2), 0.5))
    with pytest.raises(ConfigError, match="nothing to train in stage 2"):
        build(backbone, weighting="uniform", finetune_tower=False)


def test_the_fine_tuned_tower_starts_from_clip_and_leaves_clip_alone(backbone):
    m = build(backbone, averaging="none")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), F.normalize(backbone.model.encode_image(x), dim=-1),
                                   atol=1e-6, rtol=0)
    clip_before = {n: p.clone() for n, p in backbone.model.named_parameters()}
    run_stage(m, backbone, "finetune", optimizer="adamw", lr=1e-3)
    assert all(torch.equal(p, clip_before[n]) for n, p in backbone.model.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(m.encode_image(x), F.normalize(backbone.model.encode_image(x), dim=-1), atol=1e-4)


# ------------------------------------------------------------------------------------------------ head
def test_head_weights_are_a_distribution_per_image(backbone):
    m = build(backbone)
    m.head.freeze_keys(torch.randn(2, 3, 32))  # [S, C, D]
    f = F.normalize(torch.randn(5, 32), dim=-1)
    w = m.expert_weights(f)
    assert w.shape == (5, 2) and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    assert not torch.allclose(w[0], w[1])  # depends on the image


def test_per_sample_weights_ignore_the_batch_and_batch_mean_does_not(backbone):
    per_sample, batch_mean = build(backbone), build(backbone, weighting="batch_mean")
    batch_mean.load_trainable_state_dict(per_sample.trainable_state_dict())
    keys = torch.randn(2, 3, 32)
    per_sample.head.freeze_keys(keys)
    batch_mean.head.freeze_keys(keys)
    f = F.normalize(torch.randn(4, 32), dim=-1)
    alone, in_batch = per_sample.expert_weights(f[:1]), per_sample.expert_weights(f)
    torch.testing.assert_close(alone[0], in_batch[0])
    # batch-mean (the official code): every row is the batch average, so image 0's weights move with its neighbours
    bm = batch_mean.expert_weights(f)
    torch.testing.assert_close(bm, in_batch.mean(0, keepdim=True).expand(4, -1))
    assert not torch.allclose(batch_mean.expert_weights(f[:1])[0], bm[0])
    # export always asks for per-image weights
    torch.testing.assert_close(batch_mean.expert_weights(f, per_sample=True), in_batch)


@pytest.mark.parametrize("loss,weighting", [("mms", "per_sample"), ("erm", "per_sample"), ("mms", "batch_mean")])
def test_finetune_loss_matches_a_direct_computation(backbone, loss, weighting):
    m = build(backbone, loss=loss, weighting=weighting, margin=0.3)
    ctx = context(m, backbone)
    m.enter_stage(m.training_stages()[-1], ctx)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    out = m.training_loss(TrainBatch(x, y, ctx.class_token_ids))
    with torch.no_grad():
        f = m.encode_image(x)  # [B, D]
        T = torch.stack([m.encode_text(ctx.class_token_ids, d) for d in range(2)])  # [S, C, D]
        a, c = m.head.class_weight, m.head.class_bias
        keys = torch.stack([torch.stack([a[h] @ T[d] + c[h] for d in range(2)]) for h in range(a.shape[0])])
        w = torch.zeros(4, 2)
        for h in range(a.shape[0]):
            q = f @ m.head.q_weight[h].t() + m.head.q_bias[h]  # [B, D]
            w += F.cosine_similarity(q[:, None, :], keys[h][None], dim=-1).softmax(-1) / a.shape[0]
        if weighting == "batch_mean":
            w = w.mean(0, keepdim=True).expand(4, -1)
        expected = 0.0
        for b in range(4):
            for d in range(2):
                feat = f[b] - (0.3 * T[d, y[b]] if loss == "mms" else 0)
                logits = m.logit_scale * feat @ T[d].t()
                expected += w[b, d] * F.cross_entropy(logits[None], y[b:b + 1]) / 4
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=1e-5)


def test_head_inputs_are_detached(backbone):
    """The tower gets gradient only through the experts' CE terms, never through the head's weights."""
    m = build(backbone)
    ctx = context(m, backbone)
    m.enter_stage(m.training_stages()[-1], ctx)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    m.zero_grad(set_to_none=True)
    out = m.training_loss(TrainBatch(x, y, ctx.class_token_ids))
    head_grad = torch.autograd.grad(out["loss"], [m.visual.proj], retain_graph=True)[0]
    # the same loss with the weights as constants gives the same tower gradient
    with torch.no_grad():
        f = m.encode_image(x)
        w = m.head(f, m.head.compute_keys(m.train_text)).detach()  # [B, S]
    feats = m.encode_image(x)
    T = m.train_text
    ce = torch.stack([F.cross_entropy(m.logit_scale * (feats - 0.3 * T[d, y]) @ T[d].t(), y, reduction="none")
                      for d in range(2)])  # [S, B]
    const = (w.t() * ce).sum(0).mean()
    torch.testing.assert_close(head_grad, torch.autograd.grad(const, [m.visual.proj])[0], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ averaging
def test_wiseft_through_the_loop_matches_a_direct_interpolation(backbone):
    init = build(backbone, averaging="none")
    state0 = init.trainable_state_dict()
    plain, wise = build(backbone, averaging="none"), build(backbone, averaging="wiseft", wiseft_alpha=0.25)
    for m in (plain, wise):
        m.load_trainable_state_dict(state0)
        run_stage(m, backbone, "finetune", optimizer="adamw", lr=1e-3, seed=3)
    plain_params = dict(plain.named_parameters())
    for n, p in wise.named_parameters():
        if n.startswith("visual."):  # the tower: interpolated with its pretrained weights
            expected = torch.lerp(state0[n], plain_params[n].detach(), 0.25)
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)
        elif n.startswith("head.") and n != "head.keys":  # the head has no pretrained weights: kept as trained
            torch.testing.assert_close(p.detach(), plain_params[n].detach(), atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(p.detach(), state0[n]) for n, p in wise.named_parameters() if n.startswith("visual."))


def test_bma_is_the_finetune_stage_callback(backbone):
    from training.callbacks import BetaMovingAverage, WiseFT

    m = build(backbone, bma_beta=0.1)
    m.enter_stage(m.training_stages()[0], None)
    assert m.training_callbacks() == []  # experts: no averaging
    m.enter_stage(m.training_stages()[-1], None)
    (cb,) = m.training_callbacks()
    assert isinstance(cb, BetaMovingAverage) and cb.beta == 0.1
    w = build(backbone, averaging="wiseft")
    w.enter_stage(w.training_stages()[-1], None)
    assert isinstance(w.training_callbacks()[0], WiseFT)


# ------------------------------------------------------------------------------------------------ data
def test_domain_balanced_batches():
    from training.data import DomainBalancedBatches

    domains = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    sampler = DomainBalancedBatches(domains, per_domain=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3  # ceil(5 / 2)
    for batch in batches:
        assert sorted(domains[i] for i in batch) == ["a", "a", "b", "b", "c", "c"]
    seen_a = {i for batch in batches for i in batch if domains[i] == "a"}
    assert seen_a == set(range(5))  # the largest domain is covered once per epoch
    assert batches == list(DomainBalancedBatches(domains, per_domain=2, seed=1))
    assert batches != list(DomainBalancedBatches(domains, per_domain=2, seed=2))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture()
def guidg_run(guidg_trained):
    return guidg_trained


def test_artifact_holds_everything_needed_to_serve(guidg_run):
    from safetensors.torch import load_file

    from training.artifact import WEIGHTS_FILE, load_prompt_artifact

    run, _ = guidg_run
    state = load_file(str(run.artifact / WEIGHTS_FILE))
    assert {"experts.0", "experts.1", "head.keys", "head.q_weight", "head.class_weight"} <= set(state)
    assert any(k.startswith("visual.") for k in state) and not any(k.startswith("clip.") for k in state)
    assert [s["stage"] for s in run.metrics["stages"]] == ["expert-0", "expert-1", "finetune"]
    art = load_prompt_artifact(run.artifact)
    assert art.config.method.config["domains"] == ["a", "b"]
    assert art.config.trained_on["domains"] == ["a", "b"]
    assert float(art.method.head.keys.abs().sum()) > 0  # fixed at the end of fine-tuning, saved


def test_rerun_loads_finished_stages(guidg_run, caplog):
    from safetensors.torch import load_file

    from training.artifact import WEIGHTS_FILE
    from training.errors import ArtifactError
    from training.workflow import train_run

    run, kwargs = guidg_run
    first = load_file(str(run.artifact / WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="already exists.*--overwrite"):  # refused before any training
        train_run(**kwargs)
    with caplog.at_level("INFO", logger="training.workflow"):
        again = train_run(**kwargs, overwrite=True)
    assert sum("already finished" in r.message for r in caplog.records) == 3
    second = load_file(str(again.artifact / WEIGHTS_FILE))
    assert all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ConfigError, match="finished stage 'expert-0' of other tensors"):  # another config, same --out
        train_run(**{**kwargs, "method_config": {"n_ctx": 3}}, overwrite=True)
    assert all(torch.equal(first[k], v) for k, v in load_file(str(again.artifact / WEIGHTS_FILE)).items())


def test_bundle_and_serving_reproduce_torch_logits_with_a_runtime_class(guidg_run, guidg_bundle):
    import json

    from serving.classifier import Classifier
    from training.artifact import load_prompt_artifact
    from training.workflow import eval_transform

    run, _ = guidg_run
    bundle = guidg_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["min_reader_version"] == 2
    assert manifest["prompt_sets"] == {"names": ["a", "b"], "combine": "weighted_sum"}
    assert [o["name"] for o in manifest["graphs"]["image"]["outputs"]] == ["image_embeds", "expert_weights"]
    assert manifest["parity"]["logits"]["min_cosine"] >= 0.9999

    art = load_prompt_artifact(run.artifact)
    names = art.classnames
    clf = Classifier.from_bundle(bundle, runtime="ort")
    clf.add_classes(["zebra"])
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    served = clf.classify(images, top_k=len(names) + 1)
    all_names = names + ["zebra"]
    got = np.array([[next(r["logit"] for r in res if r["name"] == n) for n in all_names] for res in served])
    m = art.method
    tf = eval_transform(art.backbone)
    with torch.no_grad():
        x = torch.stack([tf(im) for im in images])
        f = m.encode_image(x)
        ids = art.backbone.tokenizer()(m.prompt_texts(all_names, art.dataset_template))
        texts = [m.encode_text(ids, k) for k in range(2)]
        ref = m.combined_logits(f, texts, m.expert_weights(f, per_sample=True)).numpy()
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-4)


def _head_spread_after_stage2(backbone, **overrides) -> float:
    """Stage 2 at the official tower lr (AdamW 5e-6, 5 epochs of random batches), then max |w - 1/S| of the fixed
    head on held-out images."""
    torch.manual_seed(0)
    m = build(backbone, averaging="none", **overrides)
    stage = m.training_stages()[-1]
    ctx = context(m, backbone)
    m.enter_stage(stage, ctx)
    tc = TrainConfig(epochs=5, batch_size=6, lr=m.config.finetune_lr, optimizer="adamw", weight_decay=0.1,
                     precision="fp32", device="cpu")
    train(m, random_batches(), ctx.class_token_ids, tc, progress=False)
    m.end_stage(stage, ctx)
    with torch.no_grad():
        x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        w = m.expert_weights(m.encode_image(x).float())
    return float((w - 0.5).abs().max())


def test_head_lr_and_temperature_let_the_head_move_away_from_uniform(backbone):
    official = _head_spread_after_stage2(backbone)
    learned = _head_spread_after_stage2(backbone, head_lr=0.01, head_temperature=0.1)
    print(f"max |w - 1/2| after stage 2: official {official:.4f}, head_lr + temperature {learned:.4f}")
    assert official < 0.05 and learned > 0.1 and learned > 4 * official
    m = build(backbone, head_lr=0.01)
    assert m.parameter_lr_scales() == {}  # stage 1: no head in the optimiser
    m.enter_stage(m.training_stages()[-1], context(m, backbone))
    assert m.parameter_lr_scales() == {n: 0.01 / 5e-6 for n in ("head.q_weight", "head.q_bias", "head.class_weight",
                                                                "head.class_bias")}
    for bad in ({"head_lr": 0.0}, {"head_temperature": 0.0}):
        with pytest.raises(ConfigError, match="learning rates|head_temperature"):
            build(backbone, **bad)
