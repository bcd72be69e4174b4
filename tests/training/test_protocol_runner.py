"""The one protocol runner: `bench toyworld` and `reproduce` are presets over ProtocolRunner with dataset providers."""
from __future__ import annotations

import json

import pytest

from training.methods import method_config_for_backbone
from training.protocols.reproduce import ReproduceConfig, dataset_provider, run_reproduce
from training.protocols.runner import ProtocolRunner, RunNaming
from training.protocols.toybench import BenchConfig, run_bench
from training.toyworld.provider import WORLD, ToyWorldProvider


def test_toy_bench_and_reproduce_run_the_same_runner_and_rows(tmp_path, monkeypatch):
    """The toy world through `reproduce base2novel` (toyworld-clean) and through `bench toyworld` (style clean):
    the same runner, the same data (20 classes, 32 + 8 images per class, data seed 0), the same numbers."""
    calls = []
    real = ProtocolRunner.base2novel

    def spy(self, datasets, **kw):
        calls.append((type(self.provider).__name__, list(datasets)))
        return real(self, datasets, **kw)

    monkeypatch.setattr(ProtocolRunner, "base2novel", spy)
    bench = BenchConfig(methods=("coop",), seeds=(1,), styles=("clean",), steps=2, batch_size=8,
                        backbone="tiny-test", protocols=("base2novel",), splits=("name",))
    run_bench(bench, tmp_path / "bench")
    train = {"epochs": 10_000, "max_steps": 2, "batch_size": 8, "lr": bench.lr, "optimizer": bench.optimizer,
             "augment": bench.augment, "precision": "auto", "device": "auto", "log_every": 20}
    run_reproduce(ReproduceConfig(protocol="base2novel", method="coop", root=str(tmp_path / "data"),
                                  datasets=("toyworld-clean",), seeds=(1,), backbone="tiny-test", train=train),
                  tmp_path / "repro", progress=False)
    assert calls == [("ToyWorldProvider", ["clean"]), ("CombinedProvider", ["toyworld-clean"])]
    [b] = [json.loads(x) for x in (tmp_path / "bench" / "runs.jsonl").read_text().splitlines()]
    [r] = [json.loads(x) for x in (tmp_path / "repro" / "runs.jsonl").read_text().splitlines()]
    # each preset keeps its own run ids and row fields (its existing runs.jsonl files resume) ...
    assert b["run_id"] == "b2n/clean/coop/seed1" and b["style"] == "clean" and "dataset" not in b
    assert r["run_id"] == "b2n/toyworld-clean/seed1" and r["dataset"] == "toyworld-clean"
    # ... and measures the same thing
    assert [b[k] for k in ("base", "new", "hm")] == [r[k] for k in ("base", "new", "hm")]


def test_toy_provider_names_and_leave_one_style_out(tmp_path):
    provider = dataset_provider(tmp_path)
    own, dg = provider.load("toyworld-sketch"), provider.load("toyworld-dg-sketch")
    source = provider.load("toyworld-clean")
    assert dg.classnames == source.classnames != own.classnames  # dg: the source classes drawn in the new style
    assert (tmp_path / "toyworld" / "dg-sketch").is_dir() and own.name == "toyworld-sketch"
    assert provider.domains(WORLD) == ["clean", "sketch", "noisy", "lowres", "palette"]

    toy = ToyWorldProvider(tmp_path / "toy", styles=("clean", "sketch", "palette"), num_classes=4,
                           train_per_class=2, test_per_class=1)
    task = toy.multi_source_task(WORLD, "palette", seed=1)
    assert {s.domain for s in task.train} == {"clean", "sketch"} and len(task.test) == 4
    assert toy.default_datasets("domain-generalization") == ("dg-sketch", "dg-palette")
    assert toy.default_datasets("multi-source-dg") == (WORLD,)


def test_run_naming_renames_fields_per_step():
    naming = RunNaming({"loso": "loso/{target}/{method}/seed{seed}"},
                       fields={"*": {"dataset": "style"}, "loso": {"dataset": None, "target": "style"}})
    assert naming.run_id("loso", target="palette", method="guidg", seed=2) == "loso/palette/guidg/seed2"
    assert naming.row("loso", {"run_id": "x", "dataset": WORLD, "target": "palette"}) == {"run_id": "x",
                                                                                         "style": "palette"}
    assert naming.row("b2n", {"dataset": "clean", "hm": 0.5}) == {"style": "clean", "hm": 0.5}


def test_method_configs_fit_the_backbone_through_the_method_hook():
    assert method_config_for_backbone("ivlp", "toy-clip") == {"depth_text": 4, "depth_vision": 4}
    assert method_config_for_backbone("ivlp", "tiny-test", {"depth_text": 1}) == {"depth_text": 1, "depth_vision": 2}
    assert method_config_for_backbone("coop", "tiny-test", {"n_ctx": 4}) == {"n_ctx": 4}
    assert method_config_for_backbone("ivlp", "ViT-B-16") == {}  # 12 layers (or unknown): the defaults fit


@pytest.mark.parametrize("name", ["toyworld", "toyworld-nostyle"])
def test_toy_names_that_are_not_datasets(tmp_path, name):
    from training.errors import DatasetError

    with pytest.raises(DatasetError, match="toyworld|Petz|dataset"):
        dataset_provider(tmp_path).load(name)
