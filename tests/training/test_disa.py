"""DiSa (training/methods/disa.py) and the GPA callback (training/callbacks.py): loss terms against direct
computations on hand-made tensors, masking, frozen buffers, switches, GPA weights, and a tiny end-to-end run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from promptclip_testing import TINY, tiny_method_config
from training.backbone import create_backbone
from training.callbacks import GaussianPromptAggregation, gaussian_epoch_weights
from training.errors import ConfigError
from training.methods import TrainBatch, TrainContext, create_method
from training.methods import disa as D

CLASSES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY)


def build(backbone, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_method("disa", backbone, {**tiny_method_config("disa"), **overrides})


def data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % len(CLASSES)
    return x, y


def context(backbone, method, batch=4, template="a photo of a {}."):
    x, y = data()
    loader = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    return TrainContext(classnames=CLASSES, dataset_template=template,
                        class_token_ids=backbone.tokenizer()(method.prompt_texts(CLASSES, template)),
                        image_loader=loader, tokenize=backbone.tokenizer(), device=torch.device("cpu"))


def batch_for(backbone, method, seed=1):
    x, y = data(4, seed)
    ids = backbone.tokenizer()(method.prompt_texts(CLASSES, "a photo of a {}."))
    return TrainBatch(images=x, labels=y, class_token_ids=ids)


def randn_unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def kl_manual(p_logits, q_logits):
    """(1/B) sum_b sum_c P log(P/Q), written out."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_and_validation(backbone):
    cfg = D.DiSaConfig()
    assert (cfg.n_ctx_text, cfg.n_ctx_vision, cfg.depth_text, cfg.depth_vision) == (4, 4, 9, 9)
    assert cfg.ctx_init == "a photo of a"
    assert (cfg.sr_text_weight, cfg.sr_image_weight, cfg.sr_logit_weight) == (25.0, 10.0, 1.0)
    assert cfg.mask_ratio == 0.25 and cfg.saliency_target == "label" and cfg.dir_weight == 1.0
    assert (cfg.gpa_mean, cfg.gpa_std) == (15.0, 1.0) and cfg.use_gpa and not cfg.cir_second_term
    assert len(D.TEMPLATE_ENSEMBLE) >= 20 and all("{}" in t for t in D.TEMPLATE_ENSEMBLE)
    for bad in ({"mask_ratio": 1.0}, {"mask_ratio": -0.1}, {"gpa_std": 0.0}, {"saliency_target": "x"},
                {"sr_templates": "many"}, {"dir_weight": -1.0}, {"saliency_topk": 0}):
        with pytest.raises(ConfigError):
            D.DiSaConfig.from_dict(bad)
    assert build(backbone).capabilities == create_method("ivlp", backbone, tiny_method_config("ivlp")).capabilities


# ------------------------------------------------------------------------------------------------ pure terms
def test_sr_terms_match_direct_computation():
    f_p, f_o = randn_unit(4, 8, seed=1), randn_unit(4, 8, seed=2)
    g_p, g_sr = randn_unit(3, 8, seed=3), randn_unit(3, 8, seed=4)
    lp, lz = 100 * f_p @ g_p.t(), 100 * f_o @ g_sr.t()
    t, i, kl = D.sr_terms(f_p, g_p, f_o, g_sr, lp, lz, 25.0, 10.0, 2.0)
    torch.testing.assert_close(t, 25.0 * (g_p - g_sr).abs().mean())
    torch.testing.assert_close(i, 10.0 * (f_p - f_o).abs().mean())
    pz, pp = lz.softmax(-1), lp.softmax(-1)
    torch.testing.assert_close(kl, 2.0 * (pz * (pz.log() - pp.log())).sum() / lp.numel(), rtol=1e-4, atol=1e-6)


