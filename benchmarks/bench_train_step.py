"""Training-step throughput of each method beside ``ivlp`` in the same run, and the input pipeline's images/s.

Each step is the shared loop's own :func:`training.engine.train_step` (``training_loss`` under autocast, bf16 on
CUDA; backward; optimiser step), optionally through ``torch.compile``. Methods alternate in rounds so that machine
noise hits all alike; the median round counts. Frozen-teacher precomputation (``prepare_training``) runs once
before timing, as in real training. Also printed per method: the text rows encoded per step (the text encoder's
share of the work: one pass over the classes for prompted text, frozen text precomputed) and, on CUDA, peak memory.

The input pipeline is measured on real-size JPEGs (``--loader-images`` synthetic photos of about 500 x 375 px,
decoded, random-resized-cropped to 224 px, flipped, normalised, collated), for each worker count, with and without
the decoded-image cache:

    python benchmarks/bench_train_step.py --backbone ViT-B-16 --pretrained none --device cuda \
        --methods ivlp,coop,disa,isp,guidg --batch-sizes 32,128 --loader-workers 0,4,8
    python benchmarks/bench_train_step.py --backbone tiny-test --batch-sizes 4 --steps 1 --rounds 1 \
        --loader-images 16 --loader-workers 0      # a seconds-long check on the CPU
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL_METHODS = "ivlp,coop,disa,isp,guidg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ivlp,disa")
    p.add_argument("--backbone", default="toy-clip")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--num-classes", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile each method's loss (as train --compile)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--loader-workers", default="0,2", help="DataLoader workers for the input pipeline ('' = skip)")
    p.add_argument("--loader-images", type=int, default=256, help="JPEGs the input pipeline reads per measurement")
    p.add_argument("--loader-batch-size", type=int, default=128)
    p.add_argument("--loader-image-size", type=int, default=224, help="crop size of the input pipeline")
    return p.parse_args(argv)


def _method_list(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    return methods if "ivlp" in methods else ["ivlp", *methods]


def build_step(name: str, args: argparse.Namespace, batch_size: int, device, amp) -> dict[str, Any]:
    """A method ready to step on a fixed random batch: (method, optimizer, batch, loss module)."""
    import torch

    from training.backbone import create_backbone
    from training.distributed import TrainingLoss
    from training.methods import TrainBatch, TrainContext, create_method, get_method_class, method_config_for_backbone

    bb = create_backbone(args.backbone, args.pretrained, device=device)
    names = [f"class {i}" for i in range(args.num_classes)]
    overrides = get_method_class(name).config_for_data(method_config_for_backbone(name, args.backbone), names,
                                                       ["a", "b"])
    m = create_method(name, bb, overrides).to(device)
    tok = bb.tokenizer()
    ids = tok(m.prompt_texts(names, "a photo of a {}."))
    h, w = bb.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, h, w, generator=g).to(device)
    y = (torch.arange(batch_size) % args.num_classes).to(device)
    ctx = TrainContext(classnames=names, dataset_template="a photo of a {}.", class_token_ids=ids,
                       image_loader=[(x.cpu(), y.cpu())], tokenize=tok, device=device, out_dir=None)
    m.prepare_training(ctx)
    stages = m.training_stages()
    m.enter_stage(stages[-1], ctx)  # the last stage is the one that runs longest (GuiDG: fine-tuning)
    m.train()
    opt = torch.optim.SGD(list(m.trainable_parameters().values()), lr=1e-3, momentum=0.9)
    batch = TrainBatch(images=x, labels=y, class_token_ids=ids.to(device))
    module = torch.compile(TrainingLoss(m)) if args.compile else None
    return {"method": m, "opt": opt, "batch": batch, "module": module, "amp": amp, "stage": stages[-1].name}


def run_step(built: dict[str, Any]) -> None:
    from training.engine import train_step

    train_step(built["method"], built["opt"], built["batch"], amp_dtype=built["amp"], loss_module=built["module"])


def text_rows_per_step(built: dict[str, Any]) -> int:
    """Token rows the text encoder processes in one step (forward hook count)."""
    rows = [0]

    def count(_module, inputs):
        rows[0] += len(inputs[0])

    hook = built["method"].text_encoder.register_forward_pre_hook(count)
    try:
        run_step(built)
    finally:
        hook.remove()
    return rows[0]


def measure_steps(args: argparse.Namespace) -> dict[str, Any]:
    """{batch size: {method: images/s, ratio vs ivlp, ms/step, text rows/step, peak GiB}} on ``args.device``."""
    import torch

    from training.engine import autocast_dtype, resolve_device

    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)
    methods = _method_list(args.methods)
    out: dict[str, Any] = {"device": str(device), "autocast": str(amp), "compile": bool(args.compile),
                           "backbone": args.backbone, "torch": torch.__version__, "batch_sizes": {}}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        built = {name: build_step(name, args, bs, device, amp) for name in methods}
        rows = {name: text_rows_per_step(built[name]) for name in methods}  # also the warm-up step
        peak = {}
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.rounds):
            for name in methods:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                for _ in range(args.steps):
                    run_step(built[name])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peak[name] = torch.cuda.max_memory_allocated() / 2**30
                times[name].append((time.perf_counter() - t) / args.steps)
        base = statistics.median(times["ivlp"])
        row = {}
        for name in methods:
            sec = statistics.median(times[name])
            row[name] = {"images_per_second": bs / sec, "ratio_vs_ivlp": base / sec, "ms_per_step": 1000 * sec,
                         "text_rows_per_step": rows[name], "stage": built[name]["stage"],
                         "peak_gib": round(peak[name], 2) if name in peak else None}
        out["batch_sizes"][str(bs)] = row
        del built
    return out


def print_steps(result: dict[str, Any]) -> None:
    """One line per method, batch sizes side by side (images/s and the ratio to IVLP)."""
    sizes = list(result["batch_sizes"])
    print(f"train step, {result['backbone']} on {result['device']} (autocast {result['autocast']}, "
          f"compile {result['compile']})")
    print(f"{'method':10s} " + " ".join(f"{'batch ' + s + ' img/s':>17s} {'x ivlp':>7s}" for s in sizes)
          + f" {'text rows/step':>15s}")
    for name in result["batch_sizes"][sizes[0]]:
        cells = [result["batch_sizes"][s][name] for s in sizes]
        print(f"{name:10s} " + " ".join(f"{c['images_per_second']:17.1f} {c['ratio_vs_ivlp']:7.2f}" for c in cells)
              + f" {cells[-1]['text_rows_per_step']:15d}")


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields + texture noise, quality 90) of ``size``; reused when present."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img_{i:05d}.jpg" for i in range(n)]
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for path in paths:
        if path.exists():
            continue
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([127 + 90 * np.sin(xx / (40 + 9 * k) + a * k + b) * np.cos(yy / (55 + 7 * k) + c)
                         for k in range(1, 4)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
    return paths


def measure_loader(args: argparse.Namespace, root: Path | None = None) -> dict[str, float]:
    """Images/s of the input pipeline on real-size JPEGs: decode + random resized crop to ``loader_image_size`` +
    flip + normalise + collate, per worker count, decoded-image cache off and on (filled first, as after epoch 1)."""
    import tempfile
    from types import SimpleNamespace

    from training.backbone import get_backbone_spec
    from training.data import ImageListDataset, Sample, make_loader
    from training.workflow import train_transform

    workers = [int(w) for w in args.loader_workers.split(",") if w.strip()]
    if not workers:
        return {}
    root = root or Path(tempfile.gettempdir()) / "promptclip-bench-jpegs"
    samples = [Sample(str(p), i % 10) for i, p in enumerate(write_jpegs(root, args.loader_images))]
    spec = get_backbone_spec("ViT-B-16")
    size = args.loader_image_size
    tf = train_transform(SimpleNamespace(preprocess={"image_size": [size, size], "mean": list(spec.mean),
                                                     "std": list(spec.std)}), "crop_flip")
    out = {}
    for n_workers in workers:
        for cache in (False, True):
            ds = ImageListDataset(samples, tf, cache_decoded=cache)
            if cache:
                for i in range(len(ds)):
                    ds.load_image(i)
            loader = make_loader(ds, batch_size=args.loader_batch_size, shuffle=True, num_workers=n_workers, seed=0)
            t = time.perf_counter()
            n = sum(x.shape[0] for x, _ in loader)
            rate = n / (time.perf_counter() - t)
            out[f"workers{n_workers}_cache{int(cache)}"] = rate
            print(f"input pipeline: {n} JPEGs 500x375 -> {size} px crops, workers={n_workers:2d} "
                  f"cache={'on ' if cache else 'off'} {rate:9.1f} img/s")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = measure_steps(args)
    print_steps(result)
    result["input_pipeline"] = measure_loader(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_step.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench_train_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
