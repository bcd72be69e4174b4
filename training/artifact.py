"""The prompt artifact (training -> export): a directory holding only what was learned, plus how to rebuild it.

Files:
* ``prompt_weights.safetensors``: the method-owned trainable tensors only (namespaced keys, no class-dependent
  buffers, no pickles);
* ``prompt_config.json``: format + version, method name + config, backbone (name, pretrained, weights sha256,
  init seed), prompt text template and context positions, what it was trained on, package versions;
* ``metrics.json`` and ``training_config.json`` (the full resolved config) when written by a training run.

``prompt_config.json`` is one typed model, :class:`PromptConfig`, under the one rule of
:class:`serving.format.FormatModel`: unknown keys -- and unknown options of the stored method config -- are
ignored with a warning naming them; a newer ``format_version`` is refused with a message naming it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from serving.format import FormatModel, FormatSpec, warn_unknown_keys
from training import __version__ as PROMPTCLIP_VERSION
from training.backbone import ACTIVATIONS, GELU, QUICK_GELU, Backbone, create_backbone, get_backbone_spec
from training.config import config_from_dict
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


@dataclass(frozen=True, kw_only=True)
class MethodSection:
    """The method of an artifact: its registry name, its config (the method's own dataclass as JSON) and what it
    can do."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BackboneSection:
    """How to rebuild the frozen backbone: name, weights source, their sha256 fingerprint, init seed, the
    activation it was built with and open_clip's model name (both absent in artifacts written before they were
    recorded: :func:`recorded_activation`)."""

    name: str
    pretrained: str | None
    weights_sha256: str | None = None
    init_seed: int = 0
    activation: str | None = None
    open_clip_model: str | None = None


def recorded_activation(section: BackboneSection) -> str:
    """The activation the artifact's backbone was built with: the recorded one, or for an artifact written before
    it was recorded, the one promptclip built then (QuickGELU for the registry's ViT entries, else the spec's)."""
    if section.activation is not None:
        return section.activation
    spec = get_backbone_spec(section.name)
    return QUICK_GELU if spec.legacy_quick_gelu or spec.quick_gelu else GELU


def check_rebuilt_backbone(section: BackboneSection, backbone: Backbone, *, where: str) -> None:
    """Raise :class:`ArtifactError` unless ``backbone`` is the one ``section`` records: same weights (sha256), same
    activation, same open_clip model (export refuses anything it could not rebuild identically)."""
    problems = []
    if backbone.weights_sha256 != section.weights_sha256:
        problems.append(f"the weights (sha256 {backbone.weights_sha256[:12]}) differ from the ones it was trained on "
                        f"({str(section.weights_sha256)[:12]}); pass the same weights with --pretrained")
    if backbone.activation != recorded_activation(section):
        problems.append(f"activation {backbone.activation} instead of {recorded_activation(section)}")
    if section.open_clip_model is not None and backbone.open_clip_model != section.open_clip_model:
        problems.append(f"open_clip model {backbone.open_clip_model} instead of {section.open_clip_model}")
    if problems:
        raise ArtifactError(f"the backbone rebuilt for {where} is not the one it was trained on: "
                            + "; ".join(problems))


@dataclass(frozen=True, kw_only=True)
class TextSection:
    """The prompt text: the dataset template, the method's prompt template and the learned context positions."""

    dataset_template: str
    prompt_template: str | None = None
    ctx_start: int = 1
    n_ctx: int = 0
    context_length: int | None = None


@dataclass(frozen=True, kw_only=True)
class PromptConfig(FormatModel):
    """``prompt_config.json`` of a prompt artifact, written by :func:`save_prompt_artifact` and read by
    :func:`read_prompt_config` (the one rule of :class:`serving.format.FormatModel`)."""

    SPEC: ClassVar[FormatSpec] = FormatSpec(
        format=ARTIFACT_FORMAT, what="promptclip prompt artifact", newest=ARTIFACT_FORMAT_VERSION,
        advice="upgrade promptclip (`pip install -U promptclip`), or train it again with this promptclip version",
        version_label="prompt artifact format version")

    format: str = ARTIFACT_FORMAT
    format_version: int
    method: MethodSection
    backbone: BackboneSection
    text: TextSection
    preprocessing: dict[str, Any] = field(default_factory=dict)
    trained_on: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)

    def check(self, invalid: Callable[[str], Exception]) -> None:
        """The sections the loader needs have the right types."""
        for where, value in (("method.name", self.method.name), ("backbone.name", self.backbone.name),
                             ("text.dataset_template", self.text.dataset_template)):
            if not isinstance(value, str) or not value:
                raise invalid(f"{where} must be a non-empty string, got {value!r}")
        for where, value in (("method.config", self.method.config), ("trained_on", self.trained_on)):
            if not isinstance(value, dict):
                raise invalid(f"{where} must be a JSON object, got {type(value).__name__}")


