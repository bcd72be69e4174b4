"""serving.bundle: loading, verification and every refusal of load_bundle; serving.runtime basics."""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from serving import format as format_mod
from serving.bundle import Bundle, load_bundle, load_class_embeddings, sha256_file
from serving.errors import BundleError, RuntimeUnavailableError
from serving.format import CLASS_EMBEDDINGS_FILE, IMAGE_GRAPH_FILE, MANIFEST_FILE, READER_VERSION
from serving.runtime import OrtRuntime, Runtime, create_runtime


def test_sha256_file_streams_and_matches_hashlib(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_load_bundle_reads_the_manifest(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path)
    assert isinstance(b, Bundle)
    assert b.class_names == synthetic_bundle.class_names
    assert b.templates == [synthetic_bundle.template]
    assert b.context_length == 77
    assert b.logit_scale == 50.0
    assert b.num_prompt_sets == 1
    assert b.text_depends_on_image is False
    assert b.method_name == "synthetic"
    assert b.graph_path("image").name == IMAGE_GRAPH_FILE
    assert b.graph_path("text", 0).name == "text_encoder.onnx"
    assert b.preprocessing.image_size == (32, 32)
    with pytest.raises(IndexError):
        b.graph_path("text", 1)


def test_load_class_embeddings(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    (emb,) = load_class_embeddings(b)
    assert emb.dtype == np.float32 and emb.shape == (len(synthetic_bundle.class_names), 32)
    assert emb.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, synthetic_bundle.text_embed(synthetic_bundle.class_names), atol=1e-6)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path)