def test_cir_is_kl_of_masked_prompted_vs_frozen_image_cross_pairs_in_that_order():
    f_pm, f_o = randn_unit(4, 8, seed=5), randn_unit(4, 8, seed=6)
    g_o, g_p = randn_unit(3, 8, seed=7), randn_unit(3, 8, seed=8)
    s = 10.0
    got = D.cir_loss(f_pm, g_o, f_o, g_p, s)
    expected = kl_manual(s * f_pm @ g_o.t(), s * f_o @ g_p.t())  # KL(q_{f_p^m g_o} || q_{f_o g_p})
    reversed_ = kl_manual(s * f_o @ g_p.t(), s * f_pm @ g_o.t())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, reversed_, rtol=1e-3)
    assert D.cir_loss(f_pm, g_o, f_pm, g_o, s).abs() < 1e-6  # identical distributions -> 0


def test_cir_second_term_matches_direct_computation():
    f_p, f_o = randn_unit(4, 8, seed=9), randn_unit(4, 8, seed=10)
    g_p, g_o = randn_unit(3, 8, seed=11), randn_unit(3, 8, seed=12)
    got = D.cir_second_loss(f_p, g_p, f_o, g_o, 10.0)
    torch.testing.assert_close(got, kl_manual(10.0 * f_p @ g_p.t(), 10.0 * f_o @ g_o.t()), rtol=1e-5, atol=1e-7)


def test_dir_loss_direct_and_zero_when_aligned():
    protos = randn_unit(3, 8, seed=13)
    labels = torch.tensor([2, 0, 0, 1])
    f_p = randn_unit(4, 8, seed=14)
    expected = torch.stack([1 - (f_p[i] @ protos[labels[i]]) for i in range(4)]).mean()
    torch.testing.assert_close(D.dir_loss(f_p, protos, labels), expected)
    assert D.dir_loss(protos[labels], protos, labels).abs() < 1e-6
    # directional: only orientation counts (a scaled copy of the prototype direction is also aligned)
    assert D.dir_loss(3.0 * protos[labels], protos, labels).abs() < 1e-6
    torch.testing.assert_close(D.dir_loss(-protos[labels], protos, labels), torch.tensor(2.0))


def test_class_prototypes_are_normalised_class_means():
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = D.class_prototypes(feats, labels, 3)
    torch.testing.assert_close(protos[0], F.normalize(torch.tensor([0.5, 0.5, 0.0]), dim=0))
    torch.testing.assert_close(protos[1], F.normalize(torch.tensor([0.3, 0.4, 0.5]), dim=0))
    torch.testing.assert_close(protos[2], torch.zeros(3))  # class without samples
    torch.testing.assert_close(protos[:2].norm(dim=-1), torch.ones(2))


# ------------------------------------------------------------------------------------------------ masking
def test_keep_top_patches_keeps_exactly_the_most_salient_sorted():
    sal = torch.tensor([[0.1, 0.9, 0.3, 0.8, -0.2, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    keep = D.keep_top_patches(sal, 3)
    assert keep.tolist() == [[1, 3, 5], [0, 1, 2]]
    assert D.num_kept_patches(16, 0.25) == 12 and D.num_kept_patches(196, 0.25) == 147
    assert D.num_kept_patches(16, 0.0) == 16 and D.num_kept_patches(4, 0.99) == 1


def test_saliency_label_and_topk_match_direct_cosines():
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(15))
    text = torch.randn(4, 8, generator=torch.Generator().manual_seed(16))
    labels = torch.tensor([3, 1])
    sal = D.label_saliency(tokens, text, labels)
    for b in range(2):
        for j in range(5):
            torch.testing.assert_close(sal[b, j], F.cosine_similarity(tokens[b, j], text[labels[b]], dim=0))
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.0], [2.0, 0.0, 1.0, 3.0]])
    sal_k = D.topk_saliency(tokens, text, logits, 2)
    top = [[1, 2], [3, 0]]
    for b in range(2):
        for j in range(5):
            ref = torch.stack([F.cosine_similarity(tokens[b, j], text[c], dim=0) for c in top[b]]).mean()
            torch.testing.assert_close(sal_k[b, j], ref)
    assert D.topk_saliency(tokens, text, logits, 99).shape == (2, 5)  # k clamped to C


