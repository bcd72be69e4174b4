"""DiSa's [R] options of issue 13: CIR at PromptSRC's KL scale, class-token attention saliency, bounded masking."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptclip_testing import TINY, tiny_method_config
from training.backbone import create_backbone
from training.methods import create_method
from training.methods import disa as D


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(TINY)


def build(backbone, **overrides):
    torch.manual_seed(0)
    return create_method("disa", backbone, {**tiny_method_config("disa"), **overrides}).eval()


def test_cir_numel_reduction_is_batchmean_over_the_number_of_classes():
    g = torch.Generator().manual_seed(0)
    f_pm, f_o = (F.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2))
    g_o, g_p = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    batchmean = D.cir_loss(f_pm, g_o, f_o, g_p, 100.0, "batchmean")
    torch.testing.assert_close(D.cir_loss(f_pm, g_o, f_o, g_p, 100.0, "numel"), batchmean / 5)
    # the same scale as PromptSRC's logit KL (the L_SR term)
    torch.testing.assert_close(D.cir_loss(f_pm, g_o, f_o, g_p, 100.0, "numel"),
                               D.promptsrc_logit_kl(100.0 * f_o @ g_p.t(), 100.0 * f_pm @ g_o.t()))
    with pytest.raises(ValueError, match="reduction"):
        D.kl_rows(f_pm @ g_o.t(), f_o @ g_p.t(), "mean")
    cfg = D.DiSaConfig()
    assert cfg.cir_reduction == "numel" and cfg.saliency_source == "attention"
    for bad in ({"cir_reduction": "x"}, {"saliency_source": "x"}, {"mask_small_grid_ratio": 1.0},
                {"mask_small_grid": -1}):
        with pytest.raises(ValueError):
            D.DiSaConfig(**bad)


def test_small_grids_drop_a_bounded_fraction():
    assert D.num_kept_patches(16, 0.25, 49, 0.0625) == 15  # 4 x 4 toy grid: one patch, not four
    assert D.num_kept_patches(196, 0.25, 49, 0.0625) == 147  # ViT-B/16 at 224: the full ratio
    assert D.num_kept_patches(16, 0.25, 0, 0.0625) == 12  # the earlier rule
    assert D.num_kept_patches(16, 0.0, 49, 0.0625) == 16


def test_attention_saliency_equals_the_blocks_own_class_token_attention(backbone):
    m = build(backbone)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    block = m.vision_encoder.visual.transformer.resblocks[-1]
    seen = []
    handle = block.ln_1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        f_ref = m.frozen_image_features(x)
    handle.remove()
    _, weights = block.attn(seen[0], seen[0], seen[0], need_weights=True, average_attn_weights=True)
    f_o, sal = m.frozen_image_features_and_attention(x)
    torch.testing.assert_close(f_o, f_ref)
    torch.testing.assert_close(sal, weights[:, 0, 1:], atol=1e-5, rtol=1e-4)
    assert sal.shape == (3, m.vision_encoder.num_patches) and not block.ln_1._forward_hooks  # hook removed


@pytest.mark.parametrize("source", ["attention", "text"])
def test_masking_keeps_the_bounded_number_of_patches_from_either_source(backbone, source):
    m = build(backbone, saliency_source=source)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    m.frozen_text = F.normalize(torch.randn(3, backbone.embed_dim), dim=-1)
    keep = m.saliency_keep_index(x, torch.tensor([0, 2]))
    p = m.vision_encoder.num_patches
    assert keep.shape == (2, D.num_kept_patches(p, 0.25, 49, 0.0625))
    assert all(row.tolist() == sorted(set(row.tolist())) for row in keep)
    if source == "attention":  # the least attended patches are the dropped ones
        _, sal = m.frozen_image_features_and_attention(x)
        dropped = [sorted(set(range(p)) - set(row.tolist())) for row in keep]
        for b in range(2):
            assert sal[b, dropped[b]].max() <= sal[b, keep[b]].min()


def test_sr_l1_scale_makes_the_pull_per_unit_angle_width_independent():
    """A fixed small rotation between unit vectors costs the same scaled L1 at D = 64 and D = 512."""
    def rotated_pair(width, angle=0.05, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = F.normalize(torch.randn(256, width, generator=g), dim=-1)
        r = torch.randn(256, width, generator=g)
        r = F.normalize(r - (r * a).sum(-1, keepdim=True) * a, dim=-1)
        return a, a * torch.cos(torch.tensor(angle)) + r * torch.sin(torch.tensor(angle))

    costs = {}
    for width in (64, 512):
        a, b = rotated_pair(width)
        costs[width] = (D.sr_l1_factor(width, "width") * F.l1_loss(a, b), F.l1_loss(a, b))
    assert costs[64][1] / costs[512][1] > 2.5  # the raw mean L1: ~sqrt(8) stronger on 64-dim embeddings
    assert abs(float(costs[64][0] / costs[512][0]) - 1.0) < 0.05
    assert D.sr_l1_factor(512, "width") == 1.0 == D.sr_l1_factor(64, "none")
    assert D.DiSaConfig().sr_l1_scale == "width"
    with pytest.raises(ValueError, match="sr_l1_scale"):
        D.DiSaConfig(sr_l1_scale="x")


def test_attention_saliency_refuses_other_attention_modules_with_the_option_to_use():
    from training.errors import ConfigError

    with pytest.raises(ConfigError, match="saliency_source='text'"):
        D.cls_attention_saliency(torch.nn.Identity(), torch.zeros(1, 5, 8))
