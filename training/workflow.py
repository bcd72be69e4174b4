"""High-level train / evaluate runs used by the CLI, the demo and the protocol runners.

One function per user action: :func:`train_run` (data folder -> prompt artifact with base/new metrics) and
:func:`evaluate_artifact` (artifact + data folder -> accuracy). Both go through the one loop in ``engine``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import distributed
from training.artifact import PromptArtifact, load_prompt_artifact, save_prompt_artifact
from training.backbone import Backbone, create_backbone
from training.data import (
    DatasetSplits,
    EvalTransform,
    ImageListDataset,
    Sample,
    few_shot_cached,
    holdout_split,
    make_domain_balanced_loader,
    make_loader,
    read_image_folder,
    sample_few_shot,
    subsample_classes,
)
from training.engine import TrainConfig, evaluate, load_stage_tensors, resolve_device, stage_tensors, train
from training.errors import ArtifactError, DatasetError
from training.methods import MethodConfig, PromptMethod, TrainContext, TrainStage, create_method, get_method_class

log = logging.getLogger(__name__)


def eval_transform(backbone: Backbone) -> EvalTransform:
    """Serving's preprocessing (open_clip's eval transform) for the backbone: the one definition."""
    return EvalTransform(backbone.preprocess)


def train_transform(backbone: Backbone, augment: str, crop_scale: tuple[float, float] = (0.08, 1.0)):
    """CoOp-family augmentation: random resized crop (bicubic, area ``crop_scale``) + horizontal flip + CLIP
    normalisation."""
    if augment == "none":
        return eval_transform(backbone)
    from torchvision import transforms as T

    p = backbone.preprocess
    if augment == "flip":
        return T.Compose([T.RandomHorizontalFlip(), eval_transform(backbone)])
    return T.Compose([
        T.RandomResizedCrop(tuple(p["image_size"]), scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(p["mean"], p["std"]),
    ])


def tokenize_prompts(method: PromptMethod, backbone: Backbone, classnames: list[str], template: str) -> torch.Tensor:
    """[C, L] token ids of the method's prompt texts for ``classnames``; refuses names too long for the context."""
    tokenizer = backbone.tokenizer()
    texts = method.prompt_texts(classnames, template)
    for name, text in zip(classnames, texts):
        n = len(tokenizer.encode(text)) + 2
        if n > backbone.context_length:
            raise DatasetError(
                f"class name {name!r} makes a prompt of {n} tokens, "
                f"over the text context of {backbone.context_length}; "
                f"shorten the class name (it would be truncated otherwise)"
            )
    return tokenizer(texts)


@dataclass
class TrainRunResult:
    artifact: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _loader(samples: list[Sample], transform, batch_size: int, *, shuffle: bool, seed: int, num_workers: int,
            cache: bool, drop_last: bool = False):
    ds = ImageListDataset(samples, transform, cache_decoded=cache)
    return make_loader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, seed=seed,
                       drop_last=drop_last)


