"""The disjoint and colour base/new splits of the toy world and the paired statistics of the benchmark tables."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from training.data import subsample_classes
from training.errors import DatasetError
from training.protocols import report
from training.protocols.reproduce import dataset_provider
from training.protocols.toybench import BenchConfig, run_bench
from training.toyworld import world
from training.toyworld.provider import ToyWorldProvider


def _shape(name: str) -> str:
    return name.split(" ")[1]


@pytest.mark.parametrize("n", [2, 7, 20, 60])
def test_disjoint_split_new_classes_share_no_shape_with_base(n):
    classes = world.disjoint_style_classes("sketch", num_classes=n, seed=3)
    names = [world.class_name(*c) for c in classes]
    base, new = names[:math.ceil(n / 2)], names[math.ceil(n / 2):]
    assert len(set(names)) == n and not {_shape(x) for x in base} & {_shape(x) for x in new}
    assert classes == world.disjoint_style_classes("sketch", num_classes=n, seed=3)  # seeded
    with pytest.raises(DatasetError, match="num_classes"):
        world.disjoint_style_classes("sketch", num_classes=121)


def _colour(name: str) -> str:
    return name.split(" ")[0]


@pytest.mark.parametrize("n", [2, 5, 10, 20])
def test_colour_split_base_is_one_colour_and_new_classes_differ_in_colour(n):
    classes = world.colour_split_classes("noisy", num_classes=n, seed=4)
    names = [world.class_name(*c) for c in classes]
    base, new = names[:math.ceil(n / 2)], names[math.ceil(n / 2):]
    assert len(set(names)) == n and len({_colour(x) for x in base}) == 1  # base classes differ only in shape
    assert len({_shape(x) for x in base}) == len(base)
    assert not {_shape(x) for x in base} & {_shape(x) for x in new}
    assert not {_colour(x) for x in base} & {_colour(x) for x in new}
    if n == 20:  # 10 new classes on the 2 shapes left: 5 colours per shape, told apart by colour alone
        assert sorted(Counter(_shape(x) for x in new).values()) == [5, 5]
    assert classes == world.colour_split_classes("noisy", num_classes=n, seed=4)  # seeded
    assert classes != world.colour_split_classes("noisy", num_classes=n, seed=5) or n == 2


@pytest.mark.parametrize("n", [1, 21, 40])
def test_colour_split_refuses_class_counts_it_cannot_hold(n):
    with pytest.raises(DatasetError, match=r"colour split must be in 2\.\.20"):
        world.colour_split_classes("noisy", num_classes=n)


def test_colour_datasets_put_base_first_for_the_coop_rule(tmp_path):
    toy = ToyWorldProvider(tmp_path, num_classes=6, train_per_class=2, test_per_class=1)
    assert toy.dataset_name("lowres", split="colour") == "colour-lowres"
    splits = toy.load("colour-lowres")
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert len({_colour(x) for x in base.classnames}) == 1
    assert not {_colour(x) for x in base.classnames} & {_colour(x) for x in new.classnames}
    assert dataset_provider(tmp_path / "r").load("toyworld-colour-clean").name == "toyworld-colour-clean"


def test_disjoint_datasets_put_base_first_for_the_coop_rule(tmp_path):
    toy = ToyWorldProvider(tmp_path, num_classes=6, train_per_class=2, test_per_class=1)
    splits = toy.load("disjoint-palette")
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert not {_shape(x) for x in base.classnames} & {_shape(x) for x in new.classnames}
    assert all(splits.classnames[s.label] == s.path.split("/")[-2].replace("_", " ") for s in splits.test)
    assert toy.dataset_name("palette", split="disjoint") == "disjoint-palette"
    with pytest.raises(DatasetError, match="split"):
        toy.dataset_name("palette", split="shape")
    # reproduce selects it by name too
    assert dataset_provider(tmp_path / "r").load("toyworld-disjoint-clean").name == "toyworld-disjoint-clean"


def _rows(method: str, hm_shift: float, seeds=(1, 2, 3), styles=("a", "b")) -> list[dict]:
    return [{"method": method, "seed": s, "style": g, "base": 0.8 + hm_shift + 0.01 * s, "new": 0.6 + hm_shift}
            for s in seeds for g in styles]


def test_paired_interval_is_a_t_interval_over_seeds():
    mean, lo, hi = report.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3), abs=1e-3) and lo < mean < hi
    assert math.isnan(report.paired_interval([0.5])[1]) and report.paired_interval([0.5])[0] == 0.5
    assert report.t_quantile_975(100) == 1.96
    with pytest.raises(ValueError, match="2 paired"):
        report.t_quantile_975(0)


def test_paired_table_compares_each_method_with_the_references_on_shared_seeds():
    rows = _rows("ivlp", 0.0) + _rows("zeroshot", -0.1) + _rows("disa", 0.05)
    rows += [{"method": "disa", "seed": 9, "style": "a", "base": 0.0, "new": 0.0}]  # unfinished seed: left out
    table, text = report.paired_b2n_table(rows, methods=["zeroshot", "ivlp", "disa"], references=["ivlp", "zeroshot"],
                                          groups=["a", "b"])
    by = {(r["method"], r["reference"]): r for r in table}
    assert set(by) == {("zeroshot", "ivlp"), ("disa", "ivlp"), ("ivlp", "zeroshot"), ("disa", "zeroshot")}
    d = by[("disa", "ivlp")]
    assert d["seeds"] == 3 and d["d_new"] == pytest.approx(0.05) and d["d_base"] == pytest.approx(0.05)
    assert d["d_new_low"] == pytest.approx(0.05) == pytest.approx(d["d_new_high"])  # a constant shift: no spread
    assert by[("zeroshot", "ivlp")]["d_hm"] < 0 < by[("ivlp", "zeroshot")]["d_hm"]
    assert "| disa | ivlp | 3 | +5.0 [+5.0, +5.0] |" in text
    assert report.paired_b2n_table(_rows("coop", 0.0), methods=["coop"], references=["ivlp"]) == ([], "")


def test_bench_runs_both_splits_and_writes_paired_tables(tmp_path):
    cfg = BenchConfig(methods=("zeroshot", "coop"), seeds=(1, 2), styles=("clean",), num_classes=4, shots=1,
                      test_per_class=1, steps=1, batch_size=4, backbone="tiny-test", protocols=("base2novel",))
    summary = run_bench(cfg, tmp_path)
    assert {r["style"] for r in summary["base2novel_disjoint"]} == {"clean", "average"}
    assert [(r["method"], r["reference"], r["seeds"]) for r in summary["base2novel_disjoint_paired"]] == [
        ("coop", "zeroshot", 2)]
    text = (tmp_path / "results.md").read_text()
    assert "disjoint split" in text and "Paired differences, name split" in text
    assert (tmp_path / "b2n_hm_disjoint.png").is_file() and (tmp_path / "base2novel_paired.csv").is_file()
