"""Graph wrappers and ONNX export that checks itself (checker + ORT-vs-torch parity).

Every export runs ``onnx.checker.check_model(full_check=True)`` and compares onnxruntime's outputs with torch
eager (fp32) at batch 1 and 3 (dynamic batch honoured); past the tolerance of the graph's precision
(:data:`TOLERANCES`) the export fails with :class:`ExportError` and the measured figures.

Precisions (``--precision``): ``fp32`` (as exported); ``fp16`` (weights and matmuls in half, inputs/outputs float32,
LayerNorm, softmax and the final L2 normalisation kept in float32: :data:`FP32_ISLANDS`); ``int8`` (onnxruntime
dynamic quantisation of the weights, CPU only). ``optimize`` runs onnxruntime's transformer optimiser
(constant folding + the fusions it finds) before the precision conversion.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from serving.format import EXPERT_WEIGHTS_OUTPUT, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT
from serving.manifest import GRAPH_PRECISIONS
from training.errors import ExportError
from training.methods import PromptMethod

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
MAX_ABS_TOL = 1e-4
MIN_COSINE = 0.9999
#: Graph precisions ``export`` writes (the manifest contract's list).
PRECISIONS = GRAPH_PRECISIONS
#: ONNX op types left in float32 in an fp16 graph (the nodes producing the graph outputs are kept too).
FP32_ISLANDS = ("LayerNormalization", "Softmax", "ReduceL2", "Clip", "Div", "ReduceMean", "Pow", "Sqrt")
#: Model type given to onnxruntime's transformer optimiser (open_clip towers are CLIP encoders).
OPTIMIZER_MODEL_TYPE = "clip"


@dataclass(frozen=True)
class Tolerance:
    """Parity bound of one precision against torch fp32 (on L2-normalised embeddings, per row)."""

    max_abs: float
    min_cosine: float


#: Per precision. fp32: rounding only (measured ~1e-6). fp16: an 11-bit mantissa gives ~5e-4 relative error per op;
#: measured cosine 0.9999999 / max abs 2e-4..6e-4 on tiny-test and toy-clip, so 0.999 / 5e-3 leaves room for
#: 12-24 layer towers while still catching a broken graph (a wrong cast gives cosine < 0.9). int8 (dynamic,
#: weights per tensor): measured embedding cosine 0.9996..0.99996, max abs 3e-3..1.2e-2, and logits cosine 0.9907 on
#: random-init tiny-test (near-uniform logits are the worst case) vs 0.99997 on toy-clip; 0.98 / 5e-2 bounds that.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=MAX_ABS_TOL, min_cosine=MIN_COSINE),
    "fp16": Tolerance(max_abs=5e-3, min_cosine=0.999),
    "int8": Tolerance(max_abs=5e-2, min_cosine=0.98),
}


class ImageGraph(nn.Module):
    """pixel_values [B, 3, H, W] -> L2-normalised image embeddings [B, D], prompts baked in; methods with several
    prompt sets also output the per-image weights of the sets [B, S] (always per image, never batch-averaged)."""

    def __init__(self, method: PromptMethod) -> None:
        super().__init__()
        self.method = method
        self.with_weights = method.capabilities.num_prompt_sets > 1

    @property
    def output_names(self) -> list[str]:
        return [IMAGE_OUTPUT, EXPERT_WEIGHTS_OUTPUT] if self.with_weights else [IMAGE_OUTPUT]

    def forward(self, pixel_values: torch.Tensor):
        embeds = self.method.encode_image(pixel_values)  # [B, D]
        if not self.with_weights:
            return embeds
        return embeds, self.method.expert_weights(embeds, per_sample=True)  # [B, D], [B, S]


class TextGraph(nn.Module):
    """input_ids [N, L] int64 (templated class names) -> L2-normalised text embeddings [N, D], prompts baked in."""

    def __init__(self, method: PromptMethod, prompt_set: int = 0) -> None:
        super().__init__()
        self.method = method
        self.prompt_set = prompt_set

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.method.encode_text(input_ids, self.prompt_set)


@dataclass
class ParityReport:
    """ORT-vs-torch figures of one graph."""

    batches: list[int]
    max_abs: float
    min_cosine: float
    per_batch: list[dict[str, float]] = field(default_factory=list)
    precision: str = "fp32"

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.precision]

    def ok(self) -> bool:
        return self.max_abs <= self.tolerance.max_abs and self.min_cosine >= self.tolerance.min_cosine

    def to_dict(self) -> dict[str, Any]:
        out = {"batches": self.batches, "max_abs": self.max_abs, "min_cosine": self.min_cosine,
               "tolerance": {"max_abs": self.tolerance.max_abs, "min_cosine": self.tolerance.min_cosine},
               "per_batch": self.per_batch}
        return out if self.precision == "fp32" else {**out, "precision": self.precision}


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str,
                output_name: str | list[str], exporter: str = "dynamo", opset: int = DEFAULT_OPSET) -> None:
    """Export ``module`` (one input; one output, or several named in a list) with a dynamic batch axis on the
    input and every output; ``example`` must have batch >= 2.

    The dynamo exporter fixes the batch to 1 when the example has batch 1 (a known pitfall), hence the check.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if example.shape[0] < 2:
        raise ExportError("export example must have batch >= 2 so the batch axis stays dynamic")
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    try:
        _export(module, example, path, input_name, output_name, exporter, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    _inline_external_data(path)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str | list[str],
            exporter: str, opset: int) -> None:
    output_names = [output_name] if isinstance(output_name, str) else list(output_name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            onnx_program = torch.onnx.export(
                module, (example,), input_names=[input_name], output_names=output_names,
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False,
            )
            onnx_program.save(str(path))
        else:
            torch.onnx.export(
                module, (example,), str(path), input_names=[input_name], output_names=output_names,
                dynamic_axes={input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}, opset_version=opset,
                dynamo=False,
            )


def _inline_external_data(path: Path) -> None:
    """Store weights inside the .onnx file (single-file graphs; external data only above the 2 GB protobuf limit)."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    if model.ByteSize() < 2_000_000_000:
        data_files = {os.path.join(path.parent, e.value) for init in model.graph.initializer
                      for e in init.external_data if e.key == "location"}
        onnx.save_model(model, str(path), save_as_external_data=False)
        for f in data_files:
            if os.path.exists(f) and Path(f).resolve() != path.resolve():
                os.remove(f)


def check_onnx(path: Path) -> dict[str, Any]:
    """``onnx.checker`` full check; returns opset and io signature for the manifest."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"ONNX checker rejected {path.name}: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)

    def sig(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"opset": int(opset), "inputs": sig(model.graph.input), "outputs": sig(model.graph.output)}


