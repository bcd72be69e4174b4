"""Reading and verifying deploy bundles (see :mod:`serving.format` for the contract).

:func:`load_bundle` refuses anything the serving stack could mis-serve -- a bundle that is too
new, incomplete, tampered with, or made by a method whose text features depend on the image --
with a :class:`~serving.errors.BundleError` that says what to do. :func:`sha256_file` is also what
``export`` uses to write the hashes, so writer and reader agree by construction.

Both bundle formats are read: format 1 (one prompt set) and format 2 (several prompt sets, e.g.
GuiDG's domain experts), which adds the top-level ``prompt_sets`` object and an ``expert_weights``
output of the image graph (see :mod:`serving.format`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BundleError
from .format import (
    BUNDLE_FORMAT,
    COMBINE_WEIGHTED_SUM,
    EXPERT_WEIGHTS_OUTPUT,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    KNOWN_MANIFEST_KEYS,
    MANIFEST_FILE,
    MULTI_SET_FORMAT_VERSION,
    READER_VERSION,
    TEXT_INPUT,
    TEXT_OUTPUT,
    class_embeddings_key,
)

if TYPE_CHECKING:
    from .preprocess import PreprocessConfig

__all__ = ["Bundle", "load_bundle", "load_class_embeddings", "sha256_file"]

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20
_HASH_PREFIX = 12
_REEXPORT = "re-export the bundle with `promptclip export`"

#: Dotted manifest keys every bundle must have (``graphs.*`` specs and, for several prompt sets,
#: ``prompt_sets`` are checked separately).
_REQUIRED_KEYS = (
    "format", "format_version", "min_reader_version", "embedding_dim", "logit_scale", "preprocessing",
    "method", "method.name", "method.capabilities", "method.capabilities.text_depends_on_image",
    "method.capabilities.num_prompt_sets",
    "text", "text.vocab_file", "text.vocab_sha256", "text.context_length", "text.templates",
    "classes", "classes.names", "classes.file", "classes.sha256",
    "graphs", "graphs.image", "graphs.text",
)
_GRAPH_SPEC_KEYS = ("file", "sha256", "inputs", "outputs")
_OBJECT_KEYS = ("method", "method.capabilities", "text", "classes", "graphs", "graphs.image", "preprocessing")

_warned_unknown_keys: set[str] = set()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified deploy bundle: its directory and parsed manifest (treat ``manifest`` as read-only)."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)

    # -- files ---------------------------------------------------------------------------------

    def graph_spec(self, kind: str, prompt_set: int = 0) -> dict[str, Any]:
        """The manifest GraphSpec of the ``"image"`` graph or of prompt set ``prompt_set``'s ``"text"`` graph."""
        graphs = self.manifest["graphs"]
        if kind == "image":
            return graphs["image"]
        if kind == "text":
            if not 0 <= prompt_set < len(graphs["text"]):
                raise IndexError(f"prompt_set {prompt_set} out of range: the bundle has {len(graphs['text'])}")
            return graphs["text"][prompt_set]
        raise ValueError(f"graph kind must be 'image' or 'text', got {kind!r}")

    def graph_path(self, kind: str, prompt_set: int = 0) -> Path:
        """Path of the ``"image"`` graph or of prompt set ``prompt_set``'s ``"text"`` graph."""
        return self.root / self.graph_spec(kind, prompt_set)["file"]

    @property
    def class_embeddings_path(self) -> Path:
        """Path of the precomputed class embeddings (safetensors)."""
        return self.root / self.manifest["classes"]["file"]

    @property
    def vocab_path(self) -> Path:
        """Path of the CLIP BPE vocabulary shipped in the bundle."""
        return self.root / self.manifest["text"]["vocab_file"]

    # -- manifest views ------------------------------------------------------------------------

    @functools.cached_property
    def preprocessing(self) -> PreprocessConfig:
        """The eval preprocessing the image graph expects."""
        from .preprocess import PreprocessConfig

        return PreprocessConfig.from_manifest(self.manifest["preprocessing"])

    @property
    def method_name(self) -> str:
        """Name of the prompt-learning method that produced the bundle."""
        return str(self.manifest["method"]["name"])

    @property
    def class_names(self) -> list[str]:
        """Class names of the precomputed embeddings, in row order."""
        return list(self.manifest["classes"]["names"])

    @property
    def templates(self) -> list[str]:
        """Text templates, one per prompt set; ``"{}"`` marks the class name."""
        return list(self.manifest["text"]["templates"])

    @property
    def context_length(self) -> int:
        """Token context length of the text graphs."""
        return int(self.manifest["text"]["context_length"])

    @property
    def embedding_dim(self) -> int:
        """Dimension D of image and text embeddings."""
        return int(self.manifest["embedding_dim"])

    @property
    def logit_scale(self) -> float:
        """Factor from cosine similarity to logit."""
        return float(self.manifest["logit_scale"])

    @property
    def num_prompt_sets(self) -> int:
        """Number of prompt sets (text graphs / class-embedding tables)."""
        return int(self.manifest["method"]["capabilities"]["num_prompt_sets"])

    @property
    def prompt_set_names(self) -> list[str]:
        """Names of the prompt sets in order (``manifest["prompt_sets"]["names"]``; ``["default"]`` for one set)."""
        prompt_sets = self.manifest.get("prompt_sets")
        if isinstance(prompt_sets, Mapping):
            return [str(n) for n in prompt_sets["names"]]
        return ["default"]

    @property
    def text_depends_on_image(self) -> bool:
        """Whether the method's text features depend on the image (never true for a loaded bundle)."""
        return bool(self.manifest["method"]["capabilities"]["text_depends_on_image"])


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
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(
            f"{str(root)!r} has no {MANIFEST_FILE}: it is not a promptclip deploy bundle (or an incomplete copy); "
            f"{_REEXPORT} or copy the whole directory."
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); {_REEXPORT}.") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}; {_REEXPORT}.")

    _check_version(manifest, manifest_path)
    _check_required(manifest, manifest_path)
    _warn_unknown_keys(manifest, manifest_path)
    _check_values(manifest, manifest_path)

    bundle = Bundle(root=root, manifest=manifest)
    bundle.preprocessing  # noqa: B018 -- validates the preprocessing object (raises BundleError)
    _check_files(bundle, verify_hashes=verify_hashes)
    _check_class_embeddings(bundle)
    logger.info(
        "loaded bundle %s: method=%s, %d classes, D=%d, %d prompt set(s)%s",
        root, bundle.method_name, len(bundle.class_names), bundle.embedding_dim, bundle.num_prompt_sets,
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
        raise BundleError(f"Cannot read class embeddings {path}: {exc}; {_REEXPORT}.") from exc
    n = bundle.num_prompt_sets
    expected = (len(bundle.class_names), bundle.embedding_dim)
    out = []
    for k in range(n):
        key = class_embeddings_key(k, n)
        if key not in tensors:
            raise BundleError(f"{path.name} has no tensor {key!r} (has {sorted(tensors)}); {_REEXPORT}.")
        arr = tensors[key]
        if arr.dtype != np.float32 or tuple(arr.shape) != expected:
            raise BundleError(
                f"{path.name}[{key!r}] is {arr.dtype} {list(arr.shape)}, expected float32 {list(expected)} "
                f"(classes x embedding_dim); {_REEXPORT}."
            )
        out.append(np.ascontiguousarray(arr))
    return out


# -- checks --------------------------------------------------------------------------------------


def _check_version(manifest: dict, manifest_path: Path) -> None:
    fmt = manifest.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(
            f"{manifest_path} has format {fmt!r}, expected {BUNDLE_FORMAT!r}: this is not a promptclip deploy bundle; "
            f"{_REEXPORT}."
        )
    needed = manifest.get("min_reader_version")
    if needed is None:
        return  # reported with the other missing keys
    if not _is_int(needed) or needed < 1:
        raise BundleError(f"{manifest_path}: min_reader_version must be a positive int, got {needed!r}; {_REEXPORT}.")
    if needed > READER_VERSION:
        raise BundleError(
            f"Bundle {manifest_path.parent} needs bundle reader version {needed}, but this promptclip reads up to "
            f"version {READER_VERSION}; upgrade promptclip (`pip install -U promptclip`) to serve it, or re-export "
            "the bundle with this promptclip version."
        )
    fv = manifest.get("format_version")
    if _is_int(fv) and fv > MULTI_SET_FORMAT_VERSION:
        logger.info("bundle format_version %s is newer than %s; reading it as version %s (min_reader_version %s)",
                    fv, MULTI_SET_FORMAT_VERSION, READER_VERSION, needed)


def _lookup(manifest: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_required(manifest: dict, manifest_path: Path) -> None:
    for key in _OBJECT_KEYS:
        found, value = _lookup(manifest, key)
        if found and not isinstance(value, Mapping):
            raise BundleError(f"{manifest_path}: {key} must be a JSON object, got {type(value).__name__}; {_REEXPORT}.")
    missing = [k for k in _REQUIRED_KEYS if not _lookup(manifest, k)[0]]
    graphs = manifest.get("graphs")
    if isinstance(graphs, Mapping):
        specs: list[tuple[str, Any]] = [("graphs.image", graphs.get("image"))]
        text = graphs.get("text")
        if isinstance(text, list):
            specs += [(f"graphs.text[{i}]", s) for i, s in enumerate(text)]
        elif text is not None:
            raise BundleError(f"{manifest_path}: graphs.text must be a list of graph specs; {_REEXPORT}.")
        for where, spec in specs:
            if isinstance(spec, Mapping):
                missing += [f"{where}.{k}" for k in _GRAPH_SPEC_KEYS if k not in spec]
            elif spec is not None:
                raise BundleError(f"{manifest_path}: {where} must be a graph spec object; {_REEXPORT}.")
    # Report only the outermost missing key of a missing subtree.
    missing = [k for k in missing if not any(k != p and k.startswith(p + ".") for p in missing)]
    if missing:
        raise BundleError(
            f"{manifest_path} is missing required key(s): {', '.join(missing)}; the bundle is incomplete or was "
            f"written by an incompatible exporter -- {_REEXPORT}."
        )


def _warn_unknown_keys(manifest: dict, manifest_path: Path) -> None:
    unknown = sorted(set(manifest) - KNOWN_MANIFEST_KEYS - _warned_unknown_keys)
    if unknown:
        _warned_unknown_keys.update(unknown)
        logger.warning(
            "%s has top-level key(s) this reader does not know and ignores: %s (written by a newer exporter?)",
            manifest_path, ", ".join(unknown),
        )


def _check_values(m: dict, manifest_path: Path) -> None:
    def bad(msg: str) -> BundleError:
        return BundleError(f"{manifest_path}: {msg}; {_REEXPORT}.")

    caps = m["method"]["capabilities"]
    if caps["text_depends_on_image"]:
        raise BundleError(
            f"Bundle {manifest_path.parent} was made by method {m['method'].get('name')!r}, whose text features "
            "depend on the image (text_depends_on_image: true). This reader serves only methods whose class "
            "embeddings can be precomputed; serve it with the torch pipeline instead, or export a method with "
            "image-independent text prompts."
        )
    n = caps["num_prompt_sets"]
    if not _is_int(n) or n < 1:
        raise bad(f"method.capabilities.num_prompt_sets must be a positive int, got {n!r}")
    if not _is_int(m["embedding_dim"]) or m["embedding_dim"] < 1:
        raise bad(f"embedding_dim must be a positive int, got {m['embedding_dim']!r}")
    scale = m["logit_scale"]
    if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
        raise bad(f"logit_scale must be a positive finite number, got {scale!r}")

    text = m["text"]
    if text.get("tokenizer", "clip-bpe") != "clip-bpe":
        raise bad(f"text.tokenizer {text.get('tokenizer')!r} is not supported (only 'clip-bpe')")
    if not _is_int(text["context_length"]) or text["context_length"] < 2:
        raise bad(f"text.context_length must be an int >= 2, got {text['context_length']!r}")
    templates = text["templates"]
    if not isinstance(templates, list) or len(templates) != n:
        raise bad(f"text.templates must be a list of {n} template(s) (one per prompt set), got {templates!r}")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise bad(f"every text template must be a string containing '{{}}', got {t!r}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise bad(f"text template {t!r} is not a valid format string ({exc})") from exc

    names = m["classes"]["names"]
    if not isinstance(names, list) or not names or not all(isinstance(s, str) and s for s in names):
        raise bad("classes.names must be a non-empty list of non-empty strings")
    if len(set(names)) != len(names):
        dups = sorted({s for s in names if names.count(s) > 1})[:5]
        raise bad(f"classes.names has duplicates: {dups}")

    graphs = m["graphs"]
    if len(graphs["text"]) != n:
        raise bad(f"graphs.text has {len(graphs['text'])} graph(s) but num_prompt_sets is {n}")
    _check_io(graphs["image"], "graphs.image", IMAGE_INPUT, "float32", IMAGE_OUTPUT, bad)
    for i, spec in enumerate(graphs["text"]):
        _check_io(spec, f"graphs.text[{i}]", TEXT_INPUT, "int64", TEXT_OUTPUT, bad)
    _check_prompt_sets(m, n, bad)


def _check_prompt_sets(m: dict, n: int, bad) -> None:
    """Format 2: ``prompt_sets`` and the image graph's ``expert_weights`` output, required when ``n > 1``."""
    prompt_sets = m.get("prompt_sets")
    if prompt_sets is None:
        if n > 1:
            raise bad(f"prompt_sets is missing: a bundle with {n} prompt sets (format {MULTI_SET_FORMAT_VERSION}) "
                      f"needs prompt_sets = {{names: [{n} names], combine: {COMBINE_WEIGHTED_SUM!r}}}")
    else:
        # Optional for one prompt set, but checked when present.
        if not isinstance(prompt_sets, Mapping):
            raise bad(f"prompt_sets must be a JSON object, got {type(prompt_sets).__name__}")
        names = prompt_sets.get("names")
        if (not isinstance(names, list) or len(names) != n
                or not all(isinstance(s, str) and s.strip() for s in names)):
            raise bad(f"prompt_sets.names must be a list of {n} non-empty strings (one per prompt set, "
                      f"num_prompt_sets is {n}), got {names!r}")
        if len(set(names)) != len(names):
            raise bad(f"prompt_sets.names has duplicates: {sorted({s for s in names if names.count(s) > 1})}")
        combine = prompt_sets.get("combine")
        if combine != COMBINE_WEIGHTED_SUM:
            raise bad(f"prompt_sets.combine is {combine!r}; this reader only knows {COMBINE_WEIGHTED_SUM!r}")
    if n > 1:
        outputs = m["graphs"]["image"]["outputs"]
        outputs = outputs if isinstance(outputs, list) else []
        spec = next((x for x in outputs if isinstance(x, Mapping) and x.get("name") == EXPERT_WEIGHTS_OUTPUT), None)
        if spec is None:
            raise bad(f"graphs.image.outputs has no output named {EXPERT_WEIGHTS_OUTPUT!r}: a bundle with {n} "
                      "prompt sets needs the per-image weights of its prompt sets")
        if spec.get("dtype", "float32") != "float32":
            raise bad(f"graphs.image output {EXPERT_WEIGHTS_OUTPUT!r} has dtype {spec.get('dtype')!r}, "
                      "expected 'float32'")


def _check_io(spec: Mapping, where: str, input_name: str, input_dtype: str, output_name: str, bad) -> None:
    def by_name(items: Any, name: str) -> Mapping | None:
        if not isinstance(items, list):
            return None
        return next((x for x in items if isinstance(x, Mapping) and x.get("name") == name), None)

    inp = by_name(spec["inputs"], input_name)
    if inp is None:
        raise bad(f"{where}.inputs has no input named {input_name!r}")
    if inp.get("dtype") != input_dtype:
        raise bad(f"{where} input {input_name!r} has dtype {inp.get('dtype')!r}, expected {input_dtype!r}")
    if by_name(spec["outputs"], output_name) is None:
        raise bad(f"{where}.outputs has no output named {output_name!r}")


def _resolve_inside(root: Path, rel: Any, key: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"manifest {key} must be a file name inside the bundle, got {rel!r}; {_REEXPORT}.")
    return root / rel


def _check_files(bundle: Bundle, *, verify_hashes: bool) -> None:
    m, root = bundle.manifest, bundle.root
    entries: list[tuple[str, Any, Any]] = [
        ("graphs.image", m["graphs"]["image"]["file"], m["graphs"]["image"]["sha256"]),
        *((f"graphs.text[{i}]", s["file"], s["sha256"]) for i, s in enumerate(m["graphs"]["text"])),
        ("classes", m["classes"]["file"], m["classes"]["sha256"]),
        ("text.vocab_file", m["text"]["vocab_file"], m["text"]["vocab_sha256"]),
    ]
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
            f"bundle directory or {_REEXPORT}."
        )
    if not verify_hashes:
        logger.warning("bundle %s: sha256 verification disabled; tampered or truncated files will not be detected",
                       root)
        return
    for path, expected in resolved:
        if not isinstance(expected, str) or len(expected) != 64:
            raise BundleError(f"manifest sha256 for {path.name} is not a hex SHA-256 digest: {expected!r}; {_REEXPORT}.")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise BundleError(
                f"sha256 mismatch for {path.name}: the manifest expects {expected[:_HASH_PREFIX]}..., the file has "
                f"{actual[:_HASH_PREFIX]}...; the file was modified, truncated or replaced -- restore the original "
                f"bundle or {_REEXPORT}."
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
                    raise BundleError(f"{path.name} has no tensor {key!r} (has {sorted(keys)}); {_REEXPORT}.")
                sl = fh.get_slice(key)
                shape, dtype = list(sl.get_shape()), sl.get_dtype()
                if shape != expected or dtype != "F32":
                    detail = (
                        f"{shape[0]} rows for {expected[0]} class names" if len(shape) == 2 and shape[0] != expected[0]
                        else f"shape {shape} dtype {dtype}, expected {expected} F32"
                    )
                    raise BundleError(
                        f"{path.name}[{key!r}] does not match the manifest: {detail} (classes.names x embedding_dim); "
                        f"{_REEXPORT}."
                    )
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"Cannot read class embeddings {path}: {exc}; {_REEXPORT}.") from exc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
