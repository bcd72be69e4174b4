"""Precision and optimisation at export: fp16 / int8 graphs, the optimiser, parity bounded per precision, served."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.bundle import export_bundle
from export.onnx_export import TOLERANCES, ParityReport
from serving.bundle import load_bundle
from serving.classifier import Classifier
from training.errors import ExportError


@pytest.fixture(scope="module")
def precision_bundles(tmp_path_factory, trained):
    """precision/optimise -> bundle of the tiny ivlp artifact."""
    art = trained["ivlp"].artifact
    out = {}
    for key, prec, opt in [("fp16", "fp16", False), ("int8", "int8", False), ("opt", "fp32", True),
                           ("fp16-opt", "fp16", True)]:
        out[key] = export_bundle(art, tmp_path_factory.mktemp(f"bundle-{key}") / "b", exporter="torchscript",
                                 precision=prec, optimize=opt)
    return out


@pytest.mark.parametrize("key,precision", [("fp16", "fp16"), ("int8", "int8"), ("opt", "fp32"),
                                           ("fp16-opt", "fp16")])
def test_precision_recorded_and_parity_within_its_bound(precision_bundles, key, precision):
    m = json.loads((precision_bundles[key] / "manifest.json").read_text())
    tol = TOLERANCES[precision]
    for graph in ("image", "text"):
        spec = m["graphs"][graph] if graph == "image" else m["graphs"]["text"][0]
        assert spec.get("precision", "fp32") == precision
        assert spec["inputs"][0]["dtype"] in ("float32", "int64") and spec["outputs"][0]["dtype"] == "float32"
        par = m["parity"][graph]
        assert par["max_abs"] <= tol.max_abs and par["min_cosine"] >= tol.min_cosine
        assert par["tolerance"] == {"max_abs": tol.max_abs, "min_cosine": tol.min_cosine}
    assert m["parity"]["logits"]["min_cosine"] >= tol.min_cosine
    if key.endswith("opt"):
        assert m["graphs"]["image"]["optimization"]["model_type"] == "clip"
    else:
        assert "optimization" not in m["graphs"]["image"]


def test_fp16_is_about_half_the_size(bundles, precision_bundles):
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        fp32 = (bundles["ivlp"] / name).stat().st_size
        fp16 = (precision_bundles["fp16"] / name).stat().st_size
        assert fp16 < 0.7 * fp32, (name, fp16, fp32)
    assert (precision_bundles["int8"] / "text_encoder.onnx").stat().st_size < 0.4 * (
        bundles["ivlp"] / "text_encoder.onnx").stat().st_size


def test_fp16_graph_keeps_float32_islands(precision_bundles):
    import onnx

    model = onnx.load(str(precision_bundles["fp16"] / "image_encoder.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert any(i.data_type == f16 for i in model.graph.initializer)  # the weights are half
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceL2"):
            assert all(types.get(o, onnx.TensorProto.FLOAT) != f16 for o in node.output), node.name


@pytest.mark.parametrize("key", ["fp16", "int8", "fp16-opt"])
def test_reduced_precision_bundle_classifies_like_fp32(bundles, precision_bundles, key):
    """Served on CPU (fp16 with basic graph optimisations), the top class matches the fp32 bundle's, including a
    class added at runtime through the reduced-precision text graph."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = Classifier.from_bundle(bundles["ivlp"], runtime="ort")
    got = Classifier.from_bundle(precision_bundles[key], runtime="ort")
    a = ref.runtime.run_image(pixels)
    b = got.runtime.run_image(pixels)
    assert float(np.min(np.sum(a * b, -1))) >= TOLERANCES[got.bundle.graph_spec("image").graph_precision].min_cosine
    ids = np.zeros((1, ref.bundle.context_length), np.int64)
    ids[0, :3] = [49406, 320, 49407]
    ta, tb = ref.runtime.run_text(ids), got.runtime.run_text(ids)
    assert float(np.sum(ta * tb)) >= 0.98
    load_bundle(precision_bundles[key])


def test_unknown_precision_is_refused(tmp_path, trained):
    with pytest.raises(ExportError, match="unknown precision 'fp8'"):
        export_bundle(trained["ivlp"].artifact, tmp_path / "b", exporter="torchscript", precision="fp8")


def test_parity_bound_follows_precision():
    rep = ParityReport(batches=[1], max_abs=1e-3, min_cosine=0.9995, precision="fp16")
    assert rep.ok() and rep.to_dict()["precision"] == "fp16"
    assert not ParityReport(batches=[1], max_abs=1e-3, min_cosine=0.9995).ok()  # fp32 bound
