"""A cached few-shot pick: :func:`few_shot_cached` stores the samples :func:`~training.data.samples.sample_few_shot`
drew as JSON (never pickle), so that every run of a (dataset, shots, seed) trains on the same images."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence

from training.data.samples import DatasetSplits, Sample, sample_few_shot
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "few_shot_cached",
]


_CACHE_FORMAT = "promptclip-few-shot"
_CACHE_VERSION = 1


def _common_base(samples: Sequence[Sample]) -> str:
    paths = [os.path.abspath(s.path) for s in samples]
    if len(set(paths)) == 1:
        return os.path.dirname(paths[0])
    return os.path.commonpath(paths)


def _rel(path: str, base: str) -> str:
    return os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")


def _fingerprint(splits: DatasetSplits) -> dict:
    return {"classnames": list(splits.classnames), "num_train": len(splits.train)}


def _load_cache(path: str, fingerprint: dict, by_rel: Mapping[str, Sample]) -> tuple[list[Sample] | None, str]:
    """``(samples, "")`` from a valid cache, else ``(None, reason)``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"cannot be read as JSON ({exc})"
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("samples"), list):
        return None, "is not a promptclip few-shot cache"
    if data.get("version") != _CACHE_VERSION:
        return None, f"has format version {data.get('version')!r}, expected {_CACHE_VERSION}"
    if data.get("fingerprint") != fingerprint:
        old = data.get("fingerprint") or {}
        return None, (
            "was made for another dataset "
            f"({len(old.get('classnames', []))} classes / {old.get('num_train')} train samples, "
            f"now {len(fingerprint['classnames'])} / {fingerprint['num_train']}"
            + ("" if old.get("classnames") == fingerprint["classnames"] else ", class names differ")
            + ")"
        )
    out: list[Sample] = []
    for i, entry in enumerate(data["samples"]):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int)):
            return None, f"has a malformed entry samples[{i}] = {entry!r}"
        sample = by_rel.get(entry[0])
        if sample is None or sample.label != entry[1]:
            return None, f"lists {entry[0]!r} (label {entry[1]}), which is not a train sample of this dataset"
        out.append(sample)
    return out, ""


def few_shot_cached(
    splits: DatasetSplits,
    shots: int,
    seed: int,
    cache_dir: str | os.PathLike,
) -> list[Sample]:
    """:func:`sample_few_shot` of ``splits.train``, cached in ``cache_dir/shot_{K}-seed_{S}.json``.

    The cache is JSON (never pickle): ``{"format", "version", "dataset", "shots", "seed",
    "fingerprint": {"classnames", "num_train"}, "samples": [[relative_path, label], ...]}``,
    paths relative to the common folder of the train images (so a moved dataset still matches).
    A valid cache is returned as is (the same samples, in the same order, on every run); a cache
    whose fingerprint differs, that lists unknown samples, or that cannot be parsed is rebuilt
    with a warning naming it. ``shots <= 0`` returns every train sample and writes nothing.
    """
    shots, seed = int(shots), int(seed)
    if shots <= 0:
        return sample_few_shot(splits.train, shots, seed, classnames=splits.classnames)
    if not splits.train:
        raise DatasetError(f"dataset {splits.name or '<unnamed>'} has no train samples to draw {shots} shots from")
    cache_s = os.path.abspath(os.fspath(cache_dir))
    if os.path.exists(cache_s) and not os.path.isdir(cache_s):
        raise DatasetError(f"few-shot cache folder {cache_s} exists and is not a directory")
    path = os.path.join(cache_s, f"shot_{shots}-seed_{seed}.json")
    base = _common_base(splits.train)
    fingerprint = _fingerprint(splits)
    by_rel: dict[str, Sample] = {}
    for s in splits.train:
        by_rel.setdefault(_rel(s.path, base), s)

    if os.path.isfile(path):
        cached, reason = _load_cache(path, fingerprint, by_rel)
        if cached is not None:
            logger.info("reusing few-shot split %s (%d samples)", path, len(cached))
            return cached
        logger.warning("few-shot cache %s %s: rebuilding it", path, reason)

    picked = sample_few_shot(splits.train, shots, seed, classnames=splits.classnames)
    payload = {
        "format": _CACHE_FORMAT,
        "version": _CACHE_VERSION,
        "dataset": splits.name,
        "shots": shots,
        "seed": seed,
        "fingerprint": fingerprint,
        "samples": [[_rel(s.path, base), s.label] for s in picked],
    }
    try:
        os.makedirs(cache_s, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shot-", suffix=".json.tmp", dir=cache_s)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    except OSError as exc:
        raise DatasetError(f"cannot write the few-shot cache {path}: {exc}") from exc
    logger.info("wrote few-shot split %s (%d samples)", path, len(picked))
    return picked
