"""Graph wrappers and ONNX export that checks itself (checker + ORT-vs-torch parity).

Every export runs ``onnx.checker.check_model(full_check=True)`` and compares onnxruntime's outputs with torch
eager at batch 1 and 3 (dynamic batch honoured); past the tolerance (max abs 1e-4 *or* cosine below 0.9999)
the export fails with :class:`ExportError` and the measured figures.
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
from training.errors import ExportError
from training.methods import PromptMethod

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
MAX_ABS_TOL = 1e-4
MIN_COSINE = 0.9999


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

    def ok(self) -> bool:
        return self.max_abs <= MAX_ABS_TOL and self.min_cosine >= MIN_COSINE

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "max_abs": self.max_abs, "min_cosine": self.min_cosine,
                "tolerance": {"max_abs": MAX_ABS_TOL, "min_cosine": MIN_COSINE}, "per_batch": self.per_batch}


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


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure_parity(module: nn.Module, path: Path, make_input: Callable[[int], torch.Tensor], *, input_name: str,
                   batches: tuple[int, ...] = (1, 3)) -> ParityReport:
    """Compare onnxruntime (CPU) with torch eager on fresh inputs at each batch size (every output; the cosine is
    taken per row of each output)."""
    sess = ort_session(path)
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
    return ParityReport(batches=list(batches), max_abs=max_abs, min_cosine=min_cos, per_batch=per)


def export_checked(module: nn.Module, path: Path, make_input: Callable[[int], torch.Tensor], *, input_name: str,
                   output_name: str | list[str], exporter: str, opset: int) -> dict[str, Any]:
    """Export + check + parity; raises :class:`ExportError` past tolerance. Returns the manifest graph entry."""
    export_onnx(module, make_input(2), path, input_name=input_name, output_name=output_name, exporter=exporter,
                opset=opset)
    info = check_onnx(path)
    parity = measure_parity(module, path, make_input, input_name=input_name)
    if not parity.ok():
        raise ExportError(
            f"{path.name}: ORT-vs-torch parity failed (max abs {parity.max_abs:.2e} > {MAX_ABS_TOL:.0e} or min cosine "
            f"{parity.min_cosine:.6f} < {MIN_COSINE}); "
            f"try --exporter {'torchscript' if exporter == 'dynamo' else 'dynamo'}"
        )
    log.info("%s: parity max abs %.2e, min cosine %.7f (batches %s)", path.name, parity.max_abs, parity.min_cosine,
             parity.batches)
    return {**info, "exporter": exporter, "parity": parity.to_dict()}


__all__ = ["EXPORTERS", "EXPERT_WEIGHTS_OUTPUT", "ImageGraph", "TextGraph", "ParityReport", "export_checked",
           "export_onnx", "check_onnx", "measure_parity", "IMAGE_INPUT", "IMAGE_OUTPUT", "TEXT_INPUT", "TEXT_OUTPUT"]
