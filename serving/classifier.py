"""Open-vocabulary image classification over a deploy bundle -- the torch-free core.

:class:`Classifier` ties a :class:`~serving.bundle.Bundle`, an inference
:class:`~serving.runtime.Runtime` and a :class:`~serving.classes.ClassRegistry` together. Both the
BentoML service and local tools use it; it raises only :class:`~serving.errors.PromptclipError`
subclasses for anything a caller can get wrong.

Class embeddings come from the bundle's precomputed table for the bundle's classes and from the
exported text encoder (template + tokenizer + ``runtime.run_text``) for names added at runtime or
given ad hoc; encoded names are cached (LRU) by name.

A bundle may have S prompt sets (format 2, e.g. GuiDG's domain experts): each class then has one
embedding per set (each set's text graph on that set's template), the image graph also gives per-image
weights ``w [B, S]`` of the sets, and ``logits[b, c] = logit_scale * sum_k w[b, k] * (f[b] . T_k[c])``.
With one set this is ``logit_scale * f @ T.T`` exactly as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .batching import MicroBatcher
from .bundle import Bundle, load_bundle, load_class_embeddings
from .classes import ClassRegistry, ClassStateError
from .embedding_store import EmbeddingStore, text_encoder_key
from .errors import (
    BundleError,
    ClassNameError,
    ImageDecodeError,
    PayloadTooLargeError,
    PromptclipError,
    RequestError,
)
from .format import class_name_key
from .image_classes import (
    DEFAULT_MAX_CLASS_IMAGES,
    DEFAULT_MODALITY_SHIFT,
    DEFAULT_TEXT_WEIGHT,
    SOURCE_TEXT,
    ImageClass,
    ImageClassStore,
    describe_stale,
    image_class_row,
    image_encoder_key,
    modality_shift_vectors,
)
from .manifest import DIGEST_PREFIX, bundle_digest
from .open_set import OpenSetDecision, OpenSetScorer, check_keep_rate, check_rule, combined_cosines, softmax
from .preprocess import decode_image, decoded_size, preprocess
from .runtime import Runtime, create_runtime
from .tokenizer import ClipTokenizer

__all__ = ["Classifier", "ClassifyResult", "DEFAULT_TOP_K", "open_class_registry", "check_bundle_digest",
           "DeadlineExceededError", "deadline_scope"]

logger = logging.getLogger(__name__)

#: ``top_k`` when the caller gives none (capped at the number of classes).
DEFAULT_TOP_K = 5
#: Texts per ``run_text`` call.
TEXT_BATCH = 256
#: Images per ``run_image`` call.
IMAGE_BATCH = 32
#: Most names one ``add_classes`` call may carry (each is encoded by the text graph: ~7 ms per name on a CPU for
#: ViT-B/16), and most ad-hoc classes one ``classify`` call may list.
DEFAULT_MAX_ADD_NAMES = 256
DEFAULT_MAX_ADHOC_CLASSES = 256
#: Most decoded pixels one request's images may hold together (RGB: 3 bytes each, so 120 MB).
DEFAULT_MAX_REQUEST_PIXELS = 40_000_000
#: A JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) while both sides stay >= this many times the model's input
#: size, so the antialiased resize that follows still has at least this factor of oversampling.
DRAFT_MARGIN = 2


class DeadlineExceededError(PromptclipError):
    """A request's work ran past its deadline and was abandoned (between two encoder batches)."""


_deadline = threading.local()  # the deadline (time.monotonic()) of the call running in this thread, if any


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Within the block, this thread's encoder loops stop with :class:`DeadlineExceededError` once
    ``time.monotonic()`` passes ``deadline`` (``None``: no deadline)."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = deadline
    try:
        yield
    finally:
        _deadline.at = previous


def _check_deadline(what: str) -> None:
    at = getattr(_deadline, "at", None)
    if at is not None and time.monotonic() > at:
        raise DeadlineExceededError(f"the request ran past its deadline while {what}; the work was abandoned -- send "
                                    "fewer images or class names per request, or retry when the server is less busy")


@dataclass(frozen=True)
class ClassifyResult:
    """What :meth:`Classifier.classify_detailed` returns: the ranking plus the open-set answers."""

    predictions: list[list[dict]]  # per image, top-k {"name", "score", "logit", "confidence"}
    classes_version: int | None  # version of the registered list ranked (None for an ad-hoc list)
    none_of_these: list[bool | None]  # per image; None when the bundle has no calibration (or no basis)
    open_set: dict | None  # {rule, keep_rate, threshold, basis, num_images}; None without calibration


