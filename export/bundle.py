"""Prompt artifact -> deploy bundle (see ``serving/format.py`` for the contract).

The bundle is written into a temporary sibling directory and moved into place only after every check passed:
ONNX checker, ORT-vs-torch parity of both graphs at batch 1 and 3, parity of the precomputed class embeddings
against the exported text graph, and finally a read-back through ``serving.bundle.load_bundle`` (the reader
accepts what the writer wrote). The manifest is built as the typed :class:`serving.manifest.BundleManifest` and
written by :func:`serving.manifest.write_manifest`, the writer the test fixtures use too. An existing bundle is
never overwritten unless asked.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import calibration as calib
from export.onnx_export import DEFAULT_OPSET, TOLERANCES, ImageGraph, TextGraph, export_checked, ort_session
from serving import format as fmt
from serving.bundle import load_bundle
from serving.errors import PromptclipError
from serving.manifest import (
    BackboneInfo,
    BundleManifest,
    CalibrationInfo,
    Capabilities,
    ClassesInfo,
    Graphs,
    GraphSpec,
    MethodInfo,
    Preprocessing,
    PromptSets,
    TensorSpec,
    TextInfo,
    bundle_digest,
    bundle_versions,
    sha256_file,
    write_manifest,
)
from serving.open_set import MIN_CALIBRATION_IMAGES, check_keep_rate, check_rule, write_calibration
from serving.tokenizer import ClipTokenizer, default_vocab_path
from training.artifact import PromptArtifact, check_rebuilt_backbone, load_prompt_artifact, versions
from training.errors import ArtifactError, ExportError

log = logging.getLogger(__name__)


def normalize_class_names(names: Sequence[str]) -> list[str]:
    """The names in canonical form (:func:`serving.format.canonical_class_name`); refuse empties and duplicates
    (names with the same :func:`serving.format.class_name_key` are one class, as the service treats them)."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for raw in names:
        name = fmt.canonical_class_name(raw)
        if not name:
            raise ExportError(f"empty class name in the class list ({raw!r}); remove it")
        key = fmt.class_name_key(name)
        if key in seen:
            same = "" if seen[key] == name else f" (the same class as {seen[key]!r}: case is ignored)"
            raise ExportError(f"duplicate class name {name!r} in the class list{same}; each class must appear once")
        seen[key] = name
        out.append(name)
    if not out:
        raise ExportError("the class list is empty; pass --classes or a --classes-file with at least one name")
    return out


