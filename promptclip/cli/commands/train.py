"""``methods``, ``backbones``, ``train`` and ``eval``."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from promptclip.cli.values import float_pair, parse_sets
from serving.errors import PromptclipError
from training import distributed
from training.backbone import BACKBONES
from training.data import multi_source_task
from training.engine import TrainConfig
from training.methods import METHODS
from training.workflow import evaluate_artifact, train_run

log = logging.getLogger("promptclip")


def cmd_methods(args: argparse.Namespace) -> int:
    for name, cls in METHODS.items():
        caps = cls.capabilities
        flags = []
        if not caps.trainable:
            flags.append("nothing trainable")
        if caps.text_depends_on_image:
            flags.append("image-conditioned text")
        if cls.needs_domains:
            flags.append("needs several source domains: one prompt set per domain (train --target-domain)")
        elif caps.num_prompt_sets > 1:
            flags.append(f"{caps.num_prompt_sets} prompt sets")
        if caps.finetuned_image_tower:
            flags.append("fine-tunes the image tower")
        print(f"{name:10s} {cls.description}" + (f"  [{', '.join(flags)}]" if flags else ""))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    for name, spec in BACKBONES.items():
        print(f"{name:10s} {spec.description} (default weights: {spec.default_pretrained})")
    return 0


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr", "optimizer", "seed",
                                            "device", "precision", "num_workers", "augment", "warmup_steps",
                                            "compile", "warmup_epochs", "warmup_lr", "momentum", "weight_decay")
              if getattr(args, k, None) is not None}
    if getattr(args, "crop_scale", None):
        values["crop_scale"] = float_pair(args.crop_scale, "--crop-scale")
    return TrainConfig.from_dict(values)


def _data_arg(args: argparse.Namespace, *, seed: int) -> Any:
    """``--data``, or with ``--target-domain`` the multi-source DG task read from it (the other domains train, one
    source domain each; the target's holdout split tests)."""
    if args.target_domain:
        return multi_source_task(args.data, args.target_domain, dataset=args.dataset, seed=seed)
    if args.dataset:
        raise PromptclipError("--dataset names a multi-domain dataset and needs --target-domain (the held-out domain)")
    return args.data


def cmd_train(args: argparse.Namespace) -> int:
    data = _data_arg(args, seed=args.seed or 0)
    subsample = args.subsample
    if args.target_domain and subsample != "all":
        log.info("--target-domain: training on every class (--subsample all)")
        subsample = "all"
    train_config = _train_config(args)
    with distributed.session(train_config.device):  # torchrun: one process per GPU; alone: a no-op
        res = train_run(method_name=args.method, data_root=data, out_dir=args.out, backbone_name=args.backbone,
                        pretrained=args.pretrained, method_config=parse_sets(args.set), train_config=train_config,
                        shots=args.shots, subsample=subsample, template=args.template,
                        evaluate_splits=not args.no_eval, overwrite=args.overwrite)
        if distributed.is_main_process():
            print(f"artifact: {res.artifact}")
            print(json.dumps(res.metrics, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    data = _data_arg(args, seed=args.seed)
    res = evaluate_artifact(args.artifact, data, subsample=args.subsample, split=args.split,
                            batch_size=args.batch_size, device=args.device, pretrained=args.pretrained,
                            per_image=args.per_image)
    print(json.dumps(res, indent=2))
    return 0