class Classifier:
    """Classify images against the registry's classes or an ad-hoc class list.

    Build it with :meth:`from_bundle`. Thread-safe: concurrent :meth:`classify` calls are fine.

    Args:
        bundle, runtime, registry, tokenizer: the parts (see :meth:`from_bundle`).
        max_adhoc_classes: most classes one request may list in ``class_names``.
        max_add_names: most names one :meth:`add_classes` call may carry.
        max_image_bytes, max_image_pixels: limits for :meth:`classify_bytes` (``None``: decode_image's defaults).
        max_request_pixels: most decoded pixels of all images of one :meth:`classify_bytes` call together
            (after JPEG draft reduction); checked from the headers before anything is decoded.
        cache_size: most runtime-encoded class embeddings kept in memory (LRU).
        micro_batching: run the image graph for concurrent calls in shared batches (:mod:`serving.batching`).
        on_image_batch, on_text_encode: observers (metrics): images per image-graph run; texts and seconds per
            text encoding.
        open_set_rule, keep_rate: server-wide open-set defaults (:mod:`serving.open_set`; ``None``: the bundle's
            calibration defaults).
    """

    def __init__(
        self,
        bundle: Bundle,
        runtime: Runtime,
        registry: ClassRegistry,
        tokenizer: ClipTokenizer,
        *,
        max_adhoc_classes: int = DEFAULT_MAX_ADHOC_CLASSES,
        max_add_names: int = DEFAULT_MAX_ADD_NAMES,
        max_image_bytes: int | None = None,
        max_image_pixels: int | None = None,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        max_class_images: int = DEFAULT_MAX_CLASS_IMAGES,
        cache_size: int = 20000,
        micro_batching: bool = False,
        on_image_batch: Callable[[int], None] | None = None,
        on_text_encode: Callable[[int, float], None] | None = None,
        open_set_rule: str | None = None,
        keep_rate: float | None = None,
    ) -> None:
        self.bundle = bundle
        self.runtime = runtime
        self.registry = registry
        self.tokenizer = tokenizer
        self.max_adhoc_classes = int(max_adhoc_classes)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_add_names = int(max_add_names)
        self.max_request_pixels = int(max_request_pixels)
        self.max_class_images = int(max_class_images)
        height, width = bundle.preprocessing.image_size
        self._draft_to = (DRAFT_MARGIN * int(width), DRAFT_MARGIN * int(height))
        self._num_sets = bundle.num_prompt_sets
        self._templates = bundle.templates
        self._logit_scale = np.float32(bundle.logit_scale)
        self._bundle_embeddings = np.stack(load_class_embeddings(bundle))  # [S, C, D] float32
        # Keyed like class identity: a name differing from an exported one only in case (CLIP lowercases) or not yet
        # in canonical form gets exactly the exported row.
        self._bundle_rows = {class_name_key(name): i for i, name in enumerate(bundle.class_names)}
        self.open_set_rule = None if open_set_rule is None else check_rule(open_set_rule, field="open_set_rule")
        self.keep_rate = None if keep_rate is None else check_keep_rate(keep_rate, field="keep_rate")
        calibration = bundle.calibration
        self._open_set = (OpenSetScorer(calibration, self._bundle_embeddings, bundle.logit_scale)
                          if calibration is not None else None)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # name -> [S, D]
        self._cache_size = int(cache_size)
        self._on_image_batch = on_image_batch
        self._on_text_encode = on_text_encode
        self._batcher: MicroBatcher | None = None
        if micro_batching:
            self._batcher = MicroBatcher(self._encode_images, max_batch=IMAGE_BATCH, on_batch=on_image_batch)
        self._lock = threading.Lock()
        self._active: tuple[int, list[str], np.ndarray] | None = None  # (version, names, [S, C, D])
        # Embeddings of the registered runtime classes, persisted next to the class list (restarts do not re-encode)
        self._store: EmbeddingStore | None = None
        self._stored: dict[str, np.ndarray] = {}  # name -> [S, D]
        if registry.state_dir is not None:
            self._store = EmbeddingStore(registry.state_dir, text_encoder_key(bundle), num_sets=self._num_sets,
                                         dim=bundle.embedding_dim)
            self._stored = self._store.load()
        # Classes built from example images: their examples are the truth (class_images.npz), rows derived from them
        self._image_key = image_encoder_key(bundle)
        self._shift = modality_shift_vectors(bundle, self._bundle_embeddings)  # [S, D] or None
        self._warned_no_shift = False
        self._images = ImageClassStore(registry.state_dir, dim=bundle.embedding_dim)
        self._image_classes: dict[str, ImageClass] = self._images.load()
        self._image_rows: dict[str, np.ndarray] = {}  # name -> [S, D], derived from _image_classes
        stale = self._stale_image_classes()
        if stale:
            logger.error("%s", describe_stale(stale))

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        *,
        state_dir: str | os.PathLike | None = None,
        runtime: str = "auto",
        verify_hashes: bool = True,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        max_classes: int = 10000,
        max_adhoc_classes: int = DEFAULT_MAX_ADHOC_CLASSES,
        max_add_names: int = DEFAULT_MAX_ADD_NAMES,
        max_image_bytes: int | None = None,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        max_class_images: int = DEFAULT_MAX_CLASS_IMAGES,
        warmup: bool = True,
        micro_batching: bool = False,
        on_image_batch: Callable[[int], None] | None = None,
        on_text_encode: Callable[[int, float], None] | None = None,
        start_empty: bool = False,
        expected_digest: str | None = None,
        open_set_rule: str | None = None,
        keep_rate: float | None = None,
    ) -> Classifier:
        """Load the bundle in ``bundle_dir`` and build runtime, tokenizer and registry.

        Args:
            state_dir: where the class list persists (``None``: in memory, lost on restart).
            runtime: ``"auto"`` or ``"ort"`` (see :func:`~serving.runtime.create_runtime`).
            warmup: encode the registry's runtime-added classes now rather than on the first request.
            start_empty: see :class:`~serving.classes.ClassRegistry` (a lost state file is refused without it).
            expected_digest: refuse the bundle unless :func:`~serving.manifest.bundle_digest` gives this.
            open_set_rule, keep_rate: open-set defaults (``None``: the bundle's calibration defaults).
        """
        bundle = load_bundle(bundle_dir, verify_hashes=verify_hashes)
        if expected_digest is not None:
            check_bundle_digest(bundle.root, expected_digest)
        kwargs: dict[str, Any] = {}
        if providers is not None:
            kwargs["providers"] = providers
        if intra_op_threads is not None:
            kwargs["intra_op_threads"] = intra_op_threads
        registry = open_class_registry(bundle, state_dir, max_classes=max_classes, start_empty=start_empty)
        tokenizer = registry.tokenizer
        rt = create_runtime(bundle, runtime, **kwargs)
        clf = cls(bundle, rt, registry, tokenizer, max_adhoc_classes=max_adhoc_classes, max_add_names=max_add_names,
                  max_image_bytes=max_image_bytes, max_request_pixels=max_request_pixels,
                  max_class_images=max_class_images, micro_batching=micro_batching, on_image_batch=on_image_batch,
                  on_text_encode=on_text_encode, open_set_rule=open_set_rule, keep_rate=keep_rate)
        if warmup and not clf._stale_image_classes():  # stale ones: logged; requests using them answer 503
            clf._active_classes()
        return clf

    # -- classification ------------------------------------------------------------------------

    def classify(
        self,
        images: Sequence[Image.Image],
        *,
        top_k: int | None = DEFAULT_TOP_K,
        class_names: Sequence[str] | None = None,
    ) -> list[list[dict]]:
        """Rank classes for each image.

        Args:
            images: decoded PIL images.
            top_k: classes to return per image, 1..number of classes. ``None`` means
                ``min(DEFAULT_TOP_K, number of classes)``.
            class_names: an ad-hoc class list for this call only (validated like registered names,
                at most ``max_adhoc_classes``); ``None`` uses the registry's active classes.

        Returns:
            Per image, ``top_k`` dicts ``{"name", "score", "logit"}`` by decreasing score; ``score`` is
            the softmax probability over the whole class list, ``logit`` is ``logit_scale * cosine`` (with
            several prompt sets: the image's weighted sum of the per-set cosines, times ``logit_scale``).

        Raises:
            RequestError: no images, ``top_k`` out of range, too many ad-hoc classes.
            ClassNameError: an invalid or repeated ad-hoc class name.
        """
        return self.classify_versioned(images, top_k=top_k, class_names=class_names)[0]

    def classify_versioned(
        self,
        images: Sequence[Image.Image],
        *,
        top_k: int | None = DEFAULT_TOP_K,
        class_names: Sequence[str] | None = None,
    ) -> tuple[list[list[dict]], int | None]:
        """:meth:`classify`, and the version of the registered class list it ranked (``None`` for ad-hoc
        ``class_names``)."""
        result = self.classify_detailed(images, top_k=top_k, class_names=class_names)
        return result.predictions, result.classes_version

    def classify_detailed(
        self,
        images: Sequence[Image.Image],
        *,
        top_k: int | None = DEFAULT_TOP_K,
        class_names: Sequence[str] | None = None,
        keep_rate: float | None = None,
        open_set_rule: str | None = None,
    ) -> ClassifyResult:
        """:meth:`classify` with the open-set answers (:mod:`serving.open_set`): each prediction's
        ``confidence``, each image's ``none_of_these`` and the ``open_set`` decision that gave them.

        Args:
            keep_rate: share of images of listed classes to keep for this call (0 < r <= 1; 1 never answers
                none_of_these); ``None``: the server's default, else the bundle's.
            open_set_rule: ``max_cosine`` or ``msp`` for this call; ``None``: the server's default, else the
                bundle's.

        Raises:
            RequestError: also for an invalid ``keep_rate`` or ``open_set_rule`` (the field is named).
        """
        images = list(images)
        rule = check_rule(open_set_rule) if open_set_rule is not None else None
        rate = check_keep_rate(keep_rate) if keep_rate is not None else None
        if not images:
            raise RequestError("no images given; send at least one image", field="image")
        version: int | None = None
        if class_names is None:
            version, names, matrix = self._active_classes_versioned()
        else:
            names, matrix = self._adhoc_classes(class_names)
        k = self._check_top_k(top_k, len(names))
        decision = self._open_set_decision(names, matrix, rule, rate)
        results: list[list[dict]] = []
        none_of_these: list[bool | None] = []
        cfg = self.bundle.preprocessing
        for start in range(0, len(images), IMAGE_BATCH):
            _check_deadline("encoding images")
            pixels = preprocess(images[start:start + IMAGE_BATCH], cfg)
            image_embeds, weights = (self._batcher.encode(pixels) if self._batcher is not None
                                     else self._encode_images(pixels))
            ranked, unknown = self._rank(image_embeds, weights, names, matrix, k, decision)
            results.extend(ranked)
            none_of_these.extend(unknown)
        return ClassifyResult(predictions=results, classes_version=version, none_of_these=none_of_these,
                              open_set=None if decision is None else decision.describe())

    def _open_set_decision(self, names: list[str], matrix: np.ndarray, rule: str | None,
                           keep_rate: float | None) -> OpenSetDecision | None:
        """The open-set decision for this class list (None when the bundle has no calibration)."""
        if self._open_set is None:
            if rule is not None or keep_rate is not None:
                logger.debug("open_set_rule / keep_rate given but the bundle has no calibration: open-set fields are "
                             "null")
            return None
        cal = self._open_set.calibration
        rule = rule or self.open_set_rule or cal.rule
        keep_rate = keep_rate if keep_rate is not None else (self.keep_rate if self.keep_rate is not None
                                                             else cal.keep_rate)
        return self._open_set.decision(names, matrix, rule, keep_rate)

    def classify_bytes(self, blobs: Sequence[bytes], **kw: Any) -> list[list[dict]]:
        """:func:`~serving.preprocess.decode_image` each blob, then :meth:`classify` (same keyword arguments)."""
        return self.classify_bytes_versioned(blobs, **kw)[0]

    def classify_bytes_versioned(self, blobs: Sequence[bytes], **kw: Any) -> tuple[list[list[dict]], int | None]:
        """:meth:`classify_bytes` and the class list's version (see :meth:`classify_versioned`)."""
        return self.classify_versioned(self._decode_all(blobs), **kw)

    def classify_bytes_detailed(self, blobs: Sequence[bytes], **kw: Any) -> ClassifyResult:
        """Decode each blob, then :meth:`classify_detailed` (same keyword arguments)."""
        return self.classify_detailed(self._decode_all(blobs), **kw)

    def _decode_all(self, blobs: Sequence[bytes]) -> list[Image.Image]:
        """Decode ``blobs`` as ``/classify`` does: the pixel budget first, then each image's limits (413/400)."""
        blobs = list(blobs)
        limits: dict[str, Any] = {"draft_to": self._draft_to}
        if self.max_image_bytes is not None:
            limits["max_bytes"] = self.max_image_bytes
        if self.max_image_pixels is not None:
            limits["max_pixels"] = self.max_image_pixels
        self._check_pixel_budget(blobs)
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(decode_image(blob, **limits))
            except ImageDecodeError as exc:
                if len(blobs) == 1:
                    raise
                raise ImageDecodeError(f"image {i + 1} of {len(blobs)}: {exc}", field=exc.field) from exc
        return images

    def _check_pixel_budget(self, blobs: Sequence[bytes]) -> None:
        """Refuse (413) a request whose images would decode to more than ``max_request_pixels`` together, from their
        headers alone (JPEGs at their draft-reduced size)."""
        total = 0
        for blob in blobs:
            size = decoded_size(blob, draft_to=self._draft_to) if isinstance(blob, (bytes, bytearray)) else None
            if size is not None:
                total += size[0] * size[1]
        if total > self.max_request_pixels:
            raise PayloadTooLargeError(
                f"the request's {len(blobs)} image(s) decode to {total:,} pixels together; one request may hold at "
                f"most {self.max_request_pixels:,} (PROMPTCLIP_MAX_REQUEST_PIXELS): send smaller images (JPEGs are "
                "reduced while decoding, other formats are not) or fewer per request",
                field="image" if len(blobs) == 1 else "images")

    def close(self) -> None:
        """Stop the micro-batching thread (the classifier is not used afterwards)."""
        if self._batcher is not None:
            self._batcher.close()

    def _encode_images(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The image graph on ``pixels``: embeddings ``[B, D]`` and, with several prompt sets, weights ``[B, S]``."""
        if self._num_sets == 1:
            out: tuple[np.ndarray, np.ndarray | None] = (self.runtime.run_image(pixels), None)
        else:
            out = self.runtime.run_image_and_weights(pixels)
        if self._batcher is None and self._on_image_batch is not None:
            self._on_image_batch(len(pixels))
        return out

    def _check_top_k(self, top_k: int | None, num_classes: int) -> int:
        if top_k is None:
            return min(DEFAULT_TOP_K, num_classes)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise RequestError(f"top_k must be an integer between 1 and {num_classes}, got {top_k!r}", field="top_k")
        if not 1 <= top_k <= num_classes:
            raise RequestError(
                f"top_k must be between 1 and {num_classes} (the number of classes), got {top_k}", field="top_k")
        return int(top_k)

    def _rank(self, image_embeds: np.ndarray, weights: np.ndarray | None, names: list[str], matrix: np.ndarray,
              k: int, decision: OpenSetDecision | None = None) -> tuple[list[list[dict]], list[bool | None]]:
        """Top ``k`` of ``names`` per image and each image's ``none_of_these``; ``image_embeds [B, D]``, ``weights
        [B, S]`` or None (S == 1), ``matrix [S, C, D]``."""
        cosines = combined_cosines(image_embeds, weights, matrix)  # [B, C] float32
        logits = self._logit_scale * cosines  # [B, C] float32
        probs = softmax(logits)  # [B, C] float64
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [B, k]
        batch = logits.shape[0]
        confidence = None
        unknown: list[bool | None] = [None] * batch
        if decision is not None:
            scores = probs if decision.rule == "msp" else cosines.astype(np.float64)  # [B, C]
            confidence = decision.confidence(np.take_along_axis(scores, order, axis=1))  # [B, k] or None
            unknown = decision.none_of_these(scores.max(axis=1))
        ranked = [
            [{"name": names[j], "score": float(probs[b, j]), "logit": float(logits[b, j]),
              "confidence": None if confidence is None else float(confidence[b, i])}
             for i, j in enumerate(order[b])]
            for b in range(batch)
        ]
        return ranked, unknown

    # -- class embeddings ----------------------------------------------------------------------

    def _active_classes(self) -> tuple[list[str], np.ndarray]:
        """The registry's classes and their ``[S, C, D]`` embeddings (rebuilt when the version changes)."""
        return self._active_classes_versioned()[1:]

    def _active_classes_versioned(self) -> tuple[int, list[str], np.ndarray]:
        """``(version, names, [S, C, D] embeddings)`` of the registry's classes, other workers' changes included."""
        self.registry.refresh()
        version, names = self.registry.snapshot()
        active = self._active
        if active is not None and active[0] == version and active[1] == names:
            return active
        if self._store is not None and self._store.changed():  # another worker or replica stored new rows
            stored = self._store.load()
            with self._lock:
                self._stored = stored
        self._reload_image_classes()
        matrix = self._embeddings_for(names)
        if self._store is not None and any(self._is_text_runtime(n) and n not in self._stored for n in names):
            with self.registry.file_lock():  # encoded here: store them for the next start and the other workers
                self.registry.refresh()
                self._persist(self.registry.names())
        self._active = (version, names, matrix)
        logger.debug("class matrix rebuilt: %d classes, version %d", len(names), version)
        return version, names, matrix

    def _adhoc_classes(self, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
        if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
            raise RequestError(f"classes must be a list of class names, got {type(class_names).__name__}",
                               field="classes")
        if not class_names:
            raise RequestError("classes is empty: give at least one class name, or omit it to use the registered "
                               "classes", field="classes")
        if len(class_names) > self.max_adhoc_classes:
            raise PayloadTooLargeError(
                f"classes lists {len(class_names)} names; one request may list at most {self.max_adhoc_classes} -- "
                "register large class lists with /add_classes instead (PROMPTCLIP_MAX_ADHOC_CLASSES)", field="classes")
        names = self.registry.normalize_names(class_names, field="classes")
        return names, self._embeddings_for(names)

    def _embeddings_for(self, names: list[str]) -> np.ndarray:
        """``[S, C, D]`` float32 rows of ``names``: image-built classes' rows, else their text embeddings.

        Raises:
            ClassStateError: an image-built class among ``names`` was embedded with another image encoder.
        """
        with self._lock:
            image_classes = self._image_classes  # replaced, never mutated: a consistent snapshot
        built = [image_classes[n] for n in names if n in image_classes]
        if not built:
            return self._text_embeddings_for(names)
        stale = [c.name for c in built if c.key != self._image_key]
        if stale:
            raise ClassStateError(describe_stale(stale))
        rows = {c.name: self._image_row(c) for c in built}
        text_idx = [i for i, n in enumerate(names) if n not in rows]
        out = np.empty((self._num_sets, len(names), self.bundle.embedding_dim), dtype=np.float32)
        if text_idx:
            out[:, text_idx] = self._text_embeddings_for([names[i] for i in text_idx])
        for i, n in enumerate(names):
            if n in rows:
                out[:, i] = rows[n]
        return out

    def _text_embeddings_for(self, names: list[str]) -> np.ndarray:
        """``[S, C, D]`` float32 text embeddings of ``names``: bundle rows, cached encodings, or fresh encodings."""
        out = np.empty((self._num_sets, len(names), self.bundle.embedding_dim), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for i, name in enumerate(names):
                row = self._bundle_rows.get(class_name_key(name))
                if row is not None:
                    out[:, i] = self._bundle_embeddings[:, row]
                elif (stored := self._stored.get(name)) is not None:
                    out[:, i] = stored
                elif (cached := self._cache.get(name)) is not None:
                    self._cache.move_to_end(name)
                    out[:, i] = cached
                else:
                    missing.append(i)
        if missing:
            encoded = self._encode_all_sets([names[i] for i in missing])  # [M, S, D]
            out[:, missing] = encoded.transpose(1, 0, 2)
            with self._lock:
                for i, vecs in zip(missing, encoded):
                    self._cache[names[i]] = vecs
                    self._cache.move_to_end(names[i])
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def encode_text(self, names: Sequence[str], prompt_set: int | None = None) -> np.ndarray:
        """Text embeddings of ``names``, each put into a prompt set's template (no normalisation of names).

        Args:
            prompt_set: the set to encode with; ``None`` means all of them.

        Returns:
            ``[N, D]`` for one prompt set (an int ``prompt_set``, or a single-set bundle), else ``[N, S, D]``.
        """
        if prompt_set is None:
            out = self._encode_all_sets(names)  # [N, S, D]
            return np.ascontiguousarray(out[:, 0]) if self._num_sets == 1 else out
        if isinstance(prompt_set, bool) or not isinstance(prompt_set, (int, np.integer)) \
                or not 0 <= prompt_set < self._num_sets:
            raise IndexError(f"prompt_set must be an int in 0..{self._num_sets - 1} (the bundle has "
                             f"{self._num_sets} prompt set(s)), got {prompt_set!r}")
        return self._encode_set(list(names), int(prompt_set))

    def _encode_all_sets(self, names: Sequence[str]) -> np.ndarray:
        """``[N, S, D]`` embeddings of ``names`` by every prompt set's text graph and template."""
        names = list(names)
        t0 = time.perf_counter()
        out = np.ascontiguousarray(np.stack([self._encode_set(names, k) for k in range(self._num_sets)], axis=1))
        if self._on_text_encode is not None and names:
            self._on_text_encode(len(names), time.perf_counter() - t0)
        return out

    def _encode_set(self, names: list[str], prompt_set: int) -> np.ndarray:
        """``[N, D]`` embeddings of ``names`` in prompt set ``prompt_set``'s template, by its text graph."""
        if not names:
            return np.zeros((0, self.bundle.embedding_dim), dtype=np.float32)
        template = self._templates[prompt_set]
        texts = [template.format(n) for n in names]
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH):
            _check_deadline("encoding class names")
            ids = self.tokenizer(texts[start:start + TEXT_BATCH])  # raises ClassNameError, never truncates
            chunks.append(self.runtime.run_text(ids, prompt_set))
        return np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)

    # -- classes from example images ----------------------------------------------------------

    def _stale_image_classes(self) -> list[str]:
        """Image-built classes whose examples were embedded under another image key (see :mod:`.image_classes`)."""
        with self._lock:
            return [n for n, c in self._image_classes.items() if c.key != self._image_key]

    def _reload_image_classes(self) -> None:
        """Adopt ``class_images.npz`` when another worker (or the CLI) changed it."""
        if self._images.changed():
            current = self._images.load()
            with self._lock:
                self._image_classes = current
                self._image_rows = {}
            stale = self._stale_image_classes()
            if stale:
                logger.error("%s", describe_stale(stale))

    def _image_row(self, cls: ImageClass) -> np.ndarray:
        """The ``[S, D]`` row of the image-built class ``cls`` (derived from its stored examples, cached)."""
        with self._lock:
            row = self._image_rows.get(cls.name) if self._image_classes.get(cls.name) is cls else None
        if row is None:
            row = self._compute_image_row(cls)
            with self._lock:
                if self._image_classes.get(cls.name) is cls:
                    self._image_rows[cls.name] = row
        return row

    def _compute_image_row(self, cls: ImageClass) -> np.ndarray:
        """:func:`~serving.image_classes.image_class_row` of ``cls`` with this bundle's shift and text encoder."""
        shift = None
        if cls.modality_shift:
            shift = self._shift
            if shift is None and not self._warned_no_shift:
                self._warned_no_shift = True
                logger.warning("the bundle has no calibration image embeddings: image-built classes are served "
                               "WITHOUT the modality shift (they may outscore text classes); re-export the bundle "
                               "with calibration to get it")
        text = self._text_embeddings_for([cls.name])[:, 0] if cls.text_weight > 0 else None  # [S, D]
        return image_class_row(cls.embeds, num_sets=self._num_sets, text_embeds=text, text_weight=cls.text_weight,
                               shift=shift)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[n, D]`` L2-normalised image-graph embeddings of ``images`` (``/classify``'s preprocessing)."""
        chunks = []
        cfg = self.bundle.preprocessing
        for start in range(0, len(images), IMAGE_BATCH):
            _check_deadline("encoding example images")
            pixels = preprocess(images[start:start + IMAGE_BATCH], cfg)  # [B, 3, H, W]
            chunks.append(self._encode_images(pixels)[0])  # [B, D]
        return np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)

    def add_image_class(self, name: str, blobs: Sequence[bytes], *, text_weight: float | None = None,
                        modality_shift: bool | None = None) -> dict:
        """Register the class ``name`` built from the encoded example images ``blobs`` (see :mod:`.image_classes`).

        Args:
            text_weight: blend weight ``w`` of the name's text embedding, in [0, 1] (``None``: the default, 0).
            modality_shift: move the image prototype into the text cone with the bundle's calibration images
                (``None``: the default, on).

        Returns:
            ``{"added": [name], "version", "num_classes", "source", "num_images"}``.

        Raises:
            RequestError: no images, too many (413), ``text_weight`` outside [0, 1].
            ImageDecodeError, PayloadTooLargeError: as ``/classify`` for an image or the pixel budget.
            ClassNameError: an invalid name or one already registered (field ``name``).
        """
        blobs = list(blobs)
        if not blobs:
            raise RequestError("no example images given: send 1 to "
                               f"{self.max_class_images} image files in field 'images'", field="images")
        if len(blobs) > self.max_class_images:
            raise PayloadTooLargeError(
                f"{len(blobs)} example images in one request; a class may be built from at most "
                f"{self.max_class_images} (PROMPTCLIP_MAX_CLASS_IMAGES): send fewer", field="images")
        w = DEFAULT_TEXT_WEIGHT if text_weight is None else text_weight
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) or not 0.0 <= float(w) <= 1.0:
            raise RequestError(f"text_weight must be a number between 0 (images only) and 1 (name only), got {w!r}",
                               field="text_weight")
        shift = DEFAULT_MODALITY_SHIFT if modality_shift is None else bool(modality_shift)
        (new,) = self.registry.normalize_names([name], field="name")
        embeds = self.embed_images(self._decode_all(blobs))  # [n, D]
        cls = ImageClass(new, embeds, float(w), shift, self._image_key)
        row = self._compute_image_row(cls)  # text encoder problems surface before anything is persisted

        def store_examples(added: list[str]) -> None:  # file lock held, before classes.json names the class
            current = self._images.load() if self._images.path is not None else dict(self._image_classes)
            current[new] = cls  # replaces an orphan left by a failed commit
            self._images.save(current)
            with self._lock:
                self._image_classes = current
                self._image_rows = {new: row}

        try:
            added, version, num = self.registry.add_versioned(
                [new], before_commit=store_examples, after_commit=self._after_change)
        except ClassNameError as exc:
            raise ClassNameError(str(exc), field="name") from exc
        logger.info("class %r built from %d example image(s) (text_weight %.2f, modality shift %s)", new,
                    len(embeds), cls.text_weight, "on" if shift and self._shift is not None else "off")
        return {"added": added, "version": version, "num_classes": num, "source": cls.source,
                "num_images": cls.num_images}

    def _after_change(self, names: list[str]) -> None:
        """After a committed change (file lock held): drop the examples of classes no longer listed, then store
        the runtime text classes' embeddings."""
        current = self._images.load() if self._images.path is not None else dict(self._image_classes)
        listed = set(names)
        gone = [n for n in current if n not in listed]
        if gone:
            for n in gone:
                del current[n]
            self._images.save(current)
            logger.info("removed the example images of %d class(es): %s", len(gone), ", ".join(map(repr, gone[:10])))
        with self._lock:
            self._image_classes = current
            self._image_rows = {n: r for n, r in self._image_rows.items() if n in current}
        if self._store is not None:
            self._persist(names)

    # -- class list management -----------------------------------------------------------------

    def _drop_orphan_examples(self, new: list[str]) -> None:
        """Before names are registered as text classes (file lock held): forget examples stored under those names
        by an image add whose commit failed, so the names are not served as image-built classes."""
        current = self._images.load() if self._images.path is not None else dict(self._image_classes)
        keys = {class_name_key(n) for n in new}
        orphans = [n for n in current if class_name_key(n) in keys]
        if not orphans:
            return
        for n in orphans:
            del current[n]
        self._images.save(current)
        logger.warning("dropped the stored example images of %s (left by an add that was not committed)",
                       ", ".join(map(repr, orphans)))
        with self._lock:
            self._image_classes = current
            self._image_rows = {n: r for n, r in self._image_rows.items() if n in current}

    def add_classes(self, names: Sequence[str]) -> dict:
        """Register new classes (encoded before they are persisted); ``{"added", "version", "num_classes",
        "source": "text", "num_images": 0}`` (the same provenance ``/classes`` shows for them)."""
        if isinstance(names, Sequence) and not isinstance(names, (str, bytes)) and len(names) > self.max_add_names:
            raise PayloadTooLargeError(
                f"{len(names)} names in one request; at most {self.max_add_names} may be added at once "
                "(PROMPTCLIP_MAX_ADD_NAMES): split the list into several requests", field="names")
        normalised = self.registry.normalize_names(names, field="names")
        self._text_embeddings_for(normalised)  # encoder problems surface before the change is persisted
        added, version, num = self.registry.add_versioned(normalised, before_commit=self._drop_orphan_examples,
                                                          after_commit=self._after_change)
        return {"added": added, "version": version, "num_classes": num, "source": SOURCE_TEXT, "num_images": 0}

    def remove_classes(self, names: Sequence[str]) -> dict:
        """Unregister classes; ``{"removed", "version", "num_classes"}``."""
        removed, version, num = self.registry.remove_versioned(names, after_commit=self._after_change)
        return {"removed": removed, "version": version, "num_classes": num}

    def _is_runtime(self, name: str) -> bool:
        return class_name_key(name) not in self._bundle_rows

    def _is_text_runtime(self, name: str) -> bool:
        """A runtime class whose row is its name's text embedding (not one built from example images)."""
        return self._is_runtime(name) and name not in self._image_classes

    def _persist(self, names: list[str]) -> None:
        """Store the embeddings of ``names``' runtime classes (the registry's file lock held): ours, the file's (rows
        other workers wrote) or the LRU cache's; a row none of them has is encoded by whoever next builds the list."""
        assert self._store is not None
        disk = self._store.load() if self._store.changed() else {}
        rows: dict[str, np.ndarray] = {}
        with self._lock:
            for name in names:
                if not self._is_text_runtime(name):
                    continue
                for source in (self._stored, disk, self._cache):
                    vec = source.get(name)
                    if vec is not None:
                        rows[name] = vec
                        break
            self._stored = rows
        self._store.save(rows)

    def list_classes(self) -> dict:
        """``{"names", "version", "num_classes", "classes"}`` of the active class list (other workers' changes
        included); ``classes`` gives each class's provenance ``{"name", "source", "num_images"}`` (``source``:
        ``"text"``, ``"images"`` or ``"text+images"``)."""
        self.registry.refresh()
        version, names = self.registry.snapshot()
        self._reload_image_classes()
        with self._lock:
            images = dict(self._image_classes)
        classes = [{"name": n, "source": images[n].source, "num_images": images[n].num_images} if n in images
                   else {"name": n, "source": SOURCE_TEXT, "num_images": 0} for n in names]
        return {"names": names, "version": version, "num_classes": len(names), "classes": classes}

    def info(self) -> dict:
        """Health/readiness details: method, classes, prompt sets, runtime and providers."""
        self.registry.refresh()
        version, names = self.registry.snapshot()
        return {
            "status": "ok",
            "method": self.bundle.method_name,
            "backbone": self.bundle.backbone_name,
            "num_classes": len(names),
            "classes_version": version,
            "runtime": self.runtime.name,
            "providers": list(self.runtime.providers),
            "embedding_dim": self.bundle.embedding_dim,
            "num_prompt_sets": self._num_sets,
            "prompt_sets": self.bundle.prompt_set_names,
            "worker_pid": os.getpid(),
            "open_set": self.open_set_info(),
        }

    def open_set_info(self) -> dict | None:
        """The calibration behind open-set answers and the defaults in force; None when the bundle has none."""
        if self._open_set is None:
            return None
        cal = self._open_set.calibration
        return {"calibrated": True, "num_images": cal.num_images, "num_classes": int(len(set(cal.labels.tolist()))),
                "rule": self.open_set_rule or cal.rule,
                "keep_rate": self.keep_rate if self.keep_rate is not None else cal.keep_rate}


