"""User-facing errors of the training side. All derive from :class:`serving.errors.PromptclipError`
so the CLI can print any of them as one clear line, without a traceback."""
from __future__ import annotations

from serving.errors import PromptclipError


class RegistryError(PromptclipError, KeyError):
    """Unknown or duplicate name in a registry (methods, backbones). The message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BackboneError(PromptclipError):
    """A backbone cannot be built: weights unavailable offline, a bad weights file, an unsupported tower."""


class DatasetError(PromptclipError):
    """A dataset folder or split file is missing or malformed. The message names the path and the layout."""


class ArtifactError(PromptclipError):
    """A prompt artifact is missing, malformed, or from a newer format version."""


class ConfigError(PromptclipError):
    """An invalid configuration value (method config, training config)."""


class ExportError(PromptclipError):
    """An export failed a check (ONNX checker, ORT-vs-torch parity past tolerance)."""
