"""The BentoML HTTP service, in process through its ASGI app, plus the torch-free import check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serving.service import ServiceConfigError, ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_UPLOAD = 200_000
ENV_KEYS = ("PROMPTCLIP_BUNDLE", "PROMPTCLIP_STATE_DIR", "PROMPTCLIP_API_TOKEN", "PROMPTCLIP_MAX_UPLOAD_BYTES",
            "PROMPTCLIP_MAX_BATCH_IMAGES", "PROMPTCLIP_RUNTIME", "PROMPTCLIP_START_EMPTY", "PROMPTCLIP_MAX_ADD_NAMES",
            "PROMPTCLIP_MAX_ADHOC_CLASSES", "PROMPTCLIP_MAX_REQUEST_PIXELS", "PROMPTCLIP_MAX_CLASSES",
            "PROMPTCLIP_OPEN_WRITES", "PROMPTCLIP_BUNDLE_DIGEST", "PROMPTCLIP_BATCHING")


_APP = None


def _app():
    """The service's ASGI app, built once per process: BentoML registers Prometheus metrics in a global
    registry when the app's middleware stack is built, so a second ``to_asgi()`` app in the same
    process fails with ``DuplicateTimeseries``. Each ``running()`` re-runs its lifespan, which
    creates a fresh service instance from the current environment."""
    global _APP
    if _APP is None:
        from serving.service import PromptclipService

        _APP = PromptclipService.to_asgi()
    return _APP


@contextmanager
def running(env: dict[str, str]) -> Iterator[TestClient]:
    """A started service (lifespan run) configured by ``env``; never nest two (they share one app)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ENV_KEYS:
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        with TestClient(_app()) as client:
            yield client


@pytest.fixture
def client(synthetic_bundle, tmp_path) -> Iterator[TestClient]:
    """A started service with a token, a fresh state dir and small limits (startup ~0.15 s)."""
    env = {
        "PROMPTCLIP_BUNDLE": str(synthetic_bundle.path),
        "PROMPTCLIP_STATE_DIR": str(tmp_path / "state"),
        "PROMPTCLIP_API_TOKEN": TOKEN,
        "PROMPTCLIP_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "PROMPTCLIP_MAX_BATCH_IMAGES": "3",
    }
    with running(env) as c:
        yield c


def _png(image_bytes, seed=0):
    return ("photo.png", image_bytes(seed), "image/png")