def ort_session(path: Path, precision: str = "fp32"):
    """A CPU session of ``path``; fp16 graphs get onnxruntime's basic graph optimisations only (its extended CPU
    fusions crash on fp16 graphs with float32 islands: a segfault seen with onnxruntime 1.32)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if precision == "fp16":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def convert_graph(path: Path, *, precision: str = "fp32", optimize: bool = False) -> dict[str, Any]:
    """Rewrite the fp32 graph at ``path`` in place: optimise it (optional), then convert it to ``precision``.
    Returns what the manifest records about it (``optimization``: model type and fused operator counts)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    info: dict[str, Any] = {}
    if optimize:
        info["optimization"] = _optimize(path)
    if precision == "fp16":
        _to_fp16(path)
    elif precision == "int8":
        _to_int8(path)
    return info


def _optimize(path: Path) -> dict[str, Any]:
    """onnxruntime's transformer optimiser (its Python fusions + onnxruntime's basic level: constant folding)."""
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimizer.optimize_model(str(path), model_type=OPTIMIZER_MODEL_TYPE, num_heads=0, hidden_size=0,
                                         opt_level=1, use_gpu=False)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(path))
    log.info("%s: transformer optimiser (%s) fused %s", path.name, OPTIMIZER_MODEL_TYPE, fused or "nothing")
    return {"tool": "onnxruntime.transformers.optimizer", "model_type": OPTIMIZER_MODEL_TYPE, "fused": fused}


