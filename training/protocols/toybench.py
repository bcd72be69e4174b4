"""``promptclip bench toyworld``: a base-to-novel mini-benchmark on the toy world that can tell methods apart.

Three protocols, mirroring the field's (methods.md §2.2), with the toy world's styles as "datasets"/domains:

* **base-to-novel**, per style: each style has its own seeded set of colour-shape classes; few-shot training on the
  base half (CoOp rule on sorted class names), accuracy on the base and new halves of the test split, HM;
  it runs on each of ``splits``: ``name`` (today's split: new classes are unseen colour-shape pairs whose shapes
  also occur among the base classes) and ``disjoint`` (new classes share no shape with base classes, so a context
  that overfits to the base shapes shows it) and ``colour`` (base classes are one colour and differ only in shape,
  new classes are other shapes that differ in colour: a prompt fitted to the base classes never needs colour;
  :mod:`training.toyworld.provider`); rows of the other splits carry the style as ``<split>-<style>``;
* **cross-style transfer** (as cross-dataset): train on the source style with all its classes, evaluate on every
  other style's own classes;
* **domain generalisation**: the same source-trained model on the source classes rendered in the held-out styles;
* **leave-one-style-out** (``loso``, multi-source DG as GuiDG / DomainBed evaluate): for each style as the target,
  train on the same classes rendered in every other style (one domain per style) and test on the target style.
  It runs ``loso_methods``: by default zero-shot, ERM fine-tuning of the image tower without experts, and GuiDG.
  Opt-in (``protocols`` includes it only when asked): about 12 minutes on 2 cores for 3 seeds.

Every registered single-source method runs the first three protocols (a method added to the registry appears
automatically; methods that need several source domains, such as GuiDG, run in ``loso``). This module is a preset:
the toy world as a dataset provider (:class:`training.toyworld.provider.ToyWorldProvider`) run through the protocol
runner of ``promptclip reproduce`` (:class:`training.protocols.runner.ProtocolRunner`), with its own run names and
tables. Finished runs are recorded in ``runs.jsonl`` and skipped when the command is run again (resume after an
interruption).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from training.methods import get_method_class, list_methods
from training.protocols import report
from training.protocols.runner import ProtocolRunner, RunNaming, parse_method_spec
from training.toyworld.provider import SPLITS, WORLD, ToyWorldProvider

log = logging.getLogger(__name__)

__all__ = ["NAMING", "PROTOCOLS", "BenchConfig", "bench_provider", "parse_method_spec", "run_bench", "write_reports"]


@dataclass(frozen=True)
class BenchConfig:
    """The toy bench's settings (``promptclip bench toyworld``)."""

    methods: tuple[str, ...] = ()             #: empty = every registered method
    seeds: tuple[int, ...] = (1, 2, 3)
    shots: int = 16
    styles: tuple[str, ...] = ("clean", "sketch", "noisy", "lowres", "palette")
    source_style: str = "clean"               #: cross-style / DG source
    num_classes: int = 20                     #: classes per style (base = first half of the sorted names)
    #: each style has 2 x shots training images per class, so the seeded few-shot samples differ between seeds
    test_per_class: int = 8
    steps: int = 100                          #: optimisation steps per training run
    batch_size: int = 32
    lr: float = 0.005
    optimizer: str = "sgd"
    augment: str = "flip"                     #: flip only: random resized crops can cut a 32 px shape out entirely
    backbone: str = "toy-clip"
    pretrained: str | None = None
    data_seed: int = 0
    #: base/new splits of the base-to-novel protocol (``training.toyworld.provider.SPLITS``)
    splits: tuple[str, ...] = SPLITS
    #: ``loso`` is opt-in (``--protocols loso``): it adds ~12 min on 2 cores; the default (base2novel on both splits,
    #: cross_style, dg) takes ~35 min (estimate: the base-to-novel half of the earlier ~20 min, doubled)
    protocols: tuple[str, ...] = ("base2novel", "cross_style", "dg")
    #: methods of the leave-one-style-out protocol (method specs, as ``methods``)
    loso_methods: tuple[str, ...] = ("zeroshot", "guidg[use_experts=false,loss=erm]", "guidg")
    #: styles used as targets in ``loso`` (empty: every style)
    loso_targets: tuple[str, ...] = ()


