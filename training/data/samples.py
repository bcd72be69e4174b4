"""Dataset records (:class:`Sample`, :class:`DatasetSplits`) and split-level operations:
few-shot sampling and the CoOp base/new class split."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.format import canonical_class_name
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "Sample",
    "DatasetSplits",
    "class_name_from_folder",
    "sample_few_shot",
    "subsample_classes",
    "SUBSAMPLE_CHOICES",
]

#: Accepted values of :func:`subsample_classes` ``which``.
SUBSAMPLE_CHOICES = ("base", "new", "all")


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: str  #: absolute path of the image file
    label: int  #: index into the split's classnames
    domain: str = ""  #: optional domain name (DomainBed-style datasets)


@dataclass
class DatasetSplits:
    """Class names plus train/val/test sample lists of one dataset."""

    classnames: list[str]  #: human-readable names, index = label
    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    name: str = ""
    template: str = "a photo of a {}."  #: hand-crafted zero-shot template of the dataset

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classnames)``)."""
        return len(self.classnames)


def class_name_from_folder(folder: str) -> str:
    """Human-readable class name of a folder name: ``"red_circle"`` -> ``"red circle"``.

    The one class-name rule, :func:`serving.format.canonical_class_name`: underscores become spaces, surrounding
    whitespace is stripped and runs of whitespace collapse.
    """
    return canonical_class_name(folder)


def _class_seed(seed: int, label: int) -> int:
    """A per-class seed derived from ``(seed, label)``; stable across runs and PYTHONHASHSEED."""
    digest = hashlib.sha256(f"promptclip-few-shot:{int(seed)}:{int(label)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sample_few_shot(
    samples: Sequence[Sample],
    shots: int,
    seed: int,
    *,
    classnames: Sequence[str] | None = None,
) -> list[Sample]:
    """Pick ``shots`` samples per class, deterministically for a given ``seed``.

    Each class's samples are sorted by path, then ``min(shots, n)`` are drawn without replacement
    with a generator seeded from ``(seed, label)``, so the pick of one class does not depend on the
    other classes or on input order. Classes with fewer than ``shots`` samples keep all of them
    (a warning names them; pass ``classnames`` for readable names). ``shots <= 0`` keeps every
    sample. The result is sorted by ``(label, path)``.
    """
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)

    out: list[Sample] = []
    short: list[str] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: (s.path, s.domain))
        if shots <= 0:
            out.extend(group)
            continue
        if len(group) < shots:
            name = classnames[label] if classnames is not None and 0 <= label < len(classnames) else None
            short.append(f"{label} ({name!r}: {len(group)})" if name else f"{label} ({len(group)})")
            out.extend(group)
            continue
        rng = random.Random(_class_seed(seed, label))
        out.extend(rng.sample(group, shots))

    if short:
        logger.warning(
            "%d class(es) have fewer than %d images and keep all they have: %s",
            len(short), shots, ", ".join(short),
        )
    out.sort(key=lambda s: (s.label, s.path, s.domain))
    return out


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Restrict ``splits`` to the base or new half of its classes (CoOp base-to-new protocol).

    Labels are taken in sorted order; ``base`` is the first ``ceil(n / 2)`` labels, ``new`` the
    rest, relabelled ``0..m-1``. Applies to train, val, test and classnames. ``all`` returns
    ``splits`` unchanged.
    """
    choice = which.strip().lower() if isinstance(which, str) else which
    if choice not in SUBSAMPLE_CHOICES:
        raise DatasetError(
            f"unknown class subsample {which!r} for dataset {splits.name or '<unnamed>'!r}: "
            f"expected one of {'|'.join(SUBSAMPLE_CHOICES)}"
        )
    if choice == "all":
        return splits

    n = len(splits.classnames)
    m = math.ceil(n / 2)
    kept = list(range(m)) if choice == "base" else list(range(m, n))
    relabel = {old: new for new, old in enumerate(kept)}

    def _filter(items: list[Sample]) -> list[Sample]:
        return [dataclasses.replace(s, label=relabel[s.label]) for s in items if s.label in relabel]

    return dataclasses.replace(
        splits,
        classnames=[splits.classnames[i] for i in kept],
        train=_filter(splits.train),
        val=_filter(splits.val),
        test=_filter(splits.test),
    )
