"""Open-set answers (serving.open_set): calibration in the bundle, thresholds per class list, confidence, HTTP fields.

The synthetic bundles get a calibration file made of random images embedded by the bundle's own image graph through
the classifier's decode + preprocess path, so classifying those same images scores exactly the calibration scores
(an exact check of the quantile rule).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.bundle import load_bundle
from serving.classifier import Classifier
from serving.errors import BundleError, RequestError
from serving.format import CALIBRATION_FILE, MANIFEST_FILE
from serving.manifest import sha256_file
from serving.open_set import MIN_CALIBRATION_IMAGES, write_calibration
from serving.preprocess import decode_image, preprocess

NUM_CAL = 40  # calibration images (>= MIN_CALIBRATION_IMAGES), labels cycling over the bundle's classes


def add_calibration(bundle_dir: Path, blobs: list[bytes], labels: list[int], *, keep_rate: float = 0.9,
                    rule: str = "max_cosine") -> None:
    """Embed ``blobs`` with the bundle's image graph (as the service does) and add them as its calibration."""
    clf = Classifier.from_bundle(bundle_dir, warmup=False)
    outs = [clf._encode_images(preprocess([decode_image(b) for b in blobs[i:i + 32]], clf.bundle.preprocessing))
            for i in range(0, len(blobs), 32)]  # the classifier's image batches: the very numbers it computes
    embeds = np.concatenate([o[0] for o in outs])  # [N, D]
    weights = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])  # [N, S]
    num_sets = clf.bundle.num_prompt_sets
    write_calibration(bundle_dir / CALIBRATION_FILE, np.broadcast_to(embeds, (num_sets, *embeds.shape)),
                      np.array(labels), weights)
    path = bundle_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["calibration"] = {"file": CALIBRATION_FILE, "sha256": sha256_file(bundle_dir / CALIBRATION_FILE),
                               "num_images": len(blobs), "num_classes": len(set(labels)), "keep_rate": keep_rate,
                               "default_rule": rule}
    path.write_text(json.dumps(manifest))


def _blobs(image_bytes, n: int = NUM_CAL) -> list[bytes]:
    return [image_bytes(1000 + i, size=(40, 40)) for i in range(n)]


@pytest.fixture
def calibrated(synthetic_bundle, tmp_path, image_bytes) -> tuple[Path, list[bytes]]:
    """A copy of the synthetic bundle with calibration (labels cycle over its 6 classes), and its images."""
    dst = tmp_path / "bundle"
    shutil.copytree(synthetic_bundle.path, dst)
    blobs = _blobs(image_bytes)
    add_calibration(dst, blobs, [i % len(synthetic_bundle.class_names) for i in range(len(blobs))])
    return dst, blobs


def test_calibration_is_hash_checked_and_loaded(calibrated, synthetic_bundle):
    path, blobs = calibrated
    cal = load_bundle(path).calibration
    assert cal is not None and cal.image_embeds.dtype == np.float32
    assert cal.image_embeds.shape == (1, len(blobs), 32) and cal.weights is None
    np.testing.assert_allclose(np.linalg.norm(cal.image_embeds, axis=-1), 1.0, atol=1e-5)
    assert cal.labels.dtype == np.int64 and cal.keep_rate == 0.9 and cal.rule == "max_cosine"
    assert load_bundle(synthetic_bundle.path).calibration is None  # older bundles load unchanged
    data = dict(np.load(path / CALIBRATION_FILE))
    data["labels"] = data["labels"][::-1].copy()
    np.savez(path / CALIBRATION_FILE, **data)  # same shapes, other content: the hash catches it
    with pytest.raises(BundleError, match="sha256 mismatch for calibration.npz"):
        load_bundle(path)


def test_calibration_file_must_fit_the_bundle(calibrated, edit_manifest):
    path, blobs = calibrated
    write_calibration(path / CALIBRATION_FILE, np.zeros((1, 3, 16), np.float32), np.zeros(3))

    def rehash(m):
        m["calibration"]["sha256"] = sha256_file(path / CALIBRATION_FILE)

    edit_manifest(path, rehash)
    with pytest.raises(BundleError, match=r"expected float32 \[1, N, 32\]"):
        load_bundle(path)
    edit_manifest(path, lambda m: m["calibration"].update(default_rule="entropy"))
    with pytest.raises(BundleError, match="default_rule"):
        load_bundle(path)


