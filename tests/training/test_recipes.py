"""The papers' recipes: one table, valid for every method, used by `reproduce` by default, printed and recorded,
every value overridable, and the README's table generated from it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from promptclip.cli import main
from training.engine import TrainConfig, build_optimizer
from training.methods import get_method_class, list_methods
from training.protocols.recipes import RECIPES, recipe_for, recipe_table_markdown, resolve_recipe

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_recipe_builds_its_configs_and_names_a_source():
    for (method, protocol), recipe in RECIPES.items():
        TrainConfig.from_dict(dict(recipe.train))
        get_method_class(method).config_cls.from_dict(dict(recipe.method_config))
        assert recipe.source, (method, protocol)
    for method in list_methods():  # every registered method has a recipe for base2novel or its own protocol
        assert recipe_for(method, "base2novel").source


def test_the_papers_values():
    ivlp = recipe_for("ivlp", "base2novel").train
    assert (ivlp["batch_size"], ivlp["optimizer"], ivlp["lr"], ivlp["epochs"]) == (4, "sgd", 0.0025, 20)
    assert (ivlp["warmup_epochs"], ivlp["warmup_lr"], ivlp["momentum"]) == (1, 1e-5, 0.9)
    assert recipe_for("coop", "base2novel").train["epochs"] == 200
    xd = recipe_for("disa", "domain-generalization").method_config  # DG trains on ImageNet like cross-dataset
    assert (xd["gpa_mean"], xd["gpa_std"], xd["depth_text"]) == (6.0, 10.0, 3)
    g = recipe_for("guidg", "multi-source-dg")
    assert g.train["crop_scale"] == (0.7, 1.0)
    assert (g.method_config["expert_lr"], g.method_config["expert_momentum"], g.method_config["expert_weight_decay"],
            g.method_config["expert_epochs"]) == (1e-4, 0.0, 0.0, 31)
    assert "no official code" in recipe_for("disa", "base2novel").note
    assert "no official code" in recipe_for("isp", "base2novel").note


def test_sgd_honours_momentum_zero_and_warmup_epochs_are_steps():
    import torch

    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], TrainConfig(momentum=0.0, weight_decay=0.0, lr=1e-4))
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=(0.9, 0.5))
    assert TrainConfig.from_dict({"crop_scale": [0.7, 1]}).crop_scale == (0.7, 1.0)


def test_depths_fit_the_backbone_and_user_values_win():
    r = resolve_recipe("ivlp", "base2novel", "tiny-test", train={"lr": 0.01}, method_config={"n_ctx_text": 2})
    assert "depth_text" not in r["method_config"]  # 9 > tiny-test's 2 layers: left to depth fitting
    assert r["train"]["lr"] == 0.01 and r["train"]["batch_size"] == 4 and r["method_config"]["n_ctx_text"] == 2
    assert r["overridden"] == ["lr", "--set n_ctx_text"]
    assert resolve_recipe("ivlp", "base2novel", "ViT-B-16")["method_config"]["depth_text"] == 9


def test_readme_prints_the_table():
    text = README.read_text()
    block = re.search(r"<!-- recipes:begin -->\n(.*?)\n<!-- recipes:end -->", text, re.S)
    assert block and block.group(1) == recipe_table_markdown()


def test_reproduce_uses_prints_and_records_the_recipe(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reproduce", "base2novel", "--method", "ivlp", "--root", str(tmp_path / "data"), "--datasets",
                 "toyworld-clean", "--out", str(out), "--backbone", "tiny-test", "--seeds", "1", "--max-steps", "2",
                 "--device", "cpu", "--no-progress", "--momentum", "0.5", "--crop-scale", "0.5,1"]) == 0
    printed = capsys.readouterr().out
    assert "recipe for ivlp / base2novel" in printed and "vit_b16_c2_ep20_batch4_4+4ctx.yaml" in printed
    assert "overridden on the command line: crop_scale, device, max_steps, momentum" in printed
    recipe = json.loads((out / "summary.json").read_text())["recipe"]
    assert recipe["train"]["batch_size"] == 4 and recipe["train"]["lr"] == 0.0025 and recipe["train"]["momentum"] == 0.5
    assert recipe["train"]["crop_scale"] == [0.5, 1.0] and recipe["train"]["warmup_epochs"] == 1
    run = json.loads((out / "runs" / "b2n" / "toyworld-clean" / "seed1" / "artifact" / "training_config.json")
                     .read_text())
    assert run["train"]["batch_size"] == 4 and run["train"]["momentum"] == 0.5


def test_few_shot_epochs_follow_the_shot_count_unless_overridden(tmp_path, monkeypatch):
    import training.workflow as wf
    from training.protocols.reproduce import ReproduceConfig, run_reproduce

    r = resolve_recipe("coop", "few-shot", "tiny-test")
    assert r["train_by_shots"] == {1: {"epochs": 50}, 2: {"epochs": 100}, 4: {"epochs": 100}}
    assert resolve_recipe("coop", "few-shot", "tiny-test", train={"epochs": 3})["train_by_shots"] == {}
    epochs, real = {}, wf.train_run

    def spy(**kw):
        epochs[kw["shots"]] = kw["train_config"].epochs
        return real(**kw)

    monkeypatch.setattr(wf, "train_run", spy)
    cfg = ReproduceConfig(protocol="few-shot", method="coop", root=str(tmp_path / "data"), backbone="tiny-test",
                          datasets=("toyworld-clean",), seeds=(1,), shots=(1, 8), method_config={"n_ctx": 4},
                          train={"max_steps": 1, "device": "cpu"}, recipe="paper")
    run_reproduce(cfg, tmp_path / "out", progress=False)
    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())["recipe"]
    assert epochs == {1: 50, 8: 200} and recorded["train_by_shots"]["1"] == {"epochs": 50}
