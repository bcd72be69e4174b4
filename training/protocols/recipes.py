"""The papers' training recipes: one table, per method and protocol, with the file each value comes from.

``promptclip reproduce`` trains with :func:`resolve_recipe` (the table's entry, then the user's overrides on top),
prints it and records it in ``summary.json``; the README prints :func:`recipe_table_markdown` (a test keeps the two
equal). Values are those of the methods' official code for ViT-B/16 (Dassl configs: SGD momentum 0.9 and weight
decay 5e-4 are Dassl's defaults, ``OPTIM.MOMENTUM`` / ``OPTIM.WEIGHT_DECAY``, which the configs do not change; the
crop is Dassl's ``random_resized_crop`` with torchvision's default area 0.08-1; warmup is ``WARMUP_EPOCH`` 1 at
``WARMUP_CONS_LR`` 1e-5, then cosine). ``domain-generalization`` trains on ImageNet exactly like ``cross-dataset``.

DiSa and ISP have no official code: they inherit the recipe of the method their prompts are built on. DiSa is
IVLP's prompts plus PromptSRC-style self-regularisation and Gaussian prompt aggregation, so it takes PromptSRC's
recipe (schedule and GPA parameters per protocol); ISP is IVLP's prompts plus structural prompts and sample
probing, so it takes IVLP's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from training.backbone import get_backbone_spec
from training.errors import ConfigError
from training.methods import PROMPT_DEPTH, get_method_class

log = logging.getLogger(__name__)

__all__ = ["RECIPES", "Recipe", "recipe_for", "recipe_table_markdown", "resolve_recipe", "format_recipe"]

_COOP = "KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16.yaml (200 epochs: 8/16 shots)"
_COOP_IN = ("KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50.yaml (CoOp paper: ImageNet fixed to 50 epochs)")
_IVLP = "muzairkhattak/PromptSRC configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
_IVLP_XD = ("muzairkhattak/multimodal-prompt-learning configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml "
            "(scripts/independent-vlp/xd_train_ivlp.sh)")
_SRC = "muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
_SRC_XD = "muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml"
_SRC_FS = ("muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml "
           "(GPA 30/30 for ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397; 45/5 for the others)")
_GUIDG = ("TL-UESTC/GuiDG phase1.py (SGD lr 1e-4, no momentum/weight decay, 31 epochs, -b 32), phase2.py + "
          "scripts/ImageNetDG_Step2.sh (AdamW lr 5e-6, wd 0.1, 10 epochs, --lam 0.3, --beta 0.1); crop: DomainBed "
          "datasets.py augment (RandomResizedCrop scale 0.7-1) via converter_domainbed.py")

#: The papers' common SGD recipe (Dassl): batch 4 / lr 0.0025 / 20 epochs is IVLP's and PromptSRC's.
_SGD = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5,
        "warmup_steps": 0, "scheduler": "cosine", "augment": "crop_flip", "crop_scale": (0.08, 1.0)}
_IVLP_B2N = {**_SGD, "batch_size": 4, "lr": 0.0025, "epochs": 20}


@dataclass(frozen=True)
class Recipe:
    """One method's training recipe for one protocol: TrainConfig values, method options, where they come from."""

    method: str
    protocol: str
    train: Mapping[str, Any] = field(default_factory=dict)
    method_config: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    note: str = ""
    #: TrainConfig values that differ per number of shots (few-shot protocol), e.g. CoOp's epochs
    by_shots: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)


def _r(method: str, protocol: str, train: Mapping[str, Any], method_config: Mapping[str, Any] | None = None, *,
       source: str, note: str = "", by_shots: Mapping[int, Mapping[str, Any]] | None = None) -> Recipe:
    return Recipe(method, protocol, dict(train), dict(method_config or {}), source, note, dict(by_shots or {}))


_IVLP_CFG = {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9}
_SRC_B2N = {**_IVLP_CFG, "use_gpa": True, "gpa_mean": 15.0, "gpa_std": 1.0}
_IVLP_2X2 = {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 12, "depth_vision": 12, "ctx_init": "a photo"}
_NOTE_2X2 = ("the official 2 text tokens are initialised from 'a photo' and followed by the fixed words 'of a'; "
             "ours start from 'a photo' without them")
_INHERIT_DISA = "DiSa has no official code: PromptSRC's recipe (IVLP prompts + self-regularisation + GPA)"
_INHERIT_ISP = "ISP has no official code: IVLP's recipe (IVLP prompts + structural prompts)"

