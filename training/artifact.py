"""The prompt artifact (training -> export): a directory holding only what was learned, plus how to rebuild it.

Files:
* ``prompt_weights.safetensors``: the method-owned trainable tensors only (namespaced keys, no class-dependent
  buffers, no pickles);
* ``prompt_config.json``: format + version, method name + config, backbone (name, pretrained, weights sha256,
  init seed), prompt text template and context positions, what it was trained on, package versions;
* ``metrics.json`` and ``training_config.json`` (the full resolved config) when written by a training run.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from training import __version__ as PROMPTCLIP_VERSION
from training.backbone import Backbone, create_backbone
from training.errors import ArtifactError
from training.methods import PromptMethod, create_method, get_method_class

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "promptclip.prompt"
ARTIFACT_FORMAT_VERSION = 1
WEIGHTS_FILE = "prompt_weights.safetensors"
CONFIG_FILE = "prompt_config.json"
METRICS_FILE = "metrics.json"
TRAINING_CONFIG_FILE = "training_config.json"


def versions() -> dict[str, str]:
    """Versions of the packages that shaped an artifact (informative)."""
    import open_clip

    return {"promptclip": PROMPTCLIP_VERSION, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


@dataclass
class PromptArtifact:
    """A loaded artifact: the rebuilt method plus its config."""

    method: PromptMethod
    backbone: Backbone
    config: dict[str, Any]
    path: Path

    @property
    def dataset_template(self) -> str:
        return self.config["text"]["dataset_template"]

    @property
    def classnames(self) -> list[str]:
        return list(self.config.get("trained_on", {}).get("classnames", []))


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_prompt_artifact(
    out_dir: str | os.PathLike,
    method: PromptMethod,
    backbone: Backbone,
    *,
    dataset_template: str = "a photo of a {}.",
    trained_on: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``method``'s artifact to ``out_dir`` (written to a temp dir first, then moved into place)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    config = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "method": {"name": method.name, "config": method.config.to_dict(),
                   "capabilities": method.capabilities.__dict__.copy()},
        "backbone": {"name": backbone.name, "pretrained": backbone.pretrained,
                     "weights_sha256": backbone.weights_sha256, "init_seed": backbone.init_seed},
        "text": {"dataset_template": dataset_template, "prompt_template": method.prompt_template(dataset_template),
                 "ctx_start": 1, "n_ctx": method.n_text_ctx, "context_length": backbone.context_length},
        "preprocessing": backbone.preprocess,
        "trained_on": dict(trained_on or {}),
        "versions": versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-artifact-", dir=out.parent))
    try:
        state = method.trainable_state_dict()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": f"{ARTIFACT_FORMAT}:{method.name}"})  # one key: deterministic bytes
        _write_json_atomic(tmp / CONFIG_FILE, config)
        if metrics is not None:
            _write_json_atomic(tmp / METRICS_FILE, dict(metrics))
        if training_config is not None:
            _write_json_atomic(tmp / TRAINING_CONFIG_FILE, dict(training_config))
        if out.exists():
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prompt artifact written to %s (%d tensors, %d parameters)", out, len(state),
             sum(v.numel() for v in state.values()))
    return out


def read_prompt_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``prompt_config.json`` of an artifact directory."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise ArtifactError(f"prompt artifact {path} does not exist or is not a directory "
                            f"(expected a folder written by 'promptclip train')")
    if not cfg_path.is_file():
        raise ArtifactError(f"{cfg_path} is missing: {path} is not a prompt artifact (written by 'promptclip train')")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({exc}); the artifact is damaged, re-run training") from exc
    if cfg.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{cfg_path}: format is {cfg.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    if int(cfg.get("format_version", 0)) > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{cfg_path} has format_version {cfg.get('format_version')}, newer than this promptclip reads "
            f"({ARTIFACT_FORMAT_VERSION}); upgrade promptclip"
        )
    for key in ("method", "backbone", "text"):
        if key not in cfg:
            raise ArtifactError(f"{cfg_path} lacks the {key!r} section; the artifact is damaged, re-run training")
    return cfg


def load_prompt_artifact(
    path: str | os.PathLike,
    *,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    check_weights: bool = True,
) -> PromptArtifact:
    """Rebuild the backbone and method of an artifact and load its trained tensors.

    Args:
        pretrained: where to find the backbone weights when the recorded source is not available here (e.g. a
            local file instead of the ``openai`` tag); their sha256 fingerprint must match the recorded one.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_prompt_config(path)
    get_method_class(cfg["method"]["name"])  # unknown method -> RegistryError with the known list
    bcfg = cfg["backbone"]
    backbone = create_backbone(bcfg["name"], pretrained or bcfg["pretrained"], init_seed=int(bcfg.get("init_seed", 0)),
                               device=device)
    if check_weights and backbone.weights_sha256 != bcfg.get("weights_sha256"):
        raise ArtifactError(
            f"the backbone weights loaded for {path} (sha256 {backbone.weights_sha256[:12]}) differ from the ones it "
            f"was trained on ({str(bcfg.get('weights_sha256'))[:12]}); pass the same weights with --pretrained"
        )
    method = create_method(cfg["method"]["name"], backbone, cfg["method"].get("config"))
    wpath = path / WEIGHTS_FILE
    if not wpath.is_file():
        raise ArtifactError(f"{wpath} is missing; the artifact is incomplete, re-run training")
    try:
        state = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ArtifactError(f"{wpath} cannot be read ({exc}); the artifact is damaged, re-run training") from exc
    method.load_trainable_state_dict(state)
    method.to(device).eval()
    return PromptArtifact(method=method, backbone=backbone, config=cfg, path=path)
