"""Inference runtimes for a bundle's exported graphs (torch-free).

A :class:`Runtime` turns preprocessed pixels into image embeddings (and, for a bundle with several
prompt sets, per-image weights of the sets) and token ids into text embeddings. :class:`OrtRuntime`
runs the ONNX graphs with onnxruntime (providers chosen explicitly, or CUDA then CPU);
:class:`serving.tensorrt_runtime.TensorRTRuntime` runs the bundle's TensorRT engines built on this kind of host.
:func:`create_runtime` picks one: ``auto`` takes TensorRT when an engine matches this host, else onnxruntime, and
says which it chose (WARNING when it is not a GPU one on a host with a GPU).

Environment (read when the caller passes no providers): ``PROMPTCLIP_PROVIDERS`` (``cuda``, ``cpu``, ``cuda,cpu``
or onnxruntime provider names).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .arrays import pixel_batch, token_batch
from .bundle import Bundle
from .errors import BundleError, RuntimeUnavailableError
from .format import EXPERT_WEIGHTS_OUTPUT, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT
from .manifest import GraphSpec

__all__ = ["Runtime", "OrtRuntime", "create_runtime", "RUNTIME_KINDS", "PROVIDER_ALIASES", "resolve_providers",
           "host_has_gpu", "PROVIDERS_ENV"]

logger = logging.getLogger(__name__)

#: Kinds :func:`create_runtime` accepts.
RUNTIME_KINDS = ("auto", "ort", "tensorrt")
_DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
_TRT_EP = "TensorrtExecutionProvider"
#: GPU execution providers: requested explicitly, they must be active after session creation.
_GPU_PROVIDERS = (_CUDA, _TRT_EP)
#: Short names accepted by ``--providers`` and ``PROMPTCLIP_PROVIDERS``.
PROVIDER_ALIASES = {"cuda": _CUDA, "cpu": _CPU, "tensorrt-ep": _TRT_EP}
#: Environment variable with the providers (serve settings; read only when no providers are passed).
PROVIDERS_ENV = "PROMPTCLIP_PROVIDERS"
_GPU_INSTALL_HINT = ("pip uninstall onnxruntime && pip install 'promptclip[gpu]' (onnxruntime-gpu) with the CUDA and "
                     "cuDNN versions it was built for (see onnxruntime's CUDA requirements table), a visible GPU "
                     "(CUDA_VISIBLE_DEVICES, docker --gpus all)")
#: Manifest dtype name -> onnxruntime NodeArg type string.
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
}
_INSTALL_HINT = "pip install 'promptclip[cpu]' (or 'promptclip[gpu]' for onnxruntime-gpu)"


@runtime_checkable
class Runtime(Protocol):
    """What the classifier needs from an inference backend."""

    #: Short backend name, e.g. ``"ort"``.
    name: str
    #: Execution providers / devices actually in use, most preferred first.
    providers: list[str]

    def run_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 ``[B,3,H,W]`` preprocessed pixels -> float32 ``[B,D]`` L2-normalised image embeddings."""
        ...

    def run_image_and_weights(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[B,3,H,W]`` -> (``[B,D]`` image embeddings, float32 ``[B,S]`` prompt-set weights).

        One run of the image graph; with one prompt set the weights are ones ``[B,1]``.
        """
        ...

    def run_text(self, input_ids: np.ndarray, prompt_set: int = 0) -> np.ndarray:
        """int64 ``[N,L]`` token ids -> float32 ``[N,D]`` L2-normalised text embeddings of ``prompt_set``."""
        ...


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"onnxruntime is not installed, so the exported ONNX graphs cannot run: {_INSTALL_HINT}."
        ) from exc
    return onnxruntime


class OrtRuntime:
    """Runs a bundle's ONNX graphs with onnxruntime, one ``InferenceSession`` per graph.

    Args:
        bundle: a loaded bundle.
        providers: onnxruntime execution providers in preference order (full names or the short names of
            :data:`PROVIDER_ALIASES`). ``None`` means CUDA then CPU, keeping those this onnxruntime build has (a
            CUDA provider that falls back to CPU is one loud WARNING). Explicitly requested providers that the
            build lacks, or a requested GPU provider that is not active after session creation, are a
            :class:`RuntimeUnavailableError` saying what to install (no silent fallback).
        intra_op_threads: onnxruntime intra-op threads per session (``None``: onnxruntime's default).
        lazy_text: create the text graphs' sessions on their first use (a class that needs encoding) rather than
            now; classifying with the bundle's exported classes never needs them (cold start).
    """

    name = "ort"

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        lazy_text: bool = True,
    ) -> None:
        ort = _import_ort()
        self.bundle = bundle
        self._ort = ort
        available = list(ort.get_available_providers())
        self.explicit_providers = providers is not None
        if providers is not None:
            providers = resolve_providers(providers)
        if providers is None:
            requested = [p for p in _DEFAULT_PROVIDERS if p in available]
            if _CUDA not in available:
                logger.info("onnxruntime build has no CUDAExecutionProvider (available: %s); running on CPU. "
                            "Install 'promptclip[gpu]' for GPU inference.", ", ".join(available))
        else:
            requested = list(providers)
            unknown = [p for p in requested if p not in available]
            if unknown:
                raise RuntimeUnavailableError(
                    f"onnxruntime {ort.__version__} has no execution provider(s) {unknown} (available: {available}). "
                    + ("Install onnxruntime-gpu ('promptclip[gpu]') with a CUDA/cuDNN matching it, or "
                       if _CUDA in unknown else "")
                    + "request only available providers."
                )
        if not requested:
            raise RuntimeUnavailableError(f"no usable onnxruntime execution provider (available: {available}).")
        self.requested_providers = requested

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            if intra_op_threads < 0:
                raise ValueError(f"intra_op_threads must be >= 0 (0 = onnxruntime default), got {intra_op_threads}")
            opts.intra_op_num_threads = int(intra_op_threads)

        self._opts = opts
        self._warned_cpu_fallback = False
        self._image = self._session(ort, opts, "image", 0)
        self.providers: list[str] = list(self._image.get_providers())
        self._check_image_io()
        self._text: list[Any] = [None] * bundle.num_prompt_sets
        if not lazy_text:
            for k in range(bundle.num_prompt_sets):
                self._text_session(k)
        #: IO binding for the image graph when it runs on CUDA (inputs copied once, outputs fetched once)
        self.io_binding = self.providers[0] == _CUDA

    def _text_session(self, prompt_set: int) -> Any:
        """The text graph's session of ``prompt_set``, created and checked against the manifest on first use."""
        if self._text[prompt_set] is None:
            session = self._session(self._ort, self._opts, "text", prompt_set)
            b = self.bundle
            self._check_graph(session, b.graph_spec("text", prompt_set), b.graph_path("text", prompt_set).name,
                              TEXT_INPUT, [None, b.context_length], TEXT_OUTPUT)
            self._text[prompt_set] = session
        return self._text[prompt_set]

    def _session(self, ort: Any, opts: Any, kind: str, prompt_set: int) -> Any:
        path = self.bundle.graph_path(kind, prompt_set)
        if self.bundle.graph_spec(kind, prompt_set).graph_precision == "fp16" and _CUDA not in self.requested_providers:
            # onnxruntime's extended CPU fusions crash (segfault, 1.32) on fp16 graphs with float32 islands
            opts = _copy_options(ort, opts, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
            logger.info("%s is an fp16 graph on the CPU provider: basic graph optimisations only (fp16 is meant for "
                        "GPUs; export --precision fp32 or int8 for CPU serving)", path.name)
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=self.requested_providers)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
            raise BundleError(
                f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {exc}. The graph may be corrupt or use "
                f"an opset/operator onnxruntime {ort.__version__} lacks; re-export the bundle or upgrade onnxruntime."
            ) from exc
        active = session.get_providers()
        missing_gpu = [p for p in self.requested_providers if p in _GPU_PROVIDERS and p not in active]
        if missing_gpu and self.explicit_providers:
            raise RuntimeUnavailableError(
                f"{', '.join(missing_gpu)} was requested but onnxruntime did not activate it for {path.name} (active "
                f"providers: {active}); onnxruntime's own error is logged above. Install: {_GPU_INSTALL_HINT}. Or "
                "ask for --providers cpu to run on CPU deliberately.")
        if _CUDA in self.requested_providers and _CUDA not in active and not self._warned_cpu_fallback:
            self._warned_cpu_fallback = True
            logger.warning(
                "!!! CUDAExecutionProvider was requested but onnxruntime did not activate it for %s: INFERENCE RUNS "
                "ON CPU (active providers: %s). onnxruntime-gpu falls back silently when no GPU is visible "
                "(CUDA_VISIBLE_DEVICES, container --gpus) or the CUDA/cuDNN libraries it was built for are missing "
                "or of another version -- see onnxruntime's own error above. Fix the CUDA setup, or pass "
                "providers=['CPUExecutionProvider'] to run on CPU deliberately.",
                path.name, active,
            )
        return session

    def _check_image_io(self) -> None:
        """Check the image graph's inputs/outputs against the manifest once, at load (text graphs: at first use)."""
        b = self.bundle
        h, w = b.preprocessing.image_size
        self._check_graph(self._image, b.graph_spec("image"), b.graph_path("image").name,
                          IMAGE_INPUT, [None, 3, h, w], IMAGE_OUTPUT)
        if b.num_prompt_sets > 1:
            # load_bundle made the manifest declare a float32 expert_weights output and _check_graph found it
            # in the graph with that dtype; only its width is left to check.
            fname = b.graph_path("image").name
            outputs = {a.name: a for a in self._image.get_outputs()}
            if EXPERT_WEIGHTS_OUTPUT not in outputs:
                raise BundleError(
                    f"{fname}: graph has no output {EXPERT_WEIGHTS_OUTPUT!r} (has {sorted(outputs)}), which a bundle "
                    f"with {b.num_prompt_sets} prompt sets needs; re-export the bundle.")
            _check_shape(outputs[EXPERT_WEIGHTS_OUTPUT].shape, [None, b.num_prompt_sets],
                         f"output {EXPERT_WEIGHTS_OUTPUT!r}",
                         lambda msg: BundleError(f"{fname}: {msg} ([batch, num_prompt_sets]); the graph does not "
                                                 "match manifest.json -- re-export the bundle."))

    def _check_graph(self, session: Any, spec: GraphSpec, fname: str, input_name: str,
                     input_shape: list[int | None], output_name: str) -> None:
        def fail(msg: str) -> BundleError:
            return BundleError(f"{fname}: {msg}; the graph does not match manifest.json -- re-export the bundle.")

        graph_inputs = {a.name: a for a in session.get_inputs()}
        graph_outputs = {a.name: a for a in session.get_outputs()}
        declared = {x.name: x for x in spec.inputs}
        if set(graph_inputs) != set(declared):
            raise fail(f"graph inputs {sorted(graph_inputs)} differ from the manifest's {sorted(declared)}")
        for name, arg in graph_inputs.items():
            want = _ORT_TYPES.get(declared[name].dtype)
            if arg.type != want:
                raise fail(f"input {name!r} is {arg.type}, the manifest says {declared[name].dtype!r}")
        for out in spec.outputs:
            name = out.name
            if name not in graph_outputs:
                raise fail(f"graph has no output {name!r} (has {sorted(graph_outputs)})")
            want = _ORT_TYPES.get(out.dtype or "float32")
            if graph_outputs[name].type != want:
                raise fail(f"output {name!r} is {graph_outputs[name].type}, the manifest says {out.dtype!r}")
        _check_shape(graph_inputs[input_name].shape, input_shape, f"input {input_name!r}", fail)
        _check_shape(graph_outputs[output_name].shape, [None, self.bundle.embedding_dim], f"output {output_name!r}",
                     fail)

    def run_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 ``[B,3,H,W]`` -> float32 ``[B,D]`` image embeddings."""
        (out,) = self._run_image([IMAGE_OUTPUT], pixel_batch(pixel_values))
        return np.asarray(out, dtype=np.float32)

    def _run_image(self, outputs: list[str], x: np.ndarray) -> list[np.ndarray]:
        """One run of the image graph; on CUDA through IO binding (input copied to the device once, outputs
        allocated there and copied back once). Written against onnxruntime's documented IOBinding API; never run
        on a GPU host by this project's tests (none was at hand)."""
        if not self.io_binding:
            return self._image.run(outputs, {IMAGE_INPUT: x})
        binding = self._image.io_binding()
        binding.bind_ortvalue_input(IMAGE_INPUT, self._ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for name in outputs:
            binding.bind_output(name, "cuda", 0)
        self._image.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_image_and_weights(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[B,3,H,W]`` -> (float32 ``[B,D]`` image embeddings, float32 ``[B,S]`` prompt-set weights).

        Both come from one run of the image graph; with one prompt set the weights are ones ``[B,1]``
        (the graph has no ``expert_weights`` output then).
        """
        x = pixel_batch(pixel_values)
        s = self.bundle.num_prompt_sets
        if s == 1:
            (embeds,) = self._run_image([IMAGE_OUTPUT], x)
            return np.asarray(embeds, dtype=np.float32), np.ones((x.shape[0], 1), dtype=np.float32)
        embeds, weights = self._run_image([IMAGE_OUTPUT, EXPERT_WEIGHTS_OUTPUT], x)
        if weights.shape != (x.shape[0], s):  # the S axis may be symbolic in the graph
            raise BundleError(
                f"{self.bundle.graph_path('image').name}: output {EXPERT_WEIGHTS_OUTPUT!r} has shape "
                f"{list(weights.shape)} for {x.shape[0]} image(s), expected [{x.shape[0]}, {s}] "
                "([batch, num_prompt_sets]); re-export the bundle.")
        return np.asarray(embeds, dtype=np.float32), np.asarray(weights, dtype=np.float32)

    def run_text(self, input_ids: np.ndarray, prompt_set: int = 0) -> np.ndarray:
        """int64 ``[N,L]`` -> float32 ``[N,D]`` text embeddings of ``prompt_set``."""
        if not 0 <= prompt_set < len(self._text):
            raise IndexError(f"prompt_set {prompt_set} out of range: the bundle has {len(self._text)} prompt set(s)")
        ids = token_batch(input_ids, self.bundle.context_length)
        (out,) = self._text_session(prompt_set).run([TEXT_OUTPUT], {TEXT_INPUT: ids})
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OrtRuntime(bundle={str(self.bundle.root)!r}, providers={self.providers})"


def _copy_options(ort: Any, opts: Any, level: Any) -> Any:
    """A copy of session options ``opts`` with graph optimisation ``level``."""
    new = ort.SessionOptions()
    new.graph_optimization_level = level
    new.intra_op_num_threads = opts.intra_op_num_threads
    new.log_severity_level = opts.log_severity_level
    return new


def _check_shape(actual: list, expected: list[int | None], what: str, fail) -> None:
    """Compare an onnxruntime shape (ints for static dims, str/None for dynamic) with ``expected``."""
    if len(actual) != len(expected):
        raise fail(f"{what} has rank {len(actual)} (shape {actual}), expected rank {len(expected)}")
    for got, want in zip(actual, expected):
        if want is not None and isinstance(got, int) and got != want:
            raise fail(f"{what} has shape {actual}, expected {['N' if d is None else d for d in expected]}")


def resolve_providers(providers: str | Sequence[str]) -> list[str]:
    """``"cuda"``, ``"cuda,cpu"``, ``["cpu"]`` or full onnxruntime names -> onnxruntime provider names, in order."""
    items = [p.strip() for p in providers.split(",")] if isinstance(providers, str) else [str(p) for p in providers]
    out = []
    for item in items:
        if not item:
            continue
        name = PROVIDER_ALIASES.get(item.lower(), item)
        if not name.endswith("ExecutionProvider"):
            raise RuntimeUnavailableError(f"unknown execution provider {item!r}; use {', '.join(PROVIDER_ALIASES)} "
                                          "or an onnxruntime provider name such as CUDAExecutionProvider")
        if name not in out:
            out.append(name)
    if not out:
        raise RuntimeUnavailableError("no execution provider given; use e.g. --providers cuda or --providers cpu")
    return out


def host_has_gpu() -> bool:
    """Whether this host has an NVIDIA GPU driver (``nvidia-smi`` on PATH or ``/dev/nvidia0``)."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def create_runtime(bundle: Bundle, kind: str = "auto", *, environ: Mapping[str, str] | None = None,
                   **kwargs: Any) -> Runtime:
    """Create the inference runtime ``kind`` for ``bundle``.

    Args:
        kind: ``"ort"`` (onnxruntime), ``"tensorrt"`` (the bundle's TensorRT engine for this host; refuses a
            mismatched one with how to rebuild) or ``"auto"``: TensorRT when TensorRT is installed and an engine
            matches this host, else onnxruntime (CUDA when active, else CPU). ``auto`` logs its choice, at WARNING
            when it is not a GPU one on a host with a GPU.
        environ: where ``PROMPTCLIP_PROVIDERS`` is read when no ``providers`` are passed (default ``os.environ``).
        **kwargs: passed to the runtime (``providers``, ``intra_op_threads``, ``lazy_text`` for ort).
    """
    env = os.environ if environ is None else environ
    if kwargs.get("providers") is None and env.get(PROVIDERS_ENV, "").strip():
        kwargs["providers"] = resolve_providers(env[PROVIDERS_ENV])
    if kind not in RUNTIME_KINDS:
        raise RuntimeUnavailableError(f"unknown runtime {kind!r}; choose one of {', '.join(RUNTIME_KINDS)}.")
    if kind == "ort":
        return OrtRuntime(bundle, **kwargs)
    from . import tensorrt_runtime

    if kind == "tensorrt":
        if kwargs.get("providers") is not None:
            raise RuntimeUnavailableError("--providers applies to --runtime ort only; the TensorRT runtime runs the "
                                          "bundle's engines on the GPU (drop --providers or use --runtime ort)")
        return tensorrt_runtime.TensorRTRuntime(bundle)
    # auto
    gpu_host = host_has_gpu()
    if kwargs.get("providers") is None:
        reason = tensorrt_runtime.why_no_engine(bundle)
        if reason is None:
            rt: Runtime = tensorrt_runtime.TensorRTRuntime(bundle)
            logger.info("runtime auto: chose TensorRT (an engine in the bundle matches this host: %s)", rt.providers)
            return rt
    else:
        reason = "providers were given"
    rt = OrtRuntime(bundle, **kwargs)
    on_gpu = rt.providers[0] in _GPU_PROVIDERS
    level = logging.WARNING if gpu_host and not on_gpu else logging.INFO
    logger.log(level, "runtime auto: chose onnxruntime with %s (TensorRT not used: %s)%s", rt.providers[0], reason,
               "; THIS HOST HAS A GPU but inference runs on CPU: install onnxruntime-gpu ('promptclip[gpu]') or "
               "build a TensorRT engine (`promptclip engine build`)" if level == logging.WARNING else "")
    return rt
