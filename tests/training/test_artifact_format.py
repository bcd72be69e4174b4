"""The prompt artifact's prompt_config.json under the one rule of the versioned formats: unknown keys (also unknown
options of the stored method config) -> one warning naming them, the artifact still loads; a newer format version
-> a refusal naming the found and the newest known version; options a user gives stay strict."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from promptclip_testing import TINY
from serving import format as format_mod
from training.artifact import (
    ARTIFACT_FORMAT_VERSION,
    CONFIG_FILE,
    PromptConfig,
    load_prompt_artifact,
    read_prompt_config,
    save_prompt_artifact,
)
from training.backbone import create_backbone
from training.errors import ArtifactError, ConfigError
from training.methods import create_method


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(format_mod, "_warned_unknown", set())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    bb = create_backbone(TINY)
    m = create_method("coop", bb, {"n_ctx": 4})
    return save_prompt_artifact(tmp_path_factory.mktemp("art") / "art", m, bb, trained_on={"classnames": ["a", "b"]})


def _edit(path, edit) -> None:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    edit(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def _warnings(caplog, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and key in r.getMessage()]


def test_writer_and_reader_share_the_model(artifact):
    cfg = read_prompt_config(artifact)
    assert isinstance(cfg, PromptConfig)
    assert cfg.to_json() == json.loads((artifact / CONFIG_FILE).read_text())
    assert cfg.method.config["n_ctx"] == 4 and cfg.trained_on["classnames"] == ["a", "b"]


def test_unknown_keys_warn_once_and_the_artifact_loads(artifact, tmp_path, caplog):
    path = tmp_path / "art"
    shutil.copytree(artifact, path)

    def edit(cfg):
        cfg["future_section"] = {"x": 1}
        cfg["backbone"]["future_backbone_key"] = 1
        cfg["method"]["config"]["future_option"] = 3

    _edit(path, edit)
    with caplog.at_level(logging.WARNING):
        read_prompt_config(path)
        art = load_prompt_artifact(path)
        load_prompt_artifact(path)
    for key in ("future_section", "backbone.future_backbone_key", "method.config.future_option"):
        assert len(_warnings(caplog, key)) == 1, key
    assert art.method.config.n_ctx == 4 and art.classnames == ["a", "b"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert art.method.encode_image(x).shape[0] == 1


def test_newer_artifact_is_refused_naming_both_versions(artifact, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(artifact, path)
    _edit(path, lambda cfg: cfg.update(format_version=ARTIFACT_FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError) as info:
        read_prompt_config(path)
    msg = str(info.value)
    assert f"prompt artifact format version {ARTIFACT_FORMAT_VERSION + 1}" in msg
    assert f"reads up to prompt artifact format version {ARTIFACT_FORMAT_VERSION}" in msg
    assert "upgrade promptclip" in msg


def test_missing_sections_are_named(artifact, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(artifact, path)
    _edit(path, lambda cfg: (cfg.pop("text"), cfg["backbone"].pop("name")))
    with pytest.raises(ArtifactError, match=r"missing required key\(s\): backbone\.name, text.*re-run training"):
        read_prompt_config(path)


def test_user_given_unknown_options_are_still_refused():
    bb = create_backbone(TINY)
    with pytest.raises(ConfigError, match="unknown option.*future_option.*valid options"):
        create_method("coop", bb, {"n_ctx": 4, "future_option": 3})