def train_run(
    *,
    method_name: str,
    data_root: str | Path | DatasetSplits,
    out_dir: str | Path,
    backbone_name: str = "ViT-B-16",
    pretrained: str | None = None,
    method_config: Mapping[str, Any] | None = None,
    train_config: TrainConfig | None = None,
    shots: int = 16,
    subsample: str = "base",
    template: str | None = None,
    evaluate_splits: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    few_shot_cache: str | Path | None = None,
) -> TrainRunResult:
    """Few-shot train ``method_name`` and write a prompt artifact.

    ``data_root`` is an ImageFolder root or already-read :class:`DatasetSplits` (e.g. from
    ``training.data.read_dataset``). ``subsample="base"`` trains on the base half of the classes (CoOp rule,
    few-shot sampled *before* class subsampling, as the field does) and, with ``evaluate_splits``, reports accuracy
    on the base and the new halves of the test split; ``"all"`` trains on every class. ``template`` defaults to the
    dataset's hand-crafted template. ``few_shot_cache`` keeps the seeded few-shot selection in a JSON file.

    Samples that carry domains (``Sample.domain``, e.g. from ``read_domain_dataset``) are few-shot sampled per
    domain and class. The method's :meth:`~training.methods.PromptMethod.training_stages` run in order through
    the shared loop (GuiDG: one expert per domain, then fine-tuning); a finished stage is not rerun when the same
    ``out_dir`` is used again.
    """
    cfg = train_config or TrainConfig()
    out_dir = Path(out_dir)
    artifact_dir = out_dir / "artifact"
    if artifact_dir.is_dir() and any(artifact_dir.iterdir()) and not overwrite:  # fail before training, not after
        raise ArtifactError(f"{artifact_dir} already exists and is not empty; choose another --out or pass "
                            f"--overwrite")
    splits_all = data_root if isinstance(data_root, DatasetSplits) else read_image_folder(data_root)
    template = template or splits_all.template
    domains = sorted({s.domain for s in splits_all.train})
    classnames = subsample_classes(dataclasses.replace(splits_all, train=[]), subsample).classnames
    method_config = get_method_class(method_name).config_for_data(  # before the (slow) backbone: fail fast
        method_config.to_dict() if isinstance(method_config, MethodConfig) else method_config, classnames,
        [d or "" for d in domains])
    backbone = create_backbone(backbone_name, pretrained)
    method = create_method(method_name, backbone, method_config)
    class_ids = tokenize_prompts(method, backbone, classnames, template)
    metrics: dict[str, Any] = {"weights": backbone.describe_weights()}
    with distributed.main_process_first():  # rank 0 writes the few-shot cache, the others read it
        train_samples = _stage_samples(TrainStage("all"), splits_all, shots, cfg.seed, subsample, few_shot_cache)
    if method.capabilities.trainable:
        device = distributed.device_for(resolve_device(cfg.device))
        method.to(device)
        ctx = TrainContext(
            classnames=classnames, dataset_template=template, class_token_ids=class_ids,
            image_loader=_loader(train_samples, eval_transform(backbone), cfg.batch_size, shuffle=False, seed=0,
                                 num_workers=cfg.num_workers, cache=True),
            tokenize=backbone.tokenizer(), device=device, out_dir=out_dir)
        method.prepare_training(ctx)
        stages = method.training_stages()
        stage_metrics = []
        for stage in stages:
            samples = train_samples if stage.domains is None and stage.part == "all" else \
                _stage_samples(stage, splits_all, shots, cfg.seed, subsample, few_shot_cache)
            result = _run_stage(method, stage, ctx, samples, backbone, class_ids, cfg, out_dir, progress,
                                name=stage.name if len(stages) > 1 else None)
            stage_metrics.append({"stage": stage.name, "num_images": len(samples), **result})
        diagnostics = method.write_diagnostics(ctx) if distributed.is_main_process() else []
        if diagnostics:
            metrics["diagnostics"] = [str(p) for p in diagnostics]
        last = stage_metrics[-1]
        metrics.update({k: last[k] for k in ("train_steps", "train_seconds", "train_images_per_second", "final_loss",
                                             "train_accuracy") if k in last})
        if len(stages) > 1:
            metrics["stages"] = stage_metrics
    if evaluate_splits:
        metrics.update(_evaluate_halves(method, backbone, splits_all, subsample, template, cfg.batch_size, cfg.device))
    dataset_id = splits_all.name if isinstance(data_root, DatasetSplits) else str(Path(data_root).resolve())
    trained_on = {"dataset": dataset_id, "classnames": classnames, "shots": shots,
                  "seed": cfg.seed, "subsample": subsample, "num_images": len(train_samples),
                  "domains": [d for d in domains if d]}
    training_config = {"method": method.config.to_dict(), "train": cfg.to_dict(),
                       "backbone": backbone_name, "pretrained": backbone.pretrained}
    if distributed.is_main_process():  # rank 0 alone writes; the others wait until the artifact is complete
        save_prompt_artifact(out_dir / "artifact", method, backbone, dataset_template=template,
                             trained_on=trained_on, metrics=metrics, training_config=training_config,
                             overwrite=overwrite)
    distributed.barrier()
    return TrainRunResult(artifact=out_dir / "artifact", metrics=metrics)


