"""Tests of the benchmark catalog and readers (training.data.catalog, readers_coop, readers_domainbed,
fewshot_cache): the CoOp base-to-novel readers, the ImageNet variants, the DomainBed and ImageNet-DG
readers, holdout splits, the cached few-shot sampler and every error path. All datasets are tiny fake
trees (8x8 images) built under tmp_path."""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (
    BASE_TO_NOVEL_DATASETS,
    DATASETS,
    IMAGENET_DG_SOURCES,
    IMAGENET_VARIANTS,
    DatasetSplits,
    Sample,
    dataset_info,
    few_shot_cached,
    holdout_split,
    list_datasets,
    list_domain_datasets,
    read_dataset,
    read_domain_dataset,
    read_imagenet_dg,
    read_split_json,
    subsample_classes,
)
from training.errors import DatasetError

_COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10), (10, 200, 200), (200, 10, 200)]


def _img(path: Path, i: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), _COLORS[i % len(_COLORS)]).save(path)
    return path


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CoOp JSON datasets

#: name -> (dataset folder, image dir, split file, stored class names, expected prompt names, template)
COOP = {
    "Caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   ["accordion", "airplane", "face", "leopard"],
                   ["accordion", "airplane", "face", "leopard"], "a photo of a {}."),
    "OxfordPets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                   ["abyssinian", "american_bulldog", "basset_hound", "yorkshire_terrier"],
                   ["abyssinian", "american bulldog", "basset hound", "yorkshire terrier"],
                   "a photo of a {}, a type of pet."),
    "StanfordCars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                     ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Audi R8 Coupe"],
                     ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Audi R8 Coupe"], "a photo of a {}."),
    "Flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                   ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
                   ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
                   "a photo of a {}, a type of flower."),
    "Food101": ("food-101", "images", "split_zhou_Food101.json",
                ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio"],
                ["apple pie", "baby back ribs", "baklava", "beef carpaccio"], "a photo of {}, a type of food."),
    "SUN397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               ["abbey", "indoor apse", "airplane_cabin"],
               ["abbey", "indoor apse", "airplane cabin"], "a photo of a {}."),
    "DTD": ("dtd", "images", "split_zhou_DescribableTextures.json",
            ["banded", "blotchy", "braided", "bubbly"], ["banded", "blotchy", "braided", "bubbly"], "{} texture."),
    "EuroSAT": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"],
                ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"],
                "a centered satellite photo of {}."),
    "UCF101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery", "Yo_Yo", "Baby_Crawling"],
               ["Apply Eye Makeup", "Apply Lipstick", "Archery", "Yo Yo", "Baby Crawling"],
               "a photo of a person doing {}."),
}

_COUNTS = {"train": 4, "val": 1, "test": 2}


def _make_coop(root: Path, name: str, stored: list[str] | None = None, counts=_COUNTS) -> dict:
    """A fake CoOp dataset (images + split JSON) under ``root``; returns the JSON content."""
    folder, image_dir, split_file, names, _, _ = COOP[name]
    names = stored if stored is not None else names
    img_root = root / folder / image_dir if image_dir else root / folder
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(names):
        sub = f"c{label}"
        for s, n in counts.items():
            for i in range(n):
                rel = f"{sub}/{s}_{i}.jpg"
                _img(img_root / rel, label)
                split[s].append([rel, label, cname])
    _write_json(root / folder / split_file, split)
    return split


@pytest.mark.parametrize("name", sorted(COOP))
def test_coop_json_datasets(tmp_path, name):
    folder, image_dir, split_file, stored, prompt_names, template = COOP[name]
    _make_coop(tmp_path, name)
    splits = read_dataset(name, tmp_path)
    assert isinstance(splits, DatasetSplits)
    assert splits.name == name
    assert splits.template == template
    assert splits.classnames == prompt_names
    n = len(stored)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4 * n, n, 2 * n)
    assert Counter(s.label for s in splits.train) == {i: 4 for i in range(n)}
    img_root = tmp_path / folder / image_dir if image_dir else tmp_path / folder
    first = splits.train[0]
    assert first.path == str(img_root / "c0" / "train_0.jpg") and first.label == 0 and first.domain == ""
    assert all(os.path.isfile(s.path) for s in splits.train + splits.val + splits.test)


