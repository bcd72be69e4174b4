"""Readers of the multi-domain (domain generalisation) datasets and the task builders over them.

:func:`read_domain_dataset` reads DomainBed's ``<root>/<dataset>/<domain>/<class>/<image>`` into one
:class:`~training.data.samples.DatasetSplits` per domain, all of its samples in ``train`` (the pool; split it with
:func:`holdout_split`, which reproduces DomainBed's ``misc.split_dataset``); :func:`read_domain_folders` does the
same for any ``root/<domain>/<class>/<image>`` folder. :func:`read_imagenet_dg` reads GuiDG's ImageNet-DG layout.
:func:`leave_one_domain_out` and :func:`multi_source_task` turn them into one multi-source DG task. Class folder
names go through :func:`~training.data.samples.class_name_from_folder`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from training.data.catalog import (
    IMAGENET_DG_SOURCES,
    PHOTO_TEMPLATE,
    domain_dataset_info,
    imagenet_dg_target_domain,
    is_imagenet_dg,
    name_key,
)
from training.data.files import images_per_folder, require_dir, subdirs, wnid_folders
from training.data.readers_coop import read_imagenet_classnames
from training.data.samples import DatasetSplits, Sample, class_name_from_folder
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "HoldoutSplit", "holdout_split", "leave_one_domain_out", "multi_source_task", "read_domain_dataset",
    "read_domain_folders", "read_imagenet_dg",
]


def read_domain_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    domains: Sequence[str] | None = None,
) -> dict[str, DatasetSplits]:
    """Read a DomainBed dataset ``root/<dataset>/<domain>/<class>/<image>`` into
    ``{domain: DatasetSplits}`` (DomainBed's domain order).

    Each domain's samples all go to ``train`` (split them with :func:`holdout_split`), in
    DomainBed/ImageFolder order (sorted class folders, sorted files), with ``Sample.domain`` set.
    Classes are the sorted class folder names (prompt names: ``"_" -> " "``); every domain must
    hold the same class folders. ``domains`` restricts the read to some domains. Domain folders
    are matched ignoring case, ``_`` and spaces (``Real_World`` = ``Real World``); unknown extra
    folders are ignored with a warning.
    """
    info = domain_dataset_info(name)
    root_s = os.path.abspath(os.fspath(root))
    layout = info.layout_text(root_s)
    base = next((os.path.join(root_s, f) for f in info.folders if os.path.isdir(os.path.join(root_s, f))), None)
    if base is None:
        raise DatasetError(
            f"{info.name} folder not found: looked for "
            f"{' and '.join(os.path.join(root_s, f) for f in info.folders)}\n{layout}"
        )
    present = {name_key(d): d for d in subdirs(base)}
    wanted = list(info.domains)
    if domains is not None:
        known = {name_key(d): d for d in info.domains}
        wanted = []
        for d in domains:
            if name_key(d) not in known:
                raise DatasetError(
                    f"unknown domain {d!r} for {info.name}: known domains are {', '.join(info.domains)}"
                )
            wanted.append(known[name_key(d)])
    missing = [os.path.join(base, d) for d in wanted if name_key(d) not in present]
    if missing:
        raise DatasetError(f"{info.name} domain folder(s) missing: {', '.join(missing)}\n{layout}")
    extra = sorted(v for k, v in present.items() if k not in {name_key(d) for d in info.domains})
    if extra:
        logger.warning("%s: ignoring folder(s) that are not %s domains: %s",
                       info.name, info.name, ", ".join(os.path.join(base, e) for e in extra))

    out = _read_domain_dirs([(d, os.path.join(base, present[name_key(d)])) for d in wanted], info.name, info.template,
                            layout)
    n_classes = len(next(iter(out.values())).classnames) if out else 0
    if out and n_classes != info.num_classes:
        logger.warning("%s has %d classes in %s, expected %d", info.name, n_classes, base, info.num_classes)
    return out


def _read_domain_dirs(dirs: Sequence[tuple[str, str]], dataset: str, template: str,
                      layout: str) -> dict[str, DatasetSplits]:
    """``{domain: DatasetSplits}`` (every sample in ``train``, ``Sample.domain`` set) of ``(domain, folder)`` pairs
    whose folders each hold the same ``<class>/<image>`` sub-folders."""
    out: dict[str, DatasetSplits] = {}
    ref_classes: list[str] | None = None
    ref_domain = ""
    for domain, domain_dir in dirs:
        classes = subdirs(domain_dir)
        if not classes:
            raise DatasetError(f"{dataset} domain folder {domain_dir} holds no class folders\n{layout}")
        if ref_classes is None:
            ref_classes, ref_domain = classes, domain_dir
        elif classes != ref_classes:
            lacking = sorted(set(ref_classes) - set(classes))
            added = sorted(set(classes) - set(ref_classes))
            detail = "; ".join(
                part for part in (
                    f"lacks {', '.join(lacking[:10])}" if lacking else "",
                    f"has extra {', '.join(added[:10])}" if added else "",
                ) if part
            )
            raise DatasetError(
                f"{dataset} domain {domain!r} ({domain_dir}) has a different class set than {ref_domain}: "
                f"{detail}\n{layout}"
            )
        per = images_per_folder(domain_dir, classes, layout)
        samples = [Sample(p, label, domain) for label, c in enumerate(classes) for p in per[c]]
        out[domain] = DatasetSplits(
            classnames=[class_name_from_folder(c) for c in classes],
            train=samples, name=f"{dataset}/{domain}", template=template,
        )
    return out


def read_domain_folders(root: str | os.PathLike, *, template: str = PHOTO_TEMPLATE) -> dict[str, DatasetSplits]:
    """Any multi-domain image folder ``root/<domain>/<class>/<image>`` (your own domains: cameras, sites, styles)
    into ``{domain: DatasetSplits}`` in sorted domain order, like :func:`read_domain_dataset` for the DomainBed
    sets: every sample in ``train`` with ``Sample.domain`` set; every domain must hold the same class folders."""
    root_s = os.path.abspath(os.fspath(root))
    layout = f"expected layout: {root_s}/<domain>/<class>/<image> (the same class folders in every domain)"
    require_dir(root_s, "domain folder root", layout)
    domains = subdirs(root_s)
    if len(domains) < 2:
        raise DatasetError(f"{root_s} holds {len(domains)} domain folder(s); multi-domain data needs at least two "
                           f"(one source and the target)\n{layout}")
    return _read_domain_dirs([(d, os.path.join(root_s, d)) for d in domains], os.path.basename(root_s) or root_s,
                             template, layout)


def leave_one_domain_out(domains: Mapping[str, DatasetSplits], target: str, *, test_fraction: float = 0.2,
                         seed: int = 0) -> DatasetSplits:
    """One multi-source DG task: ``train`` = every other domain's samples (``Sample.domain`` set: one source domain
    each), ``test`` = the target domain's ``test_fraction`` holdout "out" split (GuiDG's full-data protocol uses
    20%; ``test_fraction=1`` tests on the whole target domain)."""
    matches = [d for d in domains if name_key(d) == name_key(target)]
    if not matches:
        raise DatasetError(f"target domain {target!r} is not one of the domains {', '.join(domains)}")
    target = matches[0]
    if len(domains) < 2:
        raise DatasetError("leave-one-domain-out needs at least two domains (a source and the target)")
    ref = domains[target]
    train = [s for d, split in domains.items() if d != target for s in split.train]
    target_samples = ref.train + ref.test
    test = target_samples if test_fraction >= 1.0 else holdout_split(target_samples, test_fraction, seed).out_split
    name = ref.name.rsplit("/", 1)[0] if "/" in ref.name else ref.name
    return DatasetSplits(classnames=list(ref.classnames), train=train, test=test, name=f"{name}->{target}",
                         template=ref.template)


class HoldoutSplit(NamedTuple):
    """Result of :func:`holdout_split`."""

    in_split: list[Sample]  #: the remaining ``1 - fraction`` (DomainBed's "in")
    out_split: list[Sample]  #: ``int(len * fraction)`` samples (DomainBed's "out")


def holdout_split(samples: Sequence[Sample], fraction: float, seed: int) -> HoldoutSplit:
    """Split ``samples`` like DomainBed's ``misc.split_dataset``: the indices are shuffled with
    ``numpy.random.RandomState(seed)``, the first ``int(len(samples) * fraction)`` form the "out"
    split and the rest the "in" split (each keeps the shuffled order).

    GuiDG's full-data protocol uses ``fraction=0.7`` (experts train on the 30% "in" split, step 2
    on the 70% "out" split); DomainBed's test split of a target domain is ``fraction=0.2``'s "out".
    """
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0.0 <= fraction <= 1.0):
        raise DatasetError(f"holdout fraction must be in [0, 1], got {fraction!r}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise DatasetError(f"holdout seed must be in [0, 2**32), got {seed}")
    items = list(samples)
    keys = list(range(len(items)))
    np.random.RandomState(seed).shuffle(keys)
    n_out = int(len(items) * fraction)
    return HoldoutSplit(
        in_split=[items[k] for k in keys[n_out:]],
        out_split=[items[k] for k in keys[:n_out]],
    )


# --------------------------------------------------------------------------- ImageNet-DG (GuiDG)


def _imagenet_dg_layout(base: str) -> str:
    return (
        "expected layout for ImageNet-DG (GuiDG):\n"
        f"  {base}/{{a,i/train,i/val,r,s,v2}}/<wnid>/<image>\n"
        f"  {base}/<domain>/classnames.txt   (\"<wnid> <class name>\" per line; needed in the target domain)"
    )


def multi_source_task(root: str | os.PathLike, target: str, *, dataset: str | None = None, test_fraction: float = 0.2,
                      seed: int = 0) -> DatasetSplits:
    """A multi-source DG task (GuiDG's protocols) as one :class:`DatasetSplits` with domain-tagged training samples.

    ``dataset``: ``None`` for your own ``root/<domain>/<class>/<image>`` folder (:func:`read_domain_folders`), a
    DomainBed name (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet), or ``imagenet-dg`` (sources ImageNet train,
    -Sketch, -V2; ``target`` a, i or r; tested on the whole target). Otherwise the target domain is left out and
    tested on its ``test_fraction`` holdout split (GuiDG: 20%).
    """
    if dataset is not None and is_imagenet_dg(dataset):
        sources, tgt = read_imagenet_dg(root, target)
        train = [s for split in sources.values() for s in split.train]
        return DatasetSplits(classnames=tgt.classnames, train=train, test=tgt.test, name=tgt.name,
                             template=tgt.template)
    domains = read_domain_folders(root) if dataset is None else read_domain_dataset(dataset, root)
    return leave_one_domain_out(domains, target, test_fraction=test_fraction, seed=seed)


def read_imagenet_dg(root: str | os.PathLike, target: str) -> tuple[dict[str, DatasetSplits], DatasetSplits]:
    """Read one ImageNet-DG task of GuiDG: ``(sources, target)``.

    ``root`` holds ``ImageNet/`` (e.g. ``DomainBed/domainbed/data``) or is that ``ImageNet``
    folder. ``target`` is ``a`` (ImageNet-A), ``i`` (ImageNet val) or ``r`` (ImageNet-R); long
    names such as ``imagenet-a`` are accepted. The classes are the target's wnid folders in
    sorted order (labels ``0..C-1``), named from the target's ``classnames.txt``. ``sources``
    maps ``i/train``, ``s`` and ``v2`` to splits whose ``train`` holds that domain's samples of
    the target's classes only (other wnids dropped); the target's samples are in ``test``.
    ``Sample.domain`` is the domain folder (``"i/train"``, ``"a"``, ...).
    """
    root_s = os.path.abspath(os.fspath(root))
    target_domain = imagenet_dg_target_domain(target)
    base = os.path.join(root_s, "ImageNet")
    if not os.path.isdir(base) and os.path.basename(root_s) == "ImageNet":
        base = root_s
    layout = _imagenet_dg_layout(base)
    require_dir(base, "ImageNet-DG folder", layout)

    target_dir = os.path.join(base, *target_domain.split("/"))
    require_dir(target_dir, f"ImageNet-DG target folder ({target_domain})", layout)
    names_path = os.path.join(target_dir, "classnames.txt")
    names = read_imagenet_classnames(names_path, layout=layout)
    wnids = wnid_folders(target_dir, "ImageNet-DG target folder", names, names_path, layout)
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [class_name_from_folder(names[w]) for w in wnids]
    per = images_per_folder(target_dir, wnids, layout)
    target_splits = DatasetSplits(
        classnames=list(classnames),
        test=[Sample(p, label_of[w], target_domain) for w in wnids for p in per[w]],
        name=f"ImageNet-DG/{target_domain}", template=PHOTO_TEMPLATE,
    )

    sources: dict[str, DatasetSplits] = {}
    for domain in IMAGENET_DG_SOURCES:
        domain_dir = os.path.join(base, *domain.split("/"))
        require_dir(domain_dir, f"ImageNet-DG source folder ({domain})", layout)
        present = set(subdirs(domain_dir))
        kept = [w for w in wnids if w in present]
        if not kept:
            raise DatasetError(
                f"ImageNet-DG source folder {domain_dir} holds none of the {len(wnids)} target classes "
                f"of {target_dir}\n{layout}"
            )
        if len(kept) < len(wnids):
            logger.warning("ImageNet-DG source %s lacks %d of the %d target classes",
                           domain_dir, len(wnids) - len(kept), len(wnids))
        per_src = images_per_folder(domain_dir, kept, layout)
        sources[domain] = DatasetSplits(
            classnames=list(classnames),
            train=[Sample(p, label_of[w], domain) for w in kept for p in per_src[w]],
            name=f"ImageNet-DG/{domain}", template=PHOTO_TEMPLATE,
        )
    logger.info(
        "ImageNet-DG target %s: %d classes, %d target images; sources %s",
        target_domain, len(wnids), len(target_splits.test),
        ", ".join(f"{d}={len(s.train)}" for d, s in sources.items()),
    )
    return sources, target_splits
