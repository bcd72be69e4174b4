"""One decode and one preprocessing path: training's loader decodes with serving's decoder, evaluation preprocesses
with serving's preprocessing, and on a corpus of odd images `eval` and `classify` agree image by image."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from promptclip.cli import main
from serving.preprocess import PreprocessConfig, decode_image, preprocess
from training.artifact import load_prompt_artifact
from training.data import EvalTransform, load_rgb
from training.workflow import eval_transform

CLASSES = ("red circle", "blue square")


def _rgb(seed: int, size=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _write_corpus(root) -> dict[str, str]:
    """test/<class>/<file> for every odd kind of image; returns {kind: path}."""
    files = {}

    def save(kind: str, cls: str, name: str, img: Image.Image, **kw) -> None:
        path = root / "test" / cls.replace(" ", "_") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        files[kind] = str(path)

    arr = _rgb(1)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    rgba[:, :24, :3] = (255, 0, 0)  # bright red under ...
    rgba[:, :24, 3] = 0             # ... fully transparent pixels (serving: white; convert("RGB"): red)
    save("transparent", CLASSES[0], "transparent.png", Image.fromarray(rgba, "RGBA"))
    pal = Image.fromarray(_rgb(2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    save("palette", CLASSES[0], "palette.png", pal, transparency=3)
    grey16 = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    save("16-bit", CLASSES[0], "grey16.png", Image.fromarray(grey16))
    save("cmyk", CLASSES[1], "cmyk.jpg", Image.fromarray(_rgb(3)).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("exif-rotated", CLASSES[1], "rotated.jpg", Image.fromarray(_rgb(4, (64, 30))), exif=exif, quality=95)
    frames = [Image.fromarray(_rgb(5)).convert("P"), Image.fromarray(_rgb(6)).convert("P")]
    save("animated", CLASSES[1], "animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    save("greyscale", CLASSES[1], "grey.jpg", Image.fromarray(_rgb(7)[..., 0], "L"))
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return root, _write_corpus(root)


def test_training_decodes_every_odd_image_as_serving_does(corpus):
    _, files = corpus
    for kind, path in files.items():
        with open(path, "rb") as fh:
            served = decode_image(fh.read())
        loaded = load_rgb(path)
        assert loaded.mode == "RGB" and loaded.size == served.size, kind
        assert np.array_equal(np.asarray(loaded), np.asarray(served)), kind
    # the cases the old convert("RGB") loader got wrong: transparency and EXIF orientation
    with Image.open(files["transparent"]) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(load_rgb(files["transparent"])))
        assert np.asarray(load_rgb(files["transparent"]))[0, 0].tolist() == [255, 255, 255]
    with Image.open(files["exif-rotated"]) as im:
        assert im.size == (64, 30) and load_rgb(files["exif-rotated"]).size == (30, 64)


def test_evaluation_transform_is_servings_preprocessing(trained, corpus):
    _, files = corpus
    backbone = load_prompt_artifact(trained["coop"].artifact).backbone
    tf = eval_transform(backbone)
    assert isinstance(tf, EvalTransform)
    cfg = PreprocessConfig.from_manifest(backbone.preprocess)
    for path in files.values():
        img = load_rgb(path)
        assert np.array_equal(tf(img).numpy(), preprocess([img], cfg)[0])


def test_eval_and_classify_agree_image_by_image(trained, corpus, tmp_path, capsys):
    root, files = corpus
    bundle = tmp_path / "bundle"
    assert main(["export", "--artifact", str(trained["coop"].artifact), "--out", str(bundle), "--exporter",
                 "torchscript", "--classes", ",".join(CLASSES)]) == 0
    capsys.readouterr()
    assert main(["eval", "--artifact", str(trained["coop"].artifact), "--data", str(root), "--device", "cpu",
                 "--per-image"]) == 0
    evaluated = {p["path"]: p for p in json.loads(capsys.readouterr().out)["predictions"]}
    assert len(evaluated) == len(files)

    from serving.classifier import Classifier

    clf = Classifier.from_bundle(bundle)
    for kind, path in files.items():
        with open(path, "rb") as fh:
            [ranked] = clf.classify_bytes([fh.read()], top_k=len(CLASSES))
        mine = evaluated[path]
        served = {r["name"]: r["score"] for r in ranked}
        assert ranked[0]["name"] == mine["top1"], kind
        assert set(served) == set(mine["scores"]) == set(CLASSES)
        assert max(abs(served[c] - s) for c, s in mine["scores"].items()) <= 1e-4, kind
