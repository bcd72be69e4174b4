"""Issue 16, bounded work: per-request limits answered before any encoding or decoding, the ad-hoc embedding cache,
batched text encoding, the decoded-pixel budget and JPEG draft decoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.bundle import load_bundle
from serving.classifier import TEXT_BATCH, Classifier
from serving.errors import PayloadTooLargeError
from serving.http_errors import http_status
from serving.preprocess import decode_image, decoded_size, preprocess


@pytest.fixture
def counted(synthetic_bundle, tmp_path, counting_runtime):
    base = Classifier.from_bundle(synthetic_bundle.path, state_dir=tmp_path / "state")
    rt = counting_runtime(base.runtime)
    clf = Classifier(base.bundle, rt, base.registry, base.tokenizer, max_add_names=3, max_adhoc_classes=4,
                     max_request_pixels=50_000, cache_size=5)
    return clf, rt


def _jpeg(size, seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_too_many_names_are_refused_before_any_encoding(counted, pil_image):
    clf, rt = counted
    with pytest.raises(PayloadTooLargeError, match="at most 3 may be added") as info:
        clf.add_classes(["a1", "a2", "a3", "a4"])
    assert http_status(info.value) == 413 and info.value.field == "names"
    with pytest.raises(PayloadTooLargeError, match="at most 4") as info:
        clf.classify([pil_image(0)], class_names=[f"n{i}" for i in range(5)])
    assert http_status(info.value) == 413 and info.value.field == "classes"
    assert rt.calls == 0, "nothing was encoded for refused requests"
    assert clf.add_classes(["a1", "a2", "a3"])["added"] == ["a1", "a2", "a3"]


def test_adhoc_embeddings_are_cached_in_a_bounded_lru(counted, pil_image):
    clf, rt = counted
    names = ["zebra", "okapi", "cat"]  # "cat" is a bundle class: never encoded
    first = clf.classify([pil_image(0)], class_names=names, top_k=3)
    assert rt.texts == 2
    again = clf.classify([pil_image(0)], class_names=list(reversed(names)), top_k=3)
    assert rt.texts == 2, "the second request reuses the cached embeddings"
    assert {r["name"]: r["logit"] for r in first[0]} == pytest.approx({r["name"]: r["logit"] for r in again[0]})
    for i in range(3):
        clf.classify([pil_image(0)], class_names=[f"x{i}a", f"x{i}b"], top_k=1)
    assert len(clf._cache) == 5, "the cache stays within cache_size"
    clf.classify([pil_image(0)], class_names=["zebra"], top_k=1)
    assert rt.texts == 2 + 6 + 1, "zebra was evicted (least recently used) and encoded again"


def test_text_encoding_is_batched(synthetic_bundle, counting_runtime):
    base = Classifier.from_bundle(synthetic_bundle.path, warmup=False)
    rt = counting_runtime(base.runtime)
    clf = Classifier(base.bundle, rt, base.registry, base.tokenizer)
    n = TEXT_BATCH + 3
    out = clf.encode_text([f"name {i}" for i in range(n)])
    assert out.shape[0] == n and rt.calls == 2 and rt.texts == n


def test_pixel_budget_is_checked_from_headers_before_decoding(counted, monkeypatch):
    clf, _ = counted
    import serving.classifier as classifier_module

    decoded = []
    monkeypatch.setattr(classifier_module, "decode_image",
                        lambda blob, **kw: decoded.append(1) or decode_image(blob, **kw))
    with pytest.raises(PayloadTooLargeError, match="decode to 60,000 pixels together") as info:
        clf.classify_bytes([_png((200, 150)), _png((200, 150))], top_k=1)  # 2 x 30,000 > 50,000
    assert http_status(info.value) == 413 and info.value.field == "images"
    assert not decoded, "nothing was decoded"
    assert len(clf.classify_bytes([_png((200, 150))], top_k=1)) == 1


def test_large_jpegs_are_reduced_while_decoding(synthetic_bundle, counted):
    clf, _ = counted
    blob = _jpeg((1600, 1200))
    assert decoded_size(blob) == (1600, 1200)
    assert decoded_size(blob, draft_to=(64, 64)) == (200, 150)  # 1/8 scale: both sides still >= 64
    assert decode_image(blob, draft_to=(64, 64)).size == (200, 150)
    assert decoded_size(_png((1600, 1200)), draft_to=(64, 64)) == (1600, 1200), "PNG cannot be drafted"
    # 1600x1200 = 1.92 M pixels is over this classifier's 50,000-pixel budget, but the draft decodes 200x150
    assert len(clf.classify_bytes([blob], top_k=1)) == 1
    # the reduced decode stays close to the full decode after preprocessing (model input 32 px, margin 2)
    cfg = load_bundle(synthetic_bundle.path, verify_hashes=False).preprocessing
    full = preprocess([decode_image(blob)], cfg)
    drafted = preprocess([decode_image(blob, draft_to=(64, 64))], cfg)
    assert np.abs(full - drafted).mean() < 0.05


def test_work_past_its_deadline_is_abandoned_between_encoder_batches(synthetic_bundle, counting_runtime, pil_image):
    import time

    import serving.classifier as classifier_module
    from serving.classifier import TEXT_BATCH, DeadlineExceededError, deadline_scope

    base = Classifier.from_bundle(synthetic_bundle.path, warmup=False)

    class SlowRuntime(counting_runtime):
        def run_text(self, ids, prompt_set=0):
            classifier_module._deadline.at = time.monotonic() - 1  # this batch takes the request past its deadline
            return super().run_text(ids, prompt_set)

    rt = SlowRuntime(base.runtime)
    clf = Classifier(base.bundle, rt, base.registry, base.tokenizer, max_add_names=10 * TEXT_BATCH)
    names = [f"name {i}" for i in range(4 * TEXT_BATCH)]
    with deadline_scope(time.monotonic() + 3600), pytest.raises(DeadlineExceededError, match="abandoned") as info:
        clf.add_classes(names)
    assert http_status(info.value) == 504
    assert rt.calls == 1, "the encoder stopped after the batch that ran past the deadline"
    assert "name 0" not in clf.registry.names(), "nothing was registered"
    with deadline_scope(time.monotonic() - 1), pytest.raises(DeadlineExceededError):
        clf.classify([pil_image(0)])
    assert clf.classify([pil_image(0)], top_k=1), "no deadline outside the scope"
