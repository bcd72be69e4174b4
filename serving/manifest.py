"""The bundle manifest as one typed model, written by ``export`` and read by :mod:`serving.bundle`.

:class:`BundleManifest` mirrors ``manifest.json`` (keys documented in :mod:`serving.format`). The writer builds one
and calls :func:`write_manifest`; the reader gets one from :func:`read_manifest`, which applies the one rule of
:class:`serving.format.FormatModel` (too new -> refused, unknown keys -> one warning, missing keys -> named) and
then every value check of :meth:`BundleManifest.check`. Files and hashes are checked by :mod:`serving.bundle`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import BundleError
from .format import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    COMBINE_WEIGHTED_SUM,
    EXPERT_WEIGHTS_OUTPUT,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MANIFEST_FILE,
    MULTI_SET_FORMAT_VERSION,
    OPEN_SET_RULES,
    READER_VERSION,
    TEXT_INPUT,
    TEXT_OUTPUT,
    FormatModel,
    FormatSection,
    FormatSpec,
    is_int,
)
from .preprocess import PreprocessConfig

__all__ = [
    "BackboneInfo", "BundleManifest", "CalibrationInfo", "Capabilities", "ClassesInfo", "EngineSpec",
    "GRAPH_PRECISIONS", "GraphSpec", "Graphs", "MethodInfo",
    "Preprocessing", "PromptSets", "TensorSpec", "TextInfo", "bundle_versions", "read_manifest", "sha256_file",
    "write_manifest", "REEXPORT", "bundle_digest", "DIGEST_PREFIX",
]

logger = logging.getLogger(__name__)

#: Precisions a graph may be stored in (inputs and outputs stay float32 in every one).
GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
#: What to do about a bundle this reader refuses.
REEXPORT = "re-export the bundle with `promptclip export`"
_HASH_CHUNK = 1 << 20

Invalid = Callable[[str], Exception]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: How a bundle digest starts (:func:`bundle_digest`).
DIGEST_PREFIX = "sha256:"


def bundle_digest(bundle_dir: str | os.PathLike) -> str:
    """One digest of a whole bundle: ``sha256:<hex>`` over every regular file under ``bundle_dir`` (the manifest
    included, so a relabelled class, a changed logit scale, template or normalisation changes it), each as its path
    relative to the bundle and its own SHA-256, in sorted path order. ``export`` prints it; ``serve`` and
    ``classify`` can pin it (``--bundle-digest`` / ``PROMPTCLIP_BUNDLE_DIGEST``)."""
    root = Path(bundle_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return DIGEST_PREFIX + digest.hexdigest()


def bundle_versions(num_prompt_sets: int) -> dict[str, int]:
    """``format_version`` and ``min_reader_version`` a bundle with ``num_prompt_sets`` prompt sets is written with."""
    if num_prompt_sets == 1:
        return {"format_version": BUNDLE_FORMAT_VERSION, "min_reader_version": 1}
    return {"format_version": MULTI_SET_FORMAT_VERSION, "min_reader_version": MULTI_SET_FORMAT_VERSION}


# -- the model -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One input or output of a graph."""

    name: str
    dtype: str | None = None  # outputs without one are float32
    shape: list[Any] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class GraphSpec:
    """One ONNX graph of the bundle: its file, hash and signature."""

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None = None
    exporter: str | None = None
    #: one of :data:`GRAPH_PRECISIONS`; absent in bundles written before precisions existed (= fp32)
    precision: str | None = field(default=None, metadata={"omit_none": True})
    #: what the transformer optimiser did (tool, model type, fused operator counts), when it ran
    optimization: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})

    @property
    def graph_precision(self) -> str:
        """The graph's precision (``fp32`` when not recorded)."""
        return self.precision or "fp32"

    def input(self, name: str) -> TensorSpec | None:
        """The input called ``name``, if any."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output called ``name``, if any."""
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """One TensorRT engine built from one graph of the bundle on one kind of host (``promptclip engine build``).

    An engine runs only where all of ``tensorrt_version``, ``compute_capability`` (and, by our rule, ``gpu_name``)
    and ``graph_sha256`` match; ``key`` is built from them (see :func:`engine_key`)."""

    key: str
    graph: str  # "image" or "text"
    file: str
    sha256: str
    graph_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: dict[str, int]  # min / opt / max batch
    prompt_set: int = 0
    strongly_typed: bool = False


