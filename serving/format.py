"""The file formats: the deploy-bundle contract shared by ``export`` (writer) and ``serving`` (reader), the one
rule for every versioned JSON format (:class:`FormatModel`), the persisted class state (:class:`ClassState`) and
the one class-name rule.

The manifest's typed model is :class:`serving.manifest.BundleManifest` (written by
:func:`serving.manifest.write_manifest`); the prompt artifact's is ``training.artifact.PromptConfig``.

A bundle is a directory::

    manifest.json                 # this module documents its keys
    image_encoder.onnx            # pixel_values float32 [B,3,H,W] -> image_embeds float32 [B,D], L2-normalised
    text_encoder.onnx             # input_ids int64 [N,L] -> text_embeds float32 [N,D], L2-normalised
                                  #   (one file per prompt set: text_encoder_<k>.onnx when a method has several)
    class_embeddings.safetensors  # key "class_embeddings": [C, D] float32 (one key per prompt set:
                                  #   "class_embeddings_<k>"), row order = manifest["classes"]["names"]
    bpe_simple_vocab_16e6.txt.gz  # the CLIP BPE vocabulary the tokenizer reads

manifest.json keys (format_version 1)::

    format: "promptclip.bundle"
    format_version: int            # readers refuse a bundle whose min_reader_version > READER_VERSION
    min_reader_version: int
    created_by: {promptclip, torch, open_clip, onnx, ...}  versions, informative
    method: {name, config: {...}, capabilities: {text_depends_on_image, num_prompt_sets,
             class_bound, finetuned_image_tower, trainable}}
    backbone: {name, pretrained, weights_sha256, weights}
    embedding_dim: int
    logit_scale: float             # multiply cosine similarities by this to get logits
    preprocessing: {image_size: [H, W], resize_mode: "shortest"|"longest"|"squash",
                    interpolation: "bicubic"|"bilinear"|"nearest", mean: [3], std: [3], fill_color: int}
    text: {tokenizer: "clip-bpe", vocab_file, vocab_sha256, context_length: int,
           templates: [str, ...]  (one per prompt set, "{}" marks the class name),
           max_name_tokens: int}
    classes: {names: [...], file: "class_embeddings.safetensors", sha256}
    graphs: {image: GraphSpec, text: [GraphSpec, ...]}
        GraphSpec = {file, sha256, opset, exporter, inputs: [{name, dtype, shape}], outputs: [...]}
    engines: [{graph, file, tensorrt_version, compute_capability, precision}]   (host-specific cache)
    parity: {image: {...}, text: {...}}   measured ORT-vs-torch figures written by export
    calibration: {file: "calibration.npz", sha256, num_images, num_classes, keep_rate, default_rule}  (optional:
                   held-out images for open-set answers, :mod:`serving.open_set`; a reader that does not know the
                   key ignores it with one warning, so it needs no format_version bump)

Format 2 (several prompt sets, e.g. GuiDG's domain experts; single-set bundles are still written as format 1)::

    format_version: 2, min_reader_version: 2
    method.capabilities.num_prompt_sets: S > 1
    prompt_sets: {names: [S names, e.g. the source domains], combine: "weighted_sum"}
    graphs.image outputs: image_embeds [B, D] and expert_weights float32 [B, S] (per image, each row a
        distribution over the prompt sets; it never depends on the other images of a batch)
    graphs.text: S graph specs (text_encoder_<k>.onnx), text.templates: S templates
    class_embeddings.safetensors: "class_embeddings_<k>" [C, D] for k = 0..S-1

    logits[b, c] = logit_scale * sum_k expert_weights[b, k] * (image_embeds[b] . class_embeddings_k[c])

A class added at runtime is encoded by every prompt set's text graph; the expert weights depend on the image only
(the weighting head's keys are fixed at export), so a runtime class is scored exactly like an exported one.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "promptclip.bundle"
#: Version this code writes for single-prompt-set bundles (readable by every reader).
BUNDLE_FORMAT_VERSION = 1
#: Version this code writes for bundles with several prompt sets (``prompt_sets`` + ``expert_weights``).
MULTI_SET_FORMAT_VERSION = 2
#: Newest ``min_reader_version`` this reader understands.
READER_VERSION = 2

MANIFEST_FILE = "manifest.json"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
IMAGE_GRAPH_FILE = "image_encoder.onnx"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

IMAGE_INPUT = "pixel_values"
IMAGE_OUTPUT = "image_embeds"
TEXT_INPUT = "input_ids"
TEXT_OUTPUT = "text_embeds"
#: Second image-graph output of multi-set bundles: float32 [B, S] per-image weights of the prompt sets.
EXPERT_WEIGHTS_OUTPUT = "expert_weights"
#: The only ``prompt_sets.combine`` rule (see the module docstring).
COMBINE_WEIGHTED_SUM = "weighted_sum"

#: Keys a manifest may hold at top level (the fields of :class:`serving.manifest.BundleManifest`, which a test
#: checks); readers warn once on others.
KNOWN_MANIFEST_KEYS = frozenset({
    "format", "format_version", "min_reader_version", "created_by", "method", "backbone",
    "embedding_dim", "logit_scale", "preprocessing", "text", "classes", "graphs", "engines", "parity",
    "prompt_sets", "calibration",
})

#: Optional bundle file of held-out labelled images' embeddings (see :mod:`serving.open_set`): ``image_embeds``
#: float32 [S, N, D] (L2-normalised), ``weights`` float32 [N, S] (multi-set bundles only), ``labels`` int64 [N]
#: (indices into ``classes.names``). Named by the optional manifest section ``calibration``.
CALIBRATION_FILE = "calibration.npz"
#: Scores an open-set rule may use: the best class's cosine (weighted over prompt sets) or its softmax probability.
OPEN_SET_RULES = ("max_cosine", "msp")
#: Default share of known images an open-set threshold keeps.
DEFAULT_KEEP_RATE = 0.95


def text_graph_file(prompt_set: int, num_prompt_sets: int) -> str:
    """File name of the text graph of ``prompt_set``."""
    return "text_encoder.onnx" if num_prompt_sets == 1 else f"text_encoder_{prompt_set}.onnx"


def class_embeddings_key(prompt_set: int, num_prompt_sets: int) -> str:
    """Key of ``prompt_set``'s class embeddings inside ``class_embeddings.safetensors``."""
    return "class_embeddings" if num_prompt_sets == 1 else f"class_embeddings_{prompt_set}"


