"""Several processes: sharded batches, and real ``torchrun`` runs (2 processes, gloo on the CPU) that must match
one process with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from safetensors.torch import load_file

from training import distributed
from training.data import DomainBalancedBatches
from training.distributed import DistState, ShardedBatches, shard_loader
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
#: fp32 on the CPU, same batches: the only difference is the order of the float additions (gloo sums the two
#: halves' gradients, one process sums the whole batch), ~1e-7 relative per step; 4-8 SGD steps stay far below this.
ATOL, RTOL = 1e-5, 1e-4


def _batches(n: int, size: int, seed: int = 0):
    loader = torch.utils.data.DataLoader(list(range(n)), batch_size=size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    return loader


@pytest.mark.parametrize(("n", "size", "world"), [(32, 8, 2), (30, 8, 2), (29, 8, 4), (17, 8, 2)])
def test_shards_make_up_the_single_process_batches(n, size, world):
    one = [b.tolist() for b in _batches(n, size)]
    shards = [[b.tolist() for b in shard_loader(_batches(n, size), DistState(rank=r, world_size=world))]
              for r in range(world)]
    assert all(len(s) == len(shard_loader(_batches(n, size), DistState(rank=r, world_size=world)))
               for r, s in enumerate(shards))
    kept = [b for b in one if len(b) >= world]
    assert len(shards[0]) == len(kept)
    for k, batch in enumerate(kept):
        parts = [shards[r][k] for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal shares
        usable = len(batch) - len(batch) % world
        assert sorted(sum(parts, [])) == sorted(batch[:usable])


@pytest.mark.parametrize(("n", "size", "world"), [(32, 8, 2), (29, 8, 4), (17, 8, 2), (5, 2, 4)])
def test_evaluation_shards_keep_every_item_once(n, size, world):
    shards = [list(ShardedBatches(_batches(n, size, seed=1).batch_sampler, r, world, drop_remainder=False))
              for r in range(world)]
    assert all(len(s) == len(ShardedBatches(_batches(n, size).batch_sampler, r, world, drop_remainder=False))
               for r, s in enumerate(shards))
    assert sorted(i for s in shards for b in s for i in b) == list(range(n))


def test_domain_balanced_batches_shard_exactly():
    sampler = DomainBalancedBatches(["a"] * 6 + ["b"] * 10, per_domain=2, seed=3)
    one = list(sampler)
    halves = [list(ShardedBatches(sampler, r, 2)) for r in range(2)]
    assert len(ShardedBatches(sampler, 0, 2)) == len(one) == len(halves[0])
    assert all(sorted(a + b) == sorted(g) for a, b, g in zip(*halves, one))


def test_a_global_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(ConfigError, match="multiple of 4"):
        len(shard_loader(_batches(10, 2), DistState(rank=0, world_size=4)))


def test_one_process_is_untouched():
    loader = _batches(10, 4)
    assert shard_loader(loader, DistState()) is loader
    assert distributed.setup("cpu") == DistState()  # no torchrun environment: nothing to join


def test_cuda_without_cuda_is_a_loud_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        distributed.setup("cuda")


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def _max_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a / "artifact" / "prompt_weights.safetensors")), \
        load_file(str(b / "artifact" / "prompt_weights.safetensors"))
    assert set(ta) == set(tb)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    return max(float((ta[n] - tb[n]).abs().max()) for n in ta)


def test_two_processes_match_one_process(tmp_path, shapes_root):
    """IVLP, DiSa (GPA) and GuiDG (2 expert stages + fine-tuning with BMA) under torchrun with 2 gloo processes
    give the artifact one process gives with the same global batch; an interrupted run resumes to the same
    result; rank 0 alone writes."""
    torch.set_num_threads(1)
    one, two = tmp_path / "one", tmp_path / "two"
    _torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(shapes_root), str(two)], tmp_path)
    ddp_worker.runs(str(shapes_root), one)
    diffs = {m: _max_diff(one / m, two / m) for m in ddp_worker.RUNS}
    diffs["resumed"] = _max_diff(two / "straight", two / "resumed")
    print("max abs difference, 2 processes vs 1:", diffs)
    guidg_stages = sorted(p.name for p in (two / "guidg" / "checkpoint").iterdir())
    assert guidg_stages == ["expert-0", "expert-1", "finetune"]
    for m in ddp_worker.RUNS:
        assert not list((two / m).rglob("*.tmp"))
        # the evaluation after training is sharded over the processes and summed: every test image once
        ma, mb = (json.loads((d / m / "artifact" / "metrics.json").read_text()) for d in (one, two))
        assert ma["all_num_images"] == mb["all_num_images"] > 0
        assert abs(ma["all_accuracy"] - mb["all_accuracy"]) <= 1.0 / ma["all_num_images"]  # a near-tie may flip


def test_promptclip_train_under_torchrun(tmp_path, shapes_root):
    """The documented command: ``torchrun --nproc_per_node=2 $(which promptclip) train ...``; one voice prints."""
    script = shutil.which("promptclip", path=str(Path(sys.executable).parent))
    assert script, "the promptclip console script is not installed next to this Python"
    res = _torchrun([script, "train", "--method", "coop", "--data", str(shapes_root), "--out", "run",
                     "--backbone", "tiny-test", "--pretrained", "none", "--shots", "2", "--epochs", "1",
                     "--batch-size", "8", "--device", "cpu", "--subsample", "all", "--set", "n_ctx=2"], tmp_path)
    assert res.stdout.count("artifact:") == 1
    assert (tmp_path / "run" / "artifact" / "prompt_weights.safetensors").is_file()
    assert "per process x 2 processes" in res.stderr


def test_promptclip_reproduce_under_torchrun(tmp_path):
    """``reproduce`` under torchrun: rank 0 renders the toy data and writes the run log and tables, once."""
    script = shutil.which("promptclip", path=str(Path(sys.executable).parent))
    res = _torchrun([script, "reproduce", "base2novel", "--method", "coop", "--root", "data", "--datasets",
                     "toyworld-clean", "--backbone", "tiny-test", "--pretrained", "none", "--max-steps", "2",
                     "--batch-size", "8", "--device", "cpu", "--seeds", "1", "--out", "repro", "--set", "n_ctx=2"],
                    tmp_path)
    assert res.stdout.count("| method |") == 1
    assert len((tmp_path / "repro" / "runs.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "repro" / "results.md").is_file()
