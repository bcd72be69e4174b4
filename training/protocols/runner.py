"""The one protocol runner behind ``promptclip reproduce`` and ``promptclip bench toyworld``.

:class:`ProtocolRunner` runs the field's protocols (methods.md §2.2) for a list of method specs over the datasets
of a :class:`~training.protocols.providers.DatasetProvider`:

* :meth:`~ProtocolRunner.base2novel`: train on the base half of the classes, accuracy on base and new (HM);
* :meth:`~ProtocolRunner.transfer`: train on a source dataset once per method and seed, evaluate the artifact on
  target datasets (cross-dataset and domain generalisation);
* :meth:`~ProtocolRunner.multi_source`: leave one domain out, train on the others (GuiDG / DomainBed);
* :meth:`~ProtocolRunner.few_shot`: all classes, accuracy per number of shots.

Every finished run is one row of ``OUT/runs.jsonl`` (:class:`~training.protocols.runlog.RunLog`) and is skipped
when the runner meets it again, so an interrupted run resumes. A preset (reproduce, the toy bench) chooses the
provider, the datasets and how its runs and row fields are named (:class:`RunNaming`), and writes its own tables
from :meth:`~ProtocolRunner.rows`.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import training.workflow as workflow
from training import distributed
from training.artifact import load_prompt_artifact
from training.data import DatasetSplits
from training.engine import TrainConfig
from training.errors import ConfigError, DatasetError
from training.methods import method_config_for_backbone
from training.protocols.providers import DatasetProvider
from training.protocols.runlog import RunLog

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RunNaming:
    """How a preset names its runs and row fields, so that each preset's existing ``runs.jsonl`` files resume.

    ``run_ids`` maps a step (a protocol name, or ``"source"`` for the source training of :meth:`transfer`) to a
    format string over ``dataset``, ``target``, ``method``, ``seed`` and ``shots``; the run's folder is
    ``OUT/runs/<run id>``. ``fields`` renames row keys per step (``"*"``: every step; ``None`` drops the key)."""

    run_ids: Mapping[str, str]
    fields: Mapping[str, Mapping[str, str | None]] = field(default_factory=dict)

    def run_id(self, step: str, **keys: Any) -> str:
        try:
            return self.run_ids[step].format(**keys)
        except KeyError as e:
            raise ConfigError(f"run naming has no run id for step {step!r} (or it needs the field {e})") from None

    def row(self, step: str, row: Mapping[str, Any]) -> dict[str, Any]:
        renames = {**self.fields.get("*", {}), **self.fields.get(step, {})}
        out: dict[str, Any] = {}
        for key, value in row.items():
            new = renames.get(key, key)
            if new is not None:
                out[new] = value
        return out


@dataclass
class ProtocolRunner:
    """Runs protocol steps into ``out`` and records every finished run (see the module docstring).

    ``methods`` are method specs (``name`` or ``name[key=value,...]``, :func:`parse_method_spec`); each gets
    ``method_config`` plus its overrides, with prompt depths fitted to the backbone. ``train`` is a
    :class:`~training.engine.TrainConfig` dict (the seed is set per run). ``few_shot_cache`` keeps the seeded
    few-shot selections in ``OUT/few_shot_cache/<dataset>``."""

    provider: DatasetProvider
    out: Path
    naming: RunNaming
    methods: Sequence[str]
    seeds: Sequence[int] = (1, 2, 3)
    shots: int = 16
    backbone: str = "ViT-B-16"
    pretrained: str | None = None
    method_config: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    #: TrainConfig values per number of shots, over ``train`` (a recipe's, e.g. CoOp's epochs per shot count)
    train_by_shots: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    few_shot_cache: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs = RunLog(self.out / "runs.jsonl")
        if distributed.state().enabled:  # under torchrun rank 0 prepares data (renders, caches) before the others
            self.provider = _MainFirst(self.provider)

    def rows(self) -> list[dict[str, Any]]:
        """Every finished run's row, in the order they were first recorded."""
        return list(self.runs.rows.values())

    # ------------------------------------------------------------------------------------------- checks
    def check_datasets(self, datasets: Sequence[str], *, multi_source: bool = False) -> None:
        """Read every dataset in ``datasets`` (files, split files, class names) before anything trains; raise one
        :class:`~training.errors.DatasetError` that lists every problem found, so a missing dataset is reported
        before hours of training on the others rather than after them.

        ``multi_source``: the names are multi-source datasets; each is read as its first leave-one-out task."""
        problems: list[str] = []
        names = list(dict.fromkeys(datasets))
        for name in names:
            try:
                if multi_source:
                    domains = self.provider.domains(name)
                    self.provider.multi_source_task(name, domains[0], self.seeds[0] if self.seeds else 1)
                else:
                    self.provider.load(name)
            except DatasetError as e:
                problems.append(f"[{name}] {e}")
        if problems:
            raise DatasetError(f"{len(problems)} of {len(names)} requested dataset(s) cannot be read; nothing was "
                               f"trained. Fix these first:\n\n" + "\n\n".join(problems))

    def _pending(self, step: str, keys: Sequence[Mapping[str, Any]]) -> bool:
        return any(self.naming.run_id(step, **k) not in self.runs for k in keys)

    # ------------------------------------------------------------------------------------------- protocols
    def base2novel(self, datasets: Sequence[str], *, methods: Sequence[str] | None = None,
                   step: str = "base2novel") -> None:
        """Per dataset, seed and method: train on the base classes; base / new accuracy and their HM."""
        self.check_datasets([n for n in datasets if self._pending(step, [
            {"dataset": n, "method": m, "seed": s} for s in self.seeds for m in methods or self.methods])])
        for name in datasets:
            data = None
            for seed in self.seeds:
                for method in methods or self.methods:
                    run_id = self.naming.run_id(step, dataset=name, method=method, seed=seed)
                    if run_id in self.runs:
                        continue
                    data = data or self.provider.load(name)
                    m, seconds = self._train(method, data, run_id, seed, shots=self.shots, subsample="base",
                                             cache=name)
                    self._record(step, run_id, {"dataset": name, "method": method, "seed": seed,
                                                "base": m["base_accuracy"], "new": m["new_accuracy"],
                                                "hm": m["harmonic_mean"], "seconds": seconds})
                    log.info("%s: base %.2f new %.2f HM %.2f", run_id, 100 * m["base_accuracy"],
                             100 * m["new_accuracy"], 100 * m["harmonic_mean"])

    def transfer(self, source: str, evaluations: Mapping[str, Mapping[str, str]], *, evaluate_source: bool = False,
                 methods: Sequence[str] | None = None) -> None:
        """Per seed and method: train on ``source`` (all classes) once, then evaluate the artifact on each target.

        ``evaluations`` maps a step (e.g. ``"cross-dataset"``) to ``{label: dataset name}``; the label names the
        row. With ``evaluate_source`` the source run is recorded too (its accuracy on the source test split)."""
        keys = [{"method": m, "seed": s} for s in self.seeds for m in methods or self.methods]
        targets = [name for step, ts in evaluations.items() for label, name in ts.items()
                   if self._pending(step, [{**k, "dataset": label} for k in keys])]
        untrained = [k for k in keys if not (self.out / "runs" / self.naming.run_id("source", dataset=source, **k)
                                             / "artifact" / "prompt_config.json").exists()]
        source_needed = (bool(targets) and bool(untrained)) or (evaluate_source and self._pending("source", [
            {**k, "dataset": source} for k in keys]))
        self.check_datasets(([source] if source_needed else []) + targets)
        for seed in self.seeds:
            for method in methods or self.methods:
                pending = [(step, label, name) for step, targets in evaluations.items()
                           for label, name in targets.items()
                           if self.naming.run_id(step, dataset=label, method=method, seed=seed) not in self.runs]
                src_id = self.naming.run_id("source", dataset=source, method=method, seed=seed)
                want_source = evaluate_source and src_id not in self.runs
                if not pending and not want_source:
                    continue
                artifact = self.out / "runs" / src_id / "artifact"
                if want_source or not (artifact / "prompt_config.json").exists():  # else: trained before a stop
                    m, seconds = self._train(method, self.provider.load(source), src_id, seed, shots=self.shots,
                                             subsample="all", cache=source, evaluate_splits=evaluate_source)
                    if want_source:
                        self._record("source", src_id, {"dataset": source, "method": method, "seed": seed,
                                                        "accuracy": m.get("all_accuracy"), "seconds": seconds})
                art = load_prompt_artifact(artifact, pretrained=self.pretrained)
                for step, label, name in pending:
                    r = workflow.evaluate_artifact(art, self.provider.load(name), subsample="all")
                    run_id = self.naming.run_id(step, dataset=label, method=method, seed=seed)
                    self._record(step, run_id, {"dataset": label, "method": method, "seed": seed,
                                                "accuracy": r["accuracy"]})

    def multi_source(self, datasets: Sequence[str], *, targets: Sequence[str] | None = None,
                     methods: Sequence[str] | None = None, step: str = "multi-source-dg") -> None:
        """Per dataset, seed, target domain (default: every domain) and method: train on the other domains, test
        on the target."""
        self.check_datasets(datasets, multi_source=True)
        for name in datasets:
            for seed in self.seeds:
                for target in targets or self.provider.domains(name):
                    task = None
                    for method in methods or self.methods:
                        run_id = self.naming.run_id(step, dataset=name, target=target, method=method, seed=seed)
                        if run_id in self.runs:
                            continue
                        task = task or self.provider.multi_source_task(name, target, seed)
                        m, seconds = self._train(method, task, run_id, seed, shots=self.shots, subsample="all")
                        self._record(step, run_id, {"dataset": name, "target": target, "method": method,
                                                    "seed": seed, "accuracy": m["all_accuracy"], "seconds": seconds})
                        log.info("%s: target accuracy %.2f (%.0f s)", run_id, 100 * m["all_accuracy"], seconds)

    def few_shot(self, datasets: Sequence[str], shots: Sequence[int], *, methods: Sequence[str] | None = None,
                 step: str = "few-shot") -> None:
        """Per dataset, number of shots, seed and method: train and test on all classes."""
        self.check_datasets([n for n in datasets if self._pending(step, [
            {"dataset": n, "method": m, "seed": s, "shots": k} for k in shots for s in self.seeds
            for m in methods or self.methods])])
        for name in datasets:
            data = None
            for k in shots:
                for seed in self.seeds:
                    for method in methods or self.methods:
                        run_id = self.naming.run_id(step, dataset=name, method=method, seed=seed, shots=k)
                        if run_id in self.runs:
                            continue
                        data = data or self.provider.load(name)
                        m, seconds = self._train(method, data, run_id, seed, shots=k, subsample="all", cache=name)
                        self._record(step, run_id, {"dataset": name, "method": method, "seed": seed, "shots": k,
                                                    "accuracy": m["all_accuracy"], "seconds": seconds})

    # ------------------------------------------------------------------------------------------- helpers
    def _train(self, method: str, data: DatasetSplits, run_id: str, seed: int, *, shots: int, subsample: str,
               cache: str | None = None, evaluate_splits: bool = True) -> tuple[dict[str, Any], float]:
        """One training run into ``OUT/runs/<run_id>``; returns its metrics and wall time in seconds."""
        name, overrides = parse_method_spec(method)
        t0 = time.perf_counter()
        res = workflow.train_run(
            method_name=name, data_root=data, out_dir=self.out / "runs" / run_id, backbone_name=self.backbone,
            pretrained=self.pretrained, overwrite=True, progress=self.progress,
            method_config=method_config_for_backbone(name, self.backbone, {**self.method_config, **overrides}),
            train_config=TrainConfig.from_dict({**self.train, **self.train_by_shots.get(shots, {}), "seed": seed}),
            shots=shots, subsample=subsample,
            evaluate_splits=evaluate_splits,
            few_shot_cache=self.out / "few_shot_cache" / cache if self.few_shot_cache and cache else None)
        return res.metrics, round(time.perf_counter() - t0, 1)

    def _record(self, step: str, run_id: str, row: Mapping[str, Any]) -> None:
        self.runs.add(self.naming.row(step, {"run_id": run_id, "protocol": step, **row}))


class _MainFirst:
    """A provider whose every call runs on rank 0 first, then on the other processes (which then find what rank 0
    prepared, e.g. a rendered toy-world dataset, instead of writing it at the same time)."""

    def __init__(self, provider: DatasetProvider) -> None:
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._provider, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with distributed.main_process_first():
                return attr(*args, **kwargs)
        return call
