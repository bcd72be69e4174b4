"""``promptclip bench toyworld``: a base-to-novel mini-benchmark on the toy world that can tell methods apart.

Three protocols, mirroring the field's (methods.md §2.2), with the toy world's styles as "datasets"/domains:

* **base-to-novel**, per style: each style has its own seeded set of colour-shape classes; few-shot training on the
  base half (CoOp rule on sorted class names), accuracy on the base and new halves of the test split, HM;
* **cross-style transfer** (as cross-dataset): train on the source style with all its classes, evaluate on every
  other style's own classes;
* **domain generalisation**: the same source-trained model on the source classes rendered in the held-out styles;
* **leave-one-style-out** (``loso``, multi-source DG as GuiDG / DomainBed evaluate): for each style as the target,
  train on the same classes rendered in every other style (one domain per style) and test on the target style.
  It runs ``loso_methods``: by default zero-shot, ERM fine-tuning of the image tower without experts, and GuiDG.
  Opt-in (``protocols`` includes it only when asked): about 12 minutes on 2 cores for 3 seeds.

Every registered single-source method runs the first three protocols (a method added to the registry appears
automatically; methods that need several source domains, such as GuiDG, run in ``loso``). Finished runs are recorded
in ``runs.jsonl`` and skipped when the command is run again (resume after an interruption).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from training.engine import TrainConfig
from training.errors import ConfigError
from training.protocols import report
from training.protocols.runlog import RunLog
from training.toyworld import world

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
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
    #: ``loso`` is opt-in (``--protocols loso``): it adds ~12 min on 2 cores, and the default stays within ~20 min
    protocols: tuple[str, ...] = ("base2novel", "cross_style", "dg")
    #: methods of the leave-one-style-out protocol (method specs, as ``methods``)
    loso_methods: tuple[str, ...] = ("zeroshot", "guidg[use_experts=false,loss=erm]", "guidg")
    #: styles used as targets in ``loso`` (empty: every style)
    loso_targets: tuple[str, ...] = ()

PROTOCOLS = ("base2novel", "cross_style", "dg", "loso")


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"disa"`` -> ("disa", {}); ``"disa[use_cir=false,mask_ratio=0.5]"`` -> ("disa", {...}) (for ablations).

    The whole spec string is the label the variant gets in the tables."""
    spec = spec.strip()
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigError(f"method spec {spec!r}: expected name[key=value,...]")
    name, body = spec[:-1].split("[", 1)
    overrides: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        if "=" not in item:
            raise ConfigError(f"method spec {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def _method_config(method: str, backbone: str) -> dict[str, Any]:
    """Depth options clamped to the backbone's blocks (toy-clip has 4; the papers' depth 9 assumes 12)."""
    import dataclasses

    from training.backbone import get_backbone_spec
    from training.methods import get_method_class

    spec = get_backbone_spec(backbone)
    if spec.model_cfg is None:
        return {}
    layers = min(int(spec.model_cfg["vision_cfg"]["layers"]), int(spec.model_cfg["text_cfg"]["layers"]))
    out = {}
    for f in dataclasses.fields(get_method_class(method).config_cls):
        if f.name.startswith("depth") and isinstance(f.default, int) and f.default > layers:
            out[f.name] = layers
    return out


def _train_cfg(cfg: BenchConfig, seed: int) -> TrainConfig:
    return TrainConfig(epochs=10_000, max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       optimizer=cfg.optimizer, augment=cfg.augment, seed=seed, precision="auto", device="auto", log_every=20)


def run_bench(cfg: BenchConfig, out: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``; writes tables (md/csv/json) and PNG charts; returns the summary."""
    from training.methods import get_method_class, list_methods
    from training.workflow import evaluate_artifact, train_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(cfg.methods or [m for m in list_methods() if not get_method_class(m).needs_domains])
    runs = RunLog(out / "runs.jsonl")
    t0 = time.perf_counter()
    data = out / "data"
    style_data: dict[str, Path] = {}
    for s in cfg.styles:
        classes = world.style_classes(s, num_classes=cfg.num_classes, seed=cfg.data_seed)
        world.write_style_dataset(data / s, s, classes=classes, train_per_class=2 * cfg.shots,  # few-shot sampling differs by seed
                                  test_per_class=cfg.test_per_class, seed=cfg.data_seed)
        style_data[s] = data / s
    source_classes = world.style_classes(cfg.source_style, num_classes=cfg.num_classes, seed=cfg.data_seed)
    dg_data = {}
    if "dg" in cfg.protocols:
        for s in cfg.styles:
            if s != cfg.source_style:
                world.write_style_dataset(data / f"dg-{s}", s, classes=source_classes, train_per_class=1,
                                          test_per_class=cfg.test_per_class, seed=cfg.data_seed + 1)
                dg_data[s] = data / f"dg-{s}"
    runs_dir = out / "runs"
    for seed in cfg.seeds:
        for method in methods:
            method_name, overrides = parse_method_spec(method)
            mcfg = {**_method_config(method_name, cfg.backbone), **overrides}
            if "base2novel" in cfg.protocols:
                for style in cfg.styles:
                    run_id = f"b2n/{style}/{method}/seed{seed}"
                    if run_id in runs:
                        continue
                    t = time.perf_counter()
                    res = train_run(method_name=method_name, data_root=style_data[style], out_dir=runs_dir / run_id,
                                    backbone_name=cfg.backbone, pretrained=cfg.pretrained, method_config=mcfg,
                                    train_config=_train_cfg(cfg, seed), shots=cfg.shots, subsample="base",
                                    overwrite=True, progress=progress)
                    m = res.metrics
                    runs.add({"run_id": run_id, "protocol": "base2novel", "style": style, "method": method,
                                  "seed": seed, "base": m["base_accuracy"], "new": m["new_accuracy"],
                                  "hm": m["harmonic_mean"], "seconds": round(time.perf_counter() - t, 1)})
                    log.info("%s: base %.1f new %.1f HM %.1f", run_id, 100 * m["base_accuracy"],
                             100 * m["new_accuracy"], 100 * m["harmonic_mean"])
            if {"cross_style", "dg"} & set(cfg.protocols):
                src_id = f"source/{cfg.source_style}/{method}/seed{seed}"
                pending = [s for s in cfg.styles if s != cfg.source_style and
                           (("cross_style" in cfg.protocols and f"xs/{s}/{method}/seed{seed}" not in runs) or
                            ("dg" in cfg.protocols and f"dg/{s}/{method}/seed{seed}" not in runs))]
                if not pending and src_id in runs:
                    continue
                res = train_run(method_name=method_name, data_root=style_data[cfg.source_style], out_dir=runs_dir / src_id,
                                backbone_name=cfg.backbone, pretrained=cfg.pretrained, method_config=mcfg,
                                train_config=_train_cfg(cfg, seed), shots=cfg.shots, subsample="all", overwrite=True,
                                progress=progress)
                if src_id not in runs:
                    runs.add({"run_id": src_id, "protocol": "source", "style": cfg.source_style, "method": method,
                                  "seed": seed, "accuracy": res.metrics.get("all_accuracy")})
                from training.artifact import load_prompt_artifact

                art = load_prompt_artifact(res.artifact)
                for s in pending:
                    if "cross_style" in cfg.protocols and f"xs/{s}/{method}/seed{seed}" not in runs:
                        r = evaluate_artifact(art, style_data[s], subsample="all")
                        runs.add({"run_id": f"xs/{s}/{method}/seed{seed}", "protocol": "cross_style", "style": s,
                                      "method": method, "seed": seed, "accuracy": r["accuracy"]})
                    if "dg" in cfg.protocols and f"dg/{s}/{method}/seed{seed}" not in runs:
                        r = evaluate_artifact(art, dg_data[s], subsample="all")
                        runs.add({"run_id": f"dg/{s}/{method}/seed{seed}", "protocol": "dg", "style": s,
                                      "method": method, "seed": seed, "accuracy": r["accuracy"]})
    if "loso" in cfg.protocols:
        _run_loso(cfg, data, runs_dir, runs, progress)
    summary = write_reports(cfg, out, list(runs.rows.values()), methods)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    report.write_json(out / "summary.json", summary)
    return summary


def loso_splits(cfg: BenchConfig, data: Path, target: str):
    """Leave-one-style-out data: the source classes rendered in every style but ``target`` (train, one domain per
    style) and in ``target`` (test)."""
    import dataclasses

    from training.data import DatasetSplits, read_image_folder

    classes = world.style_classes(cfg.source_style, num_classes=cfg.num_classes, seed=cfg.data_seed)
    train, test, names, template = [], [], None, "a photo of a {}."
    for s in cfg.styles:
        root = data / f"loso-{s}"
        # 2 x shots per class: the expert / aggregation halves (GuiDG) each still hold `shots` images
        world.write_style_dataset(root, s, classes=classes, train_per_class=2 * cfg.shots,
                                  test_per_class=cfg.test_per_class, seed=cfg.data_seed + 2)
        split = read_image_folder(root)
        names, template = split.classnames, split.template
        if s == target:
            test = split.test
        else:
            train += [dataclasses.replace(x, domain=s) for x in split.train]
    return DatasetSplits(classnames=names, train=train, test=test, name=f"toyworld-loso-{target}",
                         template=template)


def _run_loso(cfg: BenchConfig, data: Path, runs_dir: Path, runs: RunLog, progress: bool) -> None:
    from training.workflow import train_run

    targets = list(cfg.loso_targets or cfg.styles)
    for seed in cfg.seeds:
        for target in targets:
            splits = None
            for method in cfg.loso_methods:
                run_id = f"loso/{target}/{method}/seed{seed}"
                if run_id in runs:
                    continue
                splits = splits or loso_splits(cfg, data, target)
                method_name, overrides = parse_method_spec(method)
                t = time.perf_counter()
                res = train_run(method_name=method_name, data_root=splits, out_dir=runs_dir / run_id,
                                backbone_name=cfg.backbone, pretrained=cfg.pretrained,
                                method_config={**_method_config(method_name, cfg.backbone), **overrides},
                                train_config=_train_cfg(cfg, seed), shots=cfg.shots, subsample="all", overwrite=True,
                                progress=progress)
                acc = res.metrics["all_accuracy"]
                runs.add({"run_id": run_id, "protocol": "loso", "style": target, "method": method, "seed": seed,
                          "accuracy": acc, "seconds": round(time.perf_counter() - t, 1)})
                log.info("%s: target accuracy %.1f (%.0f s)", run_id, 100 * acc, time.perf_counter() - t)


def write_reports(cfg: BenchConfig, out: Path, rows: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Tables (results.md, *.csv, summary.json) and charts (b2n_hm.png, b2n_base_new.png, transfer.png)."""
    summary: dict[str, Any] = {"config": asdict(cfg), "methods": list(methods)}
    md = [f"# Toy-world benchmark ({cfg.backbone}, {cfg.shots} shots, seeds {list(cfg.seeds)}, {cfg.steps} steps)", ""]
    b2n = [r for r in rows if r["protocol"] == "base2novel"]
    if b2n:
        table, text = report.b2n_table(b2n, methods=methods, groups=list(cfg.styles))
        summary["base2novel"] = table
        report.write_csv(out / "base2novel.csv", table)
        md += ["## Base-to-novel (accuracy %, base / new / HM; mean over seeds)", "", text, ""]
        groups = list(cfg.styles) + ["average"]
        report.bar_chart(out / "b2n_hm.png", table, group_key="style", metric="hm", methods=methods, groups=groups,
                         title="Toy world base-to-novel: harmonic mean of base and new accuracy", ylabel="HM (%)")
        report.bar_chart(out / "b2n_new.png", table, group_key="style", metric="new", methods=methods, groups=groups,
                         title="Toy world base-to-novel: accuracy on new classes", ylabel="new accuracy (%)")
    others = [s for s in cfg.styles if s != cfg.source_style]
    for proto, title in (("cross_style", f"Cross-style transfer (train on {cfg.source_style}, all classes; "
                                         f"test on each style's own classes)"),
                         ("dg", f"Domain generalisation (train on {cfg.source_style}; same classes in held-out styles)")):
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
