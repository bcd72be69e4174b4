"""serving.batching.MicroBatcher and the classifier's micro-batching (issue 16, throughput)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import MicroBatcher
from serving.classifier import Classifier


def test_concurrent_callers_share_batches_and_get_their_own_rows():
    sizes: list[int] = []

    def encode(pixels: np.ndarray):
        time.sleep(0.05)  # while this runs, the other callers queue up
        return pixels[:, 0, 0, :2].copy(), pixels[:, 0, 0, 2:3].copy()

    batcher = MicroBatcher(encode, max_batch=8, on_batch=sizes.append)
    out: dict[int, tuple] = {}

    def call(i: int) -> None:
        n = 1 + i % 3
        pixels = np.full((n, 1, 1, 3), float(i), dtype=np.float32)
        out[i] = (n, batcher.encode(pixels))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (n, (embeds, weights)) in out.items():
        assert embeds.shape == (n, 2) and (embeds == i).all() and (weights == i).all()
    assert sum(sizes) == sum(1 + i % 3 for i in range(12))
    assert max(sizes) > 1 and max(sizes) <= 8, sizes


def test_close_stops_the_thread():
    batcher = MicroBatcher(lambda p: (p, None), max_batch=2)
    assert batcher.encode(np.ones((1, 1), np.float32))[0].shape == (1, 1)
    batcher.close()
    batcher._thread.join(timeout=5)
    assert not batcher._thread.is_alive()


def test_an_encoder_error_reaches_every_caller_of_the_batch():
    def encode(pixels):
        raise RuntimeError("boom")

    batcher = MicroBatcher(encode, max_batch=4)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.encode(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(encode, max_batch=0)


def test_micro_batching_gives_the_same_answers(synthetic_bundle, multiset_bundle, pil_image):
    for path in (synthetic_bundle.path, multiset_bundle.path):
        plain = Classifier.from_bundle(path)
        sizes: list[int] = []
        batched = Classifier.from_bundle(path, micro_batching=True, on_image_batch=sizes.append)
        images = [pil_image(i) for i in range(6)]
        expected = [plain.classify([img], top_k=3)[0] for img in images]
        got: dict[int, list] = {}

        def call(i: int, batched=batched, images=images, got=got) -> None:
            got[i] = batched.classify([images[i]], top_k=3)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(6):
            assert [r["name"] for r in got[i]] == [r["name"] for r in expected[i]]
            assert [r["logit"] for r in got[i]] == pytest.approx([r["logit"] for r in expected[i]], abs=1e-4)
        assert sum(sizes) == 6