def test_registry_lists_and_resolves_names():
    names = list_datasets()
    assert set(BASE_TO_NOVEL_DATASETS) | set(IMAGENET_VARIANTS) | {"imagefolder"} == set(names)
    assert len(names) == 16 and list(DATASETS) == names
    assert list_domain_datasets() == ["PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet"]
    assert dataset_info("oxford_flowers").name == "Flowers102"
    assert dataset_info("OxfordFlowers").name == "Flowers102"
    assert dataset_info("DescribableTextures").name == "DTD"
    assert dataset_info("imagenet-a").name == "ImageNetA"
    assert dataset_info("ImageNet_Sketch").name == "ImageNetSketch"
    assert dataset_info("fgvc_aircraft").folder == "fgvc_aircraft"


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'cifar10'") as exc:
        read_dataset("cifar10", tmp_path)
    for name in ("Caltech101", "ImageNetR", "imagefolder"):
        assert name in str(exc.value)
    with pytest.raises(DatasetError, match="read_domain_dataset"):
        read_dataset("PACS", tmp_path)


def test_read_time_renames_of_raw_json_names(tmp_path):
    """A split file holding raw folder names gets CoOp's renames; read_split_json keeps them as stored."""
    _make_coop(tmp_path, "Caltech101", stored=["Faces", "Leopards", "Motorbikes", "airplanes"])
    assert read_dataset("Caltech101", tmp_path).classnames == ["face", "leopard", "motorbike", "airplane"]
    raw = read_split_json(tmp_path / "caltech-101" / "split_zhou_Caltech101.json",
                          tmp_path / "caltech-101" / "101_ObjectCategories")
    assert raw.classnames == ["Faces", "Leopards", "Motorbikes", "airplanes"]

    _make_coop(tmp_path, "EuroSAT", stored=["AnnualCrop", "SeaLake", "Highway or Road", "River"])
    assert read_dataset("EuroSAT", tmp_path).classnames == [
        "Annual Crop Land", "Sea or Lake", "Highway or Road", "River"]

    _make_coop(tmp_path, "UCF101", stored=["ApplyEyeMakeup", "YoYo", "Playing_Daf", "Archery"])
    assert read_dataset("UCF101", tmp_path).classnames == ["Apply Eye Makeup", "Yo Yo", "Playing Daf", "Archery"]

    _make_coop(tmp_path, "OxfordPets", stored=["Abyssinian", "Bengal", "american_bulldog"])
    assert read_dataset("OxfordPets", tmp_path).classnames == ["abyssinian", "bengal", "american bulldog"]


def test_base_new_split_of_a_coop_dataset(tmp_path):
    _make_coop(tmp_path, "UCF101")  # 5 classes -> base 3, new 2
    splits = read_dataset("UCF101", tmp_path)
    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")
    assert base.classnames == ["Apply Eye Makeup", "Apply Lipstick", "Archery"]
    assert new.classnames == ["Yo Yo", "Baby Crawling"]
    assert {s.label for s in new.test} == {0, 1} and len(new.test) == 4 and len(base.train) == 12
    assert base.template == new.template == "a photo of a person doing {}."


# --------------------------------------------------------------------------- CoOp JSON errors


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as exc:
        fn(*args, **kwargs)
    return str(exc.value)


