"""Backbones are built as open_clip builds them: the activation comes from the weights, is recorded in the artifact
and the manifest, and a bundle matches open_clip's own model on the same weights file and images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.bundle import export_bundle
from training.artifact import load_prompt_artifact, save_prompt_artifact
from training.backbone import (
    GELU,
    QUICK_GELU,
    TINY_TEST_CFG,
    create_backbone,
    get_backbone_spec,
    model_activation,
    weights_activation,
)
from training.errors import ArtifactError, BackboneError, ExportError
from training.methods import create_method


@pytest.mark.parametrize("name,pretrained,expected", [
    ("ViT-B-16", "openai", QUICK_GELU),            # open_clip's pretrained config: OpenAI trained with QuickGELU
    ("ViT-B-16", "laion2b_s34b_b88k", GELU),
    ("ViT-B-16-quickgelu", "metaclip_400m", QUICK_GELU),
    ("ViT-L-14", "openai", QUICK_GELU),
    ("ViT-B-16", "/no/such/file.safetensors", GELU),  # a file (or none): as the named model says
    ("ViT-B-16-quickgelu", "none", QUICK_GELU),
    ("tiny-test", "none", GELU),
    ("tiny-test-quickgelu", "none", QUICK_GELU),
])
def test_activation_comes_from_the_weights(name, pretrained, expected):
    import open_clip

    spec = get_backbone_spec(name)
    assert weights_activation(spec, pretrained) == expected
    tag = open_clip.get_pretrained_cfg(spec.open_clip_name or "", pretrained)
    if tag:  # the same answer as open_clip's own metadata for those weights
        assert tag.get("quick_gelu", False) == (expected == QUICK_GELU)


def test_any_open_clip_model_name_is_a_backbone():
    spec = get_backbone_spec("ViT-B-32-quickgelu")
    assert spec.open_clip_name == "ViT-B-32-quickgelu" and spec.num_layers == 12
    bb = create_backbone("ViT-B-32-quickgelu", "none")
    assert bb.activation == model_activation(bb.model) == QUICK_GELU and bb.open_clip_model == "ViT-B-32-quickgelu"
    assert "quick_gelu" in bb.describe_weights()


def _open_clip_weights_file(tmp_path, quick_gelu: bool, seed: int = 3):
    """A random-init open_clip CLIP of the tiny config saved as a local safetensors file (no download)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_TEST_CFG, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # open_clip zero-initialises some tensors; make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / f"tiny-{'quickgelu' if quick_gelu else 'gelu'}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _images(n: int = 6):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("backbone,quick_gelu", [("tiny-test", False), ("tiny-test-quickgelu", True)])
def test_bundle_matches_open_clip_on_the_same_weights_file(tmp_path, backbone, quick_gelu):
    """Bundle image/text embeddings vs open_clip's encode_image/encode_text on the same file and images."""
    import onnxruntime as ort
    import open_clip
    from safetensors.numpy import load_file

    from serving.manifest import read_manifest
    from serving.preprocess import PreprocessConfig, preprocess

    ref, path = _open_clip_weights_file(tmp_path, quick_gelu)
    bb = create_backbone(backbone, str(path))
    assert bb.activation == (QUICK_GELU if quick_gelu else GELU)
    method = create_method("zeroshot", bb, {})
    names = ["red circle", "blue square", "green star"]
    art = save_prompt_artifact(tmp_path / "art", method, bb, trained_on={"classnames": names})
    assert json.loads((art / "prompt_config.json").read_text())["backbone"]["activation"] == bb.activation
    bundle = export_bundle(art, tmp_path / "bundle", class_names=names, exporter="torchscript")
    manifest, raw = read_manifest(bundle)
    assert manifest.backbone.activation == raw["backbone"]["activation"] == bb.activation

    pixels = preprocess(_images(), PreprocessConfig.from_manifest(manifest.preprocessing.to_json()))
    sess = ort.InferenceSession(str(bundle / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got_img = sess.run(None, {"pixel_values": pixels})[0]
    got_txt = load_file(str(bundle / "class_embeddings.safetensors"))["class_embeddings"]
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        tokens = open_clip.tokenize([manifest.text.templates[0].format(n) for n in names])
        want_txt = ref.encode_text(tokens, normalize=True).numpy()
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
    assert cos(got_img, want_img).min() >= 0.99999 and cos(got_txt, want_txt).min() >= 0.99999
    # the other activation on the same weights is measurably different (the test can fail)
    other = open_clip.model.CLIP(**TINY_TEST_CFG, quick_gelu=not quick_gelu).eval()
    other.load_state_dict(ref.state_dict())
    with torch.no_grad():
        wrong = other.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    assert cos(got_img, wrong).min() < cos(got_img, want_img).min()


def test_old_artifacts_rebuild_with_their_activation_and_export_refuses_a_mismatch(tmp_path):
    bb = create_backbone("tiny-test")
    art = save_prompt_artifact(tmp_path / "art", create_method("coop", bb, {"n_ctx": 4}), bb)
    cfg_path = art / "prompt_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["backbone"]["activation"] == GELU and cfg["backbone"]["open_clip_model"] is None
    del cfg["backbone"]["activation"], cfg["backbone"]["open_clip_model"]  # as written before they were recorded
    cfg_path.write_text(json.dumps(cfg))
    assert load_prompt_artifact(art).backbone.activation == GELU
    from training.artifact import BackboneSection, recorded_activation

    assert recorded_activation(BackboneSection(name="ViT-B-16", pretrained="openai")) == QUICK_GELU  # as then
    cfg["backbone"]["activation"] = "swish"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="activation 'swish'"):
        load_prompt_artifact(art)
    loaded = load_prompt_artifact(_with_activation(cfg_path, cfg, GELU))
    loaded.backbone.activation = QUICK_GELU  # a backbone that is not the one the prompts were trained on
    with pytest.raises(ExportError, match="refusing to export.*activation quick_gelu instead of gelu"):
        export_bundle(loaded, tmp_path / "bundle", exporter="torchscript")
    with pytest.raises(BackboneError, match="unknown activation"):
        create_backbone("tiny-test", activation="relu")


def _with_activation(cfg_path, cfg, activation):
    cfg["backbone"]["activation"] = activation
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path.parent