@dataclass
class PromptArtifact:
    """A loaded artifact: the rebuilt method plus its config."""

    method: PromptMethod
    backbone: Backbone
    config: PromptConfig
    path: Path

    @property
    def dataset_template(self) -> str:
        return self.config.text.dataset_template

    @property
    def classnames(self) -> list[str]:
        return list(self.config.trained_on.get("classnames", []))


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
    config = PromptConfig(
        format_version=ARTIFACT_FORMAT_VERSION,
        method=MethodSection(name=method.name, config=method.config.to_dict(),
                             capabilities=method.capabilities.__dict__.copy()),
        backbone=BackboneSection(name=backbone.name, pretrained=backbone.pretrained,
                                 weights_sha256=backbone.weights_sha256, init_seed=backbone.init_seed,
                                 activation=backbone.activation, open_clip_model=backbone.open_clip_model),
        text=TextSection(dataset_template=dataset_template, prompt_template=method.prompt_template(dataset_template),
                         ctx_start=1, n_ctx=method.n_text_ctx, context_length=backbone.context_length),
        preprocessing=dict(backbone.preprocess),
        trained_on=dict(trained_on or {}),
        versions=versions(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-artifact-", dir=out.parent))
    try:
        state = method.trainable_state_dict()
        # one key: deterministic bytes
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": f"{ARTIFACT_FORMAT}:{method.name}"})
        _write_json_atomic(tmp / CONFIG_FILE, config.to_json())
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


def read_prompt_config(path: str | os.PathLike) -> PromptConfig:
    """Read and validate ``prompt_config.json`` of an artifact directory.

    Unknown keys are ignored with one warning naming them; a newer ``format_version`` is refused with a message
    naming it and the newest this promptclip reads.
    """
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise ArtifactError(f"prompt artifact {path} does not exist or is not a directory "
                            f"(expected a folder written by 'promptclip train')")
    if not cfg_path.is_file():
        raise ArtifactError(f"{cfg_path} is missing: {path} is not a prompt artifact (written by 'promptclip train')")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({exc}); the artifact is damaged, re-run training") from exc

    def invalid(msg: str) -> ArtifactError:
        return ArtifactError(f"{cfg_path}: {msg}; the artifact is damaged or not a prompt artifact, re-run training")

    return PromptConfig.read(data, source=str(cfg_path), invalid=invalid, error=ArtifactError)


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
    method_cls = get_method_class(cfg.method.name)  # unknown method -> RegistryError with the known list
    bcfg = cfg.backbone
    activation = recorded_activation(bcfg)
    if activation not in ACTIVATIONS:
        raise ArtifactError(f"{path / CONFIG_FILE}: backbone activation {activation!r} is none this promptclip can "
                            f"build ({', '.join(ACTIVATIONS)}); upgrade promptclip or train it again")
    backbone = create_backbone(bcfg.name, pretrained or bcfg.pretrained, init_seed=int(bcfg.init_seed), device=device,
                               activation=activation)
    if check_weights:
        check_rebuilt_backbone(bcfg, backbone, where=str(path))
    # A stored config is read tolerantly (unknown options: one warning, ignored); user-given options stay strict.
    cfg_path = path / CONFIG_FILE
    method_config = config_from_dict(
        method_cls.config_cls, cfg.method.config, f"{cfg_path} method {cfg.method.name!r} config",
        on_unknown=lambda keys: warn_unknown_keys(PromptConfig.SPEC, str(cfg_path),
                                                  [f"method.config.{k}" for k in keys]))
    method = create_method(cfg.method.name, backbone, method_config)
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
