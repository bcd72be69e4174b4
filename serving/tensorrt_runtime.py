"""The TensorRT runtime: runs a bundle's engines built for this host (TensorRT + cuda-python, torch-free).

One engine per graph (image, and the text graph of each prompt set: a class added at runtime goes through the text
engine). Device buffers are allocated once for the profile's largest batch; a larger request is run in chunks.
Engines are checked against this host (:func:`serving.tensorrt_engines.match_engine`) and their sha256 once, at load.

Written against TensorRT 10's documented Python API (``execute_async_v3``, named I/O tensors) and cuda-python's
runtime API; never run by this project's tests (no GPU host was at hand): what does not need a GPU (selection,
matching, messages) is tested with fakes.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .arrays import pixel_batch, token_batch
from .bundle import Bundle
from .errors import BundleError, RuntimeUnavailableError
from .format import EXPERT_WEIGHTS_OUTPUT, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT
from .manifest import REEXPORT, EngineSpec, sha256_file
from .tensorrt_engines import (
    EngineMismatchError,
    cuda_check,
    detect_host,
    engine_for,
    import_cudart,
    import_tensorrt,
)

__all__ = ["TensorRTRuntime", "why_no_engine"]

logger = logging.getLogger(__name__)

def why_no_engine(bundle: Bundle) -> str | None:
    """``None`` when TensorRT is installed and every graph of ``bundle`` has an engine for this host; else why not
    (for ``auto``'s log line). Never raises."""
    if not bundle.model.engines:
        return "the bundle has no TensorRT engines (`promptclip engine build`)"
    try:
        engine_for(bundle, detect_host())
    except RuntimeUnavailableError as exc:  # not installed, no GPU, or EngineMismatchError
        return str(exc)
    return None


class _Engine:
    """One deserialized engine with its execution context, stream and device buffers for ``max_batch`` rows."""

    def __init__(self, trt: Any, cudart: Any, runtime: Any, path: Any, spec: EngineSpec) -> None:
        self.cudart, self.spec = cudart, spec
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {path.name} (built by another TensorRT or for "
                                      "another GPU?); rebuild with `promptclip engine build`")
        self.context = self.engine.create_execution_context()
        self.stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.max_batch = int(spec.profile["max"])
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.names}
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        for n in self.names:
            shape = [self.max_batch if d < 0 else int(d) for d in self.engine.get_tensor_shape(n)]
            nbytes = int(np.prod(shape)) * self.dtypes[n].itemsize
            ptr = cuda_check(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
            self.buffers[n] = (int(ptr), nbytes)
            self.context.set_tensor_address(n, int(ptr))

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """Run on ``feeds`` (host arrays, same batch), chunked by the profile's max batch."""
        batch = next(iter(feeds.values())).shape[0]
        chunks = [self._run_chunk({k: v[i:i + self.max_batch] for k, v in feeds.items()}, outputs)
                  for i in range(0, batch, self.max_batch)]
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(outputs))]

    def _run_chunk(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, x in feeds.items():
            x = np.ascontiguousarray(x, dtype=self.dtypes[name])
            self.context.set_input_shape(name, tuple(x.shape))
            cuda_check(cudart, cudart.cudaMemcpyAsync(self.buffers[name][0], x.ctypes.data, x.nbytes, h2d,
                                                      self.stream), "cudaMemcpyAsync")
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeUnavailableError(f"TensorRT failed to run engine {self.spec.key}")
        results = []
        for name in outputs:
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
            cuda_check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes, d2h,
                                                      self.stream), "cudaMemcpyAsync")
            results.append(out)
        cuda_check(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [r.astype(np.float32, copy=False) for r in results]


class TensorRTRuntime:
    """Runs the bundle's TensorRT engines that match this host (see :mod:`serving.tensorrt_engines`).

    Raises:
        RuntimeUnavailableError: TensorRT or cuda-python missing (names what to install), no GPU.
        EngineMismatchError: no engine for this host (says how to rebuild).
        BundleError: an engine file is missing or its sha256 differs from the manifest's.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, *, device: int = 0) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        host = detect_host(trt, cudart, device)
        specs = engine_for(bundle, host)  # refuses a mismatch before any file is read
        self.bundle = bundle
        self.providers = [f"TensorRT {host.tensorrt_version} on {host.gpu_name}"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines: dict[tuple[str, int], _Engine] = {}
        for target, spec in specs.items():
            path = bundle.root / spec.file
            if not path.is_file():
                raise BundleError(f"engine {spec.file} recorded in the manifest is missing; rebuild with "
                                  "`promptclip engine build` or copy the whole bundle")
            if sha256_file(path) != spec.sha256:
                raise BundleError(f"engine {spec.file} does not match its sha256 in the manifest (corrupt or "
                                  "partial copy); rebuild with `promptclip engine build`")
            self._engines[target] = _Engine(trt, cudart, runtime, path, spec)
        logger.info("TensorRT runtime: %s", ", ".join(s.key for s in specs.values()))

    def run_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 ``[B,3,H,W]`` -> float32 ``[B,D]`` image embeddings."""
        (out,) = self._engines[("image", 0)].run({IMAGE_INPUT: pixel_batch(pixel_values)}, [IMAGE_OUTPUT])
        return out

    def run_image_and_weights(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[B,3,H,W]`` -> (``[B,D]`` image embeddings, ``[B,S]`` prompt-set weights), one engine run."""
        x = pixel_batch(pixel_values)
        if self.bundle.num_prompt_sets == 1:
            return self.run_image(x), np.ones((x.shape[0], 1), np.float32)
        embeds, weights = self._engines[("image", 0)].run({IMAGE_INPUT: x}, [IMAGE_OUTPUT, EXPERT_WEIGHTS_OUTPUT])
        if weights.shape != (x.shape[0], self.bundle.num_prompt_sets):
            raise BundleError(f"the image engine gives expert weights of shape {list(weights.shape)}; {REEXPORT}")
        return embeds, weights

    def run_text(self, input_ids: np.ndarray, prompt_set: int = 0) -> np.ndarray:
        """int64 ``[N,L]`` -> float32 ``[N,D]`` text embeddings of ``prompt_set`` (through the text engine)."""
        if not 0 <= prompt_set < self.bundle.num_prompt_sets:
            raise IndexError(f"prompt_set {prompt_set} out of range: the bundle has {self.bundle.num_prompt_sets}")
        ids = token_batch(input_ids, self.bundle.context_length)
        (out,) = self._engines[("text", prompt_set)].run({TEXT_INPUT: ids}, [TEXT_OUTPUT])
        return out

    def __repr__(self) -> str:
        return f"TensorRTRuntime(bundle={str(self.bundle.root)!r}, providers={self.providers})"
