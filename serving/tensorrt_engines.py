"""TensorRT engines of a bundle: host identity, cache keys, batch profiles, matching and building (torch-free).

An engine is built on the device that will run it (``promptclip engine build``), from one ONNX graph of the bundle,
and stored in the bundle as ``engines/<key>.engine`` with an :class:`serving.manifest.EngineSpec` entry in the
manifest. Engines are not portable: the key holds the TensorRT version, the GPU model and compute capability and the
graph's sha256, and :func:`match_engine` refuses any other host with how to rebuild.

TensorRT 10: an fp32 graph is built with the FP16 builder flag for ``--precision fp16`` (weakly typed network).
TensorRT 11 builds strongly typed networks only (the FP16 flag is gone): the precision is the graph's, so fp16 needs
a bundle exported with ``--precision fp16``. An fp16 graph is built strongly typed on either version.

Written against TensorRT's documented Python API (10.x) and cuda-python; the real build was never run by this
project's tests (no GPU host was at hand): the logic is tested with a fake ``tensorrt`` module.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .errors import PromptclipError, RuntimeUnavailableError
from .format import MANIFEST_FILE
from .manifest import EngineSpec, read_manifest, sha256_file, write_manifest

__all__ = ["HostInfo", "BatchProfile", "EngineMismatchError", "ENGINE_DIR", "TRT_INSTALL_HINT", "import_tensorrt",
           "engine_key", "batch_profile", "match_engine", "engine_for", "build_engines", "detect_host",
           "DEFAULT_MAX_BATCH"]

logger = logging.getLogger(__name__)

ENGINE_DIR = "engines"
DEFAULT_MAX_BATCH = 64
#: What to install for the TensorRT runtime and ``engine build``.
TRT_INSTALL_HINT = ("pip install 'promptclip[trt]' (tensorrt>=10 and cuda-python) on an NVIDIA host with a "
                    "driver for its CUDA; on Jetson use JetPack's TensorRT (apt install python3-libnvinfer) and "
                    "pip install cuda-python")
REBUILD = "rebuild on this host with `promptclip engine build --bundle {bundle}`"


class EngineMismatchError(RuntimeUnavailableError):
    """The bundle has no TensorRT engine for this host (other GPU, TensorRT version or graph)."""


@dataclass(frozen=True)
class HostInfo:
    """What an engine is bound to: TensorRT version, GPU model and compute capability."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.9"

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt_version.split(".")[0])

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability})"


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch axis (TensorRT picks kernels for ``opt``)."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def import_tensorrt() -> Any:
    """``tensorrt``, or a :class:`RuntimeUnavailableError` naming what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeUnavailableError(f"TensorRT is not installed here: {TRT_INSTALL_HINT}.") from exc
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` of cuda-python < 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as exc:
            raise RuntimeUnavailableError(f"cuda-python is not installed here: {TRT_INSTALL_HINT}.") from exc
    return cudart


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` result; raise on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeUnavailableError(f"CUDA call {what} failed: {err}; check the driver and that a GPU is visible "
                                      "(nvidia-smi, CUDA_VISIBLE_DEVICES)")
    return values[0] if len(values) == 1 else tuple(values)


def detect_host(trt: Any = None, cudart: Any = None, device: int = 0) -> HostInfo:
    """TensorRT version and the GPU ``device``'s name and compute capability."""
    trt = trt or import_tensorrt()
    cudart = cudart or import_cudart()
    props = cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return HostInfo(tensorrt_version=str(trt.__version__), gpu_name=name.strip("\x00 ").strip(),
                    compute_capability=f"{props.major}.{props.minor}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def engine_key(host: HostInfo, graph_sha256: str, precision: str) -> str:
    """``trt<version>-<gpu>-sm<cc>-<precision>-<graph sha256 prefix>``: one engine per host kind, graph, precision."""
    cc = host.compute_capability.replace(".", "")
    return f"trt{host.tensorrt_version}-{_slug(host.gpu_name)}-sm{cc}-{precision}-{graph_sha256[:16]}"


def batch_profile(max_batch: int, opt_batch: int | None = None) -> BatchProfile:
    """min 1, opt ``opt_batch`` (default: ``max_batch``, throughput), max ``max_batch``."""
    if max_batch < 1:
        raise PromptclipError(f"--max-batch must be >= 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise PromptclipError(f"--opt-batch must be between 1 and --max-batch ({max_batch}), got {opt}")
    return BatchProfile(min=1, opt=opt, max=max_batch)


def _graph_targets(bundle: Bundle) -> list[tuple[str, int]]:
    return [("image", 0)] + [("text", k) for k in range(bundle.num_prompt_sets)]


def match_engine(bundle: Bundle, host: HostInfo, graph: str, prompt_set: int = 0) -> EngineSpec:
    """The engine of ``graph`` built for exactly this host and this graph; else :class:`EngineMismatchError`
    saying what the bundle has and how to rebuild."""
    spec = bundle.graph_spec(graph, prompt_set)
    engines = [e for e in bundle.model.engines if e.graph == graph and e.prompt_set == prompt_set]
    for e in engines:
        if (e.tensorrt_version == host.tensorrt_version and e.compute_capability == host.compute_capability
                and e.gpu_name == host.gpu_name and e.graph_sha256 == spec.sha256):
            return e
    what = f"{graph} graph" + (f" (prompt set {prompt_set})" if graph == "text" and bundle.num_prompt_sets > 1 else "")
    have = "; ".join(f"TensorRT {e.tensorrt_version} on {e.gpu_name} (sm {e.compute_capability})"
                     + ("" if e.graph_sha256 == spec.sha256 else ", for another version of the graph")
                     for e in engines) or "none"
    raise EngineMismatchError(
        f"the bundle has no TensorRT engine of its {what} for {host.describe()} (engines are not portable across "
        f"GPUs or TensorRT versions; it has: {have}); {REBUILD.format(bundle=bundle.root)}")


def engine_for(bundle: Bundle, host: HostInfo) -> dict[tuple[str, int], EngineSpec]:
    """The matching engine of every graph of the bundle (image and each text graph), or the first mismatch."""
    return {t: match_engine(bundle, host, *t) for t in _graph_targets(bundle)}


def _check_graph_for_trt(bundle: Bundle, graph: str, prompt_set: int, precision: str, host: HostInfo) -> bool:
    """Whether to build strongly typed; refuses graphs TensorRT cannot take."""
    spec = bundle.graph_spec(graph, prompt_set)
    name = bundle.graph_path(graph, prompt_set).name
    if spec.graph_precision == "int8":
        raise PromptclipError(f"{name} is an int8 (onnxruntime dynamic quantisation) graph, which TensorRT does not "
                              "build; export the bundle with --precision fp32 or fp16 for TensorRT")
    if spec.optimization:
        raise PromptclipError(f"{name} was optimised for onnxruntime (--optimize: com.microsoft operators TensorRT "
                              "cannot parse); export the bundle without --optimize for TensorRT")
    if spec.graph_precision == "fp16":
        return True
    if precision == "fp16" and host.tensorrt_major >= 11:
        raise PromptclipError(f"TensorRT {host.tensorrt_version} builds strongly typed networks only, so an fp16 "
                              f"engine needs an fp16 graph and {name} is fp32: export the bundle with "
                              "`promptclip export --precision fp16` and build again")
    return host.tensorrt_major >= 11


def _build_one(trt: Any, onnx_path: Path, input_name: str, input_tail: tuple[int, ...], profile: BatchProfile,
               precision: str, strongly_typed: bool, cache_path: Path, workspace_bytes: int) -> bytes:
    """One serialized engine (TensorRT builder, ONNX parser, one batch profile, timing cache read and updated)."""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is the only mode on TensorRT >= 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PromptclipError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, (profile.min, *input_tail), (profile.opt, *input_tail),
                          (profile.max, *input_tail))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PromptclipError(f"TensorRT could not build an engine of {onnx_path.name} (see TensorRT's log above); "
                              "try a smaller --max-batch")
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def build_engines(bundle: Bundle, *, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int | None = None,
                  precision: str = "fp16", host: HostInfo | None = None, trt: Any = None,
                  workspace_bytes: int = 4 << 30, progress: Callable[[str], None] = logger.info) -> list[EngineSpec]:
    """Build an engine of the image graph and of each text graph for this host, store them under ``engines/`` and
    record them in the manifest (replacing engines of the same key; engines of other hosts are kept)."""
    if precision not in ("fp32", "fp16"):
        raise PromptclipError(f"engine precision must be fp32 or fp16, got {precision!r}")
    trt = trt or import_tensorrt()
    host = host or detect_host(trt)
    profile = batch_profile(max_batch, opt_batch)
    engine_dir = bundle.root / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    cache_path = engine_dir / f"timing-trt{host.tensorrt_version}-sm{host.compute_capability.replace('.', '')}.cache"
    h, w = bundle.preprocessing.image_size
    built: list[EngineSpec] = []
    for graph, k in _graph_targets(bundle):
        strongly_typed = _check_graph_for_trt(bundle, graph, k, precision, host)
        spec = bundle.graph_spec(graph, k)
        eff_precision = spec.graph_precision if strongly_typed and spec.graph_precision != "fp32" else precision
        key = engine_key(host, spec.sha256, eff_precision) + (f"-{graph}{k}" if graph == "text" else "-image")
        tail = (3, h, w) if graph == "image" else (bundle.context_length,)
        input_name = spec.inputs[0].name
        progress(f"building {key} ({graph} graph, batch {profile.as_dict()}, {eff_precision}"
                 f"{', strongly typed' if strongly_typed else ''}) ...")
        data = _build_one(trt, bundle.graph_path(graph, k), input_name, tail, profile, eff_precision,
                          strongly_typed, cache_path, workspace_bytes)
        path = engine_dir / f"{key}.engine"
        tmp = path.with_suffix(".engine.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        built.append(EngineSpec(key=key, graph=graph, prompt_set=k, file=f"{ENGINE_DIR}/{path.name}",
                                sha256=sha256_file(path), graph_sha256=spec.sha256,
                                tensorrt_version=host.tensorrt_version, gpu_name=host.gpu_name,
                                compute_capability=host.compute_capability, precision=eff_precision,
                                profile=profile.as_dict(), strongly_typed=strongly_typed))
    record_engines(bundle.root, built)
    return built


def record_engines(bundle_dir: Path, engines: list[EngineSpec]) -> None:
    """Add ``engines`` to the manifest (same key replaced), written atomically (temp file, then rename)."""
    model, _ = read_manifest(bundle_dir)
    keys = {e.key for e in engines}
    merged = [e for e in model.engines if e.key not in keys] + list(engines)
    tmp_dir = Path(bundle_dir) / ".manifest-tmp"
    tmp_dir.mkdir(exist_ok=True)
    try:
        written = write_manifest(tmp_dir, replace(model, engines=merged))
        os.replace(written, Path(bundle_dir) / MANIFEST_FILE)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()
    logger.info("recorded %d engine(s) in %s: %s", len(engines), Path(bundle_dir) / MANIFEST_FILE,
                json.dumps([e.key for e in engines]))
