"""Open-set answers: a calibrated score per prediction and an explicit "none of these" per image.

A bundle may carry ``calibration.npz`` (written by ``promptclip export --calibration``): held-out labelled images of
its classes, embedded by the bundle's own image graph after the shared preprocessing, so their scores are exactly
what the service computes for an upload. From them the service calibrates, for the class list a request is ranked
against (the registered list at its version, or an ad-hoc list), one threshold per scoring rule:

* ``max_cosine``: the best class's cosine similarity (with several prompt sets, the image's weighted sum of the
  per-set cosines, as ranking combines them);
* ``msp``: the best class's softmax probability over the whole class list (adding a class spreads the
  probability, so its threshold moves with the list).

Only calibration images whose true class is on the list are used (their best score over the list is what a known
image scores); the threshold is their ``(1 - keep_rate)`` quantile (lower), so at least ``keep_rate`` of them are
kept. With fewer than :data:`MIN_CALIBRATION_IMAGES` of them (e.g. a list of runtime-added classes only),
``max_cosine`` falls back to all calibration images scored against the bundle's exported classes
(``basis: "bundle"``) and ``msp`` answers null (``basis: "none"``): a softmax over another list is not comparable.

Every prediction gets ``confidence``: the conformal p-value of its score, the fraction of calibration scores <= it.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, RequestError
from .format import DEFAULT_KEEP_RATE, OPEN_SET_RULES, class_name_key

__all__ = ["Calibration", "OpenSetDecision", "OpenSetScorer", "MIN_CALIBRATION_IMAGES", "RULES",
           "combined_cosines", "softmax", "load_calibration", "write_calibration", "check_keep_rate", "check_rule",
           "DEFAULT_KEEP_RATE"]

logger = logging.getLogger(__name__)

RULES = OPEN_SET_RULES
#: Fewest calibration images of the listed classes a list-specific threshold is computed from.
MIN_CALIBRATION_IMAGES = 20
#: Calibration images scored per matrix product (the classifier's image batch size).
_CHUNK = 32
#: Bases of a decision (reported as ``open_set.basis``).
BASIS_CLASSES, BASIS_BUNDLE, BASIS_NONE = "classes", "bundle", "none"


@dataclass(frozen=True, eq=False)
class Calibration:
    """The bundle's calibration images: what :attr:`serving.bundle.Bundle.calibration` returns.

    The image graph gives one embedding per image; it is stored once per prompt set (``image_embeds[k]`` is what
    set ``k`` scores), so the layout holds for an image graph with per-set embeddings too.
    """

    image_embeds: np.ndarray  # [S, N, D] float32, L2-normalised
    weights: np.ndarray | None  # [N, S] float32 per-image prompt-set weights (multi-set bundles), else None
    labels: np.ndarray  # [N] int64, indices into class_names
    class_names: list[str]  # the bundle's exported classes
    keep_rate: float  # default share of known images kept
    rule: str  # default rule

    @property
    def num_images(self) -> int:
        """Number of calibration images N."""
        return int(self.labels.shape[0])


def combined_cosines(image_embeds: np.ndarray, weights: np.ndarray | None, matrix: np.ndarray) -> np.ndarray:
    """Cosines ``[B, C]`` of images to classes, combined over prompt sets as ranking does.

    ``image_embeds`` is ``[B, D]`` (one embedding for every set) or ``[S, B, D]``; ``weights [B, S]`` or None
    (one set); ``matrix [S, C, D]``. One matrix product per set, the same for uploads and calibration images.
    """
    num_sets = matrix.shape[0]
    per_set = [image_embeds if image_embeds.ndim == 2 else image_embeds[k] for k in range(num_sets)]
    if weights is None:
        return per_set[0] @ matrix[0].T  # [B, C]
    sims = np.stack([e @ matrix[k].T for k, e in enumerate(per_set)], axis=1)  # [B, S, C]
    return np.einsum("bs,bsc->bc", weights, sims)  # [B, C]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (``[B, C]``)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def rule_scores(cosines: np.ndarray, logit_scale: float, rule: str) -> np.ndarray:
    """Per-class scores ``[B, C]`` (float64) of ``rule`` from combined cosines ``[B, C]``."""
    if rule == "max_cosine":
        return cosines.astype(np.float64)
    return softmax(np.float32(logit_scale) * cosines)


def check_rule(rule: object, *, field: str = "open_set_rule") -> str:
    """``rule`` if it is a known rule, else :class:`RequestError` naming ``field``."""
    if not isinstance(rule, str) or rule not in RULES:
        raise RequestError(f"{field} must be one of {', '.join(RULES)}, got {rule!r}", field=field)
    return rule


def check_keep_rate(rate: object, *, field: str = "keep_rate") -> float:
    """``rate`` as a float if ``0 < rate <= 1``, else :class:`RequestError` naming ``field``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not math.isfinite(rate) \
            or not 0 < rate <= 1:
        raise RequestError(f"{field} must be a number with 0 < {field} <= 1 (the share of images of listed classes "
                           f"kept; 1 never answers none_of_these), got {rate!r}", field=field)
    return float(rate)


