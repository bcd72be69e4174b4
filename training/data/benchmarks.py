"""Readers for the prompt-learning benchmarks: the 11 CoOp base-to-novel datasets, the four
ImageNet variants, the DomainBed multi-domain datasets and GuiDG's ImageNet-DG, plus a cached
few-shot sampler.

Registry
--------
:data:`DATASETS` is an explicit ``{canonical name: DatasetInfo}`` dict; :func:`list_datasets`
lists it and :func:`read_dataset` reads one (names match case-insensitively, ignoring ``-``,
``_`` and spaces, and a few aliases such as ``OxfordFlowers`` or ``DescribableTextures`` are
accepted). Every reader knows its folder under ``root``, its split file, its class-name
conventions and its hand-crafted template (``DatasetSplits.template``). The multi-domain
datasets live in :data:`DOMAIN_DATASETS` (:func:`list_domain_datasets`,
:func:`read_domain_dataset`).

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
JSONs they change nothing. Finally ``"_"`` becomes ``" "`` (CoOp does that at prompt time): the
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

Domain generalisation
---------------------
:func:`read_domain_dataset` reads DomainBed's ``<root>/<dataset>/<domain>/<class>/<image>``
into one :class:`DatasetSplits` per domain, all of its samples in ``train`` (the pool; split it
with :func:`holdout_split`, which reproduces DomainBed's ``misc.split_dataset``).
:func:`read_imagenet_dg` reads GuiDG's ImageNet-DG layout.

Few-shot cache
--------------
:func:`few_shot_cached` stores a few-shot pick as JSON (never pickle) so that runs reuse it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from training.data.folder import list_images, read_image_folder
from training.data.samples import DatasetSplits, Sample, class_name_from_folder, sample_few_shot
from training.errors import DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetInfo",
    "DomainDatasetInfo",
    "CoopSplit",
    "HoldoutSplit",
    "DATASETS",
    "DOMAIN_DATASETS",
    "BASE_TO_NOVEL_DATASETS",
    "IMAGENET_VARIANTS",
    "IMAGENET_DG_DOMAINS",
    "IMAGENET_DG_SOURCES",
    "IMAGENET_DG_TARGETS",
    "list_datasets",
    "list_domain_datasets",
    "dataset_info",
    "read_dataset",
    "read_split_json",
    "read_imagenet_classnames",
    "read_domain_dataset",
    "holdout_split",
    "read_imagenet_dg",
    "few_shot_cached",
]

# --------------------------------------------------------------------------- templates / renames

_PHOTO = "a photo of a {}."

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


# --------------------------------------------------------------------------- registry records


@dataclass(frozen=True)
class DatasetInfo:
    """What the registry knows about one single-domain dataset."""

    name: str  #: canonical name, e.g. ``"OxfordPets"``; also ``DatasetSplits.name``
    kind: str  #: reader kind: coop-json | fgvc | imagenet | imagenet-v2 | imagenet-folders | imagefolder
    folder: str  #: dataset folder under ``root`` ("" for imagefolder: root is the dataset)
    template: str  #: hand-crafted zero-shot template
    image_dir: str = ""  #: image folder, relative to ``root/folder``
    split_file: str = ""  #: split file name in ``root/folder`` ("" when none)
    layout: tuple[str, ...] = ()  #: lines drawing the expected layout; ``{root}`` is replaced by the root
    aliases: tuple[str, ...] = ()
    subset: bool = False  #: imagenet-folders: keep only the wnids present as folders (A/R)

    def layout_text(self, root: str | os.PathLike) -> str:
        """The expected on-disk layout with ``root`` filled in."""
        root_s = os.path.abspath(os.fspath(root))
        lines = "\n".join("  " + line.replace("{root}", root_s) for line in self.layout)
        return f"expected layout for {self.name}:\n{lines}"


@dataclass(frozen=True)
class DomainDatasetInfo:
    """What the registry knows about one DomainBed multi-domain dataset."""

    name: str  #: canonical name, e.g. ``"OfficeHome"``
    folders: tuple[str, ...]  #: accepted folder names under ``root`` (DomainBed's first)
    domains: tuple[str, ...]  #: domain folder names, in DomainBed's environment order
    num_classes: int
    template: str = _PHOTO
    aliases: tuple[str, ...] = ()

    def layout_text(self, root: str | os.PathLike) -> str:
        root_s = os.path.abspath(os.fspath(root))
        return (
            f"expected layout for {self.name} (DomainBed):\n"
            f"  {root_s}/{self.folders[0]}/<domain>/<class>/<image>\n"
            f"  with <domain> each of: {', '.join(self.domains)}\n"
            f"  and the same {self.num_classes} <class> folders in every domain"
        )


def _coop(name: str, folder: str, image_dir: str, split_file: str, template: str,
          aliases: tuple[str, ...] = (), image_glob: str = "<image>") -> DatasetInfo:
    return DatasetInfo(
        name=name, kind="coop-json", folder=folder, template=template, image_dir=image_dir,
        split_file=split_file, aliases=aliases,
        layout=(
            "{root}/" + f"{folder}/{image_dir + '/' if image_dir else ''}{image_glob}   (paths as listed in the split file)",
            "{root}/" + f"{folder}/{split_file}   "
            '({"train": [[relative_image_path, label, classname], ...], "val": [...], "test": [...]})',
        ),
    )


_CLASSNAMES_LINE = '{root}/imagenet/classnames.txt   ("<wnid> <class name>" per line)'

_INFOS: tuple[DatasetInfo, ...] = (
    _coop("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", _PHOTO,
          aliases=("caltech",), image_glob="<class>/image_*.jpg"),
    _coop("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
          aliases=("pets",), image_glob="*.jpg"),
    _coop("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", _PHOTO,
          aliases=("cars",), image_glob="{cars_train,cars_test}/*.jpg"),
    _coop("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
          "a photo of a {}, a type of flower.", aliases=("oxfordflowers", "flowers"), image_glob="image_*.jpg"),
    _coop("Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
          aliases=("food",), image_glob="<class>/*.jpg"),
    DatasetInfo(
        name="FGVCAircraft", kind="fgvc", folder="fgvc_aircraft", template="a photo of a {}, a type of aircraft.",
        image_dir="images", aliases=("aircraft", "fgvc"),
        layout=(
            "{root}/fgvc_aircraft/images/<image id>.jpg",
            "{root}/fgvc_aircraft/variants.txt   (one variant name per line; line order = label)",
            "{root}/fgvc_aircraft/images_variant_{train,val,test}.txt   (\"<image id> <variant>\" per line)",
        ),
    ),
    _coop("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", _PHOTO, aliases=("sun",),
          image_glob="<letter>/<class>/*.jpg"),
    _coop("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
          aliases=("describabletextures", "textures"), image_glob="<class>/*.jpg"),
    _coop("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
          image_glob="<class>/*.jpg"),
    _coop("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.",
          aliases=("ucf",), image_glob="<Action_Name>/*.jpg"),
    DatasetInfo(
        name="ImageNet", kind="imagenet", folder="imagenet", template=_PHOTO, image_dir="images",
        aliases=("ilsvrc", "ilsvrc2012"),
        layout=(
            "{root}/imagenet/images/train/<wnid>/<image>",
            "{root}/imagenet/images/val/<wnid>/<image>   (the test split)",
            _CLASSNAMES_LINE,
        ),
    ),
    DatasetInfo(
        name="ImageNetV2", kind="imagenet-v2", folder="imagenetv2", template=_PHOTO,
        image_dir="imagenetv2-matched-frequency-format-val",
        layout=(
            "{root}/imagenetv2/imagenetv2-matched-frequency-format-val/<label 0..999>/<image>",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenetv2/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetSketch", kind="imagenet-folders", folder="imagenet-sketch", template=_PHOTO,
        image_dir="images", aliases=("sketch",),
        layout=(
            "{root}/imagenet-sketch/images/<wnid>/<image>",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-sketch/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetA", kind="imagenet-folders", folder="imagenet-adversarial", template=_PHOTO,
        image_dir="imagenet-a", aliases=("imagenetadversarial",), subset=True,
        layout=(
            "{root}/imagenet-adversarial/imagenet-a/<wnid>/<image>   (its 200 wnids)",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-adversarial/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetR", kind="imagenet-folders", folder="imagenet-rendition", template=_PHOTO,
        image_dir="imagenet-r", aliases=("imagenetrendition",), subset=True,
        layout=(
            "{root}/imagenet-rendition/imagenet-r/<wnid>/<image>   (its 200 wnids)",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-rendition/)",
        ),
    ),
    DatasetInfo(
        name="imagefolder", kind="imagefolder", folder="", template=_PHOTO, aliases=("folder",),
        layout=(
            "{root}/train/<class>/<image>  (optional {root}/val/<class>/..., {root}/test/<class>/...)",
            "or {root}/<class>/<image>  (split per class into train/val/test)",
        ),
    ),
)

#: Canonical name -> :class:`DatasetInfo`, in listing order.
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}

#: The 11 datasets of the base-to-novel / cross-dataset / few-shot protocols (methods.md §2.1).
BASE_TO_NOVEL_DATASETS: tuple[str, ...] = (
    "ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
    "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101",
)
#: Test-only targets of the single-source DG protocol.
IMAGENET_VARIANTS: tuple[str, ...] = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")

_DOMAIN_INFOS: tuple[DomainDatasetInfo, ...] = (
    DomainDatasetInfo("PACS", ("PACS",), ("art_painting", "cartoon", "photo", "sketch"), 7),
    DomainDatasetInfo("VLCS", ("VLCS",), ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5),
    DomainDatasetInfo("OfficeHome", ("office_home", "OfficeHome"), ("Art", "Clipart", "Product", "Real World"), 65,
                      aliases=("office_home",)),
    DomainDatasetInfo("TerraIncognita", ("terra_incognita", "TerraIncognita"),
                      ("location_100", "location_38", "location_43", "location_46"), 10),
    DomainDatasetInfo("DomainNet", ("domain_net", "DomainNet"),
                      ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), 345),
)

#: Canonical name -> :class:`DomainDatasetInfo`.
DOMAIN_DATASETS: dict[str, DomainDatasetInfo] = {info.name: info for info in _DOMAIN_INFOS}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _lookup_table(infos: Mapping[str, object]) -> dict[str, str]:
    table: dict[str, str] = {}
    for canonical, info in infos.items():
        for alias in (canonical, *getattr(info, "aliases", ())):
            table[_key(alias)] = canonical
    return table


_LOOKUP = _lookup_table(DATASETS)
_DOMAIN_LOOKUP = _lookup_table(DOMAIN_DATASETS)


def list_datasets() -> list[str]:
    """Canonical names of the single-domain datasets :func:`read_dataset` reads, in registry order."""
    return list(DATASETS)


def list_domain_datasets() -> list[str]:
    """Canonical names of the multi-domain datasets :func:`read_domain_dataset` reads."""
    return list(DOMAIN_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry record of ``name`` (case/separator-insensitive; aliases accepted)."""
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        hint = ""
        if _key(name) in _DOMAIN_LOOKUP:
            hint = (f"\n{_DOMAIN_LOOKUP[_key(name)]} is a multi-domain (DomainBed) dataset: "
                    "read it with read_domain_dataset")
        raise DatasetError(
            f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}{hint}"
        )
    return DATASETS[canonical]


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