@dataclass(frozen=True, kw_only=True)
class Graphs:
    """The image graph and one text graph per prompt set."""

    image: GraphSpec
    text: list[GraphSpec]


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What the method's graphs can do (``text_depends_on_image`` bundles are not servable)."""

    text_depends_on_image: bool
    num_prompt_sets: int
    class_bound: bool = False
    finetuned_image_tower: bool = False
    trainable: bool = True


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """The prompt-learning method that made the bundle."""

    name: str
    capabilities: Capabilities
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BackboneInfo:
    """The CLIP backbone (informative): ``activation`` (``gelu`` / ``quick_gelu``) and ``open_clip_model`` are
    absent in bundles exported before they were recorded."""

    name: str | None = None
    pretrained: str | None = None
    weights_sha256: str | None = None
    weights: str | None = None
    activation: str | None = field(default=None, metadata={"omit_none": True})
    open_clip_model: str | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True, kw_only=True)
class TextInfo:
    """Tokenizer, vocabulary and templates of the text graphs."""

    vocab_file: str
    vocab_sha256: str
    context_length: int
    templates: list[str]
    tokenizer: str = "clip-bpe"
    max_name_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class ClassesInfo:
    """The exported classes (row order of the class embeddings)."""

    names: list[str]
    file: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class PromptSets:
    """Format 2: names of the prompt sets and how their logits combine (checked by :meth:`BundleManifest.check`)."""

    names: list[str] | None = None
    combine: str | None = None


@dataclass(frozen=True, kw_only=True)
class CalibrationInfo:
    """Optional: held-out labelled images of the exported classes, embedded by the bundle's image graph, from which
    the service calibrates its open-set ("none of these") threshold (:mod:`serving.open_set`)."""

    file: str
    sha256: str
    num_images: int
    num_classes: int
    keep_rate: float  # default share of known images kept (0 < r <= 1)
    default_rule: str  # one of serving.format.OPEN_SET_RULES


@dataclass(frozen=True, kw_only=True)
class Preprocessing(FormatSection):
    """The eval preprocessing the image graph expects; values are checked by :class:`PreprocessConfig` (whose
    defaults apply to the optional keys left out)."""

    image_size: Any  # [H, W]; a bare int means square
    mean: list[float]
    std: list[float]
    interpolation: str | None = field(default=None, metadata={"omit_none": True})
    resize_mode: str | None = field(default=None, metadata={"omit_none": True})
    fill_color: int | None = field(default=None, metadata={"omit_none": True})

    def config(self) -> PreprocessConfig:
        """The checked :class:`PreprocessConfig` (raises :class:`BundleError` on invalid values)."""
        return PreprocessConfig.from_manifest(self.to_json())


