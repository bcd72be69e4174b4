"""`promptclip reproduce`: protocols end to end on a fake CoOp tree and on the toy world (tiny backbone), resume."""
from __future__ import annotations

import json

import pytest

from promptclip.cli import main
from promptclip_testing import make_fake_oxford_pets
from training.errors import DatasetError
from training.protocols.reproduce import ReproduceConfig, run_reproduce

TRAIN = {"max_steps": 2, "batch_size": 8, "device": "cpu", "precision": "fp32", "lr": 0.01}


def _cfg(protocol, root, **kw):
    return ReproduceConfig(protocol=protocol, method=kw.pop("method", "coop"), root=str(root), backbone="tiny-test",
                           method_config={"n_ctx": 4} if kw.pop("coop_cfg", True) else {}, train=TRAIN, **kw)


def test_base2novel_on_fake_coop_tree_resumes(tmp_path, monkeypatch):
    root = make_fake_oxford_pets(tmp_path / "data")
    out = tmp_path / "out"
    import training.workflow as wf

    real, calls = wf.train_run, {"n": 0}

    def flaky(**kw):  # the process dies during the second run
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(wf, "train_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_reproduce(_cfg("base2novel", root, datasets=("OxfordPets",), seeds=(1, 2)), out, progress=False)
    first = (out / "runs.jsonl").read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["run_id"] == "b2n/OxfordPets/seed1"
    monkeypatch.setattr(wf, "train_run", real)
    summary = run_reproduce(_cfg("base2novel", root, datasets=("OxfordPets",), seeds=(1, 2)), out, progress=False)
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first[0]  # seed 1 was not redone
    rows = {r["dataset"]: r for r in summary["table"]}
    assert set(rows) == {"OxfordPets", "average"} and rows["OxfordPets"]["seeds"] == 2
    md = (out / "results.md").read_text()
    assert "OxfordPets B / N / HM" in md and "Reported by the authors" in md
    assert (out / "base2novel.png").stat().st_size > 0 and (out / "base2novel.csv").exists()
    cache = list((out / "few_shot_cache" / "OxfordPets").glob("shot_16-seed_*.json"))
    assert len(cache) == 2


def test_toyworld_protocols_via_cli(tmp_path, capsys):
    root, out = tmp_path / "data", tmp_path / "out"
    common = ["--method", "ivlp", "--root", str(root), "--backbone", "tiny-test", "--set", "depth_text=2",
              "--set", "depth_vision=2", "--seeds", "1", "--max-steps", "2", "--batch-size", "8", "--device", "cpu",
              "--no-progress"]
    assert main(["reproduce", "base2novel", "--datasets", "toyworld-clean", "--out", str(out / "b2n"), *common]) == 0
    assert "toyworld-clean" in capsys.readouterr().out
    assert main(["reproduce", "domain-generalization", "--source", "toyworld-clean", "--datasets",
                 "toyworld-palette,toyworld-sketch", "--out", str(out / "dg"), *common]) == 0
    text = capsys.readouterr().out
    assert "toyworld-palette" in text and "toyworld-sketch" in text
    assert main(["reproduce", "few-shot", "--datasets", "toyworld-clean", "--shots", "1,2", "--out", str(out / "fs"),
                 *common]) == 0
    assert "| toyworld-clean |" in capsys.readouterr().out
    assert (out / "fs" / "few-shot.png").stat().st_size > 0


def test_unknown_dataset_and_protocol_errors(tmp_path, capsys):
    assert main(["reproduce", "base2novel", "--method", "coop", "--root", str(tmp_path), "--datasets", "Petz",
                 "--out", str(tmp_path / "o"), "--backbone", "tiny-test"]) == 2
    err = capsys.readouterr().err
    assert "OxfordPets" in err and "Traceback" not in err


def test_multi_source_dg_on_fake_pacs(tmp_path):
    """GuiDG's protocol: each PACS domain is left out in turn; table per target + the authors' numbers labelled."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("art_painting", "cartoon", "photo", "sketch"):
        for cls in ("dog", "guitar", "house"):
            for i in range(5):
                path = tmp_path / "data" / "PACS" / d / cls / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    cfg = ReproduceConfig(protocol="multi-source-dg", method="guidg", root=str(tmp_path / "data"), backbone="tiny-test",
                          datasets=("PACS",), seeds=(1,), shots=(2,), method_config={"n_ctx": 4},
                          train={**TRAIN, "max_steps": 1, "batch_size": 6})
    summary = run_reproduce(cfg, out, progress=False)
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["target"] for r in rows] == ["art_painting", "cartoon", "photo", "sketch"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    text = (out / "results.md").read_text()
    assert "## PACS" in text and "CLIPood + GuiDG avg 97.3" in text and "not measured here" in text
    assert (out / "multi-source-dg-PACS.png").is_file() and "PACS" in summary["tables"]


def test_every_dataset_is_checked_before_the_first_run(tmp_path, monkeypatch, capsys):
    """`reproduce --datasets OxfordPets,DTD,Food101` with DTD and Food101 missing: both are listed, nothing trains."""
    import training.workflow as wf

    root = make_fake_oxford_pets(tmp_path / "data")
    (root / "food-101" / "images").mkdir(parents=True)
    (root / "food-101" / "split_zhou_Food101.json").write_text("{not json")
    trained = []
    monkeypatch.setattr(wf, "train_run", lambda **kw: trained.append(kw))
    assert main(["reproduce", "base2novel", "--method", "coop", "--root", str(root), "--datasets",
                 "OxfordPets,DTD,Food101", "--out", str(tmp_path / "o"), "--backbone", "tiny-test"]) == 2
    err = capsys.readouterr().err
    assert trained == [] and "Traceback" not in err
    assert "2 of 3 requested dataset(s)" in err and "[DTD]" in err and "[Food101]" in err and "OxfordPets]" not in err
    assert "split_zhou_DescribableTextures.json" in err and "not valid JSON" in err
    # the same check guards the transfer protocols (source and targets) and multi-source DG
    with pytest.raises(DatasetError, match=r"(?s)\[ImageNet\].*\[ImageNetV2\]"):
        run_reproduce(_cfg("domain-generalization", root, datasets=("ImageNetV2",), seeds=(1,)), tmp_path / "dg")
    with pytest.raises(DatasetError, match=r"(?s)1 of 1 .*\[PACS\]"):
        run_reproduce(_cfg("multi-source-dg", root, method="guidg", datasets=("PACS",), seeds=(1,)), tmp_path / "ms")
    assert trained == []