def test_coop_missing_folders_and_files(tmp_path):
    msg = _err(read_dataset, "OxfordPets", tmp_path)
    assert str(tmp_path / "oxford_pets") in msg and "does not exist" in msg
    assert f"{tmp_path}/oxford_pets/images/*.jpg" in msg
    assert f"{tmp_path}/oxford_pets/split_zhou_OxfordPets.json" in msg

    (tmp_path / "oxford_pets").mkdir()
    msg = _err(read_dataset, "OxfordPets", tmp_path)
    assert f"image folder {tmp_path}/oxford_pets/images does not exist" in msg

    (tmp_path / "oxford_pets" / "images").mkdir()
    msg = _err(read_dataset, "OxfordPets", tmp_path)
    assert f"split file {tmp_path}/oxford_pets/split_zhou_OxfordPets.json does not exist" in msg
    assert "expected layout for OxfordPets" in msg

    msg = _err(read_dataset, "OxfordPets", tmp_path / "nowhere")
    assert "dataset root" in msg and str(tmp_path / "nowhere") in msg


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"train": [], "val": []}', "lacks the key(s) test"),
        ('{"train": {}, "val": [], "test": []}', "'train' must be a list"),
        ('{"train": [["c0/train_0.jpg", 0]], "val": [], "test": []}', "train[0]"),
        ('{"train": [["c0/train_0.jpg", "0", "a"]], "val": [], "test": []}', "train[0]"),
        ('{"train": [["c0/train_0.jpg", -1, "a"]], "val": [], "test": []}', "label >= 0"),
        ('{"train": [["c0/train_0.jpg", 0, "a"], ["c0/train_1.jpg", 0, "b"]], "val": [], '
         '"test": [["c0/test_0.jpg", 0, "a"]]}', "label 0 is named both 'a' and 'b'"),
        ('{"train": [["c0/train_0.jpg", 0, "a"], ["c0/train_1.jpg", 2, "c"]], "val": [], '
         '"test": [["c0/test_0.jpg", 0, "a"]]}', "labels must be 0..2, missing 1"),
        ('{"train": [], "val": [], "test": [["c0/test_0.jpg", 0, "a"]]}', "the 'train' list is empty"),
        ('{"train": [["c0/train_0.jpg", 0, "a"]], "val": [], "test": []}', "the 'test' list is empty"),
    ],
)
def test_coop_malformed_split_file(tmp_path, content, needle):
    _make_coop(tmp_path, "DTD")
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split_path.write_text(content, encoding="utf-8")
    msg = _err(read_dataset, "DTD", tmp_path)
    assert needle in msg
    assert str(split_path) in msg and "expected layout for DTD" in msg


def test_coop_listed_image_missing(tmp_path):
    _make_coop(tmp_path, "Food101")
    gone = tmp_path / "food-101" / "images" / "c3" / "test_1.jpg"  # the last test entry
    gone.unlink()
    msg = _err(read_dataset, "Food101", tmp_path)
    assert f"image {gone}" in msg and "split_zhou_Food101.json (test)" in msg
    assert "expected layout for Food101" in msg


# --------------------------------------------------------------------------- FGVC Aircraft

_VARIANTS = ["707-320", "A300B4", "F/A-18", "Cessna 172"]


def _make_fgvc(root: Path) -> Path:
    base = root / "fgvc_aircraft"
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(_VARIANTS) + "\n", encoding="utf-8")
    k = 0
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for label, variant in enumerate(_VARIANTS):
            for _ in range(n):
                image_id = f"{1000000 + k}"
                _img(base / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {variant}")
                k += 1
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return base


def test_fgvc_aircraft(tmp_path):
    _make_fgvc(tmp_path)
    splits = read_dataset("FGVCAircraft", tmp_path)
    assert splits.classnames == _VARIANTS  # variants.txt order, not sorted
    assert splits.template == "a photo of a {}, a type of aircraft."
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 8)
    assert [s.label for s in splits.train[:3]] == [0, 0, 0]
    assert splits.train[6].label == 2 and splits.train[6].path.endswith("images/1000006.jpg")


def test_fgvc_errors(tmp_path):
    base = _make_fgvc(tmp_path)
    (base / "images_variant_val.txt").write_text("1000000 Concorde\n", encoding="utf-8")
    msg = _err(read_dataset, "FGVCAircraft", tmp_path)
    assert f"{base}/images_variant_val.txt:1" in msg and "'Concorde'" in msg and "variants.txt" in msg

    (base / "images_variant_val.txt").write_text("1000000\n", encoding="utf-8")
    msg = _err(read_dataset, "FGVCAircraft", tmp_path)
    assert "expected \"<image id> <variant>\"" in msg

    (base / "images_variant_val.txt").unlink()
    msg = _err(read_dataset, "FGVCAircraft", tmp_path)
    assert f"val list {base}/images_variant_val.txt does not exist" in msg
    assert f"{tmp_path}/fgvc_aircraft/images_variant_{{train,val,test}}.txt" in msg

    (base / "variants.txt").unlink()
    msg = _err(read_dataset, "FGVCAircraft", tmp_path)
    assert f"variant list {base}/variants.txt does not exist" in msg