# -- the file ----------------------------------------------------------------------------------------------------


def write_calibration(path: str | os.PathLike, image_embeds: np.ndarray, labels: np.ndarray,
                      weights: np.ndarray | None = None) -> Path:
    """Write ``calibration.npz`` atomically (temp file + fsync + replace): ``image_embeds [S, N, D]``,
    ``labels [N]`` and, for several prompt sets, ``weights [N, S]``."""
    path = Path(path)
    arrays = {"image_embeds": np.ascontiguousarray(image_embeds, dtype=np.float32),
              "labels": np.ascontiguousarray(labels, dtype=np.int64)}
    if weights is not None:
        arrays["weights"] = np.ascontiguousarray(weights, dtype=np.float32)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-calibration-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_calibration(path: str | os.PathLike, *, num_sets: int, dim: int, class_names: Sequence[str],
                     keep_rate: float, rule: str) -> Calibration:
    """Read and check ``calibration.npz`` against the bundle (sets, dimension, labels); raises
    :class:`BundleError` saying what is wrong."""
    fix = "re-export the bundle with `promptclip export --calibration DIR`, or remove the manifest's calibration"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # zip / npy format errors have several types
        raise BundleError(f"cannot read calibration file {path}: {exc}; {fix}") from exc
    for key in ("image_embeds", "labels"):
        if key not in arrays:
            raise BundleError(f"calibration file {path} has no array {key!r} (has {sorted(arrays)}); {fix}")
    embeds, labels, weights = arrays["image_embeds"], arrays["labels"], arrays.get("weights")
    if embeds.dtype != np.float32 or embeds.ndim != 3 or embeds.shape[0] != num_sets or embeds.shape[2] != dim:
        raise BundleError(f"calibration image_embeds is {embeds.dtype} {list(embeds.shape)}, expected float32 "
                          f"[{num_sets}, N, {dim}] (prompt sets x images x embedding_dim); {fix}")
    n = embeds.shape[1]
    if labels.dtype != np.int64 or labels.shape != (n,):
        raise BundleError(f"calibration labels is {labels.dtype} {list(labels.shape)}, expected int64 [{n}]; {fix}")
    if n == 0 or labels.min() < 0 or labels.max() >= len(class_names):
        raise BundleError(f"calibration labels must index the bundle's {len(class_names)} classes (and N >= 1); "
                          f"{fix}")
    if num_sets > 1:
        if weights is None or weights.dtype != np.float32 or weights.shape != (n, num_sets):
            got = "missing" if weights is None else f"{weights.dtype} {list(weights.shape)}"
            raise BundleError(f"calibration weights is {got}, expected float32 [{n}, {num_sets}] for a bundle with "
                              f"{num_sets} prompt sets; {fix}")
    elif weights is not None:
        raise BundleError(f"calibration file {path} has weights but the bundle has one prompt set; {fix}")
    return Calibration(image_embeds=embeds, weights=weights, labels=labels, class_names=list(class_names),
                       keep_rate=float(keep_rate), rule=rule)


