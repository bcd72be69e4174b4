"""ISP (training/methods/isp.py) and the encoders' prompt_hook: IVLP equivalence at gate 0, the structural
attention and its masks, sample-probing weights against direct computations, gradient flow, the variant A/B
capabilities, and a tiny train -> export round trip (tiny-test backbone, depth 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promptclip_testing import TINY, tiny_method_config
from training.backbone import create_backbone
from training.errors import ConfigError, ExportError
from training.methods import TrainBatch, TrainContext, create_method
from training.methods import isp as I

CLASSES = ["red circle", "blue square", "green triangle"]
TEMPLATE = "a photo of a {}."
GATES = ("ssp_text_gate", "ssp_vision_gate", "csp_text_gate", "csp_vision_gate")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY)


def build(backbone, seed=0, name="isp", **overrides):
    torch.manual_seed(seed)
    return create_method(name, backbone, {**tiny_method_config(name), **overrides})


def open_gates(method, value=0.5):
    with torch.no_grad():
        for g in GATES:
            if hasattr(method, g):
                getattr(method, g).fill_(value)
    return method


def ids_for(backbone, method, names=CLASSES):
    return backbone.tokenizer()(method.prompt_texts(names, TEMPLATE))


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def batch_for(backbone, method, n=4, seed=1):
    y = torch.arange(n) % len(CLASSES)
    return TrainBatch(images=images(n, seed), labels=y, class_token_ids=ids_for(backbone, method))


def prepared(backbone, method):
    ctx = TrainContext(classnames=CLASSES, dataset_template=TEMPLATE, class_token_ids=ids_for(backbone, method),
                       image_loader=[], tokenize=backbone.tokenizer(), device=torch.device("cpu"))
    method.prepare_training(ctx)
    return method


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_validation_and_capabilities(backbone):
    cfg = I.ISPConfig()
    assert (cfg.n_ctx_text, cfg.n_ctx_vision, cfg.depth_text, cfg.depth_vision) == (4, 4, 9, 9)
    assert cfg.ctx_init == "a photo of a"
    assert (cfg.use_ssp, cfg.ssp_rank, cfg.use_csp, cfg.csp_variant, cfg.csp_rank) == (True, 32, True, "A", 32)
    assert cfg.gate_init == 0.0 and cfg.use_probing and cfg.probing_mode == "softmax"
    assert (cfg.probing_temperature, cfg.probing_gamma, cfg.probing_mix) == (1.0, 1.0, 0.0)
    for bad in ({"csp_variant": "C"}, {"ssp_rank": 0}, {"probing_mode": "x"}, {"probing_temperature": 0.0},
                {"probing_mix": 1.5}, {"probing_gamma": -1.0}, {"use_csp": True, "depth_vision": 0}):
        with pytest.raises(ConfigError):
            I.ISPConfig.from_dict(bad)
    I.ISPConfig.from_dict({"use_csp": False, "depth_vision": 0})  # text-only ISP is fine
    a, b = build(backbone), build(backbone, csp_variant="B")
    assert not a.capabilities.text_depends_on_image and a.text_image_dependency is None
    assert b.capabilities.text_depends_on_image and "csp_variant='B'" in b.text_image_dependency
    assert not I.ISP.capabilities.text_depends_on_image  # class-level (CLI listing): the defaults, variant A
    assert a.capabilities == build(backbone, name="ivlp").capabilities
    assert not build(backbone, csp_variant="B", use_csp=False).capabilities.text_depends_on_image


# ------------------------------------------------------------------------------------------------ IVLP at gate 0
def test_gate_zero_reproduces_ivlp_exactly(backbone):
    ivlp = build(backbone, seed=3, name="ivlp").eval()
    isp = build(backbone, seed=4).eval()
    own = isp.trainable_parameters()
    with torch.no_grad():
        for n, p in ivlp.trainable_parameters().items():
            own[n].copy_(p)  # same prompt tensors; ISP's projections stay random, its gates 0
    assert all(float(getattr(isp, g).detach().abs().max()) == 0.0 for g in GATES)
    x, ids = images(3), ids_for(backbone, isp, CLASSES + ["a class never seen"])
    with torch.no_grad():
        assert torch.equal(isp.encode_image(x), ivlp.encode_image(x))
        assert torch.equal(isp.encode_text(ids), ivlp.encode_text(ids))
        open_gates(isp, 0.5)
        assert not torch.allclose(isp.encode_image(x), ivlp.encode_image(x), atol=1e-4)
        assert not torch.allclose(isp.encode_text(ids), ivlp.encode_text(ids), atol=1e-4)


# ------------------------------------------------------------------------------------------------ prompt_hook API
def test_prompt_hook_identity_is_exact_and_sees_documented_shapes(backbone):
    m = build(backbone, name="ivlp").eval()
    x, ids = images(2), ids_for(backbone, m)
    seen = []

    def hook(i, prompts, hidden, token_ids):
        seen.append((i, tuple(prompts.shape), tuple(hidden.shape),
                     None if token_ids is None else tuple(token_ids.shape)))
        return prompts

    with torch.no_grad():
        t_ref = m.text_encoder(ids, m.text_prompts(), ctx_start=1)
        t_hook = m.text_encoder(ids, m.text_prompts(), ctx_start=1, prompt_hook=hook)
        v_ref = m.vision_encoder(x, m.vision_prompts())
        v_hook = m.vision_encoder(x, m.vision_prompts(), prompt_hook=hook)
    assert torch.equal(t_ref, t_hook) and torch.equal(v_ref, v_hook)
    n_patch = m.vision_encoder.num_patches
    assert seen == [(0, (4, 64), (3, 77, 64), (3, 77)), (1, (4, 64), (3, 77, 64), (3, 77)),
                    (0, (4, 64), (2, 1 + n_patch + 4, 64), None), (1, (4, 64), (2, 1 + n_patch + 4, 64), None)]


def test_prompt_hook_per_sequence_and_per_image_prompts_are_inserted(backbone):
    m = build(backbone, name="ivlp").eval()
    x, ids = images(2), ids_for(backbone, m)
    with torch.no_grad():
        ref_t = m.text_encoder(ids, m.text_prompts(), ctx_start=1)
        # a hook that returns per-sequence prompts equal to the shared ones changes nothing ...
        same = m.text_encoder(ids, m.text_prompts(), ctx_start=1,
                              prompt_hook=lambda i, p, h, t: p.expand(h.shape[0], -1, -1))
        torch.testing.assert_close(same, ref_t, atol=0, rtol=0)
        # ... and one that perturbs only sequence 1 at layer 1 changes only sequence 1
        def bump(i, p, h, t):
            p = p.expand(h.shape[0], -1, -1).clone()
            if i == 1:
                p[1] += torch.randn(p.shape[1:], generator=torch.Generator().manual_seed(1))  # (a constant shift
            return p  # would vanish in the blocks' LayerNorm)
        got = m.text_encoder(ids, m.text_prompts(), ctx_start=1, prompt_hook=bump)
        assert torch.equal(got[0], ref_t[0]) and torch.equal(got[2], ref_t[2]) and not torch.allclose(got[1], ref_t[1])
        ref_v = m.vision_encoder(x, m.vision_prompts())

        def bump_v(i, p, h, t):
            p = p.expand(h.shape[0], -1, -1).clone()
            if i == 0:
                p[0] += torch.randn(p.shape[1:], generator=torch.Generator().manual_seed(2))
            return p
        got_v = m.vision_encoder(x, m.vision_prompts(), prompt_hook=bump_v)
        assert torch.equal(got_v[1], ref_v[1]) and not torch.allclose(got_v[0], ref_v[0])


# ------------------------------------------------------------------------------------------------ attention
def test_low_rank_attention_shapes_and_direct_computation():
    g = torch.Generator().manual_seed(0)
    att = I.LowRankAttention(16, 24, 4)
    q = torch.randn(3, 16, generator=g)  # shared prompts [n, W_q]
    x = torch.randn(5, 7, 24, generator=g)  # per-sequence tokens [N, M, W_k]
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[:, 5:] = False
    out = att(q, x, mask)
    assert out.shape == (5, 3, 16)
    assert att(q, x[0]).shape == (3, 16) and att(q.expand(5, -1, -1), x).shape == (5, 3, 16)
    with torch.no_grad():
        for b in range(5):
            k, v = x[b, :5] @ att.w_k, x[b, :5] @ att.w_v
            a = torch.softmax((q @ att.w_q) @ k.t() / 2.0, dim=-1)  # sqrt(r) = 2
            torch.testing.assert_close(out[b], a @ v @ att.w_o, rtol=1e-5, atol=1e-6)
        x2 = x.clone()
        x2[:, 5:] = 1e3 * torch.randn(5, 2, 24, generator=g)  # masked keys never matter
        assert torch.equal(att(q, x2, mask), out)
    # cross-width maps (CSP): text [.., W_t] <- vision [.., W_v]
    assert I.LowRankAttention(64, 96, 8)(torch.randn(4, 64), torch.randn(2, 10, 96)).shape == (2, 4, 64)


def test_text_key_mask_excludes_context_and_padding(backbone):
    m = build(backbone)
    ids = ids_for(backbone, m, ["red circle"])  # SOS a photo of a red circle . EOT pad...
    eot = int(ids[0].argmax())
    mask = I.text_key_mask(ids, m.text_encoder.eot_index(ids), 1, 4)
    expected = [j == 0 or 5 <= j <= eot for j in range(ids.shape[1])]
    assert mask[0].tolist() == expected and eot == 8


def test_ssp_output_ignores_padding_and_context_hidden_states(backbone):
    m = open_gates(build(backbone))
    ids = ids_for(backbone, m)
    eot = int(ids[0].argmax())
    hook = m._text_hook()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 77, 64, generator=g)
    prompts = m.text_deep[0]
    with torch.no_grad():
        ref = hook(1, prompts, hidden, ids)
        assert ref.shape == (3, 4, 64)  # class-specific (per sequence) text prompts
        for pos in (eot + 1, 76, 1, 3):  # padding after EOT, context positions
            h2 = hidden.clone()
            h2[:, pos] += 100.0 * torch.randn(64, generator=g)
            assert torch.equal(hook(1, prompts, h2, ids), ref), pos
        for pos in (0, 5, eot):  # SOS, a class-name token, EOT are keys
            h2 = hidden.clone()
            h2[:, pos] += 10.0 * torch.randn(64, generator=g)
            assert not torch.allclose(hook(1, prompts, h2, ids), ref)


def test_vision_ssp_attends_to_cls_and_patches_not_prompts(backbone):
    m = open_gates(build(backbone, use_csp=False))
    hook = m._vision_hook()
    n_tok = 1 + m.vision_encoder.num_patches
    hidden = torch.randn(2, n_tok + 4, 64, generator=torch.Generator().manual_seed(6))
    prompts = m.vision_deep[1]
    with torch.no_grad():
        ref = hook(1, prompts, hidden, None)
        assert ref.shape == (2, 4, 64)  # per-image vision prompts
        h2 = hidden.clone()
        h2[:, n_tok:] += 50.0  # the prompt slots
        assert torch.equal(hook(1, prompts, h2, None), ref)
        h3 = hidden.clone()
        h3[1, 0] += 5.0  # image 1's CLS changes only image 1's prompts
        out = hook(1, prompts, h3, None)
        assert torch.equal(out[0], ref[0]) and not torch.allclose(out[1], ref[1])


def test_text_causal_mask_still_respected(backbone):
    """A token after EOT changes neither the text feature (causal attention) nor the SSP prompts (masked)."""
    m = open_gates(build(backbone)).eval()
    ids = ids_for(backbone, m)
    eot = ids.argmax(-1)
    ids2 = ids.clone()
    ids2[torch.arange(3), eot + 1] = 320  # a real word id (< EOT id) right after EOT
    ids2[:, -1] = 1000
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(ids2), m.encode_text(ids), atol=1e-6, rtol=0)
        ids3 = ids.clone()
        ids3[0, 6] = 1000  # a class-name token does matter
        assert not torch.allclose(m.encode_text(ids3)[0], m.encode_text(ids)[0], atol=1e-4)


# ------------------------------------------------------------------------------------------------ sample probing
def test_probing_weights_match_direct_formulas():
    d = torch.tensor([0.1, 0.9, 0.5, 0.0])
    w = I.probing_weights(d, "softmax", temperature=0.5)
    torch.testing.assert_close(w, 4 * torch.exp(d / 0.5) / torch.exp(d / 0.5).sum())
    torch.testing.assert_close(w.sum(), torch.tensor(4.0))
    w = I.probing_weights(d, "power", gamma=2.0)
    raw = (1 + d) ** 2
    torch.testing.assert_close(w, raw / raw.mean())
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(I.probing_weights(d, "power", gamma=0.0), torch.ones(4))
    p_zs, p_pr = torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.6])
    torch.testing.assert_close(I.sample_difficulty(p_zs, p_pr, 0.25), 1 - (0.75 * p_zs + 0.25 * p_pr))
    torch.testing.assert_close(I.sample_difficulty(p_zs, None, 0.0), 1 - p_zs)
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(I.true_class_probability(logits, torch.tensor([1, 0])),
                               torch.stack([logits[0].softmax(0)[1], logits[1].softmax(0)[0]]))
    ce = F.cross_entropy(logits, torch.tensor([1, 0]), reduction="none")
    torch.testing.assert_close(I.weighted_cross_entropy(logits, torch.tensor([1, 0]), torch.tensor([0.5, 1.5])),
                               (0.5 * ce[0] + 1.5 * ce[1]) / 2)


@pytest.mark.parametrize("mode,mix", [("softmax", 0.0), ("power", 0.3)])
def test_training_loss_weights_match_direct_computation(backbone, mode, mix):
    m = prepared(backbone, open_gates(build(backbone, probing_mode=mode, probing_mix=mix, probing_gamma=2.0,
                                             probing_temperature=0.5, probing_normalize="batch"), 0.2))
    m.train()
    batch = batch_for(backbone, m)
    out = m.training_loss(batch)
    with torch.no_grad():
        g_o = F.normalize(m.text_encoder(backbone.tokenizer()([TEMPLATE.format(c) for c in CLASSES]), None), dim=-1)
        torch.testing.assert_close(m.frozen_text, g_o)
        f_o = F.normalize(m.vision_encoder(batch.images, None), dim=-1)
        p_zs = (m.logit_scale * f_o @ g_o.t()).softmax(-1)[torch.arange(4), batch.labels]
        p_pr = out["logits"].softmax(-1)[torch.arange(4), batch.labels]
        d = 1 - ((1 - mix) * p_zs + mix * p_pr)
        if mode == "softmax":
            w = 4 * torch.softmax(d / 0.5, dim=0)
            torch.testing.assert_close(w.sum(), torch.tensor(4.0))
        else:
            w = (1 + d) ** 2 / ((1 + d) ** 2).mean()
        ce = F.cross_entropy(out["logits"], batch.labels, reduction="none")
    torch.testing.assert_close(out["loss"].detach(), (w * ce).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["probing_weight_mean"], w.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["probing_weight_max"], w.max(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ce"], ce.mean(), rtol=1e-5, atol=1e-6)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")


def test_probing_off_loss_is_plain_ce_on_the_same_logits(backbone):
    m = open_gates(build(backbone, use_probing=False), 0.2).train()
    batch = batch_for(backbone, m)
    out = m.training_loss(batch)
    assert torch.equal(out["loss"].detach(), F.cross_entropy(out["logits"], batch.labels))
    assert set(out) == {"loss", "ce", "logits"}


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("variant", ["A", "B"])
def test_gradients_reach_only_isp_parameters(backbone, variant):
    m = open_gates(build(backbone, csp_variant=variant), 0.3).train()
    out = m.training_loss(batch_for(backbone, m))
    out["loss"].backward()
    params = m.trainable_parameters()
    expected = {"text_ctx", "text_deep.0", "vision_deep.0", "vision_deep.1", "ssp_text_gate", "ssp_vision_gate",
                "csp_text_gate"} | {f"{mod}.{w}" for mod in ("ssp_text", "ssp_vision", "csp_text")
                                    for w in ("w_q", "w_k", "w_v", "w_o")}
    if variant == "A":
        expected |= {"csp_vision_gate", "csp_vision.w_q", "csp_vision.w_k", "csp_vision.w_v", "csp_vision.w_o"}
    assert set(params) == expected
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in m.clip.parameters())
    assert all(not p.requires_grad for p in m.clip.parameters())


def test_at_gate_zero_gates_and_prompts_get_gradient(backbone):
    """At the default gate 0 the gates and the prompts learn from step 1 (the projections once the gates open)."""
    m = build(backbone).train()
    m.training_loss(batch_for(backbone, m))["loss"].backward()
    params = m.trainable_parameters()
    for name in ("text_ctx", "vision_deep.0", *GATES):
        assert params[name].grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------ variants A / B
def test_variant_a_text_independent_of_images_variant_b_dependent(backbone):
    ids = ids_for(backbone, build(backbone))
    x1, x2 = images(2, seed=7), images(2, seed=8)
    a = open_gates(build(backbone)).eval()
    with torch.no_grad():
        ta1, ta2 = a.encode_text_for_images(ids, x1), a.encode_text_for_images(ids, x2)
        assert ta1.shape == (2, 3, 32) and torch.equal(ta1, ta2) and torch.equal(ta1[0], a.encode_text(ids))
    b = open_gates(build(backbone, csp_variant="B")).eval()
    with torch.no_grad():
        tb1, tb2 = b.encode_text_for_images(ids, x1), b.encode_text_for_images(ids, x2)
        assert tb1.shape == (2, 3, 32)
        torch.testing.assert_close(tb1.norm(dim=-1), torch.ones(2, 3))
        assert not torch.allclose(tb1, tb2, atol=1e-4) and not torch.allclose(tb1[0], tb1[1], atol=1e-4)
        # per image, not per batch: image 0's text features do not depend on the other images of the batch
        torch.testing.assert_close(b.encode_text_for_images(ids, x1[:1])[0], tb1[0], atol=1e-5, rtol=0)
        # with the CSP gates closed, B's text is image-independent again (only SSP, per class)
        b.csp_text_gate.zero_()
        t0 = b.encode_text_for_images(ids, x1)
        torch.testing.assert_close(t0[0], t0[1], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="csp_variant='B'.*encode_text_for_images"):
        b.encode_text(ids)


def test_variant_b_training_logits_are_per_image(backbone):
    m = open_gates(build(backbone, csp_variant="B", use_probing=False), 0.4).train()
    batch = batch_for(backbone, m)
    out = m.training_loss(batch)
    with torch.no_grad():
        f = m.encode_image(batch.images)
        g = m.encode_text_for_images(batch.class_token_ids, batch.images)  # [B, C, D]
        expected = m.logit_scale * torch.einsum("bd,bcd->bc", f, g)
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ train -> export
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from promptclip_testing import make_shapes

    root = tmp_path_factory.mktemp("isp-shapes")
    make_shapes(root, train_per_class=2, test_per_class=1, size=32)
    return root


def _train(shapes, out, **overrides):
    from training.engine import TrainConfig
    from training.workflow import train_run

    return train_run(method_name="isp", data_root=shapes, out_dir=out, backbone_name=TINY,
                     method_config={**tiny_method_config("isp"), **overrides},
                     train_config=TrainConfig(max_steps=2, batch_size=4, device="cpu", precision="fp32"),
                     progress=False)


def test_train_and_export_variant_a_extends_classes_at_runtime(shapes, tmp_path):
    import onnxruntime as ort

    from export.bundle import export_bundle
    from training.artifact import load_prompt_artifact

    run = _train(shapes, tmp_path / "run")
    assert np.isfinite(run.metrics["final_loss"]) and "base_accuracy" in run.metrics
    art = load_prompt_artifact(run.artifact)
    assert art.config.method.capabilities["text_depends_on_image"] is False
    gates = [float(getattr(art.method, g).detach().abs().max()) for g in GATES]
    assert all(v > 0 for v in gates)  # two steps moved every gate off 0: the structural ops are live
    open_gates(art.method, 0.5)  # make SSP/CSP dominant so the exported graphs really carry them
    bundle = export_bundle(art, tmp_path / "bundle", exporter="torchscript")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["method"]["name"] == "isp" and manifest["parity"]["text"]["min_cosine"] >= 0.9999
    template = manifest["text"]["templates"][0]
    ids = backbone_tokenize(art, [template.format("purple hexagon never seen")])
    sess = ort.InferenceSession(str(bundle / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = art.method.encode_text(ids).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    img = sess_run_image(bundle, images(3, seed=9))
    with torch.no_grad():
        np.testing.assert_allclose(img, art.method.encode_image(images(3, seed=9)).numpy(), atol=1e-4)


def backbone_tokenize(art, texts):
    return art.backbone.tokenizer()(texts)


def sess_run_image(bundle, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})[0]


def test_variant_b_export_is_refused_clearly(shapes, tmp_path):
    from export.bundle import export_bundle
    from training.artifact import load_prompt_artifact

    run = _train(shapes, tmp_path / "run", csp_variant="B")
    assert np.isfinite(run.metrics["final_loss"])
    # evaluation scores image-conditioned text too (class text encoded per image)
    assert 0.0 <= run.metrics["base_accuracy"] <= 1.0 and 0.0 <= run.metrics["new_accuracy"] <= 1.0
    cfg = json.loads((run.artifact / "prompt_config.json").read_text())
    assert cfg["method"]["capabilities"]["text_depends_on_image"] is True
    assert cfg["method"]["config"]["csp_variant"] == "B"
    art = load_prompt_artifact(run.artifact)
    assert art.method.capabilities.text_depends_on_image
    assert "csp_variant='A'" in art.method.text_image_dependency
    with pytest.raises(ExportError, match="'isp' makes text depend on the image"):
        export_bundle(art, tmp_path / "bundle", exporter="torchscript")
    assert not (tmp_path / "bundle").exists()


def test_class_normalized_probing_keeps_each_class_share(backbone):
    """The default: weights re-scaled to mean 1 within each class of the batch (the batch form times a per-class
    factor), so a class's total weight is its sample count."""
    w = torch.tensor([2.0, 1.0, 0.5, 4.0, 3.0])
    labels = torch.tensor([0, 0, 1, 2, 2])
    got = I.class_normalized_weights(w, labels, num_classes=4)  # class 3 absent: no division by zero
    torch.testing.assert_close(got, torch.tensor([4 / 3, 2 / 3, 1.0, 8 / 7, 6 / 7]))
    m = prepared(backbone, open_gates(build(backbone, probing_mode="power", probing_gamma=2.0), 0.2)).train()
    assert m.config.probing_normalize == "class"
    batch = batch_for(backbone, m)
    out = m.training_loss(batch)
    ref = prepared(backbone, open_gates(build(backbone, probing_mode="power", probing_gamma=2.0,
                                              probing_normalize="batch"), 0.2)).train()
    ref_out = ref.training_loss(batch)
    ce = F.cross_entropy(out["logits"], batch.labels, reduction="none")
    with torch.no_grad():
        f_o = F.normalize(m.vision_encoder(batch.images, None), dim=-1)
        p_zs = (m.logit_scale * f_o @ m.frozen_text.t()).softmax(-1)[torch.arange(4), batch.labels]
        w = I.class_normalized_weights((1 + (1 - p_zs)) ** 2, batch.labels, len(CLASSES))
    torch.testing.assert_close(out["loss"].detach(), (w * ce).mean(), rtol=1e-5, atol=1e-6)
    for c in batch.labels.unique():
        torch.testing.assert_close(w[batch.labels == c].sum(), (batch.labels == c).sum().float())
    assert not torch.allclose(out["loss"], ref_out["loss"])
    with pytest.raises(ValueError, match="probing_normalize"):
        I.ISPConfig(probing_normalize="x")
