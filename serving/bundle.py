"""Reading and verifying deploy bundles (see :mod:`serving.format` for the contract).

:func:`load_bundle` reads the manifest through its typed model (:func:`serving.manifest.read_manifest`) and
refuses anything the serving stack could mis-serve -- a bundle that is too new, incomplete, tampered with, or
made by a method whose text features depend on the image -- with a :class:`~serving.errors.BundleError` that
says what to do. :func:`sha256_file` (from :mod:`serving.manifest`) is also what ``export`` uses to write the
hashes, so writer and reader agree by construction.

Both bundle formats are read: format 1 (one prompt set) and format 2 (several prompt sets, e.g.
GuiDG's domain experts), which adds the top-level ``prompt_sets`` object and an ``expert_weights``
output of the image graph (see :mod:`serving.format`).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError
from .format import class_embeddings_key
from .manifest import REEXPORT, BundleManifest, GraphSpec, read_manifest, sha256_file
from .open_set import Calibration, load_calibration
from .preprocess import PreprocessConfig

__all__ = ["Bundle", "load_bundle", "load_class_embeddings", "sha256_file"]

logger = logging.getLogger(__name__)

_HASH_PREFIX = 12


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified deploy bundle: its directory, its typed manifest and the manifest JSON as read (read-only)."""

    root: Path
    model: BundleManifest = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)

    # -- files ---------------------------------------------------------------------------------

    def graph_spec(self, kind: str, prompt_set: int = 0) -> GraphSpec:
        """The manifest GraphSpec of the ``"image"`` graph or of prompt set ``prompt_set``'s ``"text"`` graph."""
        graphs = self.model.graphs
        if kind == "image":
            return graphs.image
        if kind == "text":
            if not 0 <= prompt_set < len(graphs.text):
                raise IndexError(f"prompt_set {prompt_set} out of range: the bundle has {len(graphs.text)}")
            return graphs.text[prompt_set]
        raise ValueError(f"graph kind must be 'image' or 'text', got {kind!r}")

    def graph_path(self, kind: str, prompt_set: int = 0) -> Path:
        """Path of the ``"image"`` graph or of prompt set ``prompt_set``'s ``"text"`` graph."""
        return self.root / self.graph_spec(kind, prompt_set).file

    @property
    def class_embeddings_path(self) -> Path:
        """Path of the precomputed class embeddings (safetensors)."""
        return self.root / self.model.classes.file

    @property
    def vocab_path(self) -> Path:
        """Path of the CLIP BPE vocabulary shipped in the bundle."""
        return self.root / self.model.text.vocab_file

    # -- manifest views ------------------------------------------------------------------------

    @functools.cached_property
    def preprocessing(self) -> PreprocessConfig:
        """The eval preprocessing the image graph expects."""
        return self.model.preprocessing.config()

    @property
    def method_name(self) -> str:
        """Name of the prompt-learning method that produced the bundle."""
        return str(self.model.method.name)

    @property
    def backbone_name(self) -> str | None:
        """Name of the CLIP backbone, when the manifest records it."""
        return self.model.backbone.name if self.model.backbone is not None else None

    @property
    def class_names(self) -> list[str]:
        """Class names of the precomputed embeddings, in row order."""
        return list(self.model.classes.names)

    @property
    def templates(self) -> list[str]:
        """Text templates, one per prompt set; ``"{}"`` marks the class name."""
        return list(self.model.text.templates)

    @property
    def context_length(self) -> int:
        """Token context length of the text graphs."""
        return int(self.model.text.context_length)

    @property
    def embedding_dim(self) -> int:
        """Dimension D of image and text embeddings."""
        return int(self.model.embedding_dim)

    @property
    def logit_scale(self) -> float:
        """Factor from cosine similarity to logit."""
        return float(self.model.logit_scale)

    @property
    def num_prompt_sets(self) -> int:
        """Number of prompt sets (text graphs / class-embedding tables)."""
        return self.model.num_prompt_sets

    @property
    def prompt_set_names(self) -> list[str]:
        """Names of the prompt sets in order (``prompt_sets.names``; ``["default"]`` for one set without them)."""
        prompt_sets = self.model.prompt_sets
        if prompt_sets is not None and prompt_sets.names is not None:
            return [str(n) for n in prompt_sets.names]
        return ["default"]

    @functools.cached_property
    def calibration(self) -> Calibration | None:
        """The held-out calibration images (:mod:`serving.open_set`), or None for a bundle exported without them
        (open-set fields are then null)."""
        info = self.model.calibration
        if info is None:
            return None
        return load_calibration(self.root / info.file, num_sets=self.num_prompt_sets, dim=self.embedding_dim,
                                class_names=self.class_names, keep_rate=info.keep_rate, rule=info.default_rule)

    @property
    def text_depends_on_image(self) -> bool:
        """Whether the method's text features depend on the image (never true for a loaded bundle)."""
        return bool(self.model.method.capabilities.text_depends_on_image)


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """Read, validate and (by default) hash-check the deploy bundle in directory ``path``.

    Raises:
        BundleError: the bundle is missing, malformed, too new for this reader, fails a hash or
            shape check, or needs image-dependent text features (not servable here).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise BundleError(
            f"Bundle directory {str(root)!r} {what}; pass the directory written by `promptclip export`."
        )
    root = root.resolve()
    model, raw = read_manifest(root)
    if model.method.capabilities.text_depends_on_image:
        raise BundleError(
            f"Bundle {root} was made by method {model.method.name!r}, whose text features depend on the image "
            "(text_depends_on_image: true). This reader serves only methods whose class embeddings can be "
            "precomputed; serve it with the torch pipeline instead, or export a method with image-independent "
            "text prompts."
        )
    bundle = Bundle(root=root, model=model, manifest=raw)
    _check_files(bundle, verify_hashes=verify_hashes)
    _check_class_embeddings(bundle)
    calibration = bundle.calibration  # checked now (shapes, labels), not at the first request
    logger.info(
        "loaded bundle %s: method=%s, %d classes, D=%d, %d prompt set(s), %s%s",
        root, bundle.method_name, len(bundle.class_names), bundle.embedding_dim, bundle.num_prompt_sets,
        f"{calibration.num_images} calibration images" if calibration is not None
        else "no calibration (open-set answers are null)",
        "" if verify_hashes else " (hashes NOT verified)",
    )
    return bundle


def load_class_embeddings(bundle: Bundle) -> list[np.ndarray]:
    """Precomputed class embeddings: one C-contiguous float32 ``[C, D]`` array per prompt set."""
    from safetensors.numpy import load_file

    path = bundle.class_embeddings_path
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise BundleError(f"Cannot read class embeddings {path}: {exc}; {REEXPORT}.") from exc
    n = bundle.num_prompt_sets
    expected = (len(bundle.class_names), bundle.embedding_dim)
    out = []
    for k in range(n):
        key = class_embeddings_key(k, n)
        if key not in tensors:
            raise BundleError(f"{path.name} has no tensor {key!r} (has {sorted(tensors)}); {REEXPORT}.")
        arr = tensors[key]
        if arr.dtype != np.float32 or tuple(arr.shape) != expected:
            raise BundleError(
                f"{path.name}[{key!r}] is {arr.dtype} {list(arr.shape)}, expected float32 {list(expected)} "
                f"(classes x embedding_dim); {REEXPORT}."
            )
        out.append(np.ascontiguousarray(arr))
    return out


# -- checks --------------------------------------------------------------------------------------


def _resolve_inside(root: Path, rel: Any, key: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"manifest {key} must be a file name inside the bundle, got {rel!r}; {REEXPORT}.")
    return root / rel


def _check_files(bundle: Bundle, *, verify_hashes: bool) -> None:
    m, root = bundle.model, bundle.root
    entries: list[tuple[str, Any, Any]] = [
        ("graphs.image", m.graphs.image.file, m.graphs.image.sha256),
        *((f"graphs.text[{i}]", s.file, s.sha256) for i, s in enumerate(m.graphs.text)),
        ("classes", m.classes.file, m.classes.sha256),
        ("text.vocab_file", m.text.vocab_file, m.text.vocab_sha256),
    ]
    if m.calibration is not None:
        entries.append(("calibration", m.calibration.file, m.calibration.sha256))
    missing = []
    resolved = []
    for key, rel, expected in entries:
        path = _resolve_inside(root, rel, f"{key} file")
        if not path.is_file():
            missing.append(rel)
        resolved.append((path, expected))
    if missing:
        raise BundleError(
            f"Bundle {root} is missing file(s) named in its manifest: {', '.join(missing)}; copy the complete "
            f"bundle directory or {REEXPORT}."
        )
    if not verify_hashes:
        logger.warning("bundle %s: sha256 verification disabled; tampered or truncated files will not be detected",
                       root)
        return
    for path, expected in resolved:
        if not isinstance(expected, str) or len(expected) != 64:
            raise BundleError(f"manifest sha256 for {path.name} is not a hex SHA-256 digest: {expected!r}; {REEXPORT}.")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise BundleError(
                f"sha256 mismatch for {path.name}: the manifest expects {expected[:_HASH_PREFIX]}..., the file has "
                f"{actual[:_HASH_PREFIX]}...; the file was modified, truncated or replaced -- restore the original "
                f"bundle or {REEXPORT}."
            )


def _check_class_embeddings(bundle: Bundle) -> None:
    """Check keys, dtype and shape from the safetensors header (cheap: no tensor data is read)."""
    from safetensors import safe_open

    path = bundle.class_embeddings_path
    n = bundle.num_prompt_sets
    expected = [len(bundle.class_names), bundle.embedding_dim]
    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = set(fh.keys())
            for k in range(n):
                key = class_embeddings_key(k, n)
                if key not in keys:
                    raise BundleError(f"{path.name} has no tensor {key!r} (has {sorted(keys)}); {REEXPORT}.")
                sl = fh.get_slice(key)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if shape != expected or dtype != "F32":
                    detail = (
                        f"{shape[0]} rows for {expected[0]} class names" if len(shape) == 2 and shape[0] != expected[0]
                        else f"shape {shape} dtype {dtype}, expected {expected} F32"
                    )
                    raise BundleError(
                        f"{path.name}[{key!r}] does not match the manifest: {detail} (classes.names x embedding_dim); "
                        f"{REEXPORT}."
                    )
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"Cannot read class embeddings {path}: {exc}; {REEXPORT}.") from exc

