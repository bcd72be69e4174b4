"""Tests of training.data: folder reader, few-shot sampling, base/new split, torch datasets."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from serving.errors import PromptclipError
from training.data import (
    DatasetSplits,
    ImageListDataset,
    Sample,
    class_name_from_folder,
    make_loader,
    read_image_folder,
    sample_few_shot,
    subsample_classes,
)
from training.errors import DatasetError


def _img(path: Path, color=(200, 10, 10), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _flat(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            _img(root / cls / f"{i:02d}.png", color=(10 * i % 255, 20, 30))
    return root


def _samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(f"/data/c{label}/{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


# --------------------------------------------------------------------------- class names


def test_class_name_from_folder():
    assert class_name_from_folder("red_circle") == "red circle"
    assert class_name_from_folder("  big__blue   square_ ") == "big blue square"
    assert class_name_from_folder("cat") == "cat"


# --------------------------------------------------------------------------- folder reader


def test_split_layout_names_labels_and_sizes(tmp_path):
    root = tmp_path / "ds"
    for cls, n in {"zebra": 3, "red_circle": 2, "apple": 4}.items():
        for i in range(n):
            _img(root / "train" / cls / f"{i}.jpg")
    _img(root / "val" / "apple" / "v.png")
    _img(root / "test" / "zebra" / "t0.png")
    _img(root / "test" / "zebra" / "t1.PNG")  # extension check is case-insensitive
    # ignored: hidden files/folders, non-images
    (root / "train" / "apple" / "notes.txt").write_text("x")
    _img(root / "train" / "apple" / ".hidden.png")
    _img(root / "train" / ".cache" / "x.png")

    splits = read_image_folder(root)
    assert isinstance(splits, DatasetSplits)
    assert splits.classnames == ["apple", "red circle", "zebra"]
    assert splits.name == "ds"
    assert splits.template == "a photo of a {}."
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 1, 2)
    assert [s.label for s in splits.train] == [0] * 4 + [1] * 2 + [2] * 3
    assert {s.label for s in splits.test} == {2}
    assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in splits.train + splits.val + splits.test)
    assert not any(".hidden" in s.path or ".cache" in s.path or s.path.endswith(".txt") for s in splits.train)


def test_split_layout_without_val_and_test(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "a" / "0.png")
    _img(root / "train" / "b" / "0.png")
    splits = read_image_folder(root, test_fraction=0.5)  # fractions only apply to the flat layout
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 0, 0)


def test_flat_layout_split_sizes_and_determinism(tmp_path):
    root = _flat(tmp_path / "flat", {"b_cls": 10, "a_cls": 5, "c_cls": 2, "d_cls": 1})
    splits = read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert splits.classnames == ["a cls", "b cls", "c cls", "d cls"]

    def count(items, label):
        return sum(s.label == label for s in items)

    # class a (5): test round(1.0)=1, val 1, train 3; class b (10): 2/2/6
    assert (count(splits.train, 0), count(splits.val, 0), count(splits.test, 0)) == (3, 1, 1)
    assert (count(splits.train, 1), count(splits.val, 1), count(splits.test, 1)) == (6, 2, 2)
    # class c (2): at least one test image, train keeps one; class d (1): train only
    assert (count(splits.train, 2), count(splits.val, 2), count(splits.test, 2)) == (1, 0, 1)
    assert (count(splits.train, 3), count(splits.val, 3), count(splits.test, 3)) == (1, 0, 0)
    # disjoint and complete
    all_paths = [s.path for s in splits.train + splits.val + splits.test]
    assert len(all_paths) == len(set(all_paths)) == 18
    # deterministic for a seed, and the seed matters
    again = read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert again == splits
    others = [read_image_folder(root, val_fraction=0.2, test_fraction=0.2, seed=s).test for s in range(4, 10)]
    assert any(o != splits.test for o in others)


def test_flat_layout_default_fractions(tmp_path):
    root = _flat(tmp_path / "flat", {"x": 10, "y": 10})
    splits = read_image_folder(root)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 0, 4)


def _assert_error(match_path, fn, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(match_path) in msg, msg
    assert isinstance(info.value, PromptclipError)
    return msg


def test_error_root_missing(tmp_path):
    missing = tmp_path / "nope"
    msg = _assert_error(missing, read_image_folder, missing)
    assert "does not exist" in msg
    assert "/train/<class>/<image>" in msg and "/<class>/<image>" in msg  # layout drawing


def test_error_root_not_a_directory(tmp_path):
    f = tmp_path / "file.png"
    _img(f)
    msg = _assert_error(f, read_image_folder, f)
    assert "not a directory" in msg


def test_error_no_class_folders(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    _img(root / "loose.png")  # a file at root is not a class folder
    msg = _assert_error(root, read_image_folder, root)
    assert "no class folders" in msg


def test_error_empty_class_folder(tmp_path):
    root = _flat(tmp_path / "ds", {"good": 2})
    (root / "bad_one").mkdir()
    (root / "bad_one" / "readme.txt").write_text("not an image")
    _assert_error(root / "bad_one", read_image_folder, root)


def test_error_empty_class_folder_split_layout(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "a" / "0.png")
    (root / "train" / "b").mkdir(parents=True)
    _assert_error(root / "train" / "b", read_image_folder, root)


def test_error_duplicate_class_names(tmp_path):
    root = _flat(tmp_path / "ds", {"red_circle": 1, "red circle": 1})
    msg = _assert_error(root / "red_circle", read_image_folder, root)
    assert str(root / "red circle") in msg and "'red circle'" in msg


def test_error_unknown_class_in_test(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "a" / "0.png")
    _img(root / "test" / "a" / "0.png")
    _img(root / "test" / "ghost" / "0.png")
    msg = _assert_error(root / "test" / "ghost", read_image_folder, root)
    assert "ghost" in msg


def test_error_unknown_class_in_val(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "a" / "0.png")
    _img(root / "val" / "b" / "0.png")
    _assert_error(root / "val" / "b", read_image_folder, root)


def test_error_test_folder_without_train(tmp_path):
    root = tmp_path / "ds"
    _img(root / "test" / "a" / "0.png")
    _assert_error(root / "train", read_image_folder, root)


def test_error_bad_fractions(tmp_path):
    root = _flat(tmp_path / "ds", {"a": 3})
    _assert_error(root, read_image_folder, root, test_fraction=1.0)
    _assert_error(root, read_image_folder, root, val_fraction=0.6, test_fraction=0.5)
    _assert_error(root, read_image_folder, root, val_fraction=-0.1)


# --------------------------------------------------------------------------- few-shot


def test_few_shot_counts_and_order():
    samples = _samples({0: 10, 1: 7, 2: 16})
    picked = sample_few_shot(list(reversed(samples)), shots=4, seed=1)
    assert [sum(s.label == c for s in picked) for c in range(3)] == [4, 4, 4]
    assert picked == sorted(picked, key=lambda s: (s.label, s.path))
    assert len(set(picked)) == len(picked)
    assert set(picked) <= set(samples)


def test_few_shot_deterministic_and_seed_dependent():
    samples = _samples({0: 20, 1: 20})
    a = sample_few_shot(samples, shots=4, seed=7)
    b = sample_few_shot(list(reversed(samples)), shots=4, seed=7)  # input order does not matter
    assert a == b
    assert sample_few_shot(samples, shots=4, seed=8) != a
    # one class's pick does not depend on the other classes
    only0 = sample_few_shot([s for s in samples if s.label == 0], shots=4, seed=7)
    assert only0 == [s for s in a if s.label == 0]


def test_few_shot_small_classes_keep_all(caplog):
    samples = _samples({0: 10, 1: 2, 2: 3})
    with caplog.at_level(logging.WARNING, logger="training.data.samples"):
        picked = sample_few_shot(samples, shots=4, seed=0, classnames=["cat", "dog", "eel"])
    assert [sum(s.label == c for s in picked) for c in range(3)] == [4, 2, 3]
    text = caplog.text
    assert "dog" in text and "eel" in text and "cat" not in text


def test_few_shot_all_when_shots_nonpositive():
    samples = _samples({0: 5, 1: 3})
    assert sample_few_shot(samples, shots=0, seed=0) == sorted(samples, key=lambda s: (s.label, s.path))
    assert len(sample_few_shot(samples, shots=-1, seed=0)) == 8


# --------------------------------------------------------------------------- base / new


def _splits(n: int) -> DatasetSplits:
    names = [f"class{i}" for i in range(n)]
    return DatasetSplits(
        classnames=names,
        train=_samples({i: 2 for i in range(n)}),
        val=_samples({i: 1 for i in range(n)}),
        test=_samples({i: 3 for i in range(n)}),
        name="toy",
        template="a toy {}.",
    )


@pytest.mark.parametrize("n,n_base", [(5, 3), (6, 3)])
def test_base_new_split(n, n_base):
    full = _splits(n)
    base = subsample_classes(full, "base")
    new = subsample_classes(full, "new")
    assert base.classnames == full.classnames[:n_base]
    assert new.classnames == full.classnames[n_base:]
    for part, offset, m in ((base, 0, n_base), (new, n_base, n - n_base)):
        assert sorted({s.label for s in part.train}) == list(range(m))
        assert sorted({s.label for s in part.test}) == list(range(m))
        assert len(part.train) == 2 * m and len(part.val) == m and len(part.test) == 3 * m
        # relabelled sample keeps its path: label k of the part is label k+offset of the full set
        for s in part.test:
            assert s.path.startswith(f"/data/c{s.label + offset}/")
        assert part.name == "toy" and part.template == "a toy {}."
    assert subsample_classes(full, "all") is full
    assert full.classnames == [f"class{i}" for i in range(n)]  # input untouched


def test_base_new_unknown_choice():
    with pytest.raises(DatasetError, match=r"base\|new\|all"):
        subsample_classes(_splits(4), "novel")


# --------------------------------------------------------------------------- torch datasets


def test_image_list_dataset_with_transform(tmp_path):
    root = tmp_path / "ds"
    _img(root / "train" / "a" / "0.png", color=(255, 0, 0), size=(20, 10))
    _img(root / "train" / "b" / "0.jpg", color=(0, 0, 255), size=(12, 30))
    Image.new("L", (16, 16), 128).save(root / "train" / "b" / "1.png")  # grayscale -> RGB
    splits = read_image_folder(root)
    tf = transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])
    ds = ImageListDataset(splits.train, tf)
    assert len(ds) == 3
    assert ds.targets == [0, 1, 1]
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16) and y == 0
    assert x[0].mean() > 0.9 and x[2].mean() < 0.1
    x2, y2 = ds[2]
    assert x2.shape == (3, 16, 16) and y2 == 1


def test_image_list_dataset_without_transform(tmp_path):
    p = _img(tmp_path / "a.png", size=(5, 7))
    x, y = ImageListDataset([Sample(str(p), 3)], None)[0]
    assert x.shape == (3, 7, 5) and x.dtype == torch.float32 and y == 3
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_image_list_dataset_cache(tmp_path):
    p = _img(tmp_path / "a.png", color=(0, 255, 0), size=(8, 8))
    tf = transforms.ToTensor()
    ds = ImageListDataset([Sample(str(p), 0)], tf, cache_decoded=True)
    first, _ = ds[0]
    p.unlink()  # served from the cache from now on
    second, _ = ds[0]
    assert torch.equal(first, second)

    uncached = ImageListDataset([Sample(str(p), 0)], tf)
    with pytest.raises(DatasetError, match=str(p)):
        uncached[0]


def test_image_list_dataset_exif_transpose(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (20, 10), (0, 0, 200)).save(p, exif=exif)
    x, _ = ImageListDataset([Sample(str(p), 0)], transforms.ToTensor())[0]
    assert x.shape == (3, 20, 10)


def test_image_list_dataset_bad_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DatasetError, match="broken.png"):
        ImageListDataset([Sample(str(bad), 0)], transforms.ToTensor())[0]


class _Range(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> int:
        return i


def _order(loader) -> list[int]:
    return [int(v) for batch in loader for v in batch]


def test_make_loader_determinism():
    a = _order(make_loader(_Range(), batch_size=4, shuffle=True, seed=5, pin_memory=False))
    b = _order(make_loader(_Range(), batch_size=4, shuffle=True, seed=5, pin_memory=False))
    c = _order(make_loader(_Range(), batch_size=4, shuffle=True, seed=6, pin_memory=False))
    assert a == b and sorted(a) == list(range(20))
    assert a != c
    plain = _order(make_loader(_Range(), batch_size=4, shuffle=False, pin_memory=False))
    assert plain == list(range(20))
    dropped = make_loader(_Range(), batch_size=6, shuffle=True, drop_last=True, pin_memory=False)
    assert len(dropped) == 3
    with pytest.raises(DatasetError):
        make_loader(_Range(), batch_size=0, shuffle=False)


def test_make_loader_defaults():
    loader = make_loader(_Range(), batch_size=2, shuffle=False)
    assert loader.pin_memory == torch.cuda.is_available()



def test_test_only_folder_reads_for_evaluation(tmp_path):
    """A folder with only test/ is refused for training but read for evaluation (classes from test/)."""
    root = tmp_path / "ds"
    _img(root / "test" / "b_cat" / "0.png")
    _img(root / "test" / "a_dog" / "0.png")
    _img(root / "test" / "a_dog" / "1.png")
    _assert_error(root / "train", read_image_folder, root)
    splits = read_image_folder(root, allow_test_only=True)
    assert splits.classnames == ["a dog", "b cat"] and splits.train == [] and len(splits.test) == 3
    assert [s.label for s in splits.test] == [0, 0, 1]
