"""The backbone-fitting hook: ``PromptMethod.config_for_backbone`` and ``BackboneSpec.num_layers``."""
from __future__ import annotations

import dataclasses

import pytest

from promptclip_testing import TINY
from training.backbone import BackboneSpec, create_backbone, get_backbone_spec
from training.errors import ConfigError
from training.methods import PROMPT_DEPTH, create_method, get_method_class, list_methods

CLASSES = ["red circle", "blue square"]


def test_num_layers_of_the_registered_backbones():
    assert get_backbone_spec(TINY).num_layers == 2
    assert get_backbone_spec("toy-clip").num_layers == 4
    assert get_backbone_spec("ViT-B-16").num_layers == 12  # open_clip's config, read without weights


def test_num_layers_is_the_shallower_tower_or_none():
    cfg = {"embed_dim": 8, "vision_cfg": {"layers": 6}, "text_cfg": {"layers": 3}}
    assert BackboneSpec("x", "", model_cfg=cfg).num_layers == 3
    resnet = {"embed_dim": 8, "vision_cfg": {"layers": [3, 4, 6, 3]}, "text_cfg": {"layers": 12}}
    assert BackboneSpec("x", "", model_cfg=resnet).num_layers is None
    assert BackboneSpec("x", "", open_clip_name="no-such-open-clip-model").num_layers is None


def test_hook_clamps_the_defaults_that_exceed_the_backbone():
    ivlp = get_method_class("ivlp")
    assert ivlp.config_for_backbone(2) == {"depth_text": 2, "depth_vision": 2}
    assert ivlp.config_for_backbone(4) == {"depth_text": 4, "depth_vision": 4}
    assert ivlp.config_for_backbone(9) == {} and ivlp.config_for_backbone(12) == {}  # defaults fit: nothing set
    for name in ("disa", "isp"):  # the IVLP depth options are inherited, marks included
        assert get_method_class(name).config_for_backbone(2) == {"depth_text": 2, "depth_vision": 2}
    assert get_method_class("coop").config_for_backbone(2) == {}  # shallow: no depth option
    assert get_method_class("zeroshot").config_for_backbone(1) == {}


def test_hook_keeps_user_overrides_and_copies_them():
    ivlp = get_method_class("ivlp")
    user = {"depth_text": 1, "n_ctx_text": 2}
    out = ivlp.config_for_backbone(2, user)
    assert out == {"depth_text": 1, "n_ctx_text": 2, "depth_vision": 2}
    assert user == {"depth_text": 1, "n_ctx_text": 2} and out is not user  # the caller's dict is left alone
    # a value the user set is theirs, even one too deep for the backbone (building the method then says so)
    assert ivlp.config_for_backbone(2, {"depth_vision": 9}) == {"depth_vision": 9, "depth_text": 2}
    with pytest.raises(ConfigError, match="exceed the backbone"):
        create_method("ivlp", create_backbone(TINY), ivlp.config_for_backbone(2, {"depth_vision": 9}))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_hook_refuses_a_bad_layer_count(bad):
    with pytest.raises(ConfigError, match="num_layers"):
        get_method_class("ivlp").config_for_backbone(bad)


@pytest.mark.parametrize("name", list_methods())
def test_every_registered_method_fits_the_tiny_backbone(name):
    """Default configs fitted by the hook build on the 2-layer backbone: no depth option is left unmarked."""
    cls = get_method_class(name)
    for f in dataclasses.fields(cls.config_cls):
        if f.metadata.get(PROMPT_DEPTH):
            assert isinstance(f.default, int) and not isinstance(f.default, bool), f.name
    fitted = cls.config_for_backbone(get_backbone_spec(TINY).num_layers)
    method = create_method(name, create_backbone(TINY), cls.config_for_data(fitted, CLASSES, ["a", "b"]))
    for key, value in fitted.items():
        assert getattr(method.config, key) == value == 2