# -- decisions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class OpenSetDecision:
    """The calibrated threshold of one rule for one class list and keep rate."""

    rule: str
    keep_rate: float
    basis: str  # "classes", "bundle" or "none"
    sorted_scores: np.ndarray | None  # [n] ascending calibration scores; None when basis is "none"

    @property
    def num_images(self) -> int:
        """Calibration images the threshold comes from."""
        return 0 if self.sorted_scores is None else int(len(self.sorted_scores))

    @property
    def threshold(self) -> float | None:
        """The ``(1 - keep_rate)`` quantile (lower) of the scores; ``-inf`` for ``keep_rate == 1``; None without
        a basis."""
        s = self.sorted_scores
        if s is None:
            return None
        if self.keep_rate >= 1.0:
            return -math.inf
        # keep every score >= s[i]: at least n - i >= keep_rate * n of them, with i as large as allowed
        i = int(math.floor(len(s) * (1.0 - self.keep_rate) + 1e-9))
        return float(s[min(i, len(s) - 1)])

    def confidence(self, scores: np.ndarray) -> np.ndarray | None:
        """Conformal p-values: fraction of calibration scores <= each of ``scores`` (any shape)."""
        s = self.sorted_scores
        if s is None:
            return None
        return np.searchsorted(s, scores, side="right") / len(s)

    def none_of_these(self, best: np.ndarray) -> list[bool | None]:
        """Per image: best score below the threshold (never for ``keep_rate == 1``; None without a basis)."""
        t = self.threshold
        if t is None:
            return [None] * len(best)
        return [bool(b < t) for b in best]

    def describe(self) -> dict:
        """The response's ``open_set`` object."""
        t = self.threshold
        return {"rule": self.rule, "keep_rate": self.keep_rate,
                "threshold": None if t is None or math.isinf(t) else t, "basis": self.basis,
                "num_images": self.num_images}


class OpenSetScorer:
    """Thresholds per class list and rule, calibrated on a bundle's :class:`Calibration` (thread-safe, LRU-cached).

    Args:
        calibration: the bundle's calibration images.
        bundle_matrix: ``[S, C0, D]`` embeddings of the bundle's exported classes (the fallback basis).
        logit_scale: the bundle's factor from cosine to logit (the softmax of ``msp``).
    """

    def __init__(self, calibration: Calibration, bundle_matrix: np.ndarray, logit_scale: float, *,
                 cache_size: int = 64) -> None:
        self.calibration = calibration
        self._bundle_matrix = bundle_matrix
        self._logit_scale = float(logit_scale)
        self._label_keys = [class_name_key(calibration.class_names[i]) for i in calibration.labels]
        self._cache: OrderedDict[tuple, tuple[str, np.ndarray | None]] = OrderedDict()
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()

    def decision(self, names: Sequence[str], matrix: np.ndarray, rule: str, keep_rate: float,
                 list_key: object = None) -> OpenSetDecision:
        """The decision of ``rule`` at ``keep_rate`` for the class list ``names`` with embeddings ``matrix
        [S, C, D]``; ``list_key`` identifies the list for the cache (default: the names)."""
        key = (list_key if list_key is not None else tuple(names), rule)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._calibrate(names, matrix, rule)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        basis, scores = hit
        return OpenSetDecision(rule=rule, keep_rate=keep_rate, basis=basis, sorted_scores=scores)

    def _scores(self, mask: np.ndarray, matrix: np.ndarray, rule: str) -> np.ndarray:
        """Ascending best scores ``[n]`` of the calibration images in ``mask`` against ``matrix [S, C, D]``."""
        cal = self.calibration
        embeds = cal.image_embeds[:, mask]  # [S, n, D]
        weights = None if cal.weights is None else cal.weights[mask]  # [n, S]
        best = []
        for start in range(0, embeds.shape[1], _CHUNK):  # chunks as the classifier's image batches: same products
            w = None if weights is None else weights[start:start + _CHUNK]
            cos = combined_cosines(embeds[:, start:start + _CHUNK], w, matrix)  # [b, C]
            best.append(rule_scores(cos, self._logit_scale, rule).max(axis=1))
        return np.sort(np.concatenate(best))

    def _calibrate(self, names: Sequence[str], matrix: np.ndarray, rule: str) -> tuple[str, np.ndarray | None]:
        listed = {class_name_key(n) for n in names}
        mask = np.array([k in listed for k in self._label_keys], dtype=bool)
        n = int(mask.sum())
        if n >= MIN_CALIBRATION_IMAGES:
            logger.debug("open set: %s threshold from %d calibration images of %d listed classes", rule, n,
                         len(names))
            return BASIS_CLASSES, self._scores(mask, matrix, rule)
        if rule == "max_cosine":
            logger.warning("open set: only %d calibration image(s) of the %d listed classes (< %d): max_cosine "
                           "threshold from all %d calibration images against the bundle's classes (basis 'bundle')",
                           n, len(names), MIN_CALIBRATION_IMAGES, self.calibration.num_images)
            return BASIS_BUNDLE, self._scores(np.ones_like(mask), self._bundle_matrix, rule)
        logger.warning("open set: only %d calibration image(s) of the %d listed classes (< %d): no msp threshold "
                       "for this list (none_of_these and confidence are null; max_cosine falls back to the bundle's "
                       "classes)", n, len(names), MIN_CALIBRATION_IMAGES)
        return BASIS_NONE, None