def _manual_masked_pass(method, pixels, keep):
    """The prompted vision tower written out, dropping the non-kept patch tokens by explicit row selection."""
    v = method.vision_encoder.visual
    prompts = method.vision_prompts()
    n = prompts[0].shape[0]
    x = v.conv1(pixels).flatten(2).transpose(1, 2)  # [B, P, W]
    x = torch.cat([v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], 1) + v.positional_embedding
    rows = []
    for b in range(x.shape[0]):
        idx = [0] + [1 + int(j) for j in keep[b]]
        rows.append(torch.cat([x[b, idx], prompts[0]], 0))
    x = v.ln_pre(torch.stack(rows))
    for i, block in enumerate(v.transformer.resblocks):
        if i > 0:
            x = torch.cat([x[:, :-n], prompts[i].unsqueeze(0).expand(x.shape[0], -1, -1)], 1)
        x = block(x)
    x = v.ln_post(x[:, :-n])
    return x[:, 0] @ v.proj, x[:, 1:] @ v.proj


def test_prompted_pass_with_keep_index_equals_manual_token_dropping(backbone):
    m = build(backbone).eval()
    with torch.no_grad():
        for p in m.vision_deep:
            p.normal_(0, 0.5)  # clearly non-trivial prompts
        x, _ = data(2)
        sal = torch.arange(16.0).flip(0).repeat(2, 1)
        sal[1] = torch.tensor([3.0, -1, 7, 2, 9, 0, 4, 8, 1, 5, 6, -3, 11, 10, -2, 12])
        keep = D.keep_top_patches(sal, D.num_kept_patches(16, 0.25))
        assert keep[0].tolist() == list(range(12))
        assert set(keep[1].tolist()) == {0, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 15}
        pooled, tokens = m.vision_encoder(x, m.vision_prompts(), keep_index=keep, return_tokens=True)
        ref_pooled, ref_tokens = _manual_masked_pass(m, x, keep)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens, ref_tokens, atol=1e-5, rtol=1e-5)
        full = m.vision_encoder(x, m.vision_prompts())
        all_kept = m.vision_encoder(x, m.vision_prompts(), keep_index=torch.arange(16).repeat(2, 1))
        torch.testing.assert_close(all_kept, full, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pooled, full, atol=1e-4)


# ------------------------------------------------------------------------------------------------ method
def test_prepare_training_buffers_are_frozen_targets_and_not_saved(backbone):
    m = build(backbone, frozen_text_templates="single")
    ctx = context(backbone, m, template="a photo of the {}, a shape.")
    m.prepare_training(ctx)
    tok = backbone.tokenizer()
    with torch.no_grad():
        single = F.normalize(backbone.model.encode_text(tok([f"a photo of the {c}, a shape." for c in CLASSES])),
                             dim=-1)
        raw = sum(backbone.model.encode_text(tok([t.format(c) for c in CLASSES])) for t in D.TEMPLATE_ENSEMBLE)
        ens = F.normalize(raw / len(D.TEMPLATE_ENSEMBLE), dim=-1)
        x, y = data()
        f_o = F.normalize(backbone.model.encode_image(x), dim=-1)
        protos = torch.stack([F.normalize(f_o[y == c].mean(0), dim=0) for c in range(len(CLASSES))])
    torch.testing.assert_close(m.frozen_text, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.frozen_text_sr, ens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.prototypes, protos, atol=1e-5, rtol=1e-5)
    for buf in (m.frozen_text, m.frozen_text_sr, m.prototypes):
        assert not buf.requires_grad
    saved = m.trainable_state_dict()
    assert set(saved) == set(create_method("ivlp", backbone, tiny_method_config("ivlp")).trainable_state_dict())
    assert not {"frozen_text", "frozen_text_sr", "prototypes"} & set(m.state_dict())