def _stage_samples(stage: TrainStage, splits: DatasetSplits, shots: int, seed: int, subsample: str,
                   few_shot_cache: str | Path | None) -> list[Sample]:
    """The training samples of ``stage``: its domains, its part of each domain's pool (split before few-shot
    sampling, the same split for every stage of a run), ``shots`` per class and domain, then the class subsample."""
    pool = splits.train
    domains = sorted({s.domain for s in pool})
    if stage.domains is None and stage.part == "all" and len(domains) <= 1 and few_shot_cache is not None:
        picked = list(few_shot_cached(splits, shots, seed, few_shot_cache))
    else:
        wanted = domains if stage.domains is None else [d for d in domains if (d or "all") in stage.domains]
        if stage.domains is not None and len(wanted) != len(stage.domains):
            raise DatasetError(f"stage {stage.name!r} trains on domain(s) {list(stage.domains)} but the training data "
                               f"has {[d or 'all' for d in domains]}")
        picked = []
        for d in wanted:
            items = [s for s in pool if s.domain == d]
            if stage.part != "all":
                split = holdout_split(items, stage.part_fraction, seed)
                items = split.in_split if stage.part == "first" else split.out_split
            picked += sample_few_shot(items, shots, seed, classnames=splits.classnames)
    out = subsample_classes(dataclasses.replace(splits, train=picked), subsample).train
    if not out:
        raise DatasetError(f"stage {stage.name!r} has no training images ({splits.name or 'dataset'}, "
                           f"subsample {subsample!r}); check the data folder")
    return out


def _run_stage(method: PromptMethod, stage: TrainStage, ctx: TrainContext, samples: list[Sample], backbone: Backbone,
               class_ids: torch.Tensor, cfg: TrainConfig, out_dir: Path, progress: bool,
               name: str | None) -> dict[str, Any]:
    """Train one stage through the shared loop; a finished stage (its ``done`` file exists) is loaded, not rerun."""
    from safetensors.torch import load_file, save_file

    stage_cfg = dataclasses.replace(cfg, **dict(stage.overrides)) if stage.overrides else cfg
    ckpt = out_dir / "checkpoint" / name if name else out_dir / "checkpoint"
    done = ckpt / "stage_done.safetensors"
    method.enter_stage(stage, ctx)
    if done.is_file():  # resumed run: this stage's final (post-averaging) tensors
        load_stage_tensors(method, load_file(str(done)), ckpt, f"a finished stage {stage.name!r}")
        method.end_stage(stage, ctx)
        log.info("stage %s already finished in %s; loaded its result", stage.name, ckpt)
        return json.loads((ckpt / "stage_done.json").read_text())
    if len(samples) < stage_cfg.batch_size:
        log.warning("only %d training images for batch_size=%d: batches will be smaller", len(samples),
                    stage_cfg.batch_size)
    tf = train_transform(backbone, stage_cfg.augment, stage_cfg.crop_scale)
    # every process builds the single-process batches (same seed) and keeps its share of each (distributed.py)
    if stage.balanced_domains:
        def loader_factory(epoch: int):
            ds = ImageListDataset(samples, tf, cache_decoded=True)
            return distributed.shard_loader(make_domain_balanced_loader(
                ds, batch_size=stage_cfg.batch_size, seed=stage_cfg.seed + epoch, num_workers=stage_cfg.num_workers))
    else:
        def loader_factory(epoch: int):
            return distributed.shard_loader(_loader(samples, tf, stage_cfg.batch_size, shuffle=True,
                                                    seed=stage_cfg.seed + epoch, num_workers=stage_cfg.num_workers,
                                                    cache=True))
    _log_batch_sizes(stage_cfg.batch_size)
    if name:
        log.info("stage %s: %d images, %s", stage.name, len(samples),
                 ", ".join(f"{k}={v}" for k, v in stage.overrides.items()) or "run settings")
    result = train(method, loader_factory, class_ids, stage_cfg, out_dir=ckpt, callbacks=method.training_callbacks(),
                   progress=progress)
    method.end_stage(stage, ctx)
    summary = {"train_steps": result.steps, "train_seconds": round(result.seconds, 2),
               "train_images_per_second": round(result.images_per_second, 1), "final_loss": result.final_loss,
               "train_accuracy": result.train_accuracy}
    if distributed.is_main_process():
        save_file(stage_tensors(method), str(done.with_suffix(".tmp")))
        (ckpt / "stage_done.json").write_text(json.dumps(summary))
        os.replace(done.with_suffix(".tmp"), done)
    return summary