def _to_fp16(path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    tail = [n.name for n in model.graph.node if outputs.intersection(n.output)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_ISLANDS),
                                         node_block_list=tail)
    wrapped = OnnxModel(model)
    wrapped.topological_sort()  # the converter appends the input casts at the end; onnx.checker wants them first
    onnx.save_model(wrapped.model, str(path))


def _to_int8(path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    try:
        # DefaultTensorType: the optimiser's fused (com.microsoft) nodes have no inferred output types
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise ExportError(f"{path.name}: int8 dynamic quantisation failed ({exc}); export without --optimize or at "
                          "another --precision") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def measure_parity(module: nn.Module, path: Path, make_input: Callable[[int], torch.Tensor], *, input_name: str,
                   batches: tuple[int, ...] = (1, 3), precision: str = "fp32") -> ParityReport:
    """Compare onnxruntime (CPU) with torch eager (fp32) on fresh inputs at each batch size (every output; the cosine
    is taken per row of each output)."""
    sess = ort_session(path, precision)
    max_abs, min_cos, per = 0.0, 1.0, []
    for b in batches:
        x = make_input(b)
        with torch.no_grad():
            refs = module(x)
        refs = [refs] if torch.is_tensor(refs) else list(refs)
        gots = sess.run(None, {input_name: x.cpu().numpy()})
        if len(gots) != len(refs):
            raise ExportError(f"{path.name}: ORT gives {len(gots)} outputs, torch {len(refs)}")
        for ref_t, got in zip(refs, gots):
            ref = ref_t.float().cpu().numpy()
            if got.shape != ref.shape:
                raise ExportError(f"{path.name}: ORT output shape {got.shape} != torch {ref.shape} at batch {b} "
                                  f"(dynamic batch not honoured)")
            diff = float(np.abs(got - ref).max())
            cos = float((np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
                                                  + 1e-12)).min())
            per.append({"batch": b, "max_abs": diff, "min_cosine": cos})
            max_abs, min_cos = max(max_abs, diff), min(min_cos, cos)
    return ParityReport(batches=list(batches), max_abs=max_abs, min_cosine=min_cos, per_batch=per,
                        precision=precision)


def export_checked(module: nn.Module, path: Path, make_input: Callable[[int], torch.Tensor], *, input_name: str,
                   output_name: str | list[str], exporter: str, opset: int, precision: str = "fp32",
                   optimize: bool = False) -> dict[str, Any]:
    """Export + optimise/convert (optional) + check + parity against torch fp32; raises :class:`ExportError` past
    the precision's tolerance. Returns the manifest graph entry."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    export_onnx(module, make_input(2), path, input_name=input_name, output_name=output_name, exporter=exporter,
                opset=opset)
    extra = convert_graph(path, precision=precision, optimize=optimize)
    info = check_onnx(path)
    parity = measure_parity(module, path, make_input, input_name=input_name, precision=precision)
    if not parity.ok():
        tol = parity.tolerance
        raise ExportError(
            f"{path.name}: ORT-vs-torch parity failed at {precision} (max abs {parity.max_abs:.2e} > {tol.max_abs:.0e} "
            f"or min cosine {parity.min_cosine:.6f} < {tol.min_cosine}); "
            + (f"try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'}" if precision == "fp32"
               else "export at a higher --precision")
        )
    log.info("%s: %s parity max abs %.2e, min cosine %.7f (batches %s)", path.name, precision, parity.max_abs,
             parity.min_cosine, parity.batches)
    return {**info, "exporter": exporter, "precision": precision, **extra, "parity": parity.to_dict()}


__all__ = ["EXPORTERS", "EXPERT_WEIGHTS_OUTPUT", "ImageGraph", "TextGraph", "ParityReport", "export_checked",
           "export_onnx", "check_onnx", "measure_parity", "PRECISIONS", "TOLERANCES", "Tolerance", "FP32_ISLANDS",
           "convert_graph", "ort_session", "IMAGE_INPUT", "IMAGE_OUTPUT", "TEXT_INPUT", "TEXT_OUTPUT"]