# --------------------------------------------------------------------------- ImageNet family

_WNIDS = {  # deliberately written unsorted into classnames.txt
    "n01530575": "brambling",
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}
_SORTED = sorted(_WNIDS)


def _classnames_txt(path: Path, wnids=_WNIDS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in wnids.items()), encoding="utf-8")
    return path


def _make_imagenet(root: Path, n_train=2, n_val=1) -> None:
    _classnames_txt(root / "imagenet" / "classnames.txt")
    for label, wnid in enumerate(_SORTED):
        for i in range(n_train):
            _img(root / "imagenet" / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", label)
        for i in range(n_val):
            _img(root / "imagenet" / "images" / "val" / wnid / f"ILSVRC2012_val_{label}{i}.JPEG", label)


def test_imagenet(tmp_path):
    _make_imagenet(tmp_path)
    splits = read_dataset("ImageNet", tmp_path)
    assert splits.classnames == [_WNIDS[w] for w in _SORTED]  # sorted wnid order
    assert splits.classnames[0] == "tench"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 0, 6)
    assert splits.test[0].path.endswith(f"val/{_SORTED[0]}/ILSVRC2012_val_00.JPEG") and splits.test[0].label == 0
    assert splits.template == "a photo of a {}."


def test_imagenet_v2_and_sketch(tmp_path):
    _make_imagenet(tmp_path, n_train=1, n_val=1)
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in range(len(_SORTED)):
        _img(v2 / str(label) / "abc.jpeg", label)
        _img(v2 / str(label) / "def.jpeg", label)
    splits = read_dataset("ImageNetV2", tmp_path)
    assert splits.classnames == [_WNIDS[w] for w in _SORTED]
    assert not splits.train and not splits.val and len(splits.test) == 12
    assert [s.label for s in splits.test] == [i for i in range(6) for _ in range(2)]

    sketch = tmp_path / "imagenet-sketch" / "images"
    for wnid in _SORTED[1:]:  # one class absent: the label space stays the full one
        _img(sketch / wnid / "sketch_1.JPEG")
    splits = read_dataset("ImageNetSketch", tmp_path)
    assert splits.num_classes == 6 and {s.label for s in splits.test} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("name, folder", [("ImageNetA", "imagenet-adversarial/imagenet-a"),
                                          ("ImageNetR", "imagenet-rendition/imagenet-r")])
def test_imagenet_a_r_class_subset(tmp_path, name, folder):
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")
    subset = ["n01530575", "n01443537", "n01494475", "n01484850"]  # 4 of the 6 wnids, unsorted here
    for wnid in subset:
        for i in range(2):
            _img(tmp_path / folder / wnid / f"{i}.jpg")
    (tmp_path / folder / "README.txt").write_text("not a class", encoding="utf-8")
    splits = read_dataset(name, tmp_path)
    assert splits.classnames == ["goldfish", "great white shark", "hammerhead shark", "brambling"]
    assert sorted({s.label for s in splits.test}) == [0, 1, 2, 3]
    assert len(splits.test) == 8 and splits.test[0].path.endswith("n01443537/0.jpg")
    assert splits.template == "a photo of a {}."


