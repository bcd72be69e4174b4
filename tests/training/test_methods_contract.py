"""Contract test over the method registry: every registered method honours the interface export relies on."""
from __future__ import annotations

import pytest
import torch

from promptclip_testing import TINY, tiny_method_config
from training.backbone import create_backbone
from training.errors import ConfigError, RegistryError
from training.methods import Capabilities, TrainBatch, TrainContext, create_method, get_method_class, list_methods

METHODS = list_methods()
CLASSES = ["red circle", "blue square"]


def build(name: str, **overrides):
    """A tiny method configured for two training classes from two source domains (GuiDG needs both)."""
    cfg = get_method_class(name).config_for_data({**tiny_method_config(name), **overrides}, CLASSES, ["a", "b"])
    return create_method(name, create_backbone(TINY), cfg)


def token_ids(method, names):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(method.prompt_texts(names, "a photo of a {}."))


def test_registry_lists_baselines():
    assert {"zeroshot", "coop", "ivlp"} <= set(METHODS)


def test_unknown_method_lists_known():
    with pytest.raises(RegistryError, match="known methods: .*ivlp"):
        create_method("nope", create_backbone(TINY))


def test_unknown_config_option_is_clear():
    with pytest.raises(ConfigError, match="unknown option.*valid options"):
        build("coop", n_ctxx=3)


@pytest.mark.parametrize("name", METHODS)
def test_shapes_norms_and_determinism(name):
    torch.manual_seed(0)
    m = build(name).eval()
    x = torch.randn(3, 3, 32, 32)
    ids = token_ids(m, ["red circle", "a never seen class name", "zebra"])
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(ids)
        img2, txt2 = m.encode_image(x), m.encode_text(ids)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert torch.equal(img, img2) and torch.equal(txt, txt2)
    assert isinstance(m.capabilities, Capabilities)


@pytest.mark.parametrize("name", METHODS)
def test_only_method_tensors_train(name):
    """In every training stage, the loss reaches all of that stage's trainable tensors and none of the frozen CLIP."""
    m = build(name)
    frozen_grad = [n for n, p in m.clip.named_parameters() if p.requires_grad]
    assert frozen_grad == []
    if not m.capabilities.trainable:
        assert m.trainable_parameters() == {}
        return
    ids = token_ids(m, CLASSES)
    ctx = TrainContext(classnames=CLASSES, dataset_template="a photo of a {}.", class_token_ids=ids, image_loader=None,
                       tokenize=None, device=torch.device("cpu"))
    stages = m.training_stages()
    assert stages and len({s.name for s in stages}) == len(stages)
    trained_somewhere = set()
    for stage in stages:
        m.enter_stage(stage, ctx)
        trainable = m.trainable_parameters()
        assert trainable, f"stage {stage.name} trains nothing"
        trained_somewhere |= set(trainable)
        with torch.no_grad():  # move off the init: zero-initialised gates (ISP) would give their inputs zero gradient
            for p in trainable.values():
                p.add_(0.01 * torch.randn_like(p))
        m.train()
        m.zero_grad(set_to_none=True)
        out = m.training_loss(TrainBatch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0]), ids))
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), stage.name
        others = {n for n, p in m.learned_parameters().items() if p.grad is not None} - set(trainable)
        assert not others, f"stage {stage.name} reached tensors it does not train: {sorted(others)[:5]}"
        assert all(p.grad is None for p in m.clip.parameters())
        m.end_stage(stage, ctx)
    untrained = set(m.learned_parameters()) - trained_somewhere
    assert all(n.endswith("keys") for n in untrained), f"learned tensors no stage trains: {sorted(untrained)[:5]}"


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    a, b = build(name), build(name)
    with torch.no_grad():
        for p in a.learned_parameters().values():
            p.add_(torch.randn_like(p))
    b.load_trainable_state_dict(a.trainable_state_dict())
    x = torch.randn(2, 3, 32, 32)
    ids = token_ids(a, ["a class never seen in training"])
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
        torch.testing.assert_close(a.encode_text(ids), b.encode_text(ids))
    state = a.trainable_state_dict()
    assert all(not k.startswith("clip.") for k in state)


@pytest.mark.parametrize("name", METHODS)
def test_declared_capabilities_hold(name):
    """Text embeddings that claim independence from the image really are (same output whatever the images)."""
    m = build(name).eval()
    ids = token_ids(m, ["red circle"])
    with torch.no_grad():
        t1 = m.encode_text(ids)
        m.encode_image(torch.randn(2, 3, 32, 32))
        t2 = m.encode_text(ids)
    if not m.capabilities.text_depends_on_image:
        assert torch.equal(t1, t2)


def test_ivlp_depth_beyond_backbone_is_refused():
    with pytest.raises(ConfigError, match="exceed the backbone"):
        create_method("ivlp", create_backbone(TINY), {"depth_text": 9})


def test_ivlp_parameter_count_matches_reference_formula():
    m = build("ivlp")  # depth 2 on width-64 towers, 4+4 tokens
    n = sum(p.numel() for p in m.trainable_parameters().values())
    assert n == 2 * 4 * 64 + 2 * 4 * 64


def test_zeroshot_wrappers_reproduce_open_clip():
    """Empty prompts change nothing: the wrappers equal open_clip's encode_image/encode_text."""
    bb = create_backbone(TINY)
    m = create_method("zeroshot", bb).eval()
    from open_clip.tokenizer import SimpleTokenizer

    ids = SimpleTokenizer()(["a photo of a dog.", "something else entirely", ""])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref_t = torch.nn.functional.normalize(bb.model.encode_text(ids), dim=-1)
        ref_i = torch.nn.functional.normalize(bb.model.encode_image(x), dim=-1)
        torch.testing.assert_close(m.encode_text(ids), ref_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.encode_image(x), ref_i, atol=1e-6, rtol=0)


def test_prompts_change_outputs():
    """Non-zero prompts are really inserted (an IVLP with random prompts differs from zero-shot)."""
    bb = create_backbone(TINY)
    zs = create_method("zeroshot", bb).eval()
    iv = create_method("ivlp", bb, tiny_method_config("ivlp")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(zs.encode_image(x), iv.encode_image(x), atol=1e-4)