PROTOCOLS = ("base2novel", "cross_style", "dg", "loso")

#: Run ids and row fields of the toy bench (several methods per folder; the dataset field is called ``style``).
NAMING = RunNaming(
    {"base2novel": "b2n/{dataset}/{method}/seed{seed}", "source": "source/{dataset}/{method}/seed{seed}",
     "cross_style": "xs/{dataset}/{method}/seed{seed}", "dg": "dg/{dataset}/{method}/seed{seed}",
     "loso": "loso/{target}/{method}/seed{seed}"},
    fields={"*": {"dataset": "style"}, "loso": {"dataset": None, "target": "style"}})


def bench_provider(cfg: BenchConfig, data: str | Path) -> ToyWorldProvider:
    """The toy world of ``cfg`` under ``data``; each style has 2 x shots training images per class, so the seeded
    few-shot samples differ between seeds (and GuiDG's expert / aggregation halves each still hold ``shots``)."""
    return ToyWorldProvider(data, styles=cfg.styles, source_style=cfg.source_style, num_classes=cfg.num_classes,
                            train_per_class=2 * cfg.shots, test_per_class=cfg.test_per_class, data_seed=cfg.data_seed)


def _train_settings(cfg: BenchConfig) -> dict[str, Any]:
    return {"epochs": 10_000, "max_steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "optimizer": cfg.optimizer, "augment": cfg.augment, "precision": "auto", "device": "auto",
            "log_every": 20}