def export_bundle(
    artifact: str | os.PathLike | PromptArtifact,
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    pretrained: str | None = None,
    overwrite: bool = False,
    precision: str = "fp32",
    optimize: bool = False,
    calibration: calib.CalibrationSource = None,
    keep_rate: float = fmt.DEFAULT_KEEP_RATE,
    open_set_rule: str = "max_cosine",
    calibration_per_class: int = calib.DEFAULT_PER_CLASS,
    calibration_max_images: int = calib.DEFAULT_MAX_IMAGES,
    calibration_seed: int = 0,
    progress: bool = True,
) -> Path:
    """Export ``artifact`` into a deploy bundle at ``out_dir``; returns the bundle path.

    Args:
        class_names: the classes to precompute embeddings for (default: the classes it was trained on).
        exporter: ``dynamo`` (torch.export based) or ``torchscript`` (legacy tracer).
        pretrained: backbone weights location when the recorded one is unavailable here.
        precision: ``fp32``, ``fp16`` or ``int8`` (see :mod:`export.onnx_export`); parity bounds follow it.
        optimize: run onnxruntime's transformer optimiser on each graph before the precision conversion.
        calibration: held-out labelled images of the exported classes for open-set answers (:mod:`serving.open_set`):
            an image folder (``<class>/<image>`` or ``test/<class>/<image>``; its held-out split is used),
            ``"auto"`` (the held-out split of the data root the artifact records, when it is on disk), or ``(path,
            class name)`` pairs; ``None``: no calibration (logged; open-set answers are then null).
        keep_rate, open_set_rule: the bundle's open-set defaults (share of known images kept; ``max_cosine`` or
            ``msp``).
        calibration_per_class, calibration_seed: at most this many calibration images per class, chosen with this
            seed.
        calibration_max_images: about this many calibration images in all at most (the per-class cap is lowered to
            fit, to at least one per class).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    art = artifact if isinstance(artifact, PromptArtifact) else load_prompt_artifact(artifact, pretrained=pretrained)
    try:  # the bundle must hold the backbone the prompts were trained on: weights, activation, open_clip model
        check_rebuilt_backbone(art.config.backbone, art.backbone, where=str(art.path))
    except ArtifactError as exc:
        raise ExportError(f"refusing to export: {exc}") from exc
    method, backbone = art.method.to("cpu").eval(), art.backbone
    caps = method.capabilities
    if caps.text_depends_on_image:
        hint = getattr(method, "text_image_dependency", "")
        raise ExportError(f"method {method.name!r} makes text depend on the image: class embeddings cannot be "
                          f"precomputed, and this exporter does not build image-conditioned text graphs"
                          + (f" ({hint})" if hint else ""))
    num_sets = caps.num_prompt_sets
    if num_sets > 1 and getattr(method.config, "weighting", "per_sample") != "per_sample":
        log.warning("%s was configured with %s expert weights; the bundle computes them per image (a prediction "
                    "must not depend on the other images of a request)", method.name, method.config.weighting)
    names = normalize_class_names(class_names if class_names is not None else art.classnames)
    try:
        keep_rate = check_keep_rate(keep_rate, field="keep_rate")
        open_set_rule = check_rule(open_set_rule, field="open_set_rule")
    except PromptclipError as exc:
        raise ExportError(str(exc).replace("keep_rate", "--keep-rate").replace("open_set_rule", "--open-set-rule")
                          ) from exc
    resolved = calib.resolve_samples(calibration, art.config.trained_on.get("dataset"))
    picked = None
    if resolved is not None:  # fail on bad calibration data before the slow export
        try:
            picked = calib.pick(resolved[0], names, per_class=calibration_per_class, seed=calibration_seed,
                                max_images=calibration_max_images)
        except ExportError as exc:
            if not (isinstance(calibration, str) and calibration == "auto"):
                raise
            log.warning("no open-set calibration (none_of_these will be null): %s", exc)
    template = method.prompt_template(art.dataset_template)
    ctx_len = backbone.context_length
    vocab = default_vocab_path()
    tokenizer = ClipTokenizer(vocab, context_length=ctx_len)
    token_ids = torch.from_numpy(tokenizer([template.format(n) for n in names]))  # [C, L]; refuses over-long names

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-bundle-", dir=out.parent))
    try:
        gen = torch.Generator().manual_seed(0)
        h, w = backbone.image_size

        def image_input(b: int) -> torch.Tensor:
            return torch.randn(b, 3, h, w, generator=gen)  # [b, 3, H, W]

        def text_input(b: int) -> torch.Tensor:
            probe = names + ["a completely new class", "zebra crossing sign"]
            return torch.from_numpy(tokenizer([template.format(probe[i % len(probe)]) for i in range(b)]))

        image_graph = ImageGraph(method)
        image_entry = export_checked(image_graph, tmp / fmt.IMAGE_GRAPH_FILE, image_input,
                                     input_name=fmt.IMAGE_INPUT, output_name=image_graph.output_names,
                                     exporter=exporter, opset=opset, precision=precision, optimize=optimize)
        probe_ids = tokenizer([template.format(n) for n in PROBE_CLASSES])  # [P, L]: classes added at runtime
        text_entries, embeddings, probe_embeddings, class_parity = [], [], [], []
        for k in range(num_sets):
            text_file = fmt.text_graph_file(k, num_sets)
            text_graph = TextGraph(method, k)
            entry = export_checked(text_graph, tmp / text_file, text_input, input_name=fmt.TEXT_INPUT,
                                   output_name=fmt.TEXT_OUTPUT, exporter=exporter, opset=opset,
                                   precision=precision, optimize=optimize)
            entry["file"] = text_file
            with torch.no_grad():
                emb = torch.cat([text_graph(token_ids[i:i + 256]) for i in range(0, len(names), 256)]).float().numpy()
            text_sess = ort_session(tmp / text_file, precision)
            class_parity.append(_class_embedding_parity(text_sess, token_ids.numpy(), emb, precision))
            probe_embeddings.append(text_sess.run(None, {fmt.TEXT_INPUT: probe_ids})[0])  # [P, D], as serving would
            text_entries.append(entry)
            embeddings.append(np.ascontiguousarray(emb, dtype=np.float32))  # [C, D]
        from safetensors.numpy import save_file

        save_file({fmt.class_embeddings_key(k, num_sets): e for k, e in enumerate(embeddings)},
                  str(tmp / fmt.CLASS_EMBEDDINGS_FILE))
        shutil.copyfile(vocab, tmp / fmt.VOCAB_FILE)
        logits_parity = _logits_parity(method, tmp, image_input, token_ids, embeddings, torch.from_numpy(probe_ids),
                                       probe_embeddings, precision)

        image_entry["file"] = fmt.IMAGE_GRAPH_FILE
        for entry in [image_entry, *text_entries]:
            entry["sha256"] = sha256_file(tmp / entry["file"])
        parity = {"image": image_entry.pop("parity"),
                  "text": [e.pop("parity") for e in text_entries] if num_sets > 1 else text_entries[0].pop("parity"),
                  "class_embeddings": class_parity if num_sets > 1 else class_parity[0],
                  "logits": logits_parity}
        calibration_info = None
        if picked is not None:
            embeds, cal_weights, labels = calib.embed(tmp / fmt.IMAGE_GRAPH_FILE, picked,
                                                      Preprocessing(**backbone.preprocess).config(), num_sets,
                                                      precision, progress=progress)
            write_calibration(tmp / fmt.CALIBRATION_FILE, embeds, labels, cal_weights)
            num_cal_classes = len(set(labels.tolist()))
            calibration_info = CalibrationInfo(
                file=fmt.CALIBRATION_FILE, sha256=sha256_file(tmp / fmt.CALIBRATION_FILE), num_images=len(labels),
                num_classes=num_cal_classes, keep_rate=keep_rate, default_rule=open_set_rule)
            log.info("calibration: %d images of %d of the %d classes from %s (at most %d per class, seed %d)",
                     len(labels), num_cal_classes, len(names), resolved[1], calibration_per_class, calibration_seed)
            if len(labels) < MIN_CALIBRATION_IMAGES:
                log.warning("calibration: only %d images; thresholds from so few are coarse", len(labels))
        empty_tokens = len(tokenizer.encode(template.format("")))
        manifest = BundleManifest(
            **bundle_versions(num_sets),
            created_by={**versions(), "onnx_exporter": exporter},
            method=MethodInfo(name=method.name, config=method.config.to_dict(),
                              capabilities=Capabilities(**caps.__dict__)),
            backbone=BackboneInfo(name=backbone.name, pretrained=backbone.pretrained,
                                  weights_sha256=backbone.weights_sha256, weights=backbone.describe_weights(),
                                  activation=backbone.activation, open_clip_model=backbone.open_clip_model),
            embedding_dim=int(embeddings[0].shape[1]),
            logit_scale=float(method.logit_scale),
            preprocessing=Preprocessing(**backbone.preprocess),
            text=TextInfo(tokenizer="clip-bpe", vocab_file=fmt.VOCAB_FILE,
                          vocab_sha256=sha256_file(tmp / fmt.VOCAB_FILE), context_length=ctx_len,
                          templates=[template] * num_sets, max_name_tokens=ctx_len - 2 - empty_tokens),
            classes=ClassesInfo(names=names, file=fmt.CLASS_EMBEDDINGS_FILE,
                                sha256=sha256_file(tmp / fmt.CLASS_EMBEDDINGS_FILE)),
            graphs=Graphs(image=_graph_spec(image_entry), text=[_graph_spec(e) for e in text_entries]),
            engines=[],
            parity=parity,
            prompt_sets=(PromptSets(names=method.prompt_set_names(), combine=fmt.COMBINE_WEIGHTED_SUM)
                         if num_sets > 1 else None),
            calibration=calibration_info,
        )
        write_manifest(tmp, manifest)
        load_bundle(tmp)  # the reader must accept what we wrote (format, hashes, shapes)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s (%d classes, %d prompt set(s); image parity max abs %.1e, logits min cosine "
             "%.7f); digest %s", out, len(names), num_sets, parity["image"]["max_abs"], parity["logits"]["min_cosine"],
             bundle_digest(out))
    return out


#: Class names that are not in any bundle: the logits parity check scores them as runtime-added classes.
PROBE_CLASSES = ("a completely new class", "zebra crossing sign")


def _logits_parity(method: Any, bundle_dir: Path, image_input, token_ids: torch.Tensor, embeddings: list[np.ndarray],
                   probe_ids: torch.Tensor, probe_embeddings: list[np.ndarray], precision: str = "fp32"
                   ) -> dict[str, Any]:
    """End-to-end check: logits computed the way serving does (ONNX image graph + precomputed class embeddings +
    the ONNX text graphs' embeddings of classes added at runtime, combined per ``serving.format``) against the torch
    method's logits for the same images and classes. Fails past the precision's cosine (0.9999 at fp32) per image
    row."""
    min_cosine = TOLERANCES[precision].min_cosine
    images = image_input(3)  # [3, 3, H, W]
    outs = ort_session(bundle_dir / fmt.IMAGE_GRAPH_FILE, precision).run(None, {fmt.IMAGE_INPUT: images.numpy()})
    f = outs[0]  # [B, D]
    weights = outs[1] if len(outs) > 1 else np.ones((f.shape[0], 1), np.float32)  # [B, S]
    per_set = [f @ np.concatenate([emb, extra]).T for emb, extra in zip(embeddings, probe_embeddings)]  # S x [B, C+P]
    got = float(method.logit_scale) * np.einsum("bsc,bs->bc", np.stack(per_set, 1), weights)
    with torch.no_grad():
        feats = method.encode_image(images)
        all_ids = torch.cat([token_ids, probe_ids])
        texts = [method.encode_text(all_ids, k) for k in range(len(embeddings))]
        ref = method.combined_logits(feats, texts, method.expert_weights(feats, per_sample=True)).float().numpy()
    cos = float(np.min(np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)))
    max_abs = float(np.abs(got - ref).max())
    if cos < min_cosine:
        raise ExportError(f"logits from the exported graphs differ from torch (min cosine {cos:.6f} < {min_cosine}, "
                          f"max abs {max_abs:.2e}); try the other --exporter")
    return {"max_abs": max_abs, "min_cosine": cos, "num_images": int(f.shape[0]),
            "num_classes": int(token_ids.shape[0]), "runtime_classes": len(PROBE_CLASSES)}


def _graph_spec(entry: dict[str, Any]) -> GraphSpec:
    """The manifest model of a graph from what :func:`export_checked` returned (plus file and sha256)."""
    return GraphSpec(file=entry["file"], sha256=entry["sha256"], opset=entry["opset"], exporter=entry["exporter"],
                     inputs=[TensorSpec(**t) for t in entry["inputs"]],
                     outputs=[TensorSpec(**t) for t in entry["outputs"]],
                     precision=None if entry.get("precision", "fp32") == "fp32" else entry["precision"],
                     optimization=entry.get("optimization"))


def _class_embedding_parity(sess, token_ids: np.ndarray, torch_emb: np.ndarray, precision: str = "fp32"
                            ) -> dict[str, float]:
    """The precomputed embeddings (torch, fp32) must equal what the exported text graph (ORT session ``sess``)
    computes for the same names, within the precision's cosine."""
    min_cosine = TOLERANCES[precision].min_cosine
    got = np.concatenate([sess.run(None, {fmt.TEXT_INPUT: token_ids[i:i + 256]})[0]
                          for i in range(0, len(token_ids), 256)])
    cos = float(np.min(np.sum(got * torch_emb, -1)
                       / (np.linalg.norm(got, axis=-1) * np.linalg.norm(torch_emb, axis=-1))))
    max_abs = float(np.abs(got - torch_emb).max())
    if cos < min_cosine:
        raise ExportError(f"class embeddings from the ONNX text graph differ from torch (min cosine {cos:.6f} < "
                          f"{min_cosine})")
    return {"max_abs": max_abs, "min_cosine": cos, "num_classes": int(len(token_ids))}