#: (method, protocol) -> :class:`Recipe`. Protocols: base2novel, cross-dataset (also domain-generalization),
#: few-shot, multi-source-dg.
RECIPES: dict[tuple[str, str], Recipe] = {(r.method, r.protocol): r for r in (
    _r("zeroshot", "base2novel", {}, source="CLIP: no training", note="nothing is trained"),
    _r("coop", "base2novel", {**_SGD, "batch_size": 32, "lr": 0.002, "epochs": 200}, {"n_ctx": 16}, source=_COOP),
    _r("coop", "cross-dataset", {**_SGD, "batch_size": 32, "lr": 0.002, "epochs": 50}, {"n_ctx": 16},
       source=_COOP_IN),
    _r("coop", "few-shot", {**_SGD, "batch_size": 32, "lr": 0.002, "epochs": 200}, {"n_ctx": 16}, source=_COOP,
       note="CoOp paper: 50 epochs for 1 shot, 100 for 2/4, 200 for 8/16 (applied per shot count)",
       by_shots={1: {"epochs": 50}, 2: {"epochs": 100}, 4: {"epochs": 100}}),
    _r("ivlp", "base2novel", _IVLP_B2N, _IVLP_CFG, source=_IVLP),
    _r("ivlp", "cross-dataset", {**_SGD, "batch_size": 4, "lr": 0.0035, "epochs": 5},
       _IVLP_2X2, source=_IVLP_XD, note=_NOTE_2X2),
    _r("ivlp", "few-shot", _IVLP_B2N, _IVLP_CFG, source=_IVLP, note="no official IVLP few-shot config: base2novel's"),
    _r("disa", "base2novel", _IVLP_B2N, _SRC_B2N, source=_SRC, note=_INHERIT_DISA),
    _r("disa", "cross-dataset", _IVLP_B2N,
       {**_IVLP_CFG, "depth_text": 3, "depth_vision": 3, "use_gpa": True, "gpa_mean": 6.0, "gpa_std": 10.0},
       source=_SRC_XD, note=_INHERIT_DISA),
    _r("disa", "few-shot", {**_IVLP_B2N, "epochs": 50}, {**_SRC_B2N, "gpa_mean": 30.0, "gpa_std": 30.0},
       source=_SRC_FS, note=_INHERIT_DISA),
    _r("isp", "base2novel", _IVLP_B2N, _IVLP_CFG, source=_IVLP, note=_INHERIT_ISP),
    _r("isp", "cross-dataset", {**_SGD, "batch_size": 4, "lr": 0.0035, "epochs": 5},
       _IVLP_2X2, source=_IVLP_XD, note=f"{_INHERIT_ISP}; {_NOTE_2X2}"),
    _r("isp", "few-shot", _IVLP_B2N, _IVLP_CFG, source=_IVLP, note=_INHERIT_ISP),
    _r("guidg", "multi-source-dg",
       {"optimizer": "sgd", "batch_size": 32, "lr": 1e-4, "momentum": 0.0, "weight_decay": 0.0, "epochs": 31,
        "warmup_epochs": 0, "warmup_steps": 0, "scheduler": "cosine", "augment": "crop_flip",
        "crop_scale": (0.7, 1.0)},
       {"n_ctx": 16, "expert_optimizer": "sgd", "expert_lr": 1e-4, "expert_momentum": 0.0,
        "expert_weight_decay": 0.0, "expert_epochs": 31, "finetune_optimizer": "adamw", "finetune_lr": 5e-6,
        "finetune_weight_decay": 0.1, "finetune_epochs": 10, "margin": 0.3, "averaging": "bma", "bma_beta": 0.1},
       source=_GUIDG,
       note="stage 2 runs 10 epochs of our domain-balanced batches (official: 10 x 400 steps of 12 images per "
            "domain); the official experts are kept at their best validation epoch (checked every 5), ours at "
            "the last; DomainBed's colour jitter and greyscale are not applied"),
)}


def _protocol_key(protocol: str) -> str:
    return "cross-dataset" if protocol == "domain-generalization" else protocol