def check_bundle_digest(bundle_dir: str | os.PathLike, expected: str) -> str:
    """Raise :class:`~serving.errors.BundleError` unless the bundle's digest (:func:`serving.manifest.bundle_digest`:
    the manifest and every file) is ``expected``; returns the digest."""
    expected = expected.strip()
    if not expected.startswith(DIGEST_PREFIX) or len(expected) != len(DIGEST_PREFIX) + 64:
        raise BundleError(f"pinned bundle digest {expected[:80]!r} is not of the form {DIGEST_PREFIX}<64 hex digits> "
                          "(copy the line `promptclip export` printed)", field="bundle_digest")
    actual = bundle_digest(bundle_dir)
    if actual != expected.lower():
        raise BundleError(
            f"bundle {bundle_dir} has digest {actual}, but {expected} was pinned (--bundle-digest / "
            "PROMPTCLIP_BUNDLE_DIGEST): a file of the bundle or its manifest changed since export. Re-export it, or "
            "pin the new digest if the change is intended.", field="bundle_digest")
    return actual


def open_class_registry(bundle: Bundle, state_dir: str | os.PathLike | None, *, max_classes: int = 10000,
                        start_empty: bool = False) -> ClassRegistry:
    """The bundle's tokenizer and the class registry in ``state_dir`` (no inference runtime: cheap enough for a
    pre-flight check of the state before a server starts). Raises :class:`~serving.classes.ClassStateError` for a
    corrupt, unreadable or lost state file."""
    try:
        tokenizer = ClipTokenizer(bundle.vocab_path, context_length=bundle.context_length)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot load the bundle's tokenizer vocabulary {bundle.vocab_path}: {exc}; "
                          "re-export the bundle") from exc
    return ClassRegistry(state_dir, bundle.class_names, tokenizer=tokenizer,
                         template=_longest_template(bundle.templates, tokenizer), max_classes=max_classes,
                         start_empty=start_empty)


def _longest_template(templates: Sequence[str], tokenizer: ClipTokenizer) -> str:
    """The template leaving the fewest tokens for a class name (so a name that fits it fits every set's)."""
    return max(templates, key=lambda t: tokenizer.num_tokens(t.format("")))