@dataclass(frozen=True, kw_only=True)
class BundleManifest(FormatModel):
    """``manifest.json`` of a deploy bundle (see :mod:`serving.format` for the meaning of every key)."""

    SPEC: ClassVar[FormatSpec] = FormatSpec(
        format=BUNDLE_FORMAT, what="promptclip deploy bundle", newest=READER_VERSION,
        advice="upgrade promptclip (`pip install -U promptclip`) to serve it, or re-export the bundle with this "
               "promptclip version",
        version_key="min_reader_version", version_label="bundle reader version")

    format: str = BUNDLE_FORMAT
    format_version: int
    min_reader_version: int
    method: MethodInfo
    embedding_dim: int
    logit_scale: float
    preprocessing: Preprocessing
    text: TextInfo
    classes: ClassesInfo
    graphs: Graphs
    prompt_sets: PromptSets | None = field(default=None, metadata={"omit_none": True})
    created_by: dict[str, Any] = field(default_factory=dict)
    backbone: BackboneInfo | None = field(default=None, metadata={"omit_none": True})
    engines: list[EngineSpec] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    #: optional (bundles without it load unchanged and answer open-set fields with null); not a format bump: a
    #: reader that does not know the key ignores it with one warning
    calibration: CalibrationInfo | None = field(default=None, metadata={"omit_none": True})

    @property
    def num_prompt_sets(self) -> int:
        """Number of prompt sets (text graphs, templates, class-embedding tables)."""
        return int(self.method.capabilities.num_prompt_sets)

    def check(self, invalid: Invalid) -> None:
        """Every value check of a manifest (not its files, not whether serving can serve its method): raises
        ``invalid(msg)`` (or the :class:`BundleError` of :meth:`PreprocessConfig.from_manifest`)."""
        n = self.method.capabilities.num_prompt_sets
        if not is_int(n) or n < 1:
            raise invalid(f"method.capabilities.num_prompt_sets must be a positive int, got {n!r}")
        if is_int(self.format_version) and self.format_version > MULTI_SET_FORMAT_VERSION:
            logger.info("bundle format_version %s is newer than %s; reading it as version %s (min_reader_version %s)",
                        self.format_version, MULTI_SET_FORMAT_VERSION, READER_VERSION, self.min_reader_version)
        if not is_int(self.embedding_dim) or self.embedding_dim < 1:
            raise invalid(f"embedding_dim must be a positive int, got {self.embedding_dim!r}")
        scale = self.logit_scale
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise invalid(f"logit_scale must be a positive finite number, got {scale!r}")
        self._check_text(n, invalid)
        self._check_classes(invalid)
        if len(self.graphs.text) != n:
            raise invalid(f"graphs.text has {len(self.graphs.text)} graph(s) but num_prompt_sets is {n}")
        _check_io(self.graphs.image, "graphs.image", IMAGE_INPUT, "float32", IMAGE_OUTPUT, invalid)
        for i, spec in enumerate(self.graphs.text):
            _check_io(spec, f"graphs.text[{i}]", TEXT_INPUT, "int64", TEXT_OUTPUT, invalid)
        self._check_prompt_sets(n, invalid)
        self._check_calibration(invalid)
        self.preprocessing.config()

    def _check_calibration(self, invalid: Invalid) -> None:
        cal = self.calibration
        if cal is None:
            return
        if not is_int(cal.num_images) or cal.num_images < 1:
            raise invalid(f"calibration.num_images must be a positive int, got {cal.num_images!r}")
        if not is_int(cal.num_classes) or not 1 <= cal.num_classes <= len(self.classes.names):
            raise invalid(f"calibration.num_classes must be an int in 1..{len(self.classes.names)}, "
                          f"got {cal.num_classes!r}")
        rate = cal.keep_rate
        if not _is_number(rate) or not 0 < rate <= 1:
            raise invalid(f"calibration.keep_rate must be a number in (0, 1], got {rate!r}")
        if cal.default_rule not in OPEN_SET_RULES:
            raise invalid(f"calibration.default_rule is {cal.default_rule!r}; this reader knows "
                          f"{', '.join(OPEN_SET_RULES)}")

    def _check_text(self, n: int, invalid: Invalid) -> None:
        text = self.text
        if text.tokenizer != "clip-bpe":
            raise invalid(f"text.tokenizer {text.tokenizer!r} is not supported (only 'clip-bpe')")
        if not is_int(text.context_length) or text.context_length < 2:
            raise invalid(f"text.context_length must be an int >= 2, got {text.context_length!r}")
        templates = text.templates
        if not isinstance(templates, list) or len(templates) != n:
            raise invalid(f"text.templates must be a list of {n} template(s) (one per prompt set), got {templates!r}")
        for t in templates:
            if not isinstance(t, str) or "{}" not in t:
                raise invalid(f"every text template must be a string containing '{{}}', got {t!r}")
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError) as exc:
                raise invalid(f"text template {t!r} is not a valid format string ({exc})") from exc

    def _check_classes(self, invalid: Invalid) -> None:
        names = self.classes.names
        if not isinstance(names, list) or not names or not all(isinstance(s, str) and s for s in names):
            raise invalid("classes.names must be a non-empty list of non-empty strings")
        if len(set(names)) != len(names):
            raise invalid(f"classes.names has duplicates: {_duplicates(names)[:5]}")

    def _check_prompt_sets(self, n: int, invalid: Invalid) -> None:
        """Format 2: ``prompt_sets`` and the image graph's ``expert_weights`` output, required when ``n > 1``."""
        prompt_sets = self.prompt_sets
        if prompt_sets is None:
            if n > 1:
                raise invalid(f"prompt_sets is missing: a bundle with {n} prompt sets (format "
                              f"{MULTI_SET_FORMAT_VERSION}) needs prompt_sets = {{names: [{n} names], combine: "
                              f"{COMBINE_WEIGHTED_SUM!r}}}")
        else:  # optional for one prompt set, but checked when present
            names = prompt_sets.names
            if (not isinstance(names, list) or len(names) != n
                    or not all(isinstance(s, str) and s.strip() for s in names)):
                raise invalid(f"prompt_sets.names must be a list of {n} non-empty strings (one per prompt set, "
                              f"num_prompt_sets is {n}), got {names!r}")
            if len(set(names)) != len(names):
                raise invalid(f"prompt_sets.names has duplicates: {_duplicates(names)}")
            if prompt_sets.combine != COMBINE_WEIGHTED_SUM:
                raise invalid(f"prompt_sets.combine is {prompt_sets.combine!r}; this reader only knows "
                              f"{COMBINE_WEIGHTED_SUM!r}")
        if n > 1:
            spec = self.graphs.image.output(EXPERT_WEIGHTS_OUTPUT)
            if spec is None:
                raise invalid(f"graphs.image.outputs has no output named {EXPERT_WEIGHTS_OUTPUT!r}: a bundle with {n} "
                              "prompt sets needs the per-image weights of its prompt sets")
            if (spec.dtype or "float32") != "float32":
                raise invalid(f"graphs.image output {EXPERT_WEIGHTS_OUTPUT!r} has dtype {spec.dtype!r}, "
                              "expected 'float32'")


