"""Issue 16, state that restarts fast: runtime class embeddings persisted with the class list (keyed to the text
encoder), stale temp files removed, strictly increasing versions under concurrent adds."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from serving.bundle import load_bundle
from serving.classifier import Classifier, open_class_registry
from serving.embedding_store import EMBEDDINGS_FILE, EmbeddingStore, text_encoder_key


@pytest.fixture
def worker(counting_runtime):
    """``worker(bundle_path, state_dir)``: a classifier as a (re)started worker builds it, with its text encoder
    calls counted."""

    def make(bundle_path, state_dir):
        base = Classifier.from_bundle(bundle_path, warmup=False)
        rt = counting_runtime(base.runtime)
        registry = open_class_registry(base.bundle, state_dir)
        return Classifier(base.bundle, rt, registry, base.tokenizer), rt

    return make




def test_a_restart_does_not_re_encode_runtime_classes(synthetic_bundle, tmp_path, pil_image, worker):
    state = tmp_path / "state"
    first, rt1 = worker(synthetic_bundle.path, state)
    first.add_classes(["zebra", "okapi"])
    first.add_classes(["blue whale"])
    assert rt1.texts == 3 and (state / EMBEDDINGS_FILE).exists()
    before = first.classify([pil_image(0)], top_k=9)[0]

    second, rt2 = worker(synthetic_bundle.path, state)
    after = second.classify([pil_image(0)], top_k=9)[0]
    assert rt2.calls == 0, "the restarted worker read the stored embeddings instead of encoding"
    assert [r["name"] for r in after] == [r["name"] for r in before]
    assert [r["logit"] for r in after] == pytest.approx([r["logit"] for r in before], abs=1e-6)

    second.remove_classes(["okapi"])
    stored = EmbeddingStore(state, text_encoder_key(second.bundle), num_sets=1, dim=second.bundle.embedding_dim)
    assert set(stored.load()) == {"zebra", "blue whale"}, "removed classes leave the file"


def test_rows_of_another_text_encoder_are_re_encoded_once(synthetic_bundle, tmp_path, caplog, worker):
    state = tmp_path / "state"
    first, _ = worker(synthetic_bundle.path, state)
    first.add_classes(["zebra"])
    bundle = load_bundle(synthetic_bundle.path, verify_hashes=False)
    EmbeddingStore(state, "another-text-encoder", num_sets=1, dim=bundle.embedding_dim).save(
        {"zebra": np.ones((1, bundle.embedding_dim), np.float32)})
    with caplog.at_level(logging.INFO, logger="serving.embedding_store"):
        second, rt = worker(synthetic_bundle.path, state)
        second.classify_bytes  # noqa: B018 - nothing encoded before the list is built
        assert rt.calls == 0
        second._active_classes()
    assert rt.texts == 1 and "another text encoder" in caplog.text
    third, rt3 = worker(synthetic_bundle.path, state)
    third._active_classes()
    assert rt3.calls == 0, "the rewritten file carries this encoder's key"


def test_an_unreadable_embeddings_file_is_re_encoded_not_trusted(synthetic_bundle, tmp_path, caplog, worker):
    state = tmp_path / "state"
    first, _ = worker(synthetic_bundle.path, state)
    first.add_classes(["zebra"])
    (state / EMBEDDINGS_FILE).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="serving.embedding_store"):
        second, rt = worker(synthetic_bundle.path, state)
        second._active_classes()
    assert rt.texts == 1 and "unreadable" in caplog.text


def test_stale_temp_files_are_removed(synthetic_bundle, tmp_path, worker):
    state = tmp_path / "state"
    state.mkdir()
    stale = [state / ".classes.abc123.tmp", state / ".class_embeddings.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    keep = state / "notes.tmp"
    keep.write_text("not ours")
    worker(synthetic_bundle.path, state)
    assert not any(p.exists() for p in stale) and keep.exists()


def test_concurrent_adds_get_strictly_increasing_versions(synthetic_bundle, tmp_path, worker):
    """Two workers (separate classifiers and registries over one state dir), four threads each: every add answers
    its own version, and the versions are exactly the consecutive numbers after the start."""
    state = tmp_path / "state"
    workers = [worker(synthetic_bundle.path, state)[0] for _ in range(2)]
    start = workers[0].registry.version
    versions: list[int] = []
    lock = threading.Lock()

    def add(w: int, t: int) -> None:
        for i in range(3):
            out = workers[w].add_classes([f"class {w} {t} {i}"])
            with lock:
                versions.append(out["version"])

    threads = [threading.Thread(target=add, args=(w, t)) for w in range(2) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(versions) == list(range(start + 1, start + 25)), "no version was answered twice"
    fresh, rt = worker(synthetic_bundle.path, state)
    assert len(fresh.list_classes()["names"]) == 6 + 24
    fresh._active_classes()
    assert rt.calls == 0, "every added class's embedding reached the store"
