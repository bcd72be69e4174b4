"""The dataset catalog: which benchmark datasets promptclip reads, where they live and how they are named.

:data:`DATASETS` is an explicit ``{canonical name: DatasetInfo}`` dict; :func:`list_datasets` lists it and
:func:`dataset_info` looks one up (names match case-insensitively, ignoring ``-``, ``_`` and spaces, and a few
aliases such as ``OxfordFlowers`` or ``DescribableTextures`` are accepted). Every record knows its folder under
``root``, its split file, its expected layout and its hand-crafted template. The multi-domain (DomainBed) datasets
live in :data:`DOMAIN_DATASETS` (:func:`list_domain_datasets`, :func:`domain_dataset_info`), GuiDG's ImageNet-DG in
the ``IMAGENET_DG_*`` tables. Readers: :mod:`training.data.readers_coop` (single-domain) and
:mod:`training.data.readers_domainbed` (multi-domain).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from training.errors import DatasetError

__all__ = [
    "PHOTO_TEMPLATE", "DatasetInfo", "DomainDatasetInfo", "DATASETS", "DOMAIN_DATASETS", "BASE_TO_NOVEL_DATASETS",
    "IMAGENET_VARIANTS", "IMAGENET_DG_DOMAINS", "IMAGENET_DG_SOURCES", "IMAGENET_DG_TARGETS", "name_key",
    "list_datasets", "list_domain_datasets", "dataset_info", "domain_dataset_info", "dataset_domains",
    "is_imagenet_dg", "imagenet_dg_target_domain",
]

#: The default hand-crafted zero-shot template.
PHOTO_TEMPLATE = "a photo of a {}."


def name_key(name: str) -> str:
    """The form names are matched in: lower case, letters and digits only (``"Real_World"`` -> ``"realworld"``)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


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
    template: str = PHOTO_TEMPLATE
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
            "{root}/" + f"{folder}/{image_dir + '/' if image_dir else ''}{image_glob}"
            "   (paths as listed in the split file)",
            "{root}/" + f"{folder}/{split_file}   "
            '({"train": [[relative_image_path, label, classname], ...], "val": [...], "test": [...]})',
        ),
    )


_CLASSNAMES_LINE = '{root}/imagenet/classnames.txt   ("<wnid> <class name>" per line)'

_INFOS: tuple[DatasetInfo, ...] = (
    _coop("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", PHOTO_TEMPLATE,
          aliases=("caltech",), image_glob="<class>/image_*.jpg"),
    _coop("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
          aliases=("pets",), image_glob="*.jpg"),
    _coop("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", PHOTO_TEMPLATE,
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
    _coop("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", PHOTO_TEMPLATE, aliases=("sun",),
          image_glob="<letter>/<class>/*.jpg"),
    _coop("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
          aliases=("describabletextures", "textures"), image_glob="<class>/*.jpg"),
    _coop("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
          image_glob="<class>/*.jpg"),
    _coop("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}.",
          aliases=("ucf",), image_glob="<Action_Name>/*.jpg"),
    DatasetInfo(
        name="ImageNet", kind="imagenet", folder="imagenet", template=PHOTO_TEMPLATE, image_dir="images",
        aliases=("ilsvrc", "ilsvrc2012"),
        layout=(
            "{root}/imagenet/images/train/<wnid>/<image>",
            "{root}/imagenet/images/val/<wnid>/<image>   (the test split)",
            _CLASSNAMES_LINE,
        ),
    ),
    DatasetInfo(
        name="ImageNetV2", kind="imagenet-v2", folder="imagenetv2", template=PHOTO_TEMPLATE,
        image_dir="imagenetv2-matched-frequency-format-val",
        layout=(
            "{root}/imagenetv2/imagenetv2-matched-frequency-format-val/<label 0..999>/<image>",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenetv2/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetSketch", kind="imagenet-folders", folder="imagenet-sketch", template=PHOTO_TEMPLATE,
        image_dir="images", aliases=("sketch",),
        layout=(
            "{root}/imagenet-sketch/images/<wnid>/<image>",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-sketch/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetA", kind="imagenet-folders", folder="imagenet-adversarial", template=PHOTO_TEMPLATE,
        image_dir="imagenet-a", aliases=("imagenetadversarial",), subset=True,
        layout=(
            "{root}/imagenet-adversarial/imagenet-a/<wnid>/<image>   (its 200 wnids)",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-adversarial/)",
        ),
    ),
    DatasetInfo(
        name="ImageNetR", kind="imagenet-folders", folder="imagenet-rendition", template=PHOTO_TEMPLATE,
        image_dir="imagenet-r", aliases=("imagenetrendition",), subset=True,
        layout=(
            "{root}/imagenet-rendition/imagenet-r/<wnid>/<image>   (its 200 wnids)",
            _CLASSNAMES_LINE + " (or a copy in {root}/imagenet-rendition/)",
        ),
    ),
    DatasetInfo(
        name="imagefolder", kind="imagefolder", folder="", template=PHOTO_TEMPLATE, aliases=("folder",),
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


def _lookup_table(infos: Mapping[str, object]) -> dict[str, str]:
    table: dict[str, str] = {}
    for canonical, info in infos.items():
        for alias in (canonical, *getattr(info, "aliases", ())):
            table[name_key(alias)] = canonical
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
    canonical = _LOOKUP.get(name_key(name))
    if canonical is None:
        hint = ""
        if name_key(name) in _DOMAIN_LOOKUP:
            hint = (f"\n{_DOMAIN_LOOKUP[name_key(name)]} is a multi-domain (DomainBed) dataset: "
                    "read it with read_domain_dataset")
        raise DatasetError(
            f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}{hint}"
        )
    return DATASETS[canonical]


def domain_dataset_info(name: str) -> DomainDatasetInfo:
    """The registry record of the DomainBed dataset ``name`` (case/separator-insensitive; aliases accepted)."""
    canonical = _DOMAIN_LOOKUP.get(name_key(name))
    if canonical is None:
        raise DatasetError(
            f"unknown domain dataset {name!r}: known domain datasets are {', '.join(DOMAIN_DATASETS)}"
        )
    return DOMAIN_DATASETS[canonical]


def dataset_domains(name: str) -> list[str]:
    """The domains of DomainBed dataset ``name`` in DomainBed order (e.g. PACS: art_painting, cartoon, ...)."""
    return list(domain_dataset_info(name).domains)


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


def is_imagenet_dg(name: str) -> bool:
    """Whether ``name`` names GuiDG's ImageNet-DG (``imagenet-dg``, ``ImageNet_DG``, ...)."""
    return name_key(name) == "imagenetdg"


def imagenet_dg_target_domain(target: str) -> str:
    """The ImageNet-DG domain folder of ``target`` (``a``, ``i`` or ``r``; long names such as ``imagenet-a`` are
    accepted); raises :class:`DatasetError` listing the known targets."""
    code = _DG_TARGET_ALIASES.get(name_key(target))
    if code is None:
        raise DatasetError(
            f"unknown ImageNet-DG target {target!r}: expected one of {', '.join(IMAGENET_DG_TARGETS)} "
            "(ImageNet-A, ImageNet val, ImageNet-R)"
        )
    return IMAGENET_DG_TARGETS[code]