def test_invalid_json(bundle_copy):
    (bundle_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON.*re-export"):
        load_bundle(bundle_copy)


def test_wrong_format(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m.update(format="something.else"))
    with pytest.raises(BundleError, match="not a promptclip deploy bundle"):
        load_bundle(bundle_copy)


def test_newer_min_reader_version_says_which_version_and_to_upgrade(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m.update(min_reader_version=READER_VERSION + 1, format_version=99))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    msg = str(info.value)
    assert f"reader version {READER_VERSION + 1}" in msg and "upgrade promptclip" in msg


def test_missing_keys_are_named(bundle_copy, edit_manifest):
    def edit(m):
        del m["logit_scale"]
        del m["text"]["context_length"]
        del m["graphs"]["image"]["sha256"]

    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    msg = str(info.value)
    for key in ("logit_scale", "text.context_length", "graphs.image.sha256"):
        assert key in msg
    assert "re-export" in msg


def test_missing_file(bundle_copy):
    (bundle_copy / IMAGE_GRAPH_FILE).unlink()
    with pytest.raises(BundleError, match=f"missing file.*{IMAGE_GRAPH_FILE}"):
        load_bundle(bundle_copy)


def test_tampered_file_fails_the_hash_check(bundle_copy):
    path = bundle_copy / CLASS_EMBEDDINGS_FILE
    expected = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    msg = str(info.value)
    assert CLASS_EMBEDDINGS_FILE in msg and expected[:12] in msg and sha256_file(path)[:12] in msg
    # Without verification the (still well-formed) file loads.
    load_bundle(bundle_copy, verify_hashes=False)


def test_row_count_mismatch(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["classes"]["names"].append("extra class"))
    with pytest.raises(BundleError, match="6 rows for 7 class names"):
        load_bundle(bundle_copy)


def test_embedding_dim_mismatch(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m.update(embedding_dim=64))
    with pytest.raises(BundleError, match=r"shape \[6, 32\].*expected \[6, 64\]"):
        load_bundle(bundle_copy)


def test_text_depends_on_image_is_refused(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["method"]["capabilities"].update(text_depends_on_image=True))
    with pytest.raises(BundleError,
                       match="depend on the image.*only methods whose class embeddings can be precomputed"):
        load_bundle(bundle_copy)


def test_file_outside_bundle_is_refused(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["classes"].update(file="../elsewhere.safetensors"))
    with pytest.raises(BundleError, match="inside the bundle"):
        load_bundle(bundle_copy)


def test_unknown_top_level_keys_warn_once(bundle_copy, edit_manifest, caplog, monkeypatch):
    monkeypatch.setattr(format_mod, "_warned_unknown", set())
    edit_manifest(bundle_copy, lambda m: m.update(future_thing={"a": 1}))
    with caplog.at_level(logging.WARNING, logger="serving.bundle"):
        load_bundle(bundle_copy)
        load_bundle(bundle_copy)
    warnings = [r for r in caplog.records if "future_thing" in r.getMessage()]
    assert len(warnings) == 1


def test_template_must_mark_the_name(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["text"].update(templates=["a photo"]))
    with pytest.raises(BundleError, match="containing"):
        load_bundle(bundle_copy)


def test_manifest_io_names_are_checked(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["graphs"]["text"][0]["inputs"][0].update(dtype="int32"))
    with pytest.raises(BundleError, match="expected 'int64'"):
        load_bundle(bundle_copy)


# -- runtime ---------------------------------------------------------------------------------------


def test_ort_runtime_runs_both_graphs(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    rt = create_runtime(b, "auto")
    assert isinstance(rt, OrtRuntime) and isinstance(rt, Runtime)
    assert rt.name == "ort" and rt.providers == ["CPUExecutionProvider"]
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    emb = rt.run_image(pixels)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, synthetic_bundle.image_embed(pixels), atol=1e-5)
    from serving.tokenizer import ClipTokenizer

    tok = ClipTokenizer(b.vocab_path, context_length=b.context_length)
    names = ["cat", "zebra"]
    text = rt.run_text(tok([synthetic_bundle.template.format(n) for n in names]))
    np.testing.assert_allclose(text, synthetic_bundle.text_embed(names), atol=1e-5)


def test_runtime_kinds(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    # issue 14: the TensorRT runtime exists; on a host without TensorRT it names what to install
    with pytest.raises(RuntimeUnavailableError, match=r"TensorRT is not installed here: pip install "
                                                      r"'promptclip\[trt\]'"):
        create_runtime(b, "tensorrt")
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime"):
        create_runtime(b, "magic")
    with pytest.raises(RuntimeUnavailableError, match="CUDAExecutionProvider"):
        OrtRuntime(b, providers=["CUDAExecutionProvider"])


def test_runtime_checks_graph_against_manifest(bundle_copy, edit_manifest):
    # The graph's static input shape (3x32x32) disagrees with the manifest's preprocessing.
    edit_manifest(bundle_copy, lambda m: m["preprocessing"].update(image_size=[64, 64]))
    b = load_bundle(bundle_copy, verify_hashes=False)
    with pytest.raises(BundleError, match=r"input 'pixel_values' has shape .*re-export"):
        OrtRuntime(b)


def test_missing_onnxruntime_is_actionable(synthetic_bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'promptclip\[cpu\]'"):
        OrtRuntime(b)


def test_manifest_is_json_serialisable_roundtrip(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    assert json.loads(json.dumps(b.manifest)) == b.manifest


def test_cuda_fallback_logs_one_loud_warning(synthetic_bundle, monkeypatch, caplog):
    """onnxruntime-gpu silently falls back to CPU when CUDA cannot start: the runtime must say so, once."""
    import types

    import onnxruntime as ort

    from serving import runtime as runtime_mod

    class FallbackSession:
        def __init__(self, path, sess_options=None, providers=None):
            assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
            self._s = ort.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def __getattr__(self, name):
            return getattr(self._s, name)

    fake = types.SimpleNamespace(
        __version__=ort.__version__,
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        SessionOptions=ort.SessionOptions,
        GraphOptimizationLevel=ort.GraphOptimizationLevel,
        InferenceSession=FallbackSession,
    )
    monkeypatch.setattr(runtime_mod, "_import_ort", lambda: fake)
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        rt = OrtRuntime(b)
    warnings = [r for r in caplog.records if r.name == "serving.runtime" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "INFERENCE RUNS ON CPU" in warnings[0].getMessage()
    assert rt.providers == ["CPUExecutionProvider"]
