"""Export: graphs check themselves, parity is measured and written, the bundle is what serving reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.bundle import export_bundle
from serving.bundle import load_bundle
from training.artifact import load_prompt_artifact
from training.errors import ExportError


@pytest.mark.parametrize("name", ["coop", "ivlp", "zeroshot"])
def test_bundle_manifest_and_parity(bundles, name):
    b = bundles[name]
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["format"] == "promptclip.bundle" and manifest["format_version"] == 1
    assert manifest["method"]["name"] == name
    for graph in ("image", "text"):
        par = manifest["parity"][graph]
        assert par["batches"] == [1, 3]
        assert par["max_abs"] <= 1e-4 and par["min_cosine"] >= 0.9999
    assert manifest["parity"]["class_embeddings"]["min_cosine"] >= 0.9999
    img = manifest["graphs"]["image"]
    assert img["inputs"][0]["name"] == "pixel_values" and img["inputs"][0]["shape"][0] == "batch"
    assert img["opset"] == 18
    load_bundle(b)  # hashes verify


def test_onnx_matches_torch_at_new_batch_sizes(bundles, trained):
    """Dynamic batch honoured beyond the parity batches, and the bundle's graphs compute the artifact's function."""
    import onnxruntime as ort

    art = load_prompt_artifact(trained["ivlp"].artifact)
    sess = ort.InferenceSession(str(bundles["ivlp"] / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = art.method.encode_image(x).numpy()
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    assert got.shape == (5, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_class_embeddings_equal_text_graph(bundles):
    from safetensors.numpy import load_file

    from serving.tokenizer import ClipTokenizer

    b = bundles["coop"]
    m = json.loads((b / "manifest.json").read_text())
    emb = load_file(str(b / "class_embeddings.safetensors"))["class_embeddings"]
    assert emb.shape == (len(m["classes"]["names"]), m["embedding_dim"])
    tok = ClipTokenizer(b / "bpe_simple_vocab_16e6.txt.gz", m["text"]["context_length"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(b / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = tok([m["text"]["templates"][0].format(n) for n in m["classes"]["names"]])
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0], emb, atol=1e-5)


def test_zeroshot_bundle_reproduces_open_clip(bundles, trained):
    """A bundle with no learned prompts gives open_clip's own encode_image/encode_text (cosine >= 0.9999)."""
    import onnxruntime as ort
    from open_clip.tokenizer import SimpleTokenizer

    from training.backbone import create_backbone

    b = bundles["zeroshot"]
    bb = create_backbone("tiny-test")  # same default seed as the artifact
    x = torch.randn(4, 3, 32, 32)
    ids = SimpleTokenizer()(["a photo of a red circle.", "a photo of a thing never trained on."])
    with torch.no_grad():
        ref_i = torch.nn.functional.normalize(bb.model.encode_image(x), dim=-1).numpy()
        ref_t = torch.nn.functional.normalize(bb.model.encode_text(ids), dim=-1).numpy()
    img = ort.InferenceSession(str(b / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(b / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got_i = img.run(None, {"pixel_values": x.numpy()})[0]
    got_t = txt.run(None, {"input_ids": ids.numpy()})[0]
    assert (np.sum(got_i * ref_i, -1)).min() >= 0.9999
    assert (np.sum(got_t * ref_t, -1)).min() >= 0.9999


def test_dynamo_exporter_and_custom_classes(tmp_path, trained):
    out = export_bundle(trained["ivlp"].artifact, tmp_path / "b", exporter="dynamo",
                        class_names=["red circle", "a  purple_elephant ", "zebra"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"]["names"] == ["red circle", "a purple elephant", "zebra"]
    assert m["graphs"]["image"]["exporter"] == "dynamo"
    assert m["parity"]["image"]["max_abs"] <= 1e-4


def test_runtime_class_gets_exactly_the_exported_embedding(tmp_path, trained):
    """One class-name rule from export to serving: a class added at runtime as ``golden_retriever`` or as
    `` Golden  Retriever`` is the exported ``golden retriever`` and is scored with exactly its exported embedding."""
    from safetensors.numpy import load_file

    from serving.classifier import Classifier

    out = export_bundle(trained["coop"].artifact, tmp_path / "b", exporter="torchscript",
                        class_names=["golden_retriever", "red circle", "zebra"])
    assert json.loads((out / "manifest.json").read_text())["classes"]["names"] == [
        "golden retriever", "red circle", "zebra"]
    exported = load_file(str(out / "class_embeddings.safetensors"))["class_embeddings"][0]
    clf = Classifier.from_bundle(out, runtime="ort")
    clf.remove_classes(["golden retriever"])
    for raw, shown in (("golden_retriever", "golden retriever"), (" Golden  Retriever", "Golden Retriever")):
        assert clf.add_classes([raw])["added"] == [shown]
        names, matrix = clf._active_classes()  # what classification scores against: [S, C, D]
        assert names == ["red circle", "zebra", shown]
        assert np.array_equal(matrix[0, names.index(shown)], exported)
        assert clf.remove_classes([raw])["removed"] == [shown]
    # The text graph agrees that case is not part of a class's identity (CLIP's tokenizer lowercases).
    assert np.array_equal(clf.encode_text(["Golden Retriever"]), clf.encode_text(["golden retriever"]))


def test_export_refuses_bad_inputs_and_keeps_existing(tmp_path, trained, bundles):
    art = trained["coop"].artifact
    with pytest.raises(ExportError, match="duplicate class name"):
        export_bundle(art, tmp_path / "x", class_names=["cat", "cat"], exporter="torchscript")
    with pytest.raises(ExportError, match="the same class as 'golden retriever': case is ignored"):
        export_bundle(art, tmp_path / "x", class_names=["golden_retriever", "Golden Retriever"], exporter="torchscript")
    with pytest.raises(ExportError, match="empty class name"):
        export_bundle(art, tmp_path / "x", class_names=["cat", "  "], exporter="torchscript")
    with pytest.raises(ExportError, match="unknown exporter"):
        export_bundle(art, tmp_path / "x", exporter="tflite")
    from serving.errors import ClassNameError

    with pytest.raises(ClassNameError):
        export_bundle(art, tmp_path / "x", class_names=["word " * 100], exporter="torchscript")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-bundle-*"))
    existing = bundles["coop"]
    before = (existing / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(art, existing, exporter="torchscript")
    assert (existing / "manifest.json").read_bytes() == before