def _check_io(spec: GraphSpec, where: str, input_name: str, input_dtype: str, output_name: str,
              invalid: Invalid) -> None:
    if spec.precision is not None and spec.precision not in GRAPH_PRECISIONS:
        raise invalid(f"{where}.precision is {spec.precision!r}; this reader knows {', '.join(GRAPH_PRECISIONS)}")
    inp = spec.input(input_name)
    if inp is None:
        raise invalid(f"{where}.inputs has no input named {input_name!r}")
    if inp.dtype != input_dtype:
        raise invalid(f"{where} input {input_name!r} has dtype {inp.dtype!r}, expected {input_dtype!r}")
    if spec.output(output_name) is None:
        raise invalid(f"{where}.outputs has no output named {output_name!r}")


def _duplicates(names: Sequence[str]) -> list[str]:
    return sorted({s for s in names if names.count(s) > 1})


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- reading and writing -------------------------------------------------------------------------------------------


def read_manifest(bundle_dir: str | os.PathLike) -> tuple[BundleManifest, dict[str, Any]]:
    """Parse and check ``bundle_dir/manifest.json``: ``(model, the JSON object as read)``.

    Raises:
        BundleError: no manifest, not JSON, too new for this reader (names both versions), missing or invalid keys.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{str(root)!r} has no {MANIFEST_FILE}: it is not a promptclip deploy bundle (or an incomplete copy); "
            f"{REEXPORT} or copy the whole directory.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {REEXPORT}.") from exc

    def invalid(msg: str) -> BundleError:
        return BundleError(f"{path}: {msg}; {REEXPORT}.")

    return BundleManifest.read(data, source=f"Bundle {root}", invalid=invalid, error=BundleError), data


def write_manifest(bundle_dir: str | os.PathLike, manifest: BundleManifest) -> Path:
    """Check ``manifest``'s values (files are not looked at) and write it as ``bundle_dir/manifest.json``."""
    path = Path(bundle_dir) / MANIFEST_FILE

    def invalid(msg: str) -> BundleError:
        return BundleError(f"refusing to write {path}: {msg}")

    manifest.check(invalid)
    path.write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
