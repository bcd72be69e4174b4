"""serving.classifier.Classifier on the synthetic bundle (numbers checked against the torch modules)."""
from __future__ import annotations

import numpy as np
import pytest

from serving.bundle import load_bundle
from serving.classifier import Classifier
from serving.errors import ClassNameError, ImageDecodeError, RequestError, UnknownClassError
from serving.preprocess import preprocess


@pytest.fixture(scope="module")
def clf(synthetic_bundle) -> Classifier:
    return Classifier.from_bundle(synthetic_bundle.path)


@pytest.fixture
def fresh_clf(synthetic_bundle, tmp_path) -> Classifier:
    return Classifier.from_bundle(synthetic_bundle.path, state_dir=tmp_path / "state")


def _expected_logits(synthetic_bundle, images, names) -> np.ndarray:
    cfg = load_bundle(synthetic_bundle.path, verify_hashes=False).preprocessing
    img = synthetic_bundle.image_embed(preprocess(images, cfg))
    return 50.0 * img @ synthetic_bundle.text_embed(names).T


def test_classify_ranks_all_classes_like_torch(clf, synthetic_bundle, pil_image):
    images = [pil_image(0), pil_image(1, size=(20, 64)), pil_image(2, size=(100, 30))]
    names = synthetic_bundle.class_names
    results = clf.classify(images, top_k=len(names))
    expected = _expected_logits(synthetic_bundle, images, names)
    assert len(results) == 3
    for row, exp in zip(results, expected):
        assert [r["name"] for r in row] == [names[j] for j in np.argsort(-exp, kind="stable")]
        logits = [r["logit"] for r in row]
        scores = [r["score"] for r in row]
        assert logits == sorted(logits, reverse=True) and scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(sorted(logits, reverse=True), np.sort(exp)[::-1], atol=1e-3)
        assert set(row[0]) == {"name", "score", "logit", "confidence"}
        assert all(isinstance(r["score"], float) and isinstance(r["logit"], float) for r in row)


def test_top_k_default_and_range(clf, pil_image):
    (row,) = clf.classify([pil_image(0)])
    assert len(row) == 5  # default
    (row,) = clf.classify([pil_image(0)], top_k=2)
    assert len(row) == 2
    (row,) = clf.classify([pil_image(0)], top_k=None, class_names=["cat", "dog"])
    assert len(row) == 2  # default capped at the number of classes
    for bad in (0, 7, -1, True, "3", 2.5):
        with pytest.raises(RequestError) as info:
            clf.classify([pil_image(0)], top_k=bad)
        assert info.value.field == "top_k" and "between 1 and 6" in str(info.value)


def test_no_images(clf):
    with pytest.raises(RequestError, match="no images"):
        clf.classify([])


def test_adhoc_classes(clf, synthetic_bundle, pil_image):
    images = [pil_image(3)]
    names = ["zebra", "cat", "fire truck"]
    (row,) = clf.classify(images, top_k=3, class_names=["  zebra", "cat", "fire   truck"])
    exp = _expected_logits(synthetic_bundle, images, names)[0]
    assert [r["name"] for r in row] == [names[j] for j in np.argsort(-exp)]
    np.testing.assert_allclose([r["logit"] for r in row], np.sort(exp)[::-1], atol=1e-3)
    assert sum(r["score"] for r in row) == pytest.approx(1.0)
    assert clf.registry.names() == synthetic_bundle.class_names  # ad hoc classes are not registered


def test_adhoc_class_validation(clf, pil_image):
    img = [pil_image(0)]
    with pytest.raises(ClassNameError, match="more than once") as info:
        clf.classify(img, class_names=["cat", "cat "])
    assert info.value.field == "classes"
    with pytest.raises(ClassNameError, match="tokens long") as info:
        clf.classify(img, class_names=["cat", " ".join(["x"] * 90)])
    assert info.value.field == "classes"
    with pytest.raises(RequestError, match="empty"):
        clf.classify(img, class_names=[])
    with pytest.raises(RequestError, match="list of class names"):
        clf.classify(img, class_names="cat")
    small = Classifier(clf.bundle, clf.runtime, clf.registry, clf.tokenizer, max_adhoc_classes=2)
    with pytest.raises(RequestError, match="at most 2") as info:
        small.classify(img, class_names=["a", "b", "c"])
    assert info.value.field == "classes"


def test_added_class_gets_its_text_encoder_embedding(fresh_clf, synthetic_bundle, pil_image):
    out = fresh_clf.add_classes(["zebra", "  blue   whale "])
    assert out == {"added": ["zebra", "blue whale"], "version": 2, "num_classes": 8, "source": "text",
                   "num_images": 0}
    np.testing.assert_allclose(fresh_clf.encode_text(["zebra", "blue whale"]),
                               synthetic_bundle.text_embed(["zebra", "blue whale"]), atol=1e-5)
    images = [pil_image(5), pil_image(6)]
    names = [*synthetic_bundle.class_names, "zebra", "blue whale"]
    results = fresh_clf.classify(images, top_k=len(names))
    expected = _expected_logits(synthetic_bundle, images, names)
    for row, exp in zip(results, expected):
        got = {r["name"]: r["logit"] for r in row}
        np.testing.assert_allclose([got[n] for n in names], exp, atol=1e-3)
    assert fresh_clf.list_classes() == {"names": names, "version": 2, "num_classes": 8,
                                        "classes": [{"name": n, "source": "text", "num_images": 0} for n in names]}


def test_remove_classes(fresh_clf, pil_image):
    assert fresh_clf.remove_classes(["cat", "dog"]) == {"removed": ["cat", "dog"], "version": 2, "num_classes": 4}
    (row,) = fresh_clf.classify([pil_image(0)], top_k=4)
    assert {r["name"] for r in row} == {"red car", "tree", "airplane", "sailing boat"}
    with pytest.raises(UnknownClassError):
        fresh_clf.remove_classes(["cat"])


def test_other_workers_adds_are_seen(synthetic_bundle, tmp_path, pil_image):
    a = Classifier.from_bundle(synthetic_bundle.path, state_dir=tmp_path, verify_hashes=False)
    b = Classifier.from_bundle(synthetic_bundle.path, state_dir=tmp_path, verify_hashes=False)
    b.classify([pil_image(0)])  # builds b's class matrix at version 1
    a.add_classes(["zebra"])
    (row,) = b.classify([pil_image(0)], top_k=7)
    assert "zebra" in {r["name"] for r in row}
    assert b.list_classes()["version"] == 2


def test_classify_bytes(clf, image_bytes):
    rows = clf.classify_bytes([image_bytes(0), image_bytes(1, fmt="JPEG")], top_k=1)
    assert len(rows) == 2 and len(rows[0]) == 1
    with pytest.raises(ImageDecodeError, match="image 2 of 2"):
        clf.classify_bytes([image_bytes(0), b"not an image"])
    truncated = image_bytes(0)
    with pytest.raises(ImageDecodeError, match="truncated"):
        clf.classify_bytes([truncated[: len(truncated) // 2]])


def test_info(clf):
    info = clf.info()
    assert info["method"] == "synthetic" and info["num_classes"] == 6 and info["runtime"] == "ort"
    assert info["providers"] == ["CPUExecutionProvider"]