def test_gradients_reach_only_the_prompts(backbone):
    m = build(backbone, cir_second_term=True, saliency_target="topk")
    m.prepare_training(context(backbone, m))
    m.train()
    out = m.training_loss(batch_for(backbone, m))
    assert {"loss", "ce", "sr_text", "sr_image", "sr_logits", "cir", "cir2", "dir", "logits"} <= set(out)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters().values())
    assert all(p.grad is None for p in m.clip.parameters())
    parts = ("ce", "sr_text", "sr_image", "sr_logits", "cir", "cir2", "dir")
    torch.testing.assert_close(out["loss"].detach(), sum(out[k] for k in parts))


def test_losses_are_float32_under_autocast(backbone):
    m = build(backbone)
    m.prepare_training(context(backbone, m))
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.training_loss(batch_for(backbone, m))
    assert all(v.dtype == torch.float32 for v in out.values())
    assert torch.isfinite(out["loss"])


def _loss(backbone, state, buffers, **overrides):
    m = build(backbone, **overrides)
    m.load_trainable_state_dict(state)
    for name, value in buffers.items():  # prepare_training's result (same template options in every call)
        setattr(m, name, value)
    m.train()
    with torch.no_grad():
        return m.training_loss(batch_for(backbone, m))


def test_switching_parts_off_removes_their_term(backbone):
    ref = build(backbone)
    with torch.no_grad():
        for p in ref.trainable_parameters().values():
            p.add_(0.1 * torch.randn_like(p))
    state = ref.trainable_state_dict()
    ref.prepare_training(context(backbone, ref))
    bufs = {k: getattr(ref, k) for k in ("frozen_text", "frozen_text_sr", "prototypes")}
    full = _loss(backbone, state, bufs, cir_second_term=True)
    for switch, keys in (("use_sr", ("sr_text", "sr_image", "sr_logits")), ("use_cir", ("cir", "cir2")),
                         ("use_dir", ("dir",)), ("cir_second_term", ("cir2",))):
        off = _loss(backbone, state, bufs, **{"cir_second_term": True, switch: False})
        assert not set(keys) & set(off), switch
        removed = sum(full[k] for k in keys)
        torch.testing.assert_close(off["loss"], full["loss"] - removed, atol=1e-5, rtol=1e-5)
        for k in set(full) - set(keys) - {"loss", "logits"}:
            torch.testing.assert_close(off[k], full[k], atol=1e-6, rtol=1e-6)
    # weights scale their term
    heavy = _loss(backbone, state, bufs, cir_second_term=True, dir_weight=3.0, cir_weight=2.0)
    torch.testing.assert_close(heavy["dir"], 3.0 * full["dir"])
    torch.testing.assert_close(heavy["cir"], 2.0 * full["cir"])
    # masking off -> CIR on the unmasked view, which equals masking with ratio 0 (all patches kept)
    no_mask = _loss(backbone, state, bufs, use_masking=False)
    keep_all = _loss(backbone, state, bufs, mask_ratio=0.0)
    torch.testing.assert_close(no_mask["cir"], keep_all["cir"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(no_mask["cir"], full["cir"])
    ce_only = _loss(backbone, state, bufs, use_sr=False, use_cir=False, use_dir=False)
    assert set(ce_only) == {"loss", "ce", "logits"}
    torch.testing.assert_close(ce_only["loss"], full["ce"])


def test_unprepared_training_loss_still_works(backbone):
    m = build(backbone).train()
    out = m.training_loss(batch_for(backbone, m))
    assert torch.isfinite(out["loss"]) and "dir" in out and "cir" in out


def test_gpa_callback_is_returned_only_when_on(backbone):
    cbs = build(backbone).training_callbacks()
    assert len(cbs) == 1 and isinstance(cbs[0], GaussianPromptAggregation)
    assert (cbs[0].mean, cbs[0].std) == (15.0, 1.0)
    assert build(backbone, use_gpa=False).training_callbacks() == []


# ------------------------------------------------------------------------------------------------ GPA
class _Stub:
    """The two methods GPA uses, over hand-made tensors."""

    def __init__(self):
        self.state = {"a": torch.zeros(2), "b": torch.zeros(1, 3)}
        self.loaded = None

    def trainable_state_dict(self):
        return {k: v.clone() for k, v in self.state.items()}

    def load_trainable_state_dict(self, state):
        self.loaded = state
        self.state = {k: v.clone() for k, v in state.items()}


def _run_gpa(n_epochs, mean, std):
    cb, stub = GaussianPromptAggregation(mean, std), _Stub()
    cb.on_train_start(stub, 10)
    for epoch in range(n_epochs):  # engine epochs are 0-based
        stub.state = {"a": torch.tensor([epoch + 1.0, 2.0 * (epoch + 1)]), "b": torch.full((1, 3), (epoch + 1.0) ** 2)}
        cb.on_step_end(stub, epoch)
        cb.on_epoch_end(stub, epoch)
    cb.on_train_end(stub)
    return cb, stub


def _direct(epochs, mu, sigma):
    pdf = [math.exp(-0.5 * ((e - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for e in epochs]
    return [p / sum(pdf) for p in pdf]


@pytest.mark.parametrize("n_epochs,mean,std,mu_used", [(5, 3.0, 1.5, 3.0), (4, 2.0, 10.0, 2.0),
                                                      (3, 15.0, 1.0, 3.0), (1, 15.0, 1.0, 1.0)])
def test_gpa_equals_direct_weighted_average_including_clamping(n_epochs, mean, std, mu_used):
    cb, stub = _run_gpa(n_epochs, mean, std)
    epochs = list(range(1, n_epochs + 1))
    w = _direct(epochs, mu_used, std)
    assert cb.effective_mean == mu_used
    exp_a = sum(wi * torch.tensor([e, 2.0 * e]) for wi, e in zip(w, epochs))
    exp_b = sum(wi * torch.full((1, 3), float(e) ** 2) for wi, e in zip(w, epochs))
    torch.testing.assert_close(stub.loaded["a"], exp_a)
    torch.testing.assert_close(stub.loaded["b"], exp_b)
    assert stub.loaded["a"].dtype == torch.float32
    assert sum(cb.weights.values()) == pytest.approx(1.0)


def test_gaussian_weights_clamp_prevents_all_zero_weights():
    # unclamped, N(1; 45, 1) underflows to 0.0 in float64; clamped to the last epoch it is a proper weight
    w, mu = gaussian_epoch_weights([1], 45.0, 1.0)
    assert mu == 1.0 and w == [1.0]
    w, mu = gaussian_epoch_weights([11, 12, 13], 15.0, 1.0)  # resumed run: only the epochs seen
    assert mu == 13.0 and w == pytest.approx(_direct([11, 12, 13], 13.0, 1.0))


# ------------------------------------------------------------------------------------------------ end to end
def test_train_run_writes_saliency_figure_and_exports(tmp_path):
    from export.bundle import export_bundle
    from promptclip_testing import make_shapes
    from training.engine import TrainConfig
    from training.workflow import train_run

    root = tmp_path / "shapes"
    make_shapes(root, train_per_class=2, test_per_class=1, size=32)
    run = train_run(method_name="disa", data_root=root, out_dir=tmp_path / "run", backbone_name=TINY,
                    method_config=tiny_method_config("disa"), shots=2, progress=False,
                    train_config=TrainConfig(max_steps=2, batch_size=4, device="cpu", precision="fp32"))
    png = tmp_path / "run" / "saliency_masks.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.metrics["diagnostics"] == [str(png)]
    bundle = export_bundle(run.artifact, tmp_path / "bundle", exporter="torchscript")
    assert bundle.is_dir() and any(bundle.iterdir())