def test_imagenet_variant_uses_local_classnames_copy(tmp_path):
    """Without <root>/imagenet, CoOp's copy in the variant's own folder is used."""
    _classnames_txt(tmp_path / "imagenet-adversarial" / "classnames.txt")
    _img(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n01440764" / "0.jpg")
    assert read_dataset("ImageNetA", tmp_path).classnames == ["tench"]


def test_imagenet_errors(tmp_path):
    (tmp_path / "imagenet").mkdir()
    msg = _err(read_dataset, "ImageNet", tmp_path)
    assert f"{tmp_path}/imagenet/classnames.txt" in msg and "not found" in msg
    assert f"{tmp_path}/imagenet/images/train/<wnid>/<image>" in msg

    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537\n", encoding="utf-8")
    msg = _err(read_dataset, "ImageNet", tmp_path)
    assert f"{tmp_path}/imagenet/classnames.txt:2" in msg and "<wnid> <class name>" in msg

    _make_imagenet(tmp_path)
    _img(tmp_path / "imagenet" / "images" / "train" / "n99999999" / "x.JPEG")
    msg = _err(read_dataset, "ImageNet", tmp_path)
    assert f"{tmp_path}/imagenet/images/train/n99999999" in msg and "classnames.txt" in msg

    shutil.rmtree(tmp_path / "imagenet" / "images" / "train" / "n99999999")
    shutil.rmtree(tmp_path / "imagenet" / "images" / "val")
    msg = _err(read_dataset, "ImageNet", tmp_path)
    assert f"ImageNet val folder {tmp_path}/imagenet/images/val does not exist" in msg

    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    _img(v2 / "6" / "a.jpeg")  # only labels 0..5 exist
    msg = _err(read_dataset, "ImageNetV2", tmp_path)
    assert f"{v2}/6" in msg and "0..5" in msg

    empty = tmp_path / "imagenet-rendition" / "imagenet-r" / "n01440764"
    empty.mkdir(parents=True)
    msg = _err(read_dataset, "ImageNetR", tmp_path)
    assert f"folder {empty} holds no images" in msg and "expected layout for ImageNetR" in msg


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_registered(tmp_path):
    for cls in ("red_circle", "blue_square"):
        for i in range(3):
            _img(tmp_path / "ds" / "train" / cls / f"{i}.png")
    splits = read_dataset("imagefolder", tmp_path / "ds")
    assert splits.classnames == ["blue square", "red circle"] and len(splits.train) == 6
    assert splits.template == "a photo of a {}."
    assert "unknown option(s) bogus" in _err(read_dataset, "imagefolder", tmp_path / "ds", bogus=1)
    assert "takes no options" in _err(read_dataset, "DTD", tmp_path, seed=1)


# --------------------------------------------------------------------------- DomainBed

_PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


def _make_domainbed(root: Path, folder: str, domains, classes=("dog", "elephant", "guitar"), n=3) -> Path:
    for d in domains:
        for label, cls in enumerate(classes):
            for i in range(n):
                _img(root / folder / d / cls / f"pic_{i:03d}.jpg", label)
    return root / folder


def test_domainbed_pacs(tmp_path, caplog):
    _make_domainbed(tmp_path, "PACS", _PACS_DOMAINS)
    (tmp_path / "PACS" / "extra_stuff").mkdir()
    with caplog.at_level(logging.WARNING, logger="training.data.readers_domainbed"):
        doms = read_domain_dataset("pacs", tmp_path)
    assert "extra_stuff" in caplog.text and "expected 7" in caplog.text
    assert list(doms) == list(_PACS_DOMAINS)
    cartoon = doms["cartoon"]
    assert cartoon.classnames == ["dog", "elephant", "guitar"] and cartoon.name == "PACS/cartoon"
    assert cartoon.template == "a photo of a {}."
    assert len(cartoon.train) == 9 and not cartoon.val and not cartoon.test
    assert {s.domain for s in cartoon.train} == {"cartoon"}
    assert [s.label for s in cartoon.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cartoon.train[0].path == str(tmp_path / "PACS" / "cartoon" / "dog" / "pic_000.jpg")

    only = read_domain_dataset("PACS", tmp_path, domains=["Photo", "sketch"])
    assert list(only) == ["photo", "sketch"]


def test_domainbed_folder_aliases_and_underscore_classes(tmp_path):
    doms = ("Art", "Clipart", "Product", "Real_World")  # "Real World" spelled with an underscore
    _make_domainbed(tmp_path, "office_home", doms, classes=("Alarm_Clock", "Backpack"), n=1)
    out = read_domain_dataset("OfficeHome", tmp_path)
    assert list(out) == ["Art", "Clipart", "Product", "Real World"]
    assert out["Real World"].classnames == ["Alarm Clock", "Backpack"]
    assert out["Real World"].train[0].domain == "Real World"


def test_domainbed_class_set_mismatch(tmp_path):
    base = _make_domainbed(tmp_path, "PACS", _PACS_DOMAINS)
    shutil.rmtree(base / "photo" / "guitar")
    _img(base / "photo" / "horse" / "0.jpg")
    msg = _err(read_domain_dataset, "PACS", tmp_path)
    assert "domain 'photo'" in msg and str(base / "photo") in msg
    assert "lacks guitar" in msg and "has extra horse" in msg
    assert f"{tmp_path}/PACS/<domain>/<class>/<image>" in msg


def test_domainbed_errors(tmp_path):
    msg = _err(read_domain_dataset, "VLCS", tmp_path)
    assert f"{tmp_path}/VLCS" in msg and "not found" in msg and "Caltech101, LabelMe, SUN09, VOC2007" in msg
    base = _make_domainbed(tmp_path, "VLCS", ("Caltech101", "LabelMe", "SUN09"), classes=("bird", "car"), n=1)
    msg = _err(read_domain_dataset, "VLCS", tmp_path)
    assert f"domain folder(s) missing: {base}/VOC2007" in msg
    (base / "VOC2007" / "bird").mkdir(parents=True)
    (base / "VOC2007" / "car").mkdir(parents=True)
    msg = _err(read_domain_dataset, "VLCS", tmp_path)
    assert f"folder {base}/VOC2007/bird holds no images" in msg
    assert "unknown domain dataset 'Office31'" in _err(read_domain_dataset, "Office31", tmp_path)
    assert "unknown domain 'mars'" in _err(read_domain_dataset, "VLCS", tmp_path, domains=["mars"])


def test_read_domain_folders_and_leave_one_domain_out(tmp_path):
    from training.data import leave_one_domain_out, multi_source_task, read_domain_folders

    base = _make_domainbed(tmp_path, "cams", ("site_b", "site_a", "site_c"), classes=("cat", "dog"), n=5)
    doms = read_domain_folders(base)
    assert list(doms) == ["site_a", "site_b", "site_c"] and doms["site_b"].classnames == ["cat", "dog"]
    task = leave_one_domain_out(doms, "Site_C", test_fraction=0.2, seed=0)
    assert {s.domain for s in task.train} == {"site_a", "site_b"} and len(task.train) == 20
    assert len(task.test) == 2 and {s.domain for s in task.test} == {"site_c"}  # int(10 * 0.2)
    assert task.name == "cams->site_c"
    whole = leave_one_domain_out(doms, "site_c", test_fraction=1.0)
    assert len(whole.test) == 10
    assert "not one of the domains" in _err(leave_one_domain_out, doms, "site_z")
    pacs = _make_domainbed(tmp_path, "PACS", _PACS_DOMAINS, n=1)
    task = multi_source_task(tmp_path, "Sketch", dataset="PACS", test_fraction=1.0)
    assert {s.domain for s in task.train} == {"art_painting", "cartoon", "photo"} and len(task.test) == 3
    assert pacs.is_dir()
    (tmp_path / "lonely" / "only_one").mkdir(parents=True)
    assert "at least two" in _err(read_domain_folders, tmp_path / "lonely")


def test_holdout_split():
    samples = [Sample(f"/d/{i:03d}.jpg", i % 3, "photo") for i in range(20)]
    inside, out = holdout_split(samples, 0.7, seed=5)
    assert len(out) == 14 and len(inside) == 6
    assert sorted(inside + out, key=lambda s: s.path) == samples
    keys = list(range(20))
    np.random.RandomState(5).shuffle(keys)  # DomainBed's misc.split_dataset
    assert out == [samples[k] for k in keys[:14]] and inside == [samples[k] for k in keys[14:]]
    assert holdout_split(samples, 0.7, seed=5) == (inside, out)
    assert holdout_split(samples, 0.7, seed=6) != (inside, out)
    assert len(holdout_split(samples, 0.2, 0).out_split) == 4
    assert "fraction" in _err(holdout_split, samples, 1.5, 0)
    assert "seed" in _err(holdout_split, samples, 0.5, -1)


# --------------------------------------------------------------------------- ImageNet-DG

_DG_ALL = sorted(_WNIDS)
_DG_A = ["n01443537", "n01494475", "n01530575"]
_DG_R = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _make_imagenet_dg(root: Path) -> Path:
    base = root / "DomainBed" / "domainbed" / "data" / "ImageNet"
    layout = {"a": _DG_A, "i/train": _DG_ALL, "i/val": _DG_ALL, "r": _DG_R, "s": _DG_ALL, "v2": _DG_ALL}
    for domain, wnids in layout.items():
        d = base.joinpath(*domain.split("/"))
        _classnames_txt(d / "classnames.txt", {w: _WNIDS[w] for w in wnids})
        for wnid in wnids:
            for i in range(2):
                _img(d / wnid / f"{i}.jpg")
    return base


def test_imagenet_dg_target_a(tmp_path):
    base = _make_imagenet_dg(tmp_path)
    sources, target = read_imagenet_dg(tmp_path / "DomainBed" / "domainbed" / "data", "imagenet-a")
    assert list(sources) == list(IMAGENET_DG_SOURCES) == ["i/train", "s", "v2"]
    assert target.classnames == ["goldfish", "hammerhead shark", "brambling"]
    assert target.name == "ImageNet-DG/a" and len(target.test) == 6 and {s.domain for s in target.test} == {"a"}
    for domain, src in sources.items():
        assert src.classnames == target.classnames
        assert len(src.train) == 6  # 3 of the 6 wnids kept, 2 images each
        assert {s.domain for s in src.train} == {domain}
        assert {os.path.basename(os.path.dirname(s.path)) for s in src.train} == set(_DG_A)
        for s in src.train:
            assert _DG_A[s.label] == os.path.basename(os.path.dirname(s.path))
    # root may also be the ImageNet folder itself
    _, target_r = read_imagenet_dg(base, "r")
    assert target_r.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    sources_i, target_i = read_imagenet_dg(base, "i")
    assert target_i.num_classes == 6 and len(sources_i["s"].train) == 12
    assert {s.domain for s in target_i.test} == {"i/val"}


def test_imagenet_dg_errors(tmp_path):
    base = _make_imagenet_dg(tmp_path)
    assert "unknown ImageNet-DG target 'x'" in _err(read_imagenet_dg, base, "x")
    (base / "r" / "classnames.txt").unlink()
    msg = _err(read_imagenet_dg, base, "r")
    assert f"class-name file {base}/r/classnames.txt does not exist" in msg
    assert "{a,i/train,i/val,r,s,v2}/<wnid>/<image>" in msg
    shutil.rmtree(base / "v2")
    msg = _err(read_imagenet_dg, base, "a")
    assert f"source folder (v2) {base}/v2 does not exist" in msg
    msg = _err(read_imagenet_dg, tmp_path / "empty", "a")
    assert f"{tmp_path}/empty/ImageNet does not exist" in msg


# --------------------------------------------------------------------------- cached few-shot


def _fake_splits(root: Path, per_class=(6, 6, 2), name="fake") -> DatasetSplits:
    train = [Sample(str(root / "imgs" / f"c{label}" / f"{i:02d}.jpg"), label)
             for label, n in enumerate(per_class) for i in range(n)]
    return DatasetSplits(classnames=[f"class {i}" for i in range(len(per_class))], train=train, name=name)


def test_few_shot_cached_counts_determinism_and_file(tmp_path):
    splits = _fake_splits(tmp_path)
    cache = tmp_path / "cache"
    picked = few_shot_cached(splits, 4, 1, cache)
    assert Counter(s.label for s in picked) == {0: 4, 1: 4, 2: 2}  # class 2 keeps all it has
    path = cache / "shot_4-seed_1.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["fingerprint"] == {"classnames": ["class 0", "class 1", "class 2"], "num_train": 14}
    assert data["samples"][0] == [os.path.relpath(picked[0].path, tmp_path / "imgs"), 0]
    assert all(not os.path.isabs(p) for p, _ in data["samples"])
    assert few_shot_cached(splits, 4, 1, cache) == picked
    other = few_shot_cached(splits, 4, 2, cache)
    assert (cache / "shot_4-seed_2.json").is_file() and other != picked
    # a fresh run without the cache draws the same samples
    assert few_shot_cached(splits, 4, 1, tmp_path / "cache2") == picked
    assert few_shot_cached(splits, 0, 1, tmp_path / "cache3") == sorted(splits.train, key=lambda s: (s.label, s.path))
    assert not (tmp_path / "cache3").exists()


def test_few_shot_cache_is_reused_and_portable(tmp_path):
    splits = _fake_splits(tmp_path)
    cache = tmp_path / "cache"
    few_shot_cached(splits, 2, 1, cache)
    path = cache / "shot_2-seed_1.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["samples"] = [["c0/05.jpg", 0], ["c1/00.jpg", 1]]  # a hand-edited, still valid pick
    path.write_text(json.dumps(data), encoding="utf-8")
    got = few_shot_cached(splits, 2, 1, cache)
    assert [(os.path.basename(s.path), s.label) for s in got] == [("05.jpg", 0), ("00.jpg", 1)]
    # the same dataset under another root resolves the same relative paths
    moved = _fake_splits(tmp_path / "elsewhere")
    got2 = few_shot_cached(moved, 2, 1, cache)
    assert [s.path for s in got2] == [str(tmp_path / "elsewhere" / "imgs" / "c0" / "05.jpg"),
                                      str(tmp_path / "elsewhere" / "imgs" / "c1" / "00.jpg")]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d["fingerprint"].update(num_train=99), "was made for another dataset"),
        (lambda d: d["fingerprint"].update(classnames=["x", "y", "z"]), "class names differ"),
        (lambda d: d.update(samples=[["c0/99.jpg", 0]]), "not a train sample"),
        (lambda d: d.update(samples=[["c0/00.jpg"]]), "malformed entry"),
        (lambda d: d.update(version=99), "format version"),
        (None, "cannot be read as JSON"),
    ],
)
def test_few_shot_cache_rebuilt_with_warning(tmp_path, caplog, mutate, reason):
    splits = _fake_splits(tmp_path)
    cache = tmp_path / "cache"
    picked = few_shot_cached(splits, 3, 7, cache)
    path = cache / "shot_3-seed_7.json"
    if mutate is None:
        path.write_text("{broken", encoding="utf-8")
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        mutate(data)
        path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="training.data.fewshot_cache"):
        again = few_shot_cached(splits, 3, 7, cache)
    assert again == picked
    assert reason in caplog.text and str(path) in caplog.text and "rebuilding" in caplog.text
    assert json.loads(path.read_text(encoding="utf-8"))["fingerprint"]["num_train"] == 14