def recipe_for(method: str, protocol: str) -> Recipe:
    """The table's recipe of ``method`` for ``protocol``; a protocol without its own entry falls back to the
    method's base2novel recipe (said in the note); a method without any entry raises :class:`ConfigError`."""
    get_method_class(method)  # unknown method -> RegistryError with the known list
    key = (method, _protocol_key(protocol))
    if key in RECIPES:
        return RECIPES[key]
    if (method, "base2novel") in RECIPES:
        base = RECIPES[(method, "base2novel")]
        note = f"no {protocol} recipe in the method's code: its base2novel recipe" + (
            f"; {base.note}" if base.note else "")
        return dataclasses.replace(base, protocol=protocol, note=note)
    if (method, "multi-source-dg") in RECIPES:
        base = RECIPES[(method, "multi-source-dg")]
        return dataclasses.replace(base, protocol=protocol, note=f"only a multi-source-dg recipe exists; {base.note}")
    raise ConfigError(f"no training recipe for method {method!r}; pass --recipe none and the settings yourself")


def resolve_recipe(method: str, protocol: str, backbone: str, *, train: Mapping[str, Any] | None = None,
                   method_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings a reproduction runs with: the recipe, then the user's ``train`` / ``method_config`` on top.

    Prompt depths of the recipe that exceed ``backbone``'s layers are left to the usual depth fitting (the papers'
    depths assume ViT-B/16's 12 blocks). Returns ``{"method", "protocol", "train", "train_by_shots",
    "method_config", "source", "note", "overridden"}`` (``train_by_shots``: per-shot-count values the user did not
    override; ``overridden``: the keys the user changed)."""
    recipe = recipe_for(method, protocol)
    rec_method = dict(recipe.method_config)
    num_layers = get_backbone_spec(backbone).num_layers
    depth_keys = {f.name for f in dataclasses.fields(get_method_class(method).config_cls)
                  if f.metadata.get(PROMPT_DEPTH)}
    for key in sorted(depth_keys & set(rec_method)):
        if num_layers is not None and rec_method[key] > num_layers:
            log.info("recipe %s=%s does not fit %s (%d layers): fitted to the backbone", key, rec_method[key],
                     backbone, num_layers)
            del rec_method[key]
    user_train, user_method = dict(train or {}), dict(method_config or {})
    overridden = sorted(k for k in user_train if recipe.train.get(k, object()) != user_train[k]) + sorted(
        f"--set {k}" for k in user_method if rec_method.get(k, object()) != user_method[k])
    by_shots = {k: {kk: vv for kk, vv in v.items() if kk not in user_train} for k, v in recipe.by_shots.items()}
    return {"method": method, "protocol": protocol, "train": {**recipe.train, **user_train},
            "train_by_shots": {k: v for k, v in by_shots.items() if v},
            "method_config": {**rec_method, **user_method}, "source": recipe.source, "note": recipe.note,
            "overridden": overridden}


def format_recipe(resolved: Mapping[str, Any]) -> str:
    """A few lines that say what a run trains with and where it comes from."""
    train = ", ".join(f"{k}={_fmt(v)}" for k, v in resolved["train"].items())
    method = ", ".join(f"{k}={_fmt(v)}" for k, v in resolved["method_config"].items())
    lines = [f"recipe for {resolved['method']} / {resolved['protocol']}: {train or '(training defaults)'}",
             f"  method options: {method or '(defaults)'}", f"  source: {resolved['source'] or '-'}"]
    if resolved.get("train_by_shots"):
        lines.append("  per number of shots: " + "; ".join(
            f"{k}: " + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items())
            for k, v in sorted(resolved["train_by_shots"].items())))
    if resolved.get("note"):
        lines.append(f"  note: {resolved['note']}")
    if resolved.get("overridden"):
        lines.append(f"  overridden on the command line: {', '.join(resolved['overridden'])}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_table_markdown() -> str:
    """The README's recipe table, generated from :data:`RECIPES`."""
    rows = ["| method | protocol | batch | optimiser | lr | momentum | weight decay | epochs | warmup | crop scale "
            "| method options | source |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RECIPES.values():
        t = r.train
        warmup = (f"{t['warmup_epochs']} epoch at {_fmt(t['warmup_lr'])}" if t.get("warmup_epochs") else
                  ("none" if t else "-"))
        opts = ", ".join(f"`{k}={_fmt(v)}`" for k, v in r.method_config.items()) or "-"
        source = r.source + (f"; {r.note}" if r.note else "")
        cells = [r.method, r.protocol, t.get("batch_size", "-"), t.get("optimizer", "-"), _fmt(t.get("lr", "-")),
                 _fmt(t.get("momentum", "-")), _fmt(t.get("weight_decay", "-")), t.get("epochs", "-"), warmup,
                 _fmt(t.get("crop_scale", "-")), opts, source]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)
