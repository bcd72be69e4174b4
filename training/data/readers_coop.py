"""Readers of the single-domain benchmarks: the 11 CoOp base-to-novel datasets and the four ImageNet variants.

:func:`read_dataset` reads a dataset of the catalog (:mod:`training.data.catalog`) into a
:class:`~training.data.samples.DatasetSplits`; every failure is a :class:`~training.errors.DatasetError` that names
the file and draws the dataset's expected layout.

Class names (CoOp conventions)
------------------------------
CoOp's ``OxfordPets.read_split`` copies the class name of each ``[path, label, classname]``
entry unchanged: it applies **no rename at read time**. Every dataset-specific rename is baked
into ``split_zhou_*.json`` when CoOp generates the split:

* Caltech101: ``airplanes -> airplane``, ``Faces -> face``, ``Leopards -> leopard``,
  ``Motorbikes -> motorbike`` (``BACKGROUND_Google`` and ``Faces_easy`` are not in the JSON);
* EuroSAT: ``AnnualCrop -> Annual Crop Land``, ..., ``SeaLake -> Sea or Lake``;
* UCF101: CamelCase action names split into ``_``-joined words (``Apply_Eye_Makeup``);
* OxfordPets: lower-cased breeds from the file names (``american_bulldog``);
* SUN397: ``ClassName.txt`` minus the leading ``/x/``, path parts reversed (``indoor apse``);
* Flowers102 (``cat_to_name.json``), StanfordCars (devkit names), Food101/DTD (folder names).

So the stored JSON names are taken as they are (:func:`read_split_json` returns them untouched).
For robustness against a split file generated from raw folder names, the Caltech101 and EuroSAT
rename tables, UCF101's CamelCase splitting (only for a name with no ``_`` or space) and the
OxfordPets lower-casing are also applied at read time; they are idempotent, so on the official
JSONs they change nothing. Finally every name goes through
:func:`~training.data.samples.class_name_from_folder` (``"_"`` becomes ``" "``, as CoOp does at prompt time): the
``classnames`` of the returned :class:`DatasetSplits` are prompt-ready.

FGVCAircraft has no JSON: labels follow ``variants.txt`` order and the splits come from
``images_variant_{train,val,test}.txt``. ImageNet has no JSON either: ``classnames.txt``
("<wnid> <class name>" per line) gives the names, labels follow sorted wnids, train = the
``train`` folder, test = the ``val`` folder (val split empty).

ImageNet variants (test only)
-----------------------------
Class names come from ImageNet's ``classnames.txt`` (``<root>/imagenet/classnames.txt``, or a
copy in the variant's own folder as CoOp's DATASETS.md suggests). ImageNet-V2 and -Sketch use
the full label space (label = index of the wnid in sorted order: ImageNet-V2's folder ``<k>``
is class ``k``); ImageNet-A and -R keep only the wnids present as folders (their 200-class
subsets), in sorted wnid order, relabelled ``0..199``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from training.data.catalog import DatasetInfo, dataset_info, name_key
from training.data.files import (
    images_per_folder,
    read_text_lines,
    require_dir,
    require_file,
    subdirs,
    wnid_folders,
)
from training.data.folder import read_image_folder
from training.data.samples import DatasetSplits, Sample, class_name_from_folder
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "CoopSplit", "read_dataset", "read_split_json", "read_imagenet_classnames", "CALTECH101_RENAMES",
    "EUROSAT_RENAMES",
]

# --------------------------------------------------------------------------- class-name renames

CALTECH101_RENAMES: dict[str, str] = {
    "airplanes": "airplane",
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
}

EUROSAT_RENAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def _split_camel_case(name: str) -> str:
    """``"ApplyEyeMakeup" -> "Apply_Eye_Makeup"`` (a break before every inner capital, as CoOp's
    UCF101 split generation does); names that already hold ``_`` or spaces are left alone."""
    if "_" in name or " " in name:
        return name
    return re.sub(r"(?<=.)(?=[A-Z])", "_", name)


_RENAMERS: dict[str, Callable[[str], str]] = {
    "caltech101": lambda n: CALTECH101_RENAMES.get(n, n),
    "eurosat": lambda n: EUROSAT_RENAMES.get(n, n),
    "ucf101": _split_camel_case,
    "oxfordpets": str.lower,
}


def _prompt_name(raw: str, rename: Callable[[str], str] | None = None) -> str:
    """Prompt-ready class name: the dataset's rename (if any), then ``"_" -> " "``."""
    return class_name_from_folder(rename(raw) if rename is not None else raw)


