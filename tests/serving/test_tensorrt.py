"""TensorRT engines and runtime selection: everything that needs no GPU is tested here with fakes (profiles, cache
keys, the TensorRT 10 / 11 build logic, manifest entries, matching, auto selection, provider errors); the real
TensorRT build and run skip, with the reason, where TensorRT or a GPU is missing."""
from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest

from serving import runtime as runtime_mod
from serving import tensorrt_engines as te
from serving import tensorrt_runtime as tr
from serving.bundle import load_bundle
from serving.errors import PromptclipError, RuntimeUnavailableError
from serving.runtime import OrtRuntime, create_runtime, resolve_providers

HOST = te.HostInfo(tensorrt_version="10.7.0", gpu_name="NVIDIA L4", compute_capability="8.9")
HOST11 = te.HostInfo(tensorrt_version="11.0.1", gpu_name="NVIDIA L4", compute_capability="8.9")


class FakeTrt:
    """Records what the builder is asked for (the documented TensorRT 10 builder API, no GPU)."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 2

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16 = "fp16"

    def __init__(self, version: str = "10.7.0", parse_ok: bool = True):
        self.__version__ = version
        self.calls: list[tuple] = []
        self.parse_ok = parse_ok
        fake = self

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return fake.parse_ok

            def get_error(self, i):
                return "Unsupported operator Foo"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("profile", name, lo, opt, hi))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+tuned"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, data):
                fake.calls.append(("cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"ENGINE"

        self.OnnxParser, self.Builder = Parser, Builder

    def of(self, name):
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def fresh_copy(bundle_copy):
    return load_bundle(bundle_copy, verify_hashes=False)


def test_engine_key_and_profile():
    key = te.engine_key(HOST, "ab" * 32, "fp16")
    assert key == "trt10.7.0-nvidia-l4-sm89-fp16-" + ("ab" * 8)
    assert te.batch_profile(256).as_dict() == {"min": 1, "opt": 256, "max": 256}
    assert te.batch_profile(64, 8).as_dict() == {"min": 1, "opt": 8, "max": 64}
    with pytest.raises(PromptclipError, match="--opt-batch must be between 1 and --max-batch"):
        te.batch_profile(8, 16)
    with pytest.raises(PromptclipError, match="--max-batch must be >= 1"):
        te.batch_profile(0)


def test_build_trt10_fp16_flag_profiles_cache_and_manifest(fresh_copy):
    trt = FakeTrt("10.7.0")
    built = te.build_engines(fresh_copy, max_batch=32, opt_batch=8, precision="fp16", host=HOST, trt=trt,
                             workspace_bytes=1 << 20, progress=lambda s: None)
    assert [(e.graph, e.prompt_set) for e in built] == [("image", 0), ("text", 0)]
    assert trt.of("network") == [("network", 0), ("network", 0)]  # weakly typed on TensorRT 10
    assert trt.of("flag") == [("flag", "fp16"), ("flag", "fp16")]
    assert trt.of("profile") == [("profile", "pixel_values", (1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)),
                                 ("profile", "input_ids", (1, 77), (8, 77), (32, 77))]
    # the timing cache is read (empty the first time), written, and reused by the next graph's build
    assert trt.of("cache_in") == [("cache_in", b""), ("cache_in", b"+tuned")]
    root = fresh_copy.root
    assert (root / "engines" / "timing-trt10.7.0-sm89.cache").read_bytes() == b"+tuned+tuned"
    reread = load_bundle(root, verify_hashes=False)  # the typed manifest reads back
    specs = te.engine_for(reread, HOST)
    image = specs[("image", 0)]
    assert image.graph_sha256 == reread.graph_spec("image").sha256 and image.precision == "fp16"
    assert image.profile == {"min": 1, "opt": 8, "max": 32} and not image.strongly_typed
    assert (root / image.file).read_bytes() == b"ENGINE"
    assert json.loads((root / "manifest.json").read_text())["engines"][0]["tensorrt_version"] == "10.7.0"
    # rebuilding replaces the same keys, engines of other hosts are kept
    te.build_engines(reread, precision="fp16", host=HOST, trt=FakeTrt(), progress=lambda s: None)
    other = te.HostInfo("10.7.0", "NVIDIA T4", "7.5")
    te.build_engines(load_bundle(root, verify_hashes=False), host=other, trt=FakeTrt(), progress=lambda s: None)
    assert len(load_bundle(root, verify_hashes=False).model.engines) == 4


def test_trt11_needs_an_fp16_graph(fresh_copy, bundle_copy, edit_manifest):
    with pytest.raises(PromptclipError, match="TensorRT 11.0.1 builds strongly typed.*--precision fp16"):
        te.build_engines(fresh_copy, precision="fp16", host=HOST11, trt=FakeTrt("11.0.1"), progress=lambda s: None)
    trt = FakeTrt("11.0.1")  # fp32 engine of an fp32 graph: strongly typed, no FP16 flag
    te.build_engines(fresh_copy, precision="fp32", host=HOST11, trt=trt, progress=lambda s: None)
    assert trt.of("network") == [("network", 4), ("network", 4)] and trt.of("flag") == []
    edit_manifest(bundle_copy, lambda m: m["graphs"]["image"].update(precision="fp16"))
    edit_manifest(bundle_copy, lambda m: m["graphs"]["text"][0].update(precision="fp16"))
    trt = FakeTrt("11.0.1")
    built = te.build_engines(load_bundle(bundle_copy, verify_hashes=False), precision="fp16", host=HOST11, trt=trt,
                             progress=lambda s: None)
    assert trt.of("network") == [("network", 4), ("network", 4)] and trt.of("flag") == []
    assert all(e.strongly_typed and e.precision == "fp16" for e in built)


def test_int8_optimised_and_unparsable_graphs_are_refused(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["graphs"]["image"].update(precision="int8"))
    with pytest.raises(PromptclipError, match="int8.*TensorRT does not build.*--precision fp32 or fp16"):
        te.build_engines(load_bundle(bundle_copy, verify_hashes=False), host=HOST, trt=FakeTrt(),
                         progress=lambda s: None)
    edit_manifest(bundle_copy, lambda m: m["graphs"]["image"].update(precision="fp32", optimization={"fused": {}}))
    with pytest.raises(PromptclipError, match="without --optimize"):
        te.build_engines(load_bundle(bundle_copy, verify_hashes=False), host=HOST, trt=FakeTrt(),
                         progress=lambda s: None)
    edit_manifest(bundle_copy, lambda m: m["graphs"]["image"].pop("optimization"))
    with pytest.raises(PromptclipError, match="ONNX parser rejected image_encoder.onnx: Unsupported operator Foo"):
        te.build_engines(load_bundle(bundle_copy, verify_hashes=False), host=HOST, trt=FakeTrt(parse_ok=False),
                         progress=lambda s: None)


def test_mismatched_engine_is_refused_with_how_to_rebuild(fresh_copy, bundle_copy, edit_manifest):
    with pytest.raises(te.EngineMismatchError, match="it has: none.*promptclip engine build --bundle"):
        te.match_engine(fresh_copy, HOST, "image")
    te.build_engines(fresh_copy, host=HOST, trt=FakeTrt(), progress=lambda s: None)
    b = load_bundle(bundle_copy, verify_hashes=False)
    assert te.match_engine(b, HOST, "image").gpu_name == "NVIDIA L4"
    for other in (te.HostInfo("10.7.0", "NVIDIA T4", "7.5"), te.HostInfo("10.8.0", "NVIDIA L4", "8.9")):
        with pytest.raises(te.EngineMismatchError, match=r"not portable.*TensorRT 10.7.0 on NVIDIA L4 \(sm 8.9\).*"
                                                          r"promptclip engine build"):
            te.match_engine(b, other, "image")
    edit_manifest(bundle_copy, lambda m: m["graphs"]["image"].update(sha256="0" * 64))  # graph re-exported
    with pytest.raises(te.EngineMismatchError, match="for another version of the graph"):
        te.match_engine(load_bundle(bundle_copy, verify_hashes=False), HOST, "image")


def test_runtime_without_tensorrt_names_what_to_install(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    with pytest.raises(RuntimeUnavailableError, match=r"pip install 'promptclip\[trt\]'.*Jetson"):
        tr.TensorRTRuntime(b)
    with pytest.raises(RuntimeUnavailableError, match="--providers applies to --runtime ort only"):
        create_runtime(b, "tensorrt", providers=["CPUExecutionProvider"])
    assert tr.why_no_engine(b) == "the bundle has no TensorRT engines (`promptclip engine build`)"


def _auto_records(caplog, b, **kwargs):
    with caplog.at_level(logging.INFO, logger="serving.runtime"):
        rt = create_runtime(b, "auto", environ={}, **kwargs)
    return rt, [r for r in caplog.records if r.name == "serving.runtime" and "runtime auto" in r.getMessage()]


def test_auto_says_what_it_chose(synthetic_bundle, monkeypatch, caplog):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    monkeypatch.setattr(runtime_mod, "host_has_gpu", lambda: False)
    rt, recs = _auto_records(caplog, b)
    assert isinstance(rt, OrtRuntime) and len(recs) == 1 and recs[0].levelno == logging.INFO
    assert "CPUExecutionProvider" in recs[0].getMessage() and "no TensorRT engines" in recs[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(runtime_mod, "host_has_gpu", lambda: True)  # a GPU host where inference lands on CPU
    rt, recs = _auto_records(caplog, b)
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert "THIS HOST HAS A GPU" in recs[0].getMessage() and "promptclip[gpu]" in recs[0].getMessage()


def test_auto_takes_a_matching_engine(synthetic_bundle, monkeypatch, caplog):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)

    class FakeTrtRuntime:
        name, providers = "tensorrt", ["TensorRT 10.7.0 on NVIDIA L4"]

        def __init__(self, bundle):
            self.bundle = bundle

    monkeypatch.setattr(tr, "why_no_engine", lambda bundle: None)
    monkeypatch.setattr(tr, "TensorRTRuntime", FakeTrtRuntime)
    rt, recs = _auto_records(caplog, b)
    assert isinstance(rt, FakeTrtRuntime) and "chose TensorRT" in recs[0].getMessage()


def test_host_gpu_detection(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert runtime_mod.host_has_gpu()
    monkeypatch.setattr(runtime_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(runtime_mod, "Path", lambda p: tmp_path / "no-such-device")
    assert not runtime_mod.host_has_gpu()


def test_providers_by_short_name_and_env(synthetic_bundle):
    assert resolve_providers("cuda, cpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeUnavailableError, match="unknown execution provider 'gpu'"):
        resolve_providers("gpu")
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    with pytest.raises(RuntimeUnavailableError,
                       match="has no execution provider.*CUDAExecutionProvider.*onnxruntime-gpu"):
        create_runtime(b, "ort", environ={"PROMPTCLIP_PROVIDERS": "cuda"})
    assert create_runtime(b, "ort", environ={"PROMPTCLIP_PROVIDERS": "cpu"}).providers == ["CPUExecutionProvider"]


def test_requested_cuda_that_does_not_start_is_an_error(synthetic_bundle, monkeypatch):
    """Explicitly requested CUDA that onnxruntime-gpu leaves inactive (no GPU visible, CUDA libraries missing):
    an exception saying what to install, not a log line."""
    import onnxruntime as ort

    class FallbackSession:
        def __init__(self, path, sess_options=None, providers=None):
            self._s = ort.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def __getattr__(self, name):
            return getattr(self._s, name)

    fake = types.SimpleNamespace(
        __version__=ort.__version__, get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        SessionOptions=ort.SessionOptions, GraphOptimizationLevel=ort.GraphOptimizationLevel,
        InferenceSession=FallbackSession)
    monkeypatch.setattr(runtime_mod, "_import_ort", lambda: fake)
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    with pytest.raises(RuntimeUnavailableError, match="CUDAExecutionProvider was requested but onnxruntime did not "
                                                      r"activate it.*promptclip\[gpu\].*--providers cpu"):
        OrtRuntime(b, providers="cuda,cpu")


def test_text_sessions_are_created_on_first_use(synthetic_bundle):
    b = load_bundle(synthetic_bundle.path, verify_hashes=False)
    rt = OrtRuntime(b)
    assert rt._text == [None]
    rt.run_image(np.zeros((1, 3, 32, 32), np.float32))
    assert rt._text == [None]  # classifying against exported classes never loads the text graph
    rt.run_text(np.zeros((2, b.context_length), np.int64))
    assert rt._text[0] is not None
    assert OrtRuntime(b, lazy_text=False)._text[0] is not None


def test_real_tensorrt_engine_matches_onnxruntime(synthetic_bundle, tmp_path):
    """On a host with TensorRT and a GPU: build, load, and compare with onnxruntime (cosine >= 0.999 at fp16)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (pip install 'promptclip[trt]' on an "
                                           "NVIDIA host); the real engine build and run are untested on this host")
    import shutil

    shutil.copytree(synthetic_bundle.path, tmp_path / "b")
    b = load_bundle(tmp_path / "b")
    te.build_engines(b, max_batch=8, precision="fp16", progress=lambda s: None)
    b = load_bundle(tmp_path / "b")
    rt = tr.TensorRTRuntime(b)
    pixels = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)  # > max batch: chunked
    ref = OrtRuntime(b, providers=["CPUExecutionProvider"]).run_image(pixels)
    got = rt.run_image(pixels)
    assert got.shape == ref.shape and float(np.min(np.sum(got * ref, -1))) >= 0.999


def test_detect_host_reads_gpu_and_refuses_without_a_driver():
    props = types.SimpleNamespace(name=b"NVIDIA L4\x00\x00", major=8, minor=9)
    ok = types.SimpleNamespace(cudaGetDeviceProperties=lambda device: (0, props))
    assert te.detect_host(FakeTrt("10.7.0"), ok) == HOST
    no_driver = types.SimpleNamespace(cudaGetDeviceProperties=lambda device: (35, None))
    with pytest.raises(RuntimeUnavailableError, match="cudaGetDeviceProperties failed.*check the driver"):
        te.detect_host(FakeTrt("10.7.0"), no_driver)