# -- class names -------------------------------------------------------------------------------------------------
# The one class-name rule, used by the dataset readers (folder and split-file names), export (the bundle's class
# list) and the service (classes added at runtime), so that a class gets the same text whichever way it arrives.


def canonical_class_name(raw: str) -> str:
    """The canonical text of a class name: Unicode NFC (composed characters), underscores become spaces,
    surrounding whitespace is stripped and runs of whitespace collapse to one space. Case is kept as written (it is
    what users see back), but it is not part of a class's identity (:func:`class_name_key`).

    ``"golden_retriever"``, ``" golden  retriever "`` and ``"golden retriever"`` are one class. Validation (empty
    names, control characters, length) is the caller's: this function only rewrites.
    """
    return " ".join(unicodedata.normalize("NFC", str(raw)).replace("_", " ").split())


def class_name_key(name: str) -> str:
    """Identity of a class name for duplicate checks: its canonical text, case-folded.

    CLIP's tokenizer lowercases its input, so ``"Golden Retriever"`` and ``"golden retriever"`` get the same
    embedding: they are one class (a second spelling is refused as already registered, so the two never split one
    score), and a name whose key matches an exported class reuses that class's embedding row.
    """
    return canonical_class_name(name).casefold()


# -- the one rule for versioned JSON formats ---------------------------------------------------------------------
# The bundle manifest (serving.manifest), the persisted class state (ClassState below) and the prompt artifact
# (training.artifact) are each ONE typed model -- a frozen, keyword-only dataclass deriving from FormatModel --
# that the writer builds and the reader returns. One rule for all three:
# * ``format`` must name the format; a major version newer than this reader knows is refused with a message naming
#   the found version, the newest known one and what to do (upgrade promptclip or re-export / re-write the file);
# * required keys missing anywhere are reported together (the outermost key of a missing object only);
# * keys this reader does not know are ignored with one warning per key and process, naming them.

#: ``(format, dotted key)`` pairs already warned about (one warning per unknown key and process).
_warned_unknown: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class FormatSpec:
    """What the one rule needs to know about a versioned JSON format."""

    format: str  #: value of the ``format`` key
    what: str  #: human name, e.g. "promptclip deploy bundle"
    newest: int  #: newest major version this reader knows
    advice: str  #: what to do with a file that is too new
    version_key: str = "format_version"  #: key holding the major version a reader must know
    version_label: str = "format version"  #: how messages name that version


def warn_unknown_keys(spec: FormatSpec, source: str, keys: Iterable[str]) -> None:
    """Log one warning naming the unknown ``keys`` (dotted) of ``source``; keys warned about before are skipped."""
    new = sorted({k for k in keys if (spec.format, k) not in _warned_unknown})
    if new:
        _warned_unknown.update((spec.format, k) for k in new)
        logger.warning("%s has key(s) this reader does not know and ignores: %s (written by a newer promptclip?)",
                       source, ", ".join(new))


def check_header(data: Mapping[str, Any], spec: FormatSpec, *, source: str, invalid: Callable[[str], Exception],
                 error: Callable[[str], Exception]) -> None:
    """Check ``format`` and the major version of ``data`` (a missing version is reported with the missing keys).

    Raises:
        ``invalid(msg)``: wrong format or a version that is not a positive int.
        ``error(msg)``: a version newer than ``spec.newest`` (the message names both and what to do).
    """
    found_format = data.get("format")
    if found_format != spec.format:
        raise invalid(f"format is {found_format!r}, expected {spec.format!r}: this is not a {spec.what}")
    version = data.get(spec.version_key)
    if version is None:
        return
    if not is_int(version) or version < 1:
        raise invalid(f"{spec.version_key} must be a positive int, got {version!r}")
    if version > spec.newest:
        raise error(f"{source} needs {spec.version_label} {version}, but this promptclip reads up to "
                    f"{spec.version_label} {spec.newest}; {spec.advice}.")