def test_threshold_keeps_exactly_the_quantile_of_calibration_images(calibrated):
    path, blobs = calibrated
    clf = Classifier.from_bundle(path)
    for rule in ("max_cosine", "msp"):
        for rate in (0.9, 0.75, 0.5):
            r = clf.classify_bytes_detailed(blobs, keep_rate=rate, open_set_rule=rule, top_k=1)
            assert r.open_set["basis"] == "classes" and r.open_set["num_images"] == len(blobs)
            kept = sum(not u for u in r.none_of_these)
            assert kept == len(blobs) - math.floor(len(blobs) * (1 - rate) + 1e-9), (rule, rate)
            assert kept >= rate * len(blobs) > kept - 1
            best = [p[0]["confidence"] for p in r.predictions]  # p-value of each image's best score
            assert all(0 < c <= 1 for c in best)
            assert sorted(best) == pytest.approx([(i + 1) / len(blobs) for i in range(len(blobs))])
            # the answer follows the score: every image answered "none" ranks below every kept one
            assert max(c for c, u in zip(best, r.none_of_these) if u) < min(
                c for c, u in zip(best, r.none_of_these) if not u)


def test_keep_rate_one_never_answers_none_and_defaults_come_from_the_manifest(calibrated, image_bytes):
    path, blobs = calibrated
    clf = Classifier.from_bundle(path)
    r = clf.classify_bytes_detailed([image_bytes(7)] + blobs, keep_rate=1.0)
    assert r.none_of_these == [False] * (len(blobs) + 1)
    assert r.open_set == {"rule": "max_cosine", "keep_rate": 1.0, "threshold": None, "basis": "classes",
                          "num_images": len(blobs)}
    default = clf.classify_bytes_detailed(blobs[:1])
    assert default.open_set["keep_rate"] == 0.9 and default.open_set["rule"] == "max_cosine"
    server = Classifier.from_bundle(path, open_set_rule="msp", keep_rate=0.8)
    assert server.classify_bytes_detailed(blobs[:1]).open_set["rule"] == "msp"
    assert server.info()["open_set"] == {"calibrated": True, "num_images": len(blobs), "num_classes": 6,
                                         "rule": "msp", "keep_rate": 0.8}


def test_threshold_adapts_when_classes_are_added_or_removed(calibrated, tmp_path):
    path, blobs = calibrated
    clf = Classifier.from_bundle(path, state_dir=tmp_path / "state")
    before = {rule: clf.classify_bytes_detailed(blobs[:1], open_set_rule=rule).open_set for rule in ("msp",
                                                                                                      "max_cosine")}
    clf.add_classes(["zebra", "fire truck"])
    added = clf.classify_bytes_detailed(blobs[:1], open_set_rule="msp").open_set
    assert added["num_images"] == before["msp"]["num_images"]
    assert added["threshold"] < before["msp"]["threshold"]  # probability spread over more classes
    clf.remove_classes(["cat"])
    removed = clf.classify_bytes_detailed(blobs[:1], open_set_rule="max_cosine").open_set
    assert removed["num_images"] == len(blobs) - len(blobs[::6])  # the cat images no longer count
    assert removed["threshold"] != before["max_cosine"]["threshold"]


def test_a_list_without_calibration_images_falls_back_loudly(calibrated, caplog):
    path, blobs = calibrated
    clf = Classifier.from_bundle(path)
    r = clf.classify_bytes_detailed(blobs[:2], class_names=["zebra", "fire truck"], open_set_rule="max_cosine",
                                    top_k=2)
    assert r.open_set["basis"] == "bundle" and r.open_set["num_images"] == len(blobs)
    assert all(isinstance(u, bool) for u in r.none_of_these)
    assert "basis 'bundle'" in caplog.text
    msp = clf.classify_bytes_detailed(blobs[:2], class_names=["zebra", "fire truck"], open_set_rule="msp", top_k=1)
    assert msp.open_set["basis"] == "none" and msp.open_set["threshold"] is None
    assert msp.none_of_these == [None, None] and msp.predictions[0][0]["confidence"] is None
    few = clf.classify_bytes_detailed(blobs[:1], class_names=["cat", "zebra"], top_k=1)  # 7 cat images < 20
    assert 7 < MIN_CALIBRATION_IMAGES and few.open_set["basis"] == "bundle"