def _log_batch_sizes(batch_size: int) -> None:
    """State the batch per process and in total (``--batch-size`` is the global batch under torchrun)."""
    st = distributed.state()
    if not st.enabled:
        log.info("batch size: %d", batch_size)
        return
    per = batch_size // st.world_size
    if per * st.world_size != batch_size:
        log.warning("batch size %d is not a multiple of the %d processes: %d per process, %d in total per step",
                    batch_size, st.world_size, per, per * st.world_size)
    log.info("batch size: %d per process x %d processes = %d per step", per, st.world_size, per * st.world_size)


def _evaluate_halves(method: PromptMethod, backbone: Backbone, splits: DatasetSplits, subsample: str, template: str,
                     batch_size: int, device: str) -> dict[str, float]:
    halves = ("base", "new") if subsample in ("base", "new") else ("all",)
    out: dict[str, float] = {}
    tf = eval_transform(backbone)
    for half in halves:
        part = subsample_classes(splits, half)
        if not part.test:
            log.warning("no test images for the %s classes; skipping their evaluation", half)
            continue
        ids = tokenize_prompts(method, backbone, part.classnames, template)
        res = evaluate(method, _loader(part.test, tf, batch_size, shuffle=False, seed=0, num_workers=0, cache=False),
                       ids, device=device)
        out[f"{half}_accuracy"] = res["accuracy"]
        out[f"{half}_num_images"] = res["num_images"]
    if "base_accuracy" in out and "new_accuracy" in out:
        b, n = out["base_accuracy"], out["new_accuracy"]
        out["harmonic_mean"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return out


def evaluate_artifact(artifact: str | Path | PromptArtifact, data_root: str | Path | DatasetSplits, *,
                      subsample: str = "all",
                      split: str = "test", batch_size: int = 64, device: str = "auto",
                      pretrained: str | None = None, per_image: bool = False) -> dict[str, Any]:
    """Accuracy of a trained artifact on ``data_root``'s ``split`` restricted to the ``subsample`` classes.

    ``per_image``: also ``"predictions"``, one ``{"path", "label", "top1", "scores"}`` per image (``scores``: the
    softmax over the classes by class name, as ``promptclip classify`` reports them)."""
    art = artifact if isinstance(artifact, PromptArtifact) else load_prompt_artifact(artifact, pretrained=pretrained)
    data = data_root if isinstance(data_root, DatasetSplits) else read_image_folder(data_root, allow_test_only=True)
    splits = subsample_classes(data, subsample)
    samples = getattr(splits, split)
    if not samples:
        raise DatasetError(f"{data_root}: the {split!r} split has no images for the {subsample!r} classes")
    # the method's prompt template wraps the *target* dataset's hand-crafted template (zero-shot uses it as is)
    ids = tokenize_prompts(art.method, art.backbone, splits.classnames, data.template or art.dataset_template)
    loader = _loader(samples, eval_transform(art.backbone), batch_size, shuffle=False, seed=0, num_workers=0,
                     cache=False)
    res = evaluate(art.method, loader, ids, device=device, keep_logits=per_image)
    if per_image:
        probs = torch.softmax(res.pop("logits").double(), dim=-1)
        res["predictions"] = [{"path": s.path, "label": splits.classnames[s.label],
                               "top1": splits.classnames[int(p.argmax())],
                               "scores": {c: float(x) for c, x in zip(splits.classnames, p)}}
                              for s, p in zip(samples, probs)]
    return {"subsample": subsample, "split": split, "num_classes": len(splits.classnames), **res}