M = TypeVar("M", bound="FormatModel")


class FormatSection:
    """Base of a nested section of a format model that is written on its own too (gives :meth:`to_json`)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this dataclass (fields whose ``metadata`` has ``omit_none`` left out when ``None``)."""
        return _unstructure(self)


class FormatModel(FormatSection):
    """Base of the typed format models (frozen, keyword-only dataclasses; nested objects are dataclasses too).

    Subclasses set ``SPEC`` (top-level models only) and may override :meth:`check` for value checks. Field values
    of plain types are taken as read and checked by :meth:`check`; nested dataclass fields are structured
    recursively. A field whose ``metadata`` has ``omit_none`` is left out of the JSON when it is ``None``.
    """

    SPEC: ClassVar[FormatSpec]

    @classmethod
    def read(cls: type[M], data: Any, *, source: str, invalid: Callable[[str], Exception],
             error: Callable[[str], Exception]) -> M:
        """The one rule: header, required keys, unknown keys (warned), then :meth:`check`.

        Args:
            source: names the file in messages (e.g. its path).
            invalid: builds the error for a malformed document from a message (adds what to do).
            error: builds the error for a too new document from a complete message.
        """
        if not isinstance(data, Mapping):
            raise invalid(f"expected a JSON object, got {type(data).__name__}")
        check_header(data, cls.SPEC, source=source, invalid=invalid, error=error)
        missing: list[str] = []
        unknown: list[str] = []
        model = _structure(cls, data, "", missing, unknown, invalid)
        if missing or model is None:
            raise invalid(f"missing required key(s): {', '.join(missing)}")
        warn_unknown_keys(cls.SPEC, source, unknown)
        model.check(invalid)
        return model

    def check(self, invalid: Callable[[str], Exception]) -> None:
        """Value checks past the structure; raise ``invalid(msg)``. The default checks nothing."""


def _structure(cls: type, data: Mapping[str, Any], path: str, missing: list[str], unknown: list[str],
               invalid: Callable[[str], Exception]) -> Any:
    """``cls(**data)`` with nested dataclasses structured; records missing and unknown keys (dotted)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = set()
    complete = True
    for f in dataclasses.fields(cls):
        names.add(f.name)
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing.append(where)
                complete = False
            continue
        value = _convert(hints[f.name], data[f.name], where, missing, unknown, invalid)
        complete = complete and not (value is None and data[f.name] is not None)
        kwargs[f.name] = value
    unknown.extend(f"{path}.{k}" if path else str(k) for k in data if k not in names)
    return cls(**kwargs) if complete else None


def _convert(tp: Any, value: Any, where: str, missing: list[str], unknown: list[str],
             invalid: Callable[[str], Exception]) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        if value is None:
            return None
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise invalid(f"{where} must be a JSON object, got {type(value).__name__}")
        return _structure(tp, value, where, missing, unknown, invalid)
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
    if item is not None and dataclasses.is_dataclass(item):
        if not isinstance(value, list):
            raise invalid(f"{where} must be a list of JSON objects, got {type(value).__name__}")
        items = [_convert(item, v, f"{where}[{i}]", missing, unknown, invalid) for i, v in enumerate(value)]
        return None if any(x is None for x in items) else items
    return value


def _unstructure(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _unstructure(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [_unstructure(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _unstructure(v) for k, v in value.items()}
    return value


def is_int(v: object) -> bool:
    """An int that is not a bool (JSON ``true`` is not a version)."""
    return isinstance(v, int) and not isinstance(v, bool)


# -- the persisted class state -------------------------------------------------------------------------------------

CLASS_STATE_FORMAT = "promptclip.classes"
#: Version this code writes (and the newest it reads) of ``classes.json``.
CLASS_STATE_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ClassState(FormatModel):
    """``state_dir/classes.json`` of a service: the active class list and its version (see :mod:`serving.classes`).

    The names are checked for servability by the class registry (that needs the bundle's tokenizer).
    """

    SPEC: ClassVar[FormatSpec] = FormatSpec(
        format=CLASS_STATE_FORMAT, what="promptclip class state file", newest=CLASS_STATE_FORMAT_VERSION,
        advice="upgrade promptclip to serve from it, or move it away to start again from the bundle's classes",
        version_label="class state format version")

    format: str = CLASS_STATE_FORMAT
    format_version: int
    version: int
    names: list[str]

    def check(self, invalid: Callable[[str], Exception]) -> None:
        """``version`` is a non-negative int, ``names`` a non-empty list."""
        if not is_int(self.version) or self.version < 0:
            raise invalid(f"version must be a non-negative int, got {self.version!r}")
        if not isinstance(self.names, list) or not self.names:
            raise invalid("names must be a non-empty list")
