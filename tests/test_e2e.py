"""End to end on the real stack: train -> export -> `bentoml serve` on loopback (a real server, stopped by its pid)
-> classify -> add a class at runtime -> classify, for coop, ivlp and guidg (a format-2 bundle with two experts)."""
from __future__ import annotations

import os

import httpx
import pytest

from promptclip.server import ServerProcess


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coop", "ivlp", "guidg"])
def test_train_export_serve_classify_add_classify(name, request, shapes_root, tmp_path):
    from serving.classifier import Classifier
    from training.data import read_image_folder

    bundle = request.getfixturevalue("guidg_bundle") if name == "guidg" else request.getfixturevalue("bundles")[name]
    splits = read_image_folder(shapes_root)
    image = next(s.path for s in splits.test)
    blob = open(image, "rb").read()
    new_name = "a magenta dodecahedron"
    with ServerProcess(bundle, state_dir=tmp_path / "state", log_path=tmp_path / "server.log") as server:
        server.wait_ready()
        pid = server.proc.pid
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/classify", files={"image": ("x.png", blob, "image/png")}, data={"top_k": "2"})
            assert r.status_code == 200, r.text
            preds = r.json()["predictions"]
            assert len(preds) == 2 and preds[0]["score"] >= preds[1]["score"]
            trained_classes = c.post("/classes", json={}).json()["names"]
            assert {p["name"] for p in preds} <= set(trained_classes)

            r = c.post("/add_classes", json={"names": [new_name]})
            assert r.status_code == 200, r.text
            r = c.post("/classify", files={"image": ("x.png", blob, "image/png")},
                       data={"top_k": str(len(trained_classes) + 1)})
            assert r.status_code == 200, r.text
            served = {p["name"]: p["logit"] for p in r.json()["predictions"]}
            assert new_name in served

            # bad input over the real server: a 4xx with a message, never a 500
            r = c.post("/classify", files={"image": ("x.png", b"not an image", "image/png")})
            assert r.status_code == 400 and "image" in r.json()["message"].lower()
            r = c.post("/add_classes", json={"names": ["word " * 100]})
            assert r.status_code == 422
    assert server.proc.poll() is not None, "server still running after stop"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    # the runtime-added class went through the exported prompted text encoder: same logit in-process, and
    # the addition survived the server's stop (persisted in the state dir)
    clf = Classifier.from_bundle(bundle, state_dir=tmp_path / "state")
    assert new_name in clf.list_classes()["names"]
    local = {p["name"]: p["logit"] for p in clf.classify_bytes([blob], top_k=len(trained_classes) + 1)[0]}
    assert local[new_name] == pytest.approx(served[new_name], abs=1e-3)
