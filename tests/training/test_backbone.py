from __future__ import annotations

import logging

import pytest
import torch

from training.backbone import create_backbone, list_backbones, save_backbone_weights
from training.errors import BackboneError, RegistryError


def test_registry_lists_real_and_tiny():
    names = list_backbones()
    assert "ViT-B-16" in names and "tiny-test" in names


def test_unknown_backbone_lists_known():
    with pytest.raises(RegistryError, match="known backbones: .*ViT-B-16"):
        create_backbone("ViT-Z-99")


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        bb = create_backbone("tiny-test", "none")
    assert "RANDOM weights" in caplog.text
    assert "RANDOM" in bb.describe_weights()


def test_random_init_is_reproducible_by_seed():
    a = create_backbone("tiny-test", init_seed=3)
    b = create_backbone("tiny-test", init_seed=3)
    c = create_backbone("tiny-test", init_seed=4)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256


def test_offline_openai_tag_gives_one_clear_error(monkeypatch):
    """No weights can be downloaded here: the error names the local-file option (never random weights)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"--pretrained /path/to/ViT-B-32\.pt"):
        create_backbone("ViT-B-32", "openai")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(BackboneError, match="known tags: .*openai"):
        create_backbone("ViT-B-32", "not-a-tag")


def test_local_weights_file_round_trip(tmp_path):
    src = create_backbone("tiny-test", init_seed=7)
    path = save_backbone_weights(src, tmp_path / "tiny.safetensors")
    loaded = create_backbone("tiny-test", str(path), init_seed=0)
    assert loaded.weights_sha256 == src.weights_sha256
    assert loaded.pretrained == str(path)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_missing_or_bad_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("tiny-test", str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="could not load weights file"):
        create_backbone("tiny-test", str(bad))
    other = create_backbone("tiny-test")
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(BackboneError):
        create_backbone("tiny-test", str(wrong))
    assert other.model is not None


def test_preprocess_recorded_with_weights():
    bb = create_backbone("tiny-test")
    assert bb.preprocess["image_size"] == [32, 32]
    assert bb.preprocess["interpolation"] == "bicubic" and len(bb.preprocess["mean"]) == 3