# --------------------------------------------------------------------------- a catalog dataset


def read_dataset(name: str, root: str | os.PathLike, **options) -> DatasetSplits:
    """Read the dataset ``name`` from under ``root`` (the folder holding all dataset folders;
    for ``imagefolder``, the dataset folder itself).

    ``options`` are accepted by ``imagefolder`` only (``val_fraction``, ``test_fraction``,
    ``seed`` of :func:`read_image_folder`). Raises :class:`DatasetError` for an unknown name or
    a missing/malformed file, naming the file and drawing the dataset's expected layout.
    """
    info = dataset_info(name)
    root_s = os.path.abspath(os.fspath(root))
    if options and info.kind != "imagefolder":
        raise DatasetError(f"dataset {info.name} takes no options, got {', '.join(sorted(options))}")
    if info.kind == "imagefolder":
        allowed = {"val_fraction", "test_fraction", "seed"}
        bad = sorted(set(options) - allowed)
        if bad:
            raise DatasetError(
                f"unknown option(s) {', '.join(bad)} for imagefolder: expected {', '.join(sorted(allowed))}"
            )
        splits = read_image_folder(root_s, **options)
        splits.template = info.template
        return splits
    if not os.path.isdir(root_s):
        raise DatasetError(f"dataset root {root_s} does not exist or is not a directory\n{info.layout_text(root_s)}")
    reader = _READERS[info.kind]
    splits = reader(info, root_s)
    splits.name = info.name
    splits.template = info.template
    logger.info(
        "read %s from %s: %d classes, %d/%d/%d train/val/test images",
        info.name, root_s, splits.num_classes, len(splits.train), len(splits.val), len(splits.test),
    )
    return splits


def _fail(info: DatasetInfo, root: str, message: str) -> DatasetError:
    return DatasetError(f"{message}\n{info.layout_text(root)}")


# --------------------------------------------------------------------------- CoOp split JSON