def test_invalid_overrides_are_refused_with_the_field(calibrated):
    path, blobs = calibrated
    clf = Classifier.from_bundle(path)
    for kwargs, field in (({"keep_rate": 0}, "keep_rate"), ({"keep_rate": 1.5}, "keep_rate"),
                          ({"keep_rate": float("nan")}, "keep_rate"), ({"open_set_rule": "entropy"}, "open_set_rule")):
        with pytest.raises(RequestError) as info:
            clf.classify_bytes_detailed(blobs[:1], **kwargs)
        assert info.value.field == field


def test_multiset_calibration_uses_the_expert_weights(multiset_copy, multiset_bundle, image_bytes):
    blobs = _blobs(image_bytes, 24)
    add_calibration(multiset_copy, blobs, [i % len(multiset_bundle.class_names) for i in range(len(blobs))],
                    keep_rate=0.75)
    cal = load_bundle(multiset_copy).calibration
    assert cal.image_embeds.shape == (3, 24, 32) and cal.weights.shape == (24, 3)
    r = Classifier.from_bundle(multiset_copy).classify_bytes_detailed(blobs)
    assert sum(not u for u in r.none_of_these) == 24 - math.floor(24 * 0.25)


# -- over HTTP ------------------------------------------------------------------------------------------------------


def test_http_fields_with_and_without_calibration(calibrated, synthetic_bundle, image_bytes, tmp_path):
    from test_service import assert_error, running

    path, blobs = calibrated
    with running({"PROMPTCLIP_BUNDLE": str(path)}) as client:
        resp = client.post("/classify", files={"image": ("a.png", blobs[0], "image/png")},
                           data={"keep_rate": "1", "top_k": "2"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["none_of_these"] is False and body["open_set"]["keep_rate"] == 1.0
        assert all(0 <= p["confidence"] <= 1 for p in body["predictions"])
        batch = client.post("/classify_batch", files=[("images", ("a.png", b, "image/png")) for b in blobs[:3]],
                            data={"open_set_rule": "msp"}).json()
        assert len(batch["none_of_these"]) == 3 and batch["open_set"]["rule"] == "msp"
        for data, field in (({"keep_rate": "0"}, "keep_rate"), ({"keep_rate": "2"}, "keep_rate"),
                            ({"keep_rate": "lots"}, "keep_rate"), ({"open_set_rule": "entropy"}, "open_set_rule")):
            assert_error(client.post("/classify", files={"image": ("a.png", blobs[0], "image/png")}, data=data),
                         422, "RequestError", field=field)
        assert client.get("/info").json()["open_set"]["num_images"] == len(blobs)
    with running({"PROMPTCLIP_BUNDLE": str(synthetic_bundle.path), "PROMPTCLIP_KEEP_RATE": "0.5"}) as client:
        body = client.post("/classify", files={"image": ("a.png", blobs[0], "image/png")}).json()
        assert body["none_of_these"] is None and body["open_set"] is None
        assert all(p["confidence"] is None for p in body["predictions"])
        assert client.get("/info").json()["open_set"] is None


def test_open_set_settings_from_env(tmp_path):
    from serving.errors import ServiceConfigError
    from serving.settings import ServiceSettings

    s = ServiceSettings.from_env({"PROMPTCLIP_BUNDLE": "b", "PROMPTCLIP_OPEN_SET_RULE": "msp",
                                  "PROMPTCLIP_KEEP_RATE": "0.9"})
    assert s.open_set_rule == "msp" and s.keep_rate == 0.9
    for key, value in (("PROMPTCLIP_OPEN_SET_RULE", "entropy"), ("PROMPTCLIP_KEEP_RATE", "0"),
                       ("PROMPTCLIP_KEEP_RATE", "nan"), ("PROMPTCLIP_KEEP_RATE", "high")):
        with pytest.raises(ServiceConfigError, match=key):
            ServiceSettings.from_env({"PROMPTCLIP_BUNDLE": "b", key: value})
