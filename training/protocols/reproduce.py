"""``promptclip reproduce``: the field's protocols (methods.md §2.2) from a data folder to a paper-style table.

* ``base2novel``: per dataset and seed, 16-shot training on the base half of the classes, accuracy on the base and
  new halves of the test split, HM; averaged over seeds, then over datasets (HM of the averages).
* ``cross-dataset``: train on the source (ImageNet, all classes) once per seed, evaluate on each target dataset.
* ``domain-generalization``: the same source-trained model on ImageNet-V2 / -Sketch / -A / -R.
* ``few-shot``: all classes, K in {1, 2, 4, 8, 16} shots, accuracy per dataset and K (curves).
* ``multi-source-dg`` (GuiDG's protocol, methods.md §5.4): per DomainBed dataset, each domain in turn is the target;
  train on the other domains (one source domain each, ``Sample.domain``) and test on the target's 20% holdout
  split; ``imagenet-dg`` trains on ImageNet / -Sketch / -V2 and tests on ImageNet-A, ImageNet val and ImageNet-R.
  ``shots`` 0 is the full-data protocol (pair it with ``--set holdout_fraction=0.7`` for GuiDG).

The loops are those of :class:`training.protocols.runner.ProtocolRunner` (shared with ``promptclip bench
toyworld``): every finished (dataset, seed[, shots]) run is appended to ``OUT/runs.jsonl`` and skipped when the
command runs again, so an interrupted reproduction resumes. Few-shot selections are cached per dataset/shots/seed as
JSON. Datasets come from :func:`dataset_provider`: the registry names of ``training.data.list_datasets()`` plus the
toy world (``toyworld-<style>``, ``toyworld-disjoint-<style>`` (base/new split sharing no shape),
``toyworld-colour-<style>`` (base classes one colour, new ones differing in colour),
``toyworld-dg-<style>`` and, for ``multi-source-dg``, ``toyworld``; generated on
demand under ``ROOT/toyworld/``), so the whole pipeline can be exercised offline.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training import distributed
from training.errors import ConfigError
from training.protocols import report
from training.protocols.providers import (
    DEFAULT_B2N,
    DEFAULT_DG_TARGETS,
    DEFAULT_MULTI_SOURCE,
    PROTOCOLS,
    CatalogProvider,
    CombinedProvider,
    DatasetProvider,
)
from training.protocols.recipes import format_recipe, resolve_recipe
from training.protocols.runner import ProtocolRunner, RunNaming
from training.toyworld.provider import ToyWorldProvider

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_B2N", "DEFAULT_DG_TARGETS", "DEFAULT_MULTI_SOURCE", "NAMING", "PROTOCOLS", "REPORTED_B2N_AVERAGE",
           "REPORTED_MULTI_SOURCE", "ReproduceConfig", "dataset_provider", "run_reproduce", "write_tables"]

#: Appendix Table 8 of GuiDG (methods.md §5.8), full-data DomainBed DG with ViT-B/16, as *reported by the authors*:
#: per target domain in ``training.data.DOMAIN_DATASETS`` order, then the average.
REPORTED_MULTI_SOURCE = {
    "TerraIncognita": {"CLIP": (50.8, 23.4, 32.2, 28.8, 33.8), "ERM (WF)": (57.1, 54.8, 48.5, 43.6, 51.0),
                       "ERM (WF) + GuiDG": (59.2, 56.0, 50.1, 46.2, 52.9), "CLIPood": (73.1, 58.4, 57.7, 50.9, 60.0),
                       "CLIPood + GuiDG": (74.7, 59.8, 56.8, 52.3, 60.9)},
    "VLCS": {"CLIP": (100.0, 67.4, 73.5, 86.1, 81.8), "ERM (WF)": (100.0, 66.1, 76.8, 90.1, 83.3),
             "ERM (WF) + GuiDG": (100.0, 68.0, 77.4, 89.9, 83.8), "CLIPood": (98.9, 68.2, 78.8, 90.8, 84.2),
             "CLIPood + GuiDG": (99.3, 69.7, 77.9, 90.1, 84.3)},
    "PACS": {"CLIP": (97.6, 98.9, 100.0, 88.2, 96.2), "ERM (WF)": (97.8, 99.1, 100.0, 89.9, 96.7),
             "ERM (WF) + GuiDG": (98.5, 99.4, 100.0, 92.5, 97.6), "CLIPood": (99.0, 99.6, 100.0, 90.7, 97.3),
             "CLIPood + GuiDG": (98.3, 99.6, 100.0, 91.1, 97.3)},
}

#: Averages over the 11 datasets as *reported by their authors* (methods.md §6.1; ViT-B/16, 16 shots, 3 seeds).
REPORTED_B2N_AVERAGE = {
    "zeroshot": {"base": 69.34, "new": 74.22, "hm": 71.70, "source": "CLIP, as reported in the PromptSRC README"},
    "coop": {"base": 82.69, "new": 63.22, "hm": 71.66, "source": "CoOp, as reported in the PromptSRC README"},
    "ivlp": {"base": 84.21, "new": 71.79, "hm": 77.51, "source": "IVLP 4+4 depth 9, PromptSRC README"},
}


@dataclass(frozen=True)
class ReproduceConfig:
    protocol: str
    method: str
    root: str
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (1, 2, 3)
    shots: tuple[int, ...] = (16,)
    source: str = "ImageNet"
    backbone: str = "ViT-B-16"
    pretrained: str | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    #: ``"paper"``: the method's official recipe for the protocol (:mod:`training.protocols.recipes`) under
    #: ``train`` / ``method_config``; ``None``: only ``train`` / ``method_config`` over the TrainConfig defaults
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.recipe not in (None, "paper"):
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose paper or none")

    def resolved_recipe(self) -> dict[str, Any]:
        """The settings the runs train with (see :func:`~training.protocols.recipes.resolve_recipe`)."""
        if self.recipe == "paper":
            return resolve_recipe(self.method, self.protocol, self.backbone, train=self.train,
                                  method_config=self.method_config)
        return {"method": self.method, "protocol": self.protocol, "train": dict(self.train), "train_by_shots": {},
                "method_config": dict(self.method_config), "source": "none (--recipe none: the settings given)",
                "note": "", "overridden": []}


#: Run ids and row fields of ``promptclip reproduce`` (one method per output folder, so no method in the ids).
NAMING = RunNaming({
    "base2novel": "b2n/{dataset}/seed{seed}",
    "source": "source/{dataset}/seed{seed}",
    "cross-dataset": "cross-dataset/{dataset}/seed{seed}",
    "domain-generalization": "domain-generalization/{dataset}/seed{seed}",
    "multi-source-dg": "multi-source-dg/{dataset}/{target}/seed{seed}",
    "few-shot": "few-shot/{dataset}/{shots}shot/seed{seed}",
})


def dataset_provider(root: str | Path) -> DatasetProvider:
    """The benchmark catalog under ``root`` plus ``toyworld-<style>`` / ``toyworld-disjoint-<style>`` /
    ``toyworld-colour-<style>`` / ``toyworld-dg-<style>`` / ``toyworld``
    (generated under ``root/toyworld/``)."""
    return CombinedProvider(ToyWorldProvider(Path(root) / "toyworld", prefix="toyworld-"), CatalogProvider(root))


def run_reproduce(cfg: ReproduceConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) one protocol into ``out``; writes results.md, CSV, summary.json and PNG plots."""
    t0 = time.perf_counter()
    provider = dataset_provider(cfg.root)
    recipe = cfg.resolved_recipe()
    log.info("%s", format_recipe(recipe))
    runner = ProtocolRunner(provider, Path(out), NAMING, methods=(cfg.method,), seeds=cfg.seeds, shots=cfg.shots[0],
                            backbone=cfg.backbone, pretrained=cfg.pretrained, method_config=recipe["method_config"],
                            train=recipe["train"], train_by_shots=recipe["train_by_shots"], few_shot_cache=True,
                            progress=progress)
    datasets = cfg.datasets or provider.default_datasets(cfg.protocol)
    if cfg.protocol == "base2novel":
        runner.base2novel(datasets)
    elif cfg.protocol in ("cross-dataset", "domain-generalization"):
        runner.transfer(cfg.source, {cfg.protocol: {t: t for t in datasets}})
    elif cfg.protocol == "multi-source-dg":
        runner.multi_source(datasets)
    else:
        runner.few_shot(datasets, cfg.shots)
    if not distributed.is_main_process():  # under torchrun rank 0 alone writes the tables
        return {}
    summary = write_tables(cfg, runner.out, runner.rows())
    summary["recipe"] = recipe
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_json(runner.out / "summary.json", summary)
    return summary


