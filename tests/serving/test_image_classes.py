"""Classes built from example images (issue 17): the row rule, class_images.npz, /add_classes multipart, the CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from test_service import AUTH, assert_error, running

from serving.classes import ClassStateError
from serving.classifier import Classifier
from serving.image_classes import IMAGES_FILE, image_class_row, modality_shift_vectors


def _png(image_bytes, seed):
    return ("example.png", image_bytes(seed), "image/png")


def _form(image_bytes, seeds, **fields):
    return {"files": [("images", _png(image_bytes, s)) for s in seeds], "data": {"name": "gizmo", **fields}}


@pytest.fixture
def service(synthetic_bundle, tmp_path):
    env = {"PROMPTCLIP_BUNDLE": str(synthetic_bundle.path), "PROMPTCLIP_STATE_DIR": str(tmp_path / "state"),
           "PROMPTCLIP_API_TOKEN": "s3cret-token", "PROMPTCLIP_MAX_CLASS_IMAGES": "3",
           "PROMPTCLIP_MAX_REQUEST_PIXELS": "20000"}
    with running(env) as client:
        yield client


# -- the row rule ----------------------------------------------------------------------------------


def test_row_is_the_normalised_mean_shifted_then_blended():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4, 8))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    text = rng.normal(size=(2, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    shift = rng.normal(size=(2, 8))

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    proto = unit(f.mean(0))
    plain = image_class_row(f, num_sets=2)
    assert plain.shape == (2, 8) and plain.dtype == np.float32
    np.testing.assert_allclose(plain, np.stack([proto, proto]), atol=1e-6)
    shifted = image_class_row(f, num_sets=2, shift=shift)
    np.testing.assert_allclose(shifted, unit(proto + shift), atol=1e-6)
    blended = image_class_row(f, num_sets=2, text_embeds=text, text_weight=0.25, shift=shift)
    np.testing.assert_allclose(blended, unit(0.25 * text + 0.75 * unit(proto + shift)), atol=1e-6)
    np.testing.assert_allclose(image_class_row(f, num_sets=2, text_embeds=text, text_weight=1.0), text, atol=1e-6)


def test_shift_vectors_need_calibration_images():
    table = np.ones((2, 3, 4))  # [S, C, D]
    assert modality_shift_vectors(SimpleNamespace(), table) is None
    calib = SimpleNamespace(calibration=SimpleNamespace(image_embeds=np.full((2, 5, 4), 0.25)))
    np.testing.assert_allclose(modality_shift_vectors(calib, table), np.full((2, 4), 0.75))
    wrong = SimpleNamespace(calibration=SimpleNamespace(image_embeds=np.zeros((2, 5, 3))))
    assert modality_shift_vectors(wrong, table) is None  # logged as an error, served without the shift


# -- HTTP ------------------------------------------------------------------------------------------


def test_add_a_class_from_images_over_http_and_classify_with_it(service, image_bytes):
    resp = service.post("/add_classes", headers=AUTH, **_form(image_bytes, [10, 11]))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["added"] == ["gizmo"] and body["source"] == "images" and body["num_images"] == 2
    listing = service.post("/classes").json()
    assert listing["names"][-1] == "gizmo" and listing["version"] == body["version"]
    info = {c["name"]: c for c in listing["classes"]}
    assert info["gizmo"] == {"name": "gizmo", "source": "images", "num_images": 2}
    assert info["cat"] == {"name": "cat", "source": "text", "num_images": 0}
    # the example itself is ranked first (images only: its prototype is close to each example)
    top = service.post("/classify", files={"image": _png(image_bytes, 10)}, data={"top_k": "1"}).json()
    assert top["predictions"][0]["name"] == "gizmo"
    blended = service.post("/add_classes", headers=AUTH,
                           files=[("images", _png(image_bytes, 12))], data={"name": "widget", "text_weight": "0.5"})
    assert blended.status_code == 200, blended.text
    assert blended.json()["source"] == "text+images"
    by_name = service.post("/add_classes", headers=AUTH, json={"names": ["zebra"]}).json()
    assert by_name["source"] == "text" and by_name["num_images"] == 0  # as /classes shows it
    removed = service.post("/remove_classes", headers=AUTH, json={"names": ["gizmo"]})
    assert removed.status_code == 200, removed.text
    after = {c["name"]: c["source"] for c in service.post("/classes").json()["classes"]}
    assert "gizmo" not in after and after["widget"] == "text+images" and after["zebra"] == "text"


def test_image_add_needs_the_token_and_refuses_bad_input(service, image_bytes):
    assert_error(service.post("/add_classes", **_form(image_bytes, [1])), 401, "AuthError")
    assert_error(service.post("/add_classes", headers=AUTH, **_form(image_bytes, [1, 2, 3, 4])), 413,
                 "PayloadTooLargeError", field="images", contains="PROMPTCLIP_MAX_CLASS_IMAGES")
    big = [("images", ("big.png", image_bytes(1, size=(200, 120)), "image/png"))]
    assert_error(service.post("/add_classes", headers=AUTH, files=big, data={"name": "gizmo"}), 413,
                 "PayloadTooLargeError", field="image", contains="PROMPTCLIP_MAX_REQUEST_PIXELS")
    junk = [("images", ("a.png", b"not an image", "image/png"))]
    assert_error(service.post("/add_classes", headers=AUTH, files=junk, data={"name": "gizmo"}), 400,
                 "ImageDecodeError")
    assert_error(service.post("/add_classes", headers=AUTH, **_form(image_bytes, [1], text_weight="1.5")), 422,
                 "RequestError", field="text_weight")
    assert_error(service.post("/add_classes", headers=AUTH, files=[("images", _png(image_bytes, 1))]), 422,
                 "RequestError", field="name")
    assert_error(service.post("/add_classes", headers=AUTH, data={"name": "gizmo"}, files=[("other", b"x")]),
                 422, "RequestError")
    assert_error(service.post("/add_classes", headers=AUTH, files=[("images", _png(image_bytes, 1))],
                              data={"name": "Cat"}), 422, "ClassNameError", field="name", contains="already")
    # nothing of the refused requests was stored
    listing = service.post("/classes").json()
    assert all(c["source"] == "text" for c in listing["classes"]) and listing["version"] == 1


def test_a_numeric_name_stays_a_string(service, image_bytes):
    resp = service.post("/add_classes", headers=AUTH, files=[("images", _png(image_bytes, 3))],
                        data={"name": "1234"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["added"] == ["1234"]


# -- persistence -----------------------------------------------------------------------------------


def _rows(clf):
    names, matrix = clf._active_classes()
    return dict(zip(names, np.moveaxis(matrix, 1, 0)))  # name -> [S, D]


def test_rows_survive_a_restart_bit_for_bit_and_removal_drops_the_examples(synthetic_bundle, image_bytes, tmp_path):
    state = tmp_path / "state"
    first = Classifier.from_bundle(synthetic_bundle.path, state_dir=state)
    worker = Classifier.from_bundle(synthetic_bundle.path, state_dir=state)  # another worker, started before the adds
    first.add_image_class("gizmo", [image_bytes(s) for s in (20, 21, 22)])
    first.add_image_class("widget", [image_bytes(23)], text_weight=0.3)
    before = _rows(first)
    second = Classifier.from_bundle(synthetic_bundle.path, state_dir=state)  # a restart
    after = _rows(second)
    seen = _rows(worker)
    for name in ("gizmo", "widget"):
        assert np.array_equal(before[name], after[name]), name
        assert np.array_equal(before[name], seen[name]), name
    assert second.list_classes()["classes"][-2:] == [{"name": "gizmo", "source": "images", "num_images": 3},
                                                      {"name": "widget", "source": "text+images", "num_images": 1}]
    # the first classifier sees the second's removal (shared state dir) and the examples are gone from the file
    second.remove_classes(["gizmo"])
    assert "gizmo" not in _rows(first)
    with np.load(state / IMAGES_FILE) as data:
        meta = json.loads(str(data["meta"]))
        assert [c["name"] for c in meta["classes"]] == ["widget"] and data["embeddings"].shape[0] == 1
    # a name added again by text is a text class, not the old examples
    first.add_classes(["gizmo"])
    assert {c["name"]: c["source"] for c in second.list_classes()["classes"]}["gizmo"] == "text"


def test_examples_from_another_image_encoder_are_refused_not_deleted(synthetic_bundle, bundle_copy, edit_manifest,
                                                                     image_bytes, tmp_path):
    state = tmp_path / "state"
    Classifier.from_bundle(synthetic_bundle.path, state_dir=state).add_image_class("gizmo", [image_bytes(5)])
    stored = (state / IMAGES_FILE).read_bytes()

    def other_preprocessing(manifest):
        manifest["preprocessing"]["mean"] = [0.5, 0.5, 0.5]

    edit_manifest(bundle_copy, other_preprocessing)
    from serving.bundle import load_bundle
    from serving.image_classes import check_image_classes

    assert check_image_classes(load_bundle(bundle_copy), state, ["cat", "gizmo"]) == ["gizmo"]  # serve's pre-flight
    assert check_image_classes(load_bundle(synthetic_bundle.path), state, ["cat", "gizmo"]) == []
    clf = Classifier.from_bundle(bundle_copy, state_dir=state)
    with pytest.raises(ClassStateError, match="'gizmo'.*another image encoder.*add them again from their images"):
        clf.classify_bytes([image_bytes(5)])
    assert (state / IMAGES_FILE).read_bytes() == stored  # nothing deleted
    assert clf.list_classes()["classes"][-1]["source"] == "images"
    clf.remove_classes(["gizmo"])  # the way out named by the message
    assert clf.classify_bytes([image_bytes(5)], top_k=1)[0][0]["name"] in synthetic_bundle.class_names


def test_a_service_with_stale_image_classes_answers_503_and_can_remove_them(synthetic_bundle, bundle_copy,
                                                                         edit_manifest, image_bytes, tmp_path,
                                                                         caplog):
    state = tmp_path / "state"
    Classifier.from_bundle(synthetic_bundle.path, state_dir=state).add_image_class("gizmo", [image_bytes(5)])
    edit_manifest(bundle_copy, lambda m: m["preprocessing"].update(interpolation="bilinear"))
    env = {"PROMPTCLIP_BUNDLE": str(bundle_copy), "PROMPTCLIP_STATE_DIR": str(state),
           "PROMPTCLIP_API_TOKEN": "s3cret-token"}
    with running(env) as client:
        assert client.get("/readyz").status_code == 200
        assert_error(client.post("/classify", files={"image": _png(image_bytes, 5)}), 503, "ClassStateError")
        assert "'gizmo' were built from example images embedded by another image encoder" in caplog.text  # 5xx
        # bodies carry no server detail: the operator reads the class and the fix in the log
        assert client.post("/remove_classes", headers=AUTH, json={"names": ["gizmo"]}).status_code == 200
        assert client.post("/classify", files={"image": _png(image_bytes, 5)}).status_code == 200


def test_a_corrupt_examples_file_is_refused_and_kept(synthetic_bundle, image_bytes, tmp_path):
    state = tmp_path / "state"
    Classifier.from_bundle(synthetic_bundle.path, state_dir=state).add_image_class("gizmo", [image_bytes(5)])
    (state / IMAGES_FILE).write_bytes(b"garbage")
    with pytest.raises(ClassStateError, match="corrupt.*never overwritten"):
        Classifier.from_bundle(synthetic_bundle.path, state_dir=state)
    assert (state / IMAGES_FILE).read_bytes() == b"garbage"


def test_multiset_bundle_gets_one_image_row_for_every_set(multiset_bundle, image_bytes, tmp_path):
    clf = Classifier.from_bundle(multiset_bundle.path, state_dir=tmp_path / "state")
    clf.add_image_class("gizmo", [image_bytes(30), image_bytes(31)])
    row = _rows(clf)["gizmo"]  # [S, D]
    assert row.shape[0] == 3 and np.array_equal(row[0], row[1]) and np.array_equal(row[1], row[2])
    assert clf.classify_bytes([image_bytes(30)], top_k=1)[0][0]["name"] == "gizmo"


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_adds_lists_and_removes(synthetic_bundle, image_bytes, tmp_path, capsys):
    from promptclip.cli import main

    state = tmp_path / "state"
    paths = []
    for s in (40, 41):
        p = tmp_path / f"ex{s}.png"
        p.write_bytes(image_bytes(s))
        paths.append(str(p))
    base = ["--bundle", str(synthetic_bundle.path), "--state-dir", str(state)]
    assert main(["classes", "add", *base, "--name", "gizmo", "--images", *paths, "--text-weight", "0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "text+images"
    assert main(["classes", "add", *base, "--names", "zebra", "okapi"]) == 0
    capsys.readouterr()
    assert main(["classes", "list", *base]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)["classes"]}
    assert listed["gizmo"] == {"name": "gizmo", "source": "text+images", "num_images": 2}
    assert listed["okapi"]["source"] == "text"
    assert main(["classes", "add", *base, "--name", "gizmo", "--images", paths[0]]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["classes", "add", *base, "--name", "x", "--images", str(tmp_path / "missing.png")]) == 2
    assert "cannot read example image" in capsys.readouterr().err
    assert main(["classes", "remove", *base, "--name", "gizmo"]) == 0
    assert main(["classes", "remove", *base, "--names", "zebra", "okapi"]) == 0
    capsys.readouterr()
    # a server over the same state dir sees the CLI's change
    clf = Classifier.from_bundle(synthetic_bundle.path, state_dir=state)
    assert clf.list_classes()["names"] == synthetic_bundle.class_names


def test_a_bundle_with_calibration_images_shifts_the_prototype(synthetic_bundle, image_bytes, tmp_path):
    """The calibration images of the bundle (``bundle.calibration.image_embeds [S, N, D]``) give ``mean_image``;
    ``mean_text`` is the mean of the bundle's class rows; ``modality_shift=False`` turns it off per class."""
    from serving.bundle import load_bundle, load_class_embeddings
    from serving.classifier import open_class_registry
    from serving.open_set import Calibration
    from serving.runtime import create_runtime

    bundle = load_bundle(synthetic_bundle.path)
    calib = np.random.default_rng(0).normal(size=(1, 5, bundle.embedding_dim)).astype(np.float32)
    calib /= np.linalg.norm(calib, axis=-1, keepdims=True)
    labels = np.arange(5, dtype=np.int64) % len(bundle.class_names)
    object.__setattr__(bundle, "calibration", Calibration(  # what the export writes
        image_embeds=calib, weights=None, labels=labels, class_names=list(bundle.class_names), keep_rate=0.95,
        rule="max_cosine"))
    registry = open_class_registry(bundle, tmp_path / "state")
    clf = Classifier(bundle, create_runtime(bundle, "ort"), registry, registry.tokenizer)
    clf.add_image_class("gizmo", [image_bytes(7), image_bytes(8)])
    clf.add_image_class("plain", [image_bytes(7), image_bytes(8)], modality_shift=False)
    rows = _rows(clf)
    examples = clf.embed_images(clf._decode_all([image_bytes(7), image_bytes(8)]))
    shift = np.stack(load_class_embeddings(bundle)).astype(np.float64).mean(axis=1) - calib.mean(axis=1)
    np.testing.assert_allclose(rows["gizmo"], image_class_row(examples, num_sets=1, shift=shift), atol=1e-6)
    np.testing.assert_array_equal(rows["plain"], image_class_row(examples, num_sets=1))
    assert not np.allclose(rows["gizmo"], rows["plain"])


def test_workers_adding_concurrently_lose_no_examples(synthetic_bundle, image_bytes, tmp_path):
    """Two workers over one state dir (each its own registry and file-lock fd) add image classes and names at the
    same time: every class is kept with its examples, and a third worker builds the same rows."""
    import threading

    state = tmp_path / "state"
    workers = [Classifier.from_bundle(synthetic_bundle.path, state_dir=state) for _ in range(2)]
    errors: list[BaseException] = []

    def add(w: int) -> None:
        try:
            for i in range(3):
                workers[w].add_image_class(f"img {w} {i}", [image_bytes(100 + 10 * w + i)])
                workers[w].add_classes([f"word {w} {i}"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    third = Classifier.from_bundle(synthetic_bundle.path, state_dir=state)
    sources = {c["name"]: c["source"] for c in third.list_classes()["classes"]}
    expected = [f"img {w} {i}" for w in range(2) for i in range(3)]
    assert sorted(n for n, s in sources.items() if s == "images") == expected
    assert sum(s == "text" for s in sources.values()) == 6 + 6
    rows = _rows(third)
    for w in range(2):
        mine = _rows(workers[w])
        for i in range(3):
            assert np.array_equal(mine[f"img {w} {i}"], rows[f"img {w} {i}"])
