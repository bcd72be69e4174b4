"""Run by the DDP tests under ``torchrun --nproc_per_node=2`` (gloo, CPU): trains IVLP, DiSa and GuiDG on the tiny
shapes set and (IVLP) resumes an interrupted run. ``python tests/ddp_worker.py SHAPES_ROOT OUT``; the test runs the
same :func:`runs` in one process and compares the artifacts."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import distributed  # noqa: E402
from training.data import read_image_folder  # noqa: E402
from training.engine import TrainConfig  # noqa: E402
from training.workflow import train_run  # noqa: E402

#: deterministic data path (no augmentation), fp32, 2 steps of 8 images per epoch
CFG = TrainConfig(epochs=2, batch_size=8, lr=0.01, precision="fp32", device="cpu", seed=1, augment="none",
                  log_every=1)
RUNS = {
    "ivlp": {"depth_text": 2, "depth_vision": 2},
    "disa": {"depth_text": 2, "depth_vision": 2, "gpa_mean": 2.0},
    # SGD in stage 2 too: AdamW's scale-free update turns float-order noise in near-zero gradients into +-lr steps
    "guidg": {"n_ctx": 4, "finetune_lr": 1e-3, "finetune_optimizer": "sgd"},
}


def data(shapes_root: str, method: str):
    splits = read_image_folder(shapes_root)
    if method != "guidg":
        return splits
    return dataclasses.replace(splits, train=[dataclasses.replace(s, domain="ab"[i % 2])
                                              for i, s in enumerate(splits.train)])


def run(shapes_root: str, out: Path, method: str, cfg: TrainConfig = CFG, **kwargs):
    return train_run(method_name=method, data_root=data(shapes_root, method), out_dir=out, backbone_name="tiny-test",
                     method_config=RUNS[method], train_config=cfg, shots=2, subsample="all", progress=False, **kwargs)


def runs(shapes_root: str, out: Path) -> None:
    """Every run the DDP test compares (in one process or under torchrun)."""
    for method in RUNS:
        run(shapes_root, out / method, method)
    # resume: a run stopped after epoch 1 (constant lr, so the schedule does not depend on the run's length) ...
    const = dataclasses.replace(CFG, scheduler="constant")
    run(shapes_root, out / "resumed", "ivlp", dataclasses.replace(const, epochs=1))
    if distributed.is_main_process():  # ... whose artifact and finished-stage marker are gone (interrupted)
        shutil.rmtree(out / "resumed" / "artifact")
        for p in (out / "resumed" / "checkpoint").glob("stage_done.*"):
            p.unlink()
    distributed.barrier()
    run(shapes_root, out / "resumed", "ivlp", const)
    run(shapes_root, out / "straight", "ivlp", const)


if __name__ == "__main__":
    torch.set_num_threads(1)
    with distributed.session("cpu"):
        assert distributed.state().world_size == 2, distributed.state()
        runs(sys.argv[1], Path(sys.argv[2]))