def test_few_shot_cache_rebuilt_when_dataset_changes(tmp_path, caplog):
    cache = tmp_path / "cache"
    few_shot_cached(_fake_splits(tmp_path), 2, 1, cache)
    bigger = _fake_splits(tmp_path, per_class=(6, 6, 2, 5))
    with caplog.at_level(logging.WARNING, logger="training.data.fewshot_cache"):
        got = few_shot_cached(bigger, 2, 1, cache)
    assert Counter(s.label for s in got) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert "another dataset" in caplog.text


def test_few_shot_cached_errors(tmp_path):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    msg = _err(few_shot_cached, _fake_splits(tmp_path), 2, 1, tmp_path / "afile")
    assert f"{tmp_path}/afile exists and is not a directory" in msg
    empty = DatasetSplits(classnames=["a"], name="empty")
    assert "no train samples" in _err(few_shot_cached, empty, 2, 1, tmp_path / "c")


def test_few_shot_cached_on_a_read_dataset(tmp_path):
    _make_coop(tmp_path, "EuroSAT")
    splits = read_dataset("EuroSAT", tmp_path)
    cache = tmp_path / "eurosat" / "split_fewshot"
    picked = few_shot_cached(splits, 2, 1, cache)
    assert Counter(s.label for s in picked) == {i: 2 for i in range(4)}
    assert all(p in splits.train for p in picked)
    assert few_shot_cached(read_dataset("EuroSAT", tmp_path), 2, 1, cache) == picked