class CoopSplit(NamedTuple):
    """Content of a CoOp ``split_zhou_*.json``: samples per split and the stored class names."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    classnames: list[str]  #: names exactly as stored in the JSON, index = label


def read_split_json(path: str | os.PathLike, image_dir: str | os.PathLike, *, layout: str = "") -> CoopSplit:
    """Parse a CoOp split file ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``.

    Image paths are joined to ``image_dir``. Class names are collected from all three splits and
    returned as stored. Raises :class:`DatasetError` (naming ``path``; ``layout`` is appended)
    for a missing file, bad JSON, a malformed entry, two names for one label, labels that are not
    ``0..n-1``, or an empty train or test split.
    """
    path_s = os.path.abspath(os.fspath(path))
    image_dir_s = os.path.abspath(os.fspath(image_dir))
    tail = f"\n{layout}" if layout else ""
    require_file(path_s, "split file", layout)
    try:
        with open(path_s, encoding="utf-8") as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"split file {path_s} is not valid JSON: {exc}{tail}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read split file {path_s}: {exc}{tail}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"split file {path_s} must hold a JSON object with train/val/test lists{tail}")
    missing = [k for k in ("train", "val", "test") if k not in data]
    if missing:
        raise DatasetError(f"split file {path_s} lacks the key(s) {', '.join(missing)}{tail}")

    names: dict[int, str] = {}
    lists: dict[str, list[Sample]] = {}
    for split in ("train", "val", "test"):
        entries = data[split]
        if not isinstance(entries, list):
            raise DatasetError(f"split file {path_s}: {split!r} must be a list of [path, label, classname]{tail}")
        out: list[Sample] = []
        for i, entry in enumerate(entries):
            ok = (
                isinstance(entry, (list, tuple)) and len(entry) == 3
                and isinstance(entry[0], str) and entry[0]
                and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
                and isinstance(entry[2], str) and entry[2].strip()
            )
            if not ok:
                raise DatasetError(
                    f"split file {path_s}: {split}[{i}] = {entry!r} is not "
                    f"[relative_image_path, label >= 0, classname]{tail}"
                )
            rel, label, cname = entry
            known = names.setdefault(label, cname)
            if known != cname:
                raise DatasetError(
                    f"split file {path_s}: label {label} is named both {known!r} and {cname!r} "
                    f"({split}[{i}]){tail}"
                )
            out.append(Sample(os.path.join(image_dir_s, rel), label))
        lists[split] = out
    for split in ("train", "test"):
        if not lists[split]:
            raise DatasetError(f"split file {path_s}: the {split!r} list is empty{tail}")
    n = max(names) + 1
    gaps = [i for i in range(n) if i not in names]
    if gaps:
        shown = ", ".join(map(str, gaps[:10])) + (" ..." if len(gaps) > 10 else "")
        raise DatasetError(f"split file {path_s}: labels must be 0..{n - 1}, missing {shown}{tail}")
    return CoopSplit(lists["train"], lists["val"], lists["test"], [names[i] for i in range(n)])


def _spot_check_images(info: DatasetInfo, root: str, split_path: str, lists: Mapping[str, Sequence[Sample]]) -> None:
    """Check that the first and last image of every split exist (a wrong root or image folder
    shows up here without statting every file)."""
    for split, samples in lists.items():
        for s in (samples[:1] + samples[-1:]) if samples else []:
            if not os.path.isfile(s.path):
                raise _fail(info, root, f"image {s.path} listed in {split_path} ({split}) does not exist")


def _read_coop_json(info: DatasetInfo, root: str) -> DatasetSplits:
    layout = info.layout_text(root)
    folder = os.path.join(root, info.folder)
    require_dir(folder, f"{info.name} folder", layout)
    image_dir = os.path.join(folder, info.image_dir) if info.image_dir else folder
    require_dir(image_dir, f"{info.name} image folder", layout)
    split_path = os.path.join(folder, info.split_file)
    parsed = read_split_json(split_path, image_dir, layout=layout)
    _spot_check_images(info, root, split_path, {"train": parsed.train, "val": parsed.val, "test": parsed.test})
    rename = _RENAMERS.get(name_key(info.name))
    classnames = [_prompt_name(n, rename) for n in parsed.classnames]
    _warn_duplicates(info.name, classnames)
    return DatasetSplits(classnames=classnames, train=parsed.train, val=parsed.val, test=parsed.test)


def _warn_duplicates(dataset: str, classnames: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    dupes: list[str] = []
    for i, name in enumerate(classnames):
        if name in seen:
            dupes.append(f"{name!r} (labels {seen[name]} and {i})")
        seen.setdefault(name, i)
    if dupes:
        logger.warning("%s: several labels share a class name: %s", dataset, ", ".join(dupes))


# --------------------------------------------------------------------------- FGVC Aircraft


def _read_fgvc(info: DatasetInfo, root: str) -> DatasetSplits:
    layout = info.layout_text(root)
    folder = os.path.join(root, info.folder)
    require_dir(folder, f"{info.name} folder", layout)
    image_dir = os.path.join(folder, info.image_dir)
    require_dir(image_dir, f"{info.name} image folder", layout)
    variants_path = os.path.join(folder, "variants.txt")
    require_file(variants_path, "variant list", layout)
    variants: list[str] = []
    label_of: dict[str, int] = {}
    for lineno, line in read_text_lines(variants_path, layout):
        if line in label_of:
            raise DatasetError(f"{variants_path}:{lineno}: variant {line!r} is listed twice\n{layout}")
        label_of[line] = len(variants)
        variants.append(line)
    if not variants:
        raise DatasetError(f"variant list {variants_path} is empty\n{layout}")

    lists: dict[str, list[Sample]] = {}
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"images_variant_{split}.txt")
        require_file(path, f"{split} list", layout)
        out: list[Sample] = []
        for lineno, line in read_text_lines(path, layout):
            parts = line.split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DatasetError(f"{path}:{lineno}: expected \"<image id> <variant>\", got {line!r}\n{layout}")
            variant = parts[1].strip()
            if variant not in label_of:
                raise DatasetError(f"{path}:{lineno}: variant {variant!r} is not in {variants_path}\n{layout}")
            out.append(Sample(os.path.join(image_dir, parts[0] + ".jpg"), label_of[variant]))
        lists[split] = out
    for split in ("train", "test"):
        if not lists[split]:
            raise DatasetError(f"{os.path.join(folder, f'images_variant_{split}.txt')} lists no images\n{layout}")
    _spot_check_images(info, root, os.path.join(folder, "images_variant_<split>.txt"), lists)
    return DatasetSplits(
        classnames=[class_name_from_folder(v) for v in variants],
        train=lists["train"], val=lists["val"], test=lists["test"],
    )


# --------------------------------------------------------------------------- ImageNet family


def read_imagenet_classnames(path: str | os.PathLike, *, layout: str = "") -> dict[str, str]:
    """``{wnid: class name}`` from a ``classnames.txt`` with lines ``"<wnid> <class name>"``
    (names as stored; file order kept). Raises :class:`DatasetError` naming the file."""
    path_s = os.path.abspath(os.fspath(path))
    tail = f"\n{layout}" if layout else ""
    require_file(path_s, "class-name file", layout)
    out: dict[str, str] = {}
    for lineno, line in read_text_lines(path_s, layout):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{path_s}:{lineno}: expected \"<wnid> <class name>\", got {line!r}{tail}")
        wnid, name = parts[0], parts[1].strip()
        if wnid in out:
            raise DatasetError(f"{path_s}:{lineno}: wnid {wnid} is listed twice{tail}")
        out[wnid] = name
    if not out:
        raise DatasetError(f"class-name file {path_s} is empty{tail}")
    return out


def _imagenet_classnames(info: DatasetInfo, root: str) -> tuple[dict[str, str], str]:
    """ImageNet's ``{wnid: name}`` for ``info``: ``root/imagenet/classnames.txt``, else a copy in
    the dataset's own folder (CoOp's DATASETS.md)."""
    layout = info.layout_text(root)
    candidates = [os.path.join(root, "imagenet", "classnames.txt")]
    if info.folder != "imagenet":
        candidates.append(os.path.join(root, info.folder, "classnames.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return read_imagenet_classnames(path, layout=layout), path
    raise DatasetError(f"class-name file not found: looked for {' and '.join(candidates)}\n{layout}")


def _read_imagenet(info: DatasetInfo, root: str) -> DatasetSplits:
    layout = info.layout_text(root)
    folder = os.path.join(root, info.folder)
    require_dir(folder, "ImageNet folder", layout)
    names, names_path = _imagenet_classnames(info, root)
    wnids = sorted(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    lists: dict[str, list[Sample]] = {}
    for split in ("train", "val"):
        split_dir = os.path.join(folder, info.image_dir, split)
        require_dir(split_dir, f"ImageNet {split} folder", layout)
        folders = wnid_folders(split_dir, f"ImageNet {split} folder", label_of, names_path, layout)
        per = images_per_folder(split_dir, folders, layout)
        lists[split] = [Sample(p, label_of[w]) for w in folders for p in per[w]]
        absent = len(wnids) - len(folders)
        if absent:
            logger.warning("ImageNet %s folder %s lacks %d of the %d classes of %s",
                           split, split_dir, absent, len(wnids), names_path)
    return DatasetSplits(
        classnames=[class_name_from_folder(names[w]) for w in wnids],
        train=lists["train"], val=[], test=lists["val"],
    )


def _read_imagenet_v2(info: DatasetInfo, root: str) -> DatasetSplits:
    layout = info.layout_text(root)
    names, names_path = _imagenet_classnames(info, root)
    wnids = sorted(names)
    image_dir = os.path.join(root, info.folder, info.image_dir)
    require_dir(image_dir, f"{info.name} image folder", layout)
    folders = subdirs(image_dir)
    if not folders:
        raise DatasetError(f"{info.name} image folder {image_dir} holds no <label> folders\n{layout}")
    bad = [f for f in folders if not (f.isdigit() and int(f) < len(wnids))]
    if bad:
        raise DatasetError(
            f"folder(s) {', '.join(os.path.join(image_dir, f) for f in bad[:5])} are not labels "
            f"0..{len(wnids) - 1} ({len(wnids)} classes in {names_path})\n{layout}"
        )
    ordered = sorted(folders, key=int)
    per = images_per_folder(image_dir, ordered, layout)
    test = [Sample(p, int(f)) for f in ordered for p in per[f]]
    return DatasetSplits(classnames=[class_name_from_folder(names[w]) for w in wnids], test=test)


def _read_imagenet_folders(info: DatasetInfo, root: str) -> DatasetSplits:
    """ImageNet-Sketch (full label space) and ImageNet-A/R (only the wnids present, relabelled)."""
    layout = info.layout_text(root)
    names, names_path = _imagenet_classnames(info, root)
    image_dir = os.path.join(root, info.folder, info.image_dir)
    require_dir(image_dir, f"{info.name} image folder", layout)
    folders = wnid_folders(image_dir, f"{info.name} image folder", names, names_path, layout)
    wnids = folders if info.subset else sorted(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    per = images_per_folder(image_dir, folders, layout)
    test = [Sample(p, label_of[w]) for w in folders for p in per[w]]
    return DatasetSplits(classnames=[class_name_from_folder(names[w]) for w in wnids], test=test)


_READERS: dict[str, Callable[[DatasetInfo, str], DatasetSplits]] = {
    "coop-json": _read_coop_json,
    "fgvc": _read_fgvc,
    "imagenet": _read_imagenet,
    "imagenet-v2": _read_imagenet_v2,
    "imagenet-folders": _read_imagenet_folders,
}