def assert_error(resp, status: int, error: str, *, field: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"]
    if field is not None:
        assert body.get("field") == field, body
    assert contains in body["message"], body
    return body


# -- classification --------------------------------------------------------------------------------


def test_classify(client, image_bytes, synthetic_bundle):
    resp = client.post("/classify", files={"image": _png(image_bytes)}, data={"top_k": "3"})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert len(preds) == 3
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert {p["name"] for p in preds} <= set(synthetic_bundle.class_names)
    default = client.post("/classify", files={"image": _png(image_bytes)}).json()["predictions"]
    assert len(default) == 5
    assert [p["name"] for p in default[:3]] == [p["name"] for p in preds]


def test_classify_adhoc_classes(client, image_bytes):
    as_json = client.post("/classify", files={"image": _png(image_bytes)},
                          data={"classes": json.dumps(["zebra", "cat"])})
    assert as_json.status_code == 200, as_json.text
    preds = as_json.json()["predictions"]
    assert {p["name"] for p in preds} == {"zebra", "cat"}
    assert sum(p["score"] for p in preds) == pytest.approx(1.0)
    repeated = client.post("/classify", files=[("image", _png(image_bytes))],
                           data={"classes": ["zebra", "cat"], "top_k": "1"})
    assert repeated.status_code == 200, repeated.text
    assert repeated.json()["predictions"][0]["name"] == preds[0]["name"]


def test_classify_batch(client, image_bytes):
    files = [("images", _png(image_bytes, s)) for s in range(3)]
    resp = client.post("/classify_batch", files=files, data={"top_k": "2"})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 3 and all(len(r) == 2 for r in results)
    single = client.post("/classify", files={"image": _png(image_bytes, 1)}, data={"top_k": "2"}).json()
    assert [p["name"] for p in results[1]] == [p["name"] for p in single["predictions"]]
    assert [p["score"] for p in results[1]] == pytest.approx([p["score"] for p in single["predictions"]], abs=1e-6)


def test_classify_batch_limits(client, image_bytes):
    files = [("images", _png(image_bytes, s)) for s in range(4)]
    assert_error(client.post("/classify_batch", files=files), 422, "RequestError", field="images",
                 contains="at most 3")
    files = [("images", _png(image_bytes, 0)), ("images", ("x.png", b"garbage", "image/png"))]
    assert_error(client.post("/classify_batch", files=files), 400, "ImageDecodeError", contains="image 2 of 2")


@pytest.mark.parametrize(
    ("kwargs", "status", "error", "field", "contains"),
    [
        ({"files": {"image": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "ImageDecodeError", "image",
         "not a recognised image"),
        ({"files": {"image": ("a.png", b"", "image/png")}}, 400, "ImageDecodeError", "image", "empty"),
        ({"data": {"top_k": "0"}}, 422, "RequestError", "top_k", "between 1 and 6"),
        ({"data": {"top_k": "99"}}, 422, "RequestError", "top_k", "between 1 and 6"),
        ({"data": {"top_k": "abc"}}, 422, "RequestError", "top_k", "integer"),
        ({"data": {"topk": "3"}}, 422, "RequestError", "topk", "unknown form field"),
        ({"data": {"classes": json.dumps(["cat", " ".join(["x"] * 90)])}}, 422, "ClassNameError", "classes",
         "tokens long"),
        ({"data": {"classes": json.dumps(["cat", "cat"])}}, 422, "ClassNameError", "classes", "more than once"),
        ({"data": {"classes": json.dumps(["cat", "bad\u0000name"])}}, 422, "ClassNameError", "classes", "U+0000"),
        ({"data": {"classes": "[not json"}}, 422, "RequestError", "classes", "JSON"),
        ({"data": {"classes": "[]"}}, 422, "RequestError", "classes", "empty"),
    ],
)
def test_classify_bad_input(client, image_bytes, kwargs, status, error, field, contains):
    kwargs = dict(kwargs)
    kwargs.setdefault("files", {"image": _png(image_bytes)})
    assert_error(client.post("/classify", **kwargs), status, error, field=field, contains=contains)


def test_classify_truncated_image(client, image_bytes):
    data = image_bytes(0, size=(64, 64))
    resp = client.post("/classify", files={"image": ("a.png", data[: len(data) // 2], "image/png")})
    assert_error(resp, 400, "ImageDecodeError", field="image", contains="truncated")


def test_classify_request_shape_errors(client, image_bytes):
    # The image under another field name (BentoML's own parser answers this with a 500).
    assert_error(client.post("/classify", files={"file": _png(image_bytes)}), 422, "RequestError", field="file",
                 contains="'image'")
    # A text value where the file belongs (BentoML's own parser would try to download it as a URL).
    resp = client.post("/classify", files={"other": ("x", b"1", "text/plain")}, data={"image": "cat.jpg"})
    assert resp.status_code == 422
    resp = client.post("/classify", data={"image": "cat.jpg"}, files={"image2": ("x", b"", "text/plain")})
    assert resp.status_code == 422
    resp = client.post("/classify", files=[("image", ("a", b"x", "text/plain"))], data={"image": "cat.jpg"})
    assert_error(resp, 422, "RequestError", field="image", contains="must be a file upload")
    # No image at all, two images, a JSON body, a raw image body.
    assert_error(client.post("/classify", files={"top_k": (None, "3")}), 422, "RequestError", field="image",
                 contains="no image uploaded")
    two = [("image", _png(image_bytes, 0)), ("image", _png(image_bytes, 1))]
    assert_error(client.post("/classify", files=two), 422, "RequestError", contains="/classify_batch")
    assert_error(client.post("/classify", json={"image": "x"}), 415, "UnsupportedMediaTypeError",
                 contains="multipart/form-data")
    assert_error(client.post("/classify", content=image_bytes(0), headers={"Content-Type": "image/png"}), 415,
                 "UnsupportedMediaTypeError", contains="curl -F image=@")


def test_upload_too_large(client):
    big = b"\0" * (MAX_UPLOAD + 1)
    resp = client.post("/classify", files={"image": ("big.png", big, "image/png")})
    body = assert_error(resp, 413, "PayloadTooLargeError", contains="PROMPTCLIP_MAX_UPLOAD_BYTES")
    assert f"{MAX_UPLOAD:,}" in body["message"]

    def chunks():  # no Content-Length: transfer-encoding chunked
        for _ in range(5):
            yield b"\0" * (MAX_UPLOAD // 4)

    resp = client.post("/classify", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert_error(resp, 413, "PayloadTooLargeError")


def test_chunked_upload_within_limit(client, image_bytes):
    import httpx

    req = httpx.Request("POST", "http://testserver/classify", files={"image": _png(image_bytes)})
    body = req.read()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    resp = client.post("/classify", content=chunks(), headers={"Content-Type": req.headers["Content-Type"]})
    assert resp.status_code == 200, resp.text


# -- class management ------------------------------------------------------------------------------


def test_list_classes_is_open(client, synthetic_bundle):
    resp = client.post("/classes")
    assert resp.status_code == 200
    body = resp.json()
    assert body["names"][:6] == synthetic_bundle.class_names and body["num_classes"] == len(body["names"])
    assert isinstance(body["version"], int)
    assert_error(client.post("/classes", json={"verbose": True}), 422, "RequestError", field="verbose")


@pytest.mark.parametrize(
    ("headers", "contains"),
    [({}, "Authorization: Bearer"), ({"Authorization": "Bearer nope"}, "invalid API token"),
     ({"Authorization": "Basic abc"}, "malformed"), ({"Authorization": TOKEN}, "malformed")],
)
def test_mutations_need_the_token(client, headers, contains):
    for route in ("/add_classes", "/remove_classes"):
        resp = client.post(route, json={"names": ["zebra"]}, headers=headers)
        assert_error(resp, 401, "AuthError", contains=contains)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # Auth is checked before the body: no validation details leak to anonymous callers.
    assert_error(client.post("/add_classes", content=b"{bad", headers=headers), 401, "AuthError")


def test_add_and_remove_classes(client, image_bytes):
    before = client.post("/classes").json()
    resp = client.post("/add_classes", json={"names": ["  snow   leopard ", "fire truck"]}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["added"] == ["snow leopard", "fire truck"]
    assert body["version"] == before["version"] + 1 and body["num_classes"] == before["num_classes"] + 2
    listed = client.post("/classes").json()
    assert listed["names"][-2:] == ["snow leopard", "fire truck"]
    preds = client.post("/classify", files={"image": _png(image_bytes)},
                        data={"top_k": str(listed["num_classes"])}).json()["predictions"]
    assert {"snow leopard", "fire truck"} <= {p["name"] for p in preds}

    assert_error(client.post("/add_classes", json={"names": ["fire truck"]}, headers=AUTH), 422, "ClassNameError",
                 field="names", contains="already registered")
    resp = client.post("/remove_classes", json={"names": ["snow leopard", "fire truck"]}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["removed"] == ["snow leopard", "fire truck"]
    assert client.post("/classes").json()["names"] == before["names"]
    assert_error(client.post("/remove_classes", json={"names": ["snow leopard"]}, headers=AUTH), 404,
                 "UnknownClassError", field="names", contains="not registered")


@pytest.mark.parametrize(
    ("body", "status", "error", "field", "contains"),
    [
        ({"names": ["x" * 201]}, 422, "ClassNameError", "names", "the limit is 200"),
        ({"names": [" ".join(["x"] * 90)]}, 422, "ClassNameError", "names", "at most 77"),
        ({"names": ["a", "a"]}, 422, "ClassNameError", "names", "more than once"),
        ({"names": []}, 422, "ClassNameError", "names", "empty"),
        ({"names": ["   "]}, 422, "ClassNameError", "names", "empty"),
        ({"names": "zebra"}, 422, "RequestError", "names", "valid array"),
        ({"nmes": ["zebra"]}, 422, "RequestError", "nmes", "unknown field"),
        ({}, 422, "RequestError", "names", "required"),
        ([1, 2], 422, "RequestError", None, "JSON object"),
    ],
)
def test_add_classes_bad_input(client, body, status, error, field, contains):
    assert_error(client.post("/add_classes", json=body, headers=AUTH), status, error, field=field, contains=contains)


def test_add_classes_bad_body(client):
    assert_error(client.post("/add_classes", content=b"{not json",
                             headers={**AUTH, "Content-Type": "application/json"}),
                 422, "RequestError", contains="not valid JSON")
    assert_error(client.post("/remove_classes", files={"names": ("n", b"zebra")}, headers=AUTH), 415,
                 "UnsupportedMediaTypeError", contains="JSON")
    # /add_classes' multipart form is the image form (one class from example images): `names` is not one of its fields
    assert_error(client.post("/add_classes", files={"names": ("n", b"zebra")}, headers=AUTH), 422,
                 "RequestError", field="names", contains="'images'")
    assert_error(client.post("/remove_classes", json={"names": ["cat", "dog", "red car", "tree", "airplane",
                                                                "sailing boat"]}, headers=AUTH),
                 422, "ClassNameError", contains="at least one class must remain")


def test_healthz(client):
    resp = client.post("/healthz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["method"] == "synthetic" and body["runtime"] == "ort"
    assert body["providers"] == ["CPUExecutionProvider"] and body["num_classes"] >= 6
    assert body["num_prompt_sets"] == 1 and body["prompt_sets"] == ["default"]
    # BentoML's own liveness/readiness probes stay in place.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    info = client.get("/info")  # issue 16: the JSON health over GET
    assert info.status_code == 200 and info.headers["content-type"].startswith("application/json")
    assert {k: v for k, v in info.json().items() if k != "worker_pid"} == {
        k: v for k, v in body.items() if k != "worker_pid"}
    assert client.get("/no-such-path").status_code == 404


def test_multiset_bundle_is_served_like_any_other(multiset_bundle, image_bytes, tmp_path):
    """A format-2 bundle (3 prompt sets) through HTTP: health, classify, add a class, classify again."""
    from serving.classifier import Classifier

    reference = Classifier.from_bundle(multiset_bundle.path, verify_hashes=False, warmup=False)
    names = [*multiset_bundle.class_names, "zebra"]
    expected = {r["name"]: r for r in reference.classify_bytes([image_bytes(4)], top_k=7, class_names=names)[0]}
    env = {"PROMPTCLIP_BUNDLE": str(multiset_bundle.path), "PROMPTCLIP_STATE_DIR": str(tmp_path / "state"),
           "PROMPTCLIP_API_TOKEN": TOKEN}
    with running(env) as c:
        health = c.post("/healthz").json()
        assert health["num_prompt_sets"] == 3 and health["prompt_sets"] == ["photo", "sketch", "art"]
        before = c.post("/classify", files={"image": _png(image_bytes, 4)}, data={"top_k": "6"})
        assert before.status_code == 200, before.text
        assert {p["name"] for p in before.json()["predictions"]} == set(multiset_bundle.class_names)
        added = c.post("/add_classes", json={"names": ["zebra"]}, headers=AUTH)
        assert added.status_code == 200 and added.json()["added"] == ["zebra"], added.text
        after = c.post("/classify", files={"image": _png(image_bytes, 4)}, data={"top_k": "7"})
        assert after.status_code == 200, after.text
        preds = after.json()["predictions"]
    assert [p["name"] for p in preds] == sorted(names, key=lambda n: -expected[n]["logit"])
    for p in preds:
        assert p["logit"] == pytest.approx(expected[p["name"]]["logit"], abs=1e-4)
        assert p["score"] == pytest.approx(expected[p["name"]]["score"], abs=1e-6)


# -- configuration ---------------------------------------------------------------------------------


def test_settings_from_env(tmp_path):
    with pytest.raises(ServiceConfigError, match="PROMPTCLIP_BUNDLE is not set"):
        ServiceSettings.from_env({})
    with pytest.raises(ServiceConfigError, match="PROMPTCLIP_MAX_UPLOAD_BYTES='lots' is not an integer"):
        ServiceSettings.from_env({"PROMPTCLIP_BUNDLE": "b", "PROMPTCLIP_MAX_UPLOAD_BYTES": "lots"})
    s = ServiceSettings.from_env({"PROMPTCLIP_BUNDLE": "b", "PROMPTCLIP_API_TOKEN": " ", "PROMPTCLIP_STATE_DIR": ""})
    assert s.api_token is None and s.state_dir is None and s.runtime == "auto"


def test_open_service_and_state_errors(synthetic_bundle, tmp_path, caplog):
    """Without a token and with open writes mutations are open; a state file corrupted while serving makes readiness
    fail and every request that needs the class list answer 503 with a JSON body that holds no server path (the log
    has it)."""
    env = {"PROMPTCLIP_BUNDLE": str(synthetic_bundle.path), "PROMPTCLIP_STATE_DIR": str(tmp_path),
           "PROMPTCLIP_OPEN_WRITES": "1"}  # issue 16: open writes are asked for explicitly
    with running(env) as c:
        resp = c.post("/add_classes", json={"names": ["zebra"]})
        assert resp.status_code == 200 and resp.json()["version"] == 2
        assert c.get("/readyz").status_code == 200
        (tmp_path / "classes.json").write_text("{oops")
        body = assert_error(c.post("/classes"), 503, "ClassStateError", contains="not ready")
        assert str(tmp_path) not in json.dumps(body) and "/" not in body["message"]
        assert c.get("/readyz").status_code == 503
        assert any("Move it away" in r.getMessage() and str(tmp_path / "classes.json") in r.getMessage()
                   for r in caplog.records), "the operator's log names the file and the fix"
        (tmp_path / "classes.json").write_text(json.dumps(
            {"format": "promptclip.classes", "format_version": 1, "version": 3, "names": ["cat", "dog"]}))
        assert c.get("/readyz").status_code == 200
        assert c.post("/classes").json()["names"] == ["cat", "dog"]


def test_classes_form_field_accepts_json_comma_separated_and_repeated(client, image_bytes):
    """Issue 16 item 9: `classes=red circle,blue square` is two classes, as with the CLI's --classes."""
    for data in ({"classes": "red circle,blue square"}, {"classes": json.dumps(["red circle", "blue square"])},
                 {"classes": ["red circle", "blue square"]}):
        resp = client.post("/classify", files={"image": _png(image_bytes)}, data={**data, "top_k": "2"})
        assert resp.status_code == 200, resp.text
        assert {p["name"] for p in resp.json()["predictions"]} == {"red circle", "blue square"}
        assert resp.json()["classes_version"] is None
    listed = client.post("/add_classes", json={"names": ["Red Circle"]}, headers=AUTH)
    assert listed.status_code == 200
    assert_error(client.post("/add_classes", json={"names": ["red circle"]}, headers=AUTH), 422, "ClassNameError",
                 contains="ignoring case")


def test_prometheus_metrics_include_ours(client, image_bytes):
    """Issue 16: BentoML's metrics plus classes, encode time, batch sizes and errors by kind."""
    assert client.post("/classify", files={"image": _png(image_bytes)},
                       data={"classes": "zebra,okapi"}).status_code == 200
    assert client.post("/classify", files={"image": ("x.png", b"nope", "image/png")}).status_code == 400
    # in process BentoML's GET /metrics never answers (its multiprocess collector); the real-server test in
    # test_processes.py reads GET /metrics, here the process registry is read directly
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    for name in ("promptclip_text_encode_seconds_count", "promptclip_image_batch_size_count",
                 'promptclip_errors_total{error="ImageDecodeError",status="400"}'):
        assert name in text, name


def test_a_corrupt_state_at_start_up_gives_a_not_ready_service_not_a_crash_loop(synthetic_bundle, tmp_path,
                                                                                 monkeypatch):
    """`bentoml serve` directly (a Bento container): the worker starts not ready and answers 503 without paths (no
    restart loop, no hanging requests), and becomes ready once the state file is fixed."""
    from serving.service import PromptclipService

    monkeypatch.setattr(PromptclipService.inner, "RELOAD_INTERVAL_S", 0.0)
    (tmp_path / "classes.json").write_text("{oops")
    env = {"PROMPTCLIP_BUNDLE": str(synthetic_bundle.path), "PROMPTCLIP_STATE_DIR": str(tmp_path),
           "PROMPTCLIP_API_TOKEN": TOKEN}
    with running(env) as c:
        assert c.get("/readyz").status_code == 503
        body = assert_error(c.post("/classes"), 503, "ClassStateError")
        assert str(tmp_path) not in json.dumps(body)
        assert c.get("/info").status_code == 503
        (tmp_path / "classes.json").write_text(json.dumps(
            {"format": "promptclip.classes", "format_version": 1, "version": 2, "names": ["cat", "zebra"]}))
        assert c.get("/readyz").status_code == 200
        assert c.post("/classes").json()["names"] == ["cat", "zebra"]


def test_writes_are_closed_without_a_token_unless_opened(synthetic_bundle, tmp_path, caplog):
    """Issue 16, safe defaults: no token means no class changes; reads stay open."""
    env = {"PROMPTCLIP_BUNDLE": str(synthetic_bundle.path), "PROMPTCLIP_STATE_DIR": str(tmp_path)}
    with running(env) as c:
        for route in ("/add_classes", "/remove_classes"):
            assert_error(c.post(route, json={"names": ["cat"]}), 401, "AuthError", contains="PROMPTCLIP_OPEN_WRITES")
        assert c.post("/classes").status_code == 200
        assert c.post("/classify", files={"image": ("p.png", _png_bytes_for_auth(), "image/png")}).status_code == 200
    assert "are refused" in caplog.text
    with running({**env, "PROMPTCLIP_OPEN_WRITES": "1"}) as c:
        assert c.post("/add_classes", json={"names": ["zebra"]}).status_code == 200
    assert "OPEN to every client" in caplog.text


def _png_bytes_for_auth() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_pinned_bundle_digest_refuses_any_change(synthetic_bundle, bundle_copy, edit_manifest):
    """Issue 16: one digest over the manifest and every file; an edit of the manifest alone (a relabelled class)
    is refused when the digest is pinned."""
    from serving.classifier import Classifier, check_bundle_digest
    from serving.errors import BundleError
    from serving.manifest import bundle_digest

    digest = bundle_digest(bundle_copy)
    assert digest.startswith("sha256:") and digest == bundle_digest(bundle_copy)
    assert check_bundle_digest(bundle_copy, digest) == digest
    Classifier.from_bundle(bundle_copy, expected_digest=digest, warmup=False)

    def relabel(m: dict) -> None:
        m["classes"]["names"][0] = "lion"

    edit_manifest(bundle_copy, relabel)
    assert bundle_digest(bundle_copy) != digest
    with pytest.raises(BundleError, match="was pinned"):
        Classifier.from_bundle(bundle_copy, expected_digest=digest, warmup=False)
    with pytest.raises(BundleError, match="is not of the form"):
        check_bundle_digest(bundle_copy, "abc")
    env = {"PROMPTCLIP_BUNDLE": str(bundle_copy), "PROMPTCLIP_BUNDLE_DIGEST": digest}
    assert ServiceSettings.from_env(env).bundle_digest == digest


def test_service_import_and_classification_are_torch_free(synthetic_bundle, multiset_bundle, image_bytes,
                                                          tmp_path):
    img = tmp_path / "img.png"
    img.write_bytes(image_bytes(0))
    script = textwrap.dedent(f"""
        import sys
        import serving.service
        heavy = [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules]
        assert not heavy, f"imported at module load: {{heavy}}"
        from serving.classifier import Classifier
        clf = Classifier.from_bundle({str(synthetic_bundle.path)!r})
        clf.add_classes(["zebra"])
        rows = clf.classify_bytes([open({str(img)!r}, "rb").read()], top_k=3)
        assert len(rows[0]) == 3
        multi = Classifier.from_bundle({str(multiset_bundle.path)!r})
        multi.add_classes(["zebra"])
        assert len(multi.classify_bytes([open({str(img)!r}, "rb").read()], top_k=7)[0]) == 7
        heavy = [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules]
        assert not heavy, f"imported while serving: {{heavy}}"
        print("torch-free ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PROMPTCLIP_BUNDLE": str(synthetic_bundle.path),
           "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch-free ok" in proc.stdout


# -- the OpenAPI document and a bounded schemathesis run ---------------------------------------------


def test_openapi_document_is_the_service(client):
    """Issue 16 item 8: the served document is serving.openapi's: every status, the real error body, uploads as
    OpenAPI 3 binary, `names: []` refused by the schema as by the service."""
    from serving.openapi import openapi_document

    doc = client.get("/docs.json").json()
    assert doc == openapi_document() == client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    form = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"] == {**form["properties"]["image"], "type": "string", "format": "binary"}
    assert '"type": "file"' not in json.dumps(doc)
    add = doc["paths"]["/add_classes"]["post"]
    assert {"200", "401", "413", "415", "422", "503"} <= set(add["responses"])
    assert add["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    assert add["requestBody"]["content"]["application/json"]["schema"]["properties"]["names"]["minItems"] == 1
    assert {"400", "413", "422"} <= set(doc["paths"]["/classify"]["post"]["responses"])


try:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError as _exc:  # the dev extra installs it: a missing one is an error, not a skip
    raise ImportError(f"schemathesis is needed by the serving tests: pip install -e '.[dev]' ({_exc})") from _exc

#: Examples per operation and mode (valid, invalid): 9 operations x 2 x 12 stay under ~30 s on 2 cores.
SCHEMATHESIS_EXAMPLES = 12


def test_schemathesis_finds_no_server_error_and_no_schema_violation(client):
    """A bounded schema-driven run over the served document: no 5xx, every status documented, every body matching
    its documented schema (with the token, so the write endpoints are exercised past auth)."""
    schema = schemathesis.openapi.from_asgi("/docs.json", _app())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    def run_operation(operation, mode) -> None:
        @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def run(case) -> None:
            response = case.call_and_validate(headers=AUTH, checks=checks)
            counts[operation.label] = counts.get(operation.label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        run()

    from serving.openapi import openapi_document

    paths = openapi_document()["paths"]
    for result in schema.get_all_operations():
        operation = result.ok()
        has_body = "requestBody" in paths[operation.path][operation.method.lower()]
        # valid requests, and invalid ones where there is something to get wrong (GET probes take no input)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_body else (GenerationMode.POSITIVE,):
            run_operation(operation, mode)
    assert len(counts) == 9, counts
    assert sum(counts.values()) >= 9 * 10
    assert not [s for s in statuses if s >= 500], statuses
    print(f"schemathesis: {sum(counts.values())} cases, statuses {dict(sorted(statuses.items()))}")
