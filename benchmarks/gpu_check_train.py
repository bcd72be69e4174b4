"""The training GPU check, in one go (< 5 minutes on an H100/H200): every method's step on ViT-B/16 at batch 32 and
128 with bf16 (beside IVLP), the input pipeline on real-size JPEGs, and one real ``promptclip train`` of DiSa for a
few hundred steps on CUDA; then the issue's goals (IVLP >= 5,000 img/s at batch 128, DiSa >= 0.4x IVLP).

    python benchmarks/gpu_check_train.py --out gpu_check_train          # on the GPU host (random ViT-B/16 weights:
                                                                        # the speed is the same, nothing downloaded)
    python benchmarks/gpu_check_train.py --tiny --out /tmp/gpu_check    # seconds on a CPU: proves the script works

Writes ``OUT/gpu_check_train.json`` (all figures) and prints a summary; exits 1 when a goal is missed on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402

GOAL_IVLP_128 = 5000.0      #: img/s of IVLP at batch 128 on an H100/H200-class GPU
GOAL_DISA_RATIO = 0.4       #: DiSa's throughput as a fraction of IVLP's in the same run


def _write_image_folder(root: Path, classes: int, per_class: int) -> Path:
    """ROOT/train/<class>/*.jpg of real-size synthetic JPEGs (the same generator as the pipeline benchmark)."""
    for c in range(classes):
        folder = root / "train" / f"class_{c:03d}"
        if not folder.is_dir() or len(list(folder.glob("*.jpg"))) < per_class:
            bench.write_jpegs(folder, per_class, seed=c)
    return root


def train_disa(out: Path, *, tiny: bool, device: str, steps: int, pretrained: str) -> dict:
    """One real ``promptclip train`` of DiSa (its own process, as a user runs it); returns its metrics."""
    data = _write_image_folder(out / "disa_data", classes=4 if tiny else 100, per_class=10 if tiny else 16)
    run = out / "disa_run"
    cmd = [sys.executable, "-m", "promptclip", "train", "--method", "disa", "--data", str(data), "--out", str(run),
           "--backbone", "tiny-test" if tiny else "ViT-B-16", "--pretrained", pretrained, "--shots", "0",
           "--subsample", "all", "--epochs", "1000", "--max-steps", str(steps), "--batch-size", "8" if tiny else "32",
           "--device", device, "--precision", "fp32" if tiny else "bf16", "--num-workers", "0" if tiny else "8",
           "--no-eval", "--overwrite"]
    if tiny:
        cmd += ["--set", "depth_text=2", "--set", "depth_vision=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-4000:], sep="\n")
        raise SystemExit(f"promptclip train failed (exit {res.returncode}): {' '.join(cmd)}")
    metrics = json.loads((run / "artifact" / "metrics.json").read_text())
    return {"command": " ".join(cmd), "wall_seconds": round(wall, 1), "train_steps": metrics.get("train_steps"),
            "train_images_per_second": metrics.get("train_images_per_second"),
            "train_seconds": metrics.get("train_seconds"), "final_loss": metrics.get("final_loss")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny-test backbone on the CPU, seconds (a check of the script)")
    p.add_argument("--out", default="gpu_check_train")
    p.add_argument("--pretrained", default="none", help="ViT-B/16 weights (none: random, same speed)")
    p.add_argument("--disa-steps", type=int, default=300)
    p.add_argument("--compile", action="store_true", help="also time the steps through torch.compile")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.tiny:
        step_argv = ["--backbone", "tiny-test", "--device", "cpu", "--batch-sizes", "4,8", "--steps", "1",
                     "--rounds", "1", "--loader-images", "16", "--loader-workers", "0", "--loader-batch-size", "8"]
    else:
        step_argv = ["--backbone", "ViT-B-16", "--pretrained", args.pretrained, "--device", "cuda",
                     "--precision", "bf16", "--batch-sizes", "32,128", "--steps", "10", "--rounds", "3",
                     "--loader-images", "1024", "--loader-workers", "0,8,16", "--loader-batch-size", "128"]
    step_argv += ["--methods", bench.ALL_METHODS, "--num-classes", "100", "--out", str(out)]
    step_args = bench.parse_args(step_argv)
    report: dict = {"steps": bench.measure_steps(step_args)}
    bench.print_steps(report["steps"])
    if args.compile:
        report["steps_compiled"] = bench.measure_steps(bench.parse_args([*step_argv, "--compile"]))
        bench.print_steps(report["steps_compiled"])
    report["input_pipeline"] = bench.measure_loader(step_args, out / "jpegs")
    report["disa_train"] = train_disa(out, tiny=args.tiny, device="cpu" if args.tiny else "cuda",
                                      steps=4 if args.tiny else args.disa_steps, pretrained=args.pretrained)
    d = report["disa_train"]
    print(f"promptclip train disa: {d['train_steps']} steps, {d['train_images_per_second']} img/s in the loop, "
          f"{d['wall_seconds']} s wall (start-up included)")
    largest = report["steps"]["batch_sizes"][max(report["steps"]["batch_sizes"], key=int)]
    ivlp, disa_ratio = largest["ivlp"]["images_per_second"], largest["disa"]["ratio_vs_ivlp"]
    goals = {"ivlp_images_per_second_at_largest_batch": round(ivlp, 1), "ivlp_goal": GOAL_IVLP_128,
             "disa_ratio": round(disa_ratio, 3), "disa_goal": GOAL_DISA_RATIO,
             "met": ivlp >= GOAL_IVLP_128 and disa_ratio >= GOAL_DISA_RATIO}
    report["goals"] = goals
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check_train.json").write_text(json.dumps(report, indent=2))
    print(f"goals: IVLP {ivlp:.0f} img/s (goal {GOAL_IVLP_128:.0f} at batch 128), DiSa {disa_ratio:.2f}x IVLP "
          f"(goal {GOAL_DISA_RATIO}) -> {'met' if goals['met'] else 'NOT met'}; {report['seconds']} s in all; "
          f"wrote {out / 'gpu_check_train.json'}")
    return 0 if goals["met"] or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