def run_bench(cfg: BenchConfig, out: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``; writes tables (md/csv/json) and PNG charts; returns the summary."""
    t0 = time.perf_counter()
    methods = list(cfg.methods or [m for m in list_methods() if not get_method_class(m).needs_domains])
    provider = bench_provider(cfg, Path(out) / "data")
    runner = ProtocolRunner(provider, Path(out), NAMING, methods=methods, seeds=cfg.seeds, shots=cfg.shots,
                            backbone=cfg.backbone, pretrained=cfg.pretrained, train=_train_settings(cfg),
                            progress=progress)
    if "base2novel" in cfg.protocols:
        runner.base2novel([provider.dataset_name(s, split=split) for split in cfg.splits for s in cfg.styles])
    others = [s for s in cfg.styles if s != cfg.source_style]
    evaluations = {p: {s: provider.dataset_name(s, dg=p == "dg") for s in others}
                   for p in ("cross_style", "dg") if p in cfg.protocols}
    if evaluations:
        runner.transfer(cfg.source_style, evaluations, evaluate_source=True)
    if "loso" in cfg.protocols:
        runner.multi_source([WORLD], targets=list(cfg.loso_targets or cfg.styles), methods=cfg.loso_methods,
                            step="loso")
    summary = write_reports(cfg, runner.out, runner.rows(), methods)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_json(runner.out / "summary.json", summary)
    return summary


#: what each base/new split means, for the report headings
SPLIT_DESCRIPTIONS = {
    "name": "new classes share shapes with base classes",
    "disjoint": "new classes share no shape with base classes",
    "colour": "base classes are one colour and differ only in shape; new classes are other shapes in other colours",
}


def _b2n_reports(cfg: BenchConfig, out: Path, rows: list[dict[str, Any]], methods: Sequence[str], split: str,
                 summary: dict[str, Any]) -> list[str]:
    """The base-to-novel table, paired comparisons and charts of one split (file names suffixed unless ``name``)."""
    prefix = "" if split == "name" else f"{split}-"
    names = {f"{prefix}{s}": s for s in cfg.styles}
    b2n = [{**r, "style": names[r["style"]]} for r in rows if r["protocol"] == "base2novel" and r["style"] in names]
    if not b2n:
        return []
    key, suffix = ("base2novel", "") if split == "name" else (f"base2novel_{split}", f"_{split}")
    table, text = report.b2n_table(b2n, methods=methods, groups=list(cfg.styles))
    summary[key] = table
    report.write_csv(out / f"{key}.csv", table)
    what = SPLIT_DESCRIPTIONS.get(split, split)
    md = [f"## Base-to-novel, {split} split ({what}; accuracy %, base / new / HM; mean over seeds)", "", text, ""]
    paired, ptext = report.paired_b2n_table(b2n, methods=methods, references=PAIRED_REFERENCES, groups=list(cfg.styles))
    if paired:
        summary[f"{key}_paired"] = paired
        report.write_csv(out / f"{key}_paired.csv", paired)
        md += [f"### Paired differences, {split} split (method minus reference on the same seeds; mean over styles; "
               "mean [95% t interval over seeds], points)", "", ptext, ""]
    groups = list(cfg.styles) + ["average"]
    report.bar_chart(out / f"b2n_hm{suffix}.png", table, group_key="style", metric="hm", methods=methods,
                     groups=groups, title=f"Toy world base-to-novel ({split} split): harmonic mean of base and new",
                     ylabel="HM (%)")
    report.bar_chart(out / f"b2n_new{suffix}.png", table, group_key="style", metric="new", methods=methods,
                     groups=groups, title=f"Toy world base-to-novel ({split} split): accuracy on new classes",
                     ylabel="new accuracy (%)")
    return md


#: Methods every other method is compared with on the same seeds (paired differences).
PAIRED_REFERENCES = ("ivlp", "zeroshot")


def write_reports(cfg: BenchConfig, out: Path, rows: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Tables (results.md, *.csv, summary.json) and charts (b2n_hm.png, b2n_base_new.png, transfer.png)."""
    summary: dict[str, Any] = {"config": asdict(cfg), "methods": list(methods)}
    md = [f"# Toy-world benchmark ({cfg.backbone}, {cfg.shots} shots, seeds {list(cfg.seeds)}, {cfg.steps} steps)", ""]
    for split in cfg.splits:
        md += _b2n_reports(cfg, out, rows, methods, split, summary)
    others = [s for s in cfg.styles if s != cfg.source_style]
    for proto, title in (("cross_style", f"Cross-style transfer (train on {cfg.source_style}, all classes; "
                                         f"test on each style's own classes)"),
                         ("dg", f"Domain generalisation (train on {cfg.source_style}; "
                                "same classes in held-out styles)")):
        sub = [r for r in rows if r["protocol"] == proto]
        if sub:
            table, text = report.accuracy_table(sub, group_key="style", methods=methods, groups=others)
            summary[proto] = table
            report.write_csv(out / f"{proto}.csv", table)
            md += [f"## {title}", "", text, ""]
            report.bar_chart(out / f"{proto}.png", table, group_key="style", metric="accuracy", methods=methods,
                             groups=others + ["average"], title=title)
    loso = [r for r in rows if r["protocol"] == "loso"]
    if loso:
        targets = [s for s in cfg.styles if any(r["style"] == s for r in loso)]
        loso_methods = [m for m in cfg.loso_methods if any(r["method"] == m for r in loso)]
        title = "Leave-one-style-out multi-source DG (train on the other styles; accuracy on the held-out style)"
        table, text = report.accuracy_table(loso, group_key="style", methods=loso_methods, groups=targets)
        summary["loso"] = table
        report.write_csv(out / "loso.csv", table)
        md += [f"## {title}", "", text, ""]
        report.bar_chart(out / "loso.png", table, group_key="style", metric="accuracy", methods=loso_methods,
                         groups=targets + ["average"], title=title)
    src = [r for r in rows if r["protocol"] == "source"]
    if src:
        table, text = report.accuracy_table(src, group_key="style", methods=methods, groups=[cfg.source_style])
        md += [f"## Source style accuracy ({cfg.source_style}, all classes)", "", text, ""]
    (out / "results.md").write_text("\n".join(md))
    report.write_csv(out / "runs.csv", rows)
    return summary