def write_tables(cfg: ReproduceConfig, out: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in rows if r.get("method") == cfg.method]
    summary: dict[str, Any] = {"config": asdict(cfg)}
    title = (f"# {cfg.protocol}: {cfg.method} on {cfg.backbone} ({cfg.pretrained or 'default weights'}), "
             f"seeds {list(cfg.seeds)}")
    md = [title, ""]
    if cfg.protocol == "base2novel":
        groups = list(dict.fromkeys(r["dataset"] for r in rows))
        table, text = report.b2n_table(rows, group_key="dataset", methods=[cfg.method], groups=groups)
        summary["table"] = table
        report.write_csv(out / "base2novel.csv", table)
        md += ["Accuracy %, base / new / HM (HM of the seed-averaged base and new).", "", text, ""]
        ref = REPORTED_B2N_AVERAGE.get(cfg.method)
        if ref:
            md += [f"Reported by the authors (11-dataset average, not measured here): base {ref['base']}, "
                   f"new {ref['new']}, HM {ref['hm']} ({ref['source']}).", ""]
        report.bar_chart(out / "base2novel.png", table, group_key="dataset", metric="hm", methods=[cfg.method],
                         groups=groups + ["average"], title=f"{cfg.method}: base-to-novel HM per dataset",
                         ylabel="HM (%)")
    elif cfg.protocol in ("cross-dataset", "domain-generalization"):
        groups = list(dict.fromkeys(r["dataset"] for r in rows))
        table, text = report.accuracy_table(rows, group_key="dataset", methods=[cfg.method], groups=groups)
        summary["table"] = table
        report.write_csv(out / f"{cfg.protocol}.csv", table)
        md += [f"Source: {cfg.source} (all classes). Top-1 accuracy %, mean ± std over seeds.", "", text, ""]
        report.bar_chart(out / f"{cfg.protocol}.png", table, group_key="dataset", metric="accuracy",
                         methods=[cfg.method], groups=groups + ["average"], title=f"{cfg.method}: {cfg.protocol}")
    elif cfg.protocol == "multi-source-dg":
        md += [f"Leave one domain out: train on the other domains ({cfg.shots[0] or 'all'} shots), top-1 accuracy % on "
               f"the held-out domain, mean ± std over seeds.", ""]
        summary["tables"] = {}
        for name in dict.fromkeys(r["dataset"] for r in rows):
            sub = [r for r in rows if r["dataset"] == name]
            targets = list(dict.fromkeys(r["target"] for r in sub))
            table, text = report.accuracy_table(sub, group_key="target", methods=[cfg.method], groups=targets)
            summary["tables"][name] = table
            report.write_csv(out / f"multi-source-dg-{name}.csv", table)
            md += [f"## {name}", "", text, ""]
            ref = REPORTED_MULTI_SOURCE.get(name)
            if ref:
                md += ["Reported by the GuiDG authors (appendix Table 8, full data, ViT-B/16; not measured here): "
                       + "; ".join(f"{k} avg {v[-1]}" for k, v in ref.items()) + ".", ""]
            report.bar_chart(out / f"multi-source-dg-{name}.png", table, group_key="target", metric="accuracy",
                             methods=[cfg.method], groups=targets + ["average"],
                             title=f"{cfg.method}: multi-source DG on {name} (held-out domain)")
    else:
        for r in rows:
            r["group"] = f"{r['dataset']}@{r['shots']}"
        agg = report.aggregate(rows, ["dataset", "shots"], ["accuracy"])
        summary["table"] = agg
        report.write_csv(out / "few-shot.csv", agg)
        datasets = list(dict.fromkeys(r["dataset"] for r in agg))
        shots = sorted({r["shots"] for r in agg})
        md += ["Top-1 accuracy % (all classes), mean over seeds.", "",
               f"| dataset | {' | '.join(f'{k} shots' for k in shots)} |", "|---|" + "---|" * len(shots)]
        for d in datasets:
            cells = [next((f"{100 * r['accuracy']:.1f}" for r in agg if r["dataset"] == d and r["shots"] == k), "-")
                     for k in shots]
            md.append(f"| {d} | {' | '.join(cells)} |")
        _few_shot_plot(out / "few-shot.png", agg, datasets, shots, cfg.method)
    (out / "results.md").write_text("\n".join(md) + "\n")
    return summary


def _few_shot_plot(path: Path, agg: list[dict[str, Any]], datasets: list[str], shots: list[int], method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in datasets:
        pts = sorted((r["shots"], 100 * r["accuracy"]) for r in agg if r["dataset"] == d)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{method}: few-shot accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