# --------------------------------------------------------------------------- shared helpers


def _fail(info: DatasetInfo, root: str, message: str) -> DatasetError:
    return DatasetError(f"{message}\n{info.layout_text(root)}")


def _subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``path``."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.name != "__MACOSX" and e.is_dir())


def _require_dir(path: str, what: str, layout: str) -> None:
    if not os.path.isdir(path):
        state = "is not a directory" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"{what} {path} {state}\n{layout}")


def _require_file(path: str, what: str, layout: str) -> None:
    if not os.path.isfile(path):
        state = "is not a file" if os.path.exists(path) else "does not exist"
        raise DatasetError(f"{what} {path} {state}\n{layout}")


def _read_text_lines(path: str, layout: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the non-blank lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [(i, line.strip()) for i, line in enumerate(fh, 1) if line.strip()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}\n{layout}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}\n{layout}") from exc


def _images_per_folder(parent: str, folders: Sequence[str], layout: str) -> dict[str, list[str]]:
    """``{folder: sorted image paths}``; an image-less folder is an error naming it."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        images = list_images(os.path.join(parent, folder))
        if not images:
            raise DatasetError(f"folder {os.path.join(parent, folder)} holds no images\n{layout}")
        out[folder] = images
    return out


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
    _require_file(path_s, "split file", layout)
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
    _require_dir(folder, f"{info.name} folder", layout)
    image_dir = os.path.join(folder, info.image_dir) if info.image_dir else folder
    _require_dir(image_dir, f"{info.name} image folder", layout)
    split_path = os.path.join(folder, info.split_file)
    parsed = read_split_json(split_path, image_dir, layout=layout)
    _spot_check_images(info, root, split_path, {"train": parsed.train, "val": parsed.val, "test": parsed.test})
    rename = _RENAMERS.get(_key(info.name))
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
    _require_dir(folder, f"{info.name} folder", layout)
    image_dir = os.path.join(folder, info.image_dir)
    _require_dir(image_dir, f"{info.name} image folder", layout)
    variants_path = os.path.join(folder, "variants.txt")
    _require_file(variants_path, "variant list", layout)
    variants: list[str] = []
    label_of: dict[str, int] = {}
    for lineno, line in _read_text_lines(variants_path, layout):
        if line in label_of:
            raise DatasetError(f"{variants_path}:{lineno}: variant {line!r} is listed twice\n{layout}")
        label_of[line] = len(variants)
        variants.append(line)
    if not variants:
        raise DatasetError(f"variant list {variants_path} is empty\n{layout}")

    lists: dict[str, list[Sample]] = {}
    for split in ("train", "val", "test"):
        path = os.path.join(folder, f"images_variant_{split}.txt")
        _require_file(path, f"{split} list", layout)
        out: list[Sample] = []
        for lineno, line in _read_text_lines(path, layout):
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
    _require_file(path_s, "class-name file", layout)
    out: dict[str, str] = {}
    for lineno, line in _read_text_lines(path_s, layout):
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
    _require_dir(folder, "ImageNet folder", layout)
    names, names_path = _imagenet_classnames(info, root)
    wnids = sorted(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    lists: dict[str, list[Sample]] = {}
    for split in ("train", "val"):
        split_dir = os.path.join(folder, info.image_dir, split)
        _require_dir(split_dir, f"ImageNet {split} folder", layout)
        folders = _subdirs(split_dir)
        if not folders:
            raise DatasetError(f"ImageNet {split} folder {split_dir} holds no <wnid> folders\n{layout}")
        unknown = [f for f in folders if f not in label_of]
        if unknown:
            raise DatasetError(
                f"folder(s) {', '.join(os.path.join(split_dir, f) for f in unknown[:5])} are not wnids "
                f"listed in {names_path}\n{layout}"
            )
        per = _images_per_folder(split_dir, folders, layout)
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
    _require_dir(image_dir, f"{info.name} image folder", layout)
    folders = _subdirs(image_dir)
    if not folders:
        raise DatasetError(f"{info.name} image folder {image_dir} holds no <label> folders\n{layout}")
    bad = [f for f in folders if not (f.isdigit() and int(f) < len(wnids))]
    if bad:
        raise DatasetError(
            f"folder(s) {', '.join(os.path.join(image_dir, f) for f in bad[:5])} are not labels "
            f"0..{len(wnids) - 1} ({len(wnids)} classes in {names_path})\n{layout}"
        )
    ordered = sorted(folders, key=int)
    per = _images_per_folder(image_dir, ordered, layout)
    test = [Sample(p, int(f)) for f in ordered for p in per[f]]
    return DatasetSplits(classnames=[class_name_from_folder(names[w]) for w in wnids], test=test)


def _read_imagenet_folders(info: DatasetInfo, root: str) -> DatasetSplits:
    """ImageNet-Sketch (full label space) and ImageNet-A/R (only the wnids present, relabelled)."""
    layout = info.layout_text(root)
    names, names_path = _imagenet_classnames(info, root)
    image_dir = os.path.join(root, info.folder, info.image_dir)
    _require_dir(image_dir, f"{info.name} image folder", layout)
    folders = _subdirs(image_dir)
    if not folders:
        raise DatasetError(f"{info.name} image folder {image_dir} holds no <wnid> folders\n{layout}")
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DatasetError(
            f"folder(s) {', '.join(os.path.join(image_dir, f) for f in unknown[:5])} are not wnids "
            f"listed in {names_path}\n{layout}"
        )
    wnids = folders if info.subset else sorted(names)
    label_of = {w: i for i, w in enumerate(wnids)}
    per = _images_per_folder(image_dir, folders, layout)
    test = [Sample(p, label_of[w]) for w in folders for p in per[w]]
    return DatasetSplits(classnames=[class_name_from_folder(names[w]) for w in wnids], test=test)


_READERS: dict[str, Callable[[DatasetInfo, str], DatasetSplits]] = {
    "coop-json": _read_coop_json,
    "fgvc": _read_fgvc,
    "imagenet": _read_imagenet,
    "imagenet-v2": _read_imagenet_v2,
    "imagenet-folders": _read_imagenet_folders,
}


# --------------------------------------------------------------------------- DomainBed


def _domain_info(name: str) -> DomainDatasetInfo:
    canonical = _DOMAIN_LOOKUP.get(_key(name))
    if canonical is None:
        raise DatasetError(
            f"unknown domain dataset {name!r}: known domain datasets are {', '.join(DOMAIN_DATASETS)}"
        )
    return DOMAIN_DATASETS[canonical]


def dataset_domains(name: str) -> list[str]:
    """The domains of DomainBed dataset ``name`` in DomainBed order (e.g. PACS: art_painting, cartoon, ...)."""
    return list(_domain_info(name).domains)


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
    info = _domain_info(name)
    root_s = os.path.abspath(os.fspath(root))
    layout = info.layout_text(root_s)
    base = next((os.path.join(root_s, f) for f in info.folders if os.path.isdir(os.path.join(root_s, f))), None)
    if base is None:
        raise DatasetError(
            f"{info.name} folder not found: looked for "
            f"{' and '.join(os.path.join(root_s, f) for f in info.folders)}\n{layout}"
        )
    present = {_key(d): d for d in _subdirs(base)}
    wanted = list(info.domains)
    if domains is not None:
        known = {_key(d): d for d in info.domains}
        wanted = []
        for d in domains:
            if _key(d) not in known:
                raise DatasetError(
                    f"unknown domain {d!r} for {info.name}: known domains are {', '.join(info.domains)}"
                )
            wanted.append(known[_key(d)])
    missing = [os.path.join(base, d) for d in wanted if _key(d) not in present]
    if missing:
        raise DatasetError(f"{info.name} domain folder(s) missing: {', '.join(missing)}\n{layout}")
    extra = sorted(v for k, v in present.items() if k not in {_key(d) for d in info.domains})
    if extra:
        logger.warning("%s: ignoring folder(s) that are not %s domains: %s",
                       info.name, info.name, ", ".join(os.path.join(base, e) for e in extra))

    out = _read_domain_dirs([(d, os.path.join(base, present[_key(d)])) for d in wanted], info.name, info.template,
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
        classes = _subdirs(domain_dir)
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
        per = _images_per_folder(domain_dir, classes, layout)
        samples = [Sample(p, label, domain) for label, c in enumerate(classes) for p in per[c]]
        out[domain] = DatasetSplits(
            classnames=[class_name_from_folder(c) for c in classes],
            train=samples, name=f"{dataset}/{domain}", template=template,
        )
    return out


def read_domain_folders(root: str | os.PathLike, *, template: str = _PHOTO) -> dict[str, DatasetSplits]:
    """Any multi-domain image folder ``root/<domain>/<class>/<image>`` (your own domains: cameras, sites, styles)
    into ``{domain: DatasetSplits}`` in sorted domain order, like :func:`read_domain_dataset` for the DomainBed
    sets: every sample in ``train`` with ``Sample.domain`` set; every domain must hold the same class folders."""
    root_s = os.path.abspath(os.fspath(root))
    layout = f"expected layout: {root_s}/<domain>/<class>/<image> (the same class folders in every domain)"
    _require_dir(root_s, "domain folder root", layout)
    domains = _subdirs(root_s)
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
    matches = [d for d in domains if _key(d) == _key(target)]
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

#: ImageNet-DG domain folders in GuiDG's index order (a=0, i/train=1, i/val=2, r=3, s=4, v2=5).
IMAGENET_DG_DOMAINS: tuple[str, ...] = ("a", "i/train", "i/val", "r", "s", "v2")
#: Source domains of every ImageNet-DG task.
IMAGENET_DG_SOURCES: tuple[str, ...] = ("i/train", "s", "v2")
#: Target name -> target domain folder.
IMAGENET_DG_TARGETS: dict[str, str] = {"a": "a", "i": "i/val", "r": "r"}
_DG_TARGET_ALIASES = {
    "a": "a", "imageneta": "a", "ival": "i", "i": "i", "imagenet": "i", "r": "r", "imagenetr": "r",
}


def _imagenet_dg_layout(base: str) -> str:
    return (
        "expected layout for ImageNet-DG (GuiDG):\n"
        f"  {base}/{{a,i/train,i/val,r,s,v2}}/<wnid>/<image>\n"
        f"  {base}/<domain>/classnames.txt   (\"<wnid> <class name>\" per line; needed in the target domain)"
    )


def is_imagenet_dg(name: str) -> bool:
    """Whether ``name`` names GuiDG's ImageNet-DG (``imagenet-dg``, ``ImageNet_DG``, ...)."""
    return _key(name) == "imagenetdg"


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
    code = _DG_TARGET_ALIASES.get(_key(target))
    if code is None:
        raise DatasetError(
            f"unknown ImageNet-DG target {target!r}: expected one of {', '.join(IMAGENET_DG_TARGETS)} "
            "(ImageNet-A, ImageNet val, ImageNet-R)"
        )
    base = os.path.join(root_s, "ImageNet")
    if not os.path.isdir(base) and os.path.basename(root_s) == "ImageNet":
        base = root_s
    layout = _imagenet_dg_layout(base)
    _require_dir(base, "ImageNet-DG folder", layout)

    target_domain = IMAGENET_DG_TARGETS[code]
    target_dir = os.path.join(base, *target_domain.split("/"))
    _require_dir(target_dir, f"ImageNet-DG target folder ({target_domain})", layout)
    names_path = os.path.join(target_dir, "classnames.txt")
    names = read_imagenet_classnames(names_path, layout=layout)
    wnids = _subdirs(target_dir)
    if not wnids:
        raise DatasetError(f"ImageNet-DG target folder {target_dir} holds no <wnid> folders\n{layout}")
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DatasetError(
            f"folder(s) {', '.join(os.path.join(target_dir, w) for w in unknown[:5])} are not wnids "
            f"listed in {names_path}\n{layout}"
        )
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [class_name_from_folder(names[w]) for w in wnids]
    per = _images_per_folder(target_dir, wnids, layout)
    target_splits = DatasetSplits(
        classnames=list(classnames),
        test=[Sample(p, label_of[w], target_domain) for w in wnids for p in per[w]],
        name=f"ImageNet-DG/{target_domain}", template=_PHOTO,
    )

    sources: dict[str, DatasetSplits] = {}
    for domain in IMAGENET_DG_SOURCES:
        domain_dir = os.path.join(base, *domain.split("/"))
        _require_dir(domain_dir, f"ImageNet-DG source folder ({domain})", layout)
        present = set(_subdirs(domain_dir))
        kept = [w for w in wnids if w in present]
        if not kept:
            raise DatasetError(
                f"ImageNet-DG source folder {domain_dir} holds none of the {len(wnids)} target classes "
                f"of {target_dir}\n{layout}"
            )
        if len(kept) < len(wnids):
            logger.warning("ImageNet-DG source %s lacks %d of the %d target classes",
                           domain_dir, len(wnids) - len(kept), len(wnids))
        per_src = _images_per_folder(domain_dir, kept, layout)
        sources[domain] = DatasetSplits(
            classnames=list(classnames),
            train=[Sample(p, label_of[w], domain) for w in kept for p in per_src[w]],
            name=f"ImageNet-DG/{domain}", template=_PHOTO,
        )
    logger.info(
        "ImageNet-DG target %s: %d classes, %d target images; sources %s",
        target_domain, len(wnids), len(target_splits.test),
        ", ".join(f"{d}={len(s.train)}" for d, s in sources.items()),
    )
    return sources, target_splits


# --------------------------------------------------------------------------- cached few-shot

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
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int)):
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
