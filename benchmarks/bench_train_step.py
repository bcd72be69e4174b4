"""Training-step throughput of each method beside ``ivlp`` in the same run (images/s and the ratio).

Each step is what the shared loop does: ``training_loss`` under autocast (bf16 on CUDA), backward, optimiser step.
Methods alternate in rounds so that machine noise hits all alike; the median round counts. Frozen-teacher
precomputation (``prepare_training``) runs once before timing, as in real training.

    python benchmarks/bench_train_step.py --methods ivlp,disa --backbone toy-clip --batch-sizes 32,128
    python benchmarks/bench_train_step.py --backbone ViT-B-16 --pretrained none --device cuda --batch-sizes 32,128
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ivlp,disa")
    p.add_argument("--backbone", default="toy-clip")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--batch-sizes", default="32,128")
    p.add_argument("--num-classes", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--loader-workers", default="0,2", help="DataLoader workers to measure beside the steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from training.backbone import create_backbone
    from training.engine import autocast_dtype, resolve_device
    from training.methods import TrainBatch, TrainContext, create_method, method_config_for_backbone

    device = resolve_device(args.device)
    amp = autocast_dtype("auto", device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ivlp" not in methods:
        methods.insert(0, "ivlp")
    results: dict = {"backbone": args.backbone, "device": str(device), "autocast": str(amp), "torch": torch.__version__,
                     "batch_sizes": {}}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        built = {}
        for name in methods:
            bb = create_backbone(args.backbone, args.pretrained, device=device)
            m = create_method(name, bb, method_config_for_backbone(name, args.backbone)).to(device)
            tok = bb.tokenizer()
            names = [f"class {i}" for i in range(args.num_classes)]
            ids = tok(m.prompt_texts(names, "a photo of a {}."))
            h, w = bb.image_size
            g = torch.Generator().manual_seed(0)
            x = torch.randn(bs, 3, h, w, generator=g).to(device)
            y = (torch.arange(bs) % args.num_classes).to(device)
            ctx = TrainContext(classnames=names, dataset_template="a photo of a {}.", class_token_ids=ids,
                               image_loader=[(x.cpu(), y.cpu())], tokenize=tok, device=device, out_dir=None)
            m.prepare_training(ctx)
            m.train()
            opt = torch.optim.SGD(list(m.trainable_parameters().values()), lr=1e-3, momentum=0.9)
            batch = TrainBatch(images=x, labels=y, class_token_ids=ids.to(device))
            built[name] = (m, opt, batch)

        def step(name: str, built: dict = built) -> None:
            m, opt, batch = built[name]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = m.training_loss(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for name in methods:  # warm-up (allocator, kernels)
            step(name)
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.rounds):
            for name in methods:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t) / args.steps)
        row = {}
        base = statistics.median(times["ivlp"])
        for name in methods:
            sec = statistics.median(times[name])
            row[name] = {"seconds_per_step": sec, "images_per_second": bs / sec, "ratio_vs_ivlp": base / sec}
            print(f"batch {bs:4d} {name:10s} {bs / sec:9.1f} img/s  ({1000 * sec:7.1f} ms/step)  "
                  f"{base / sec:.2f}x of ivlp")
        row["loader"] = _loader_throughput(args, bs, built["ivlp"][0])
        results["batch_sizes"][str(bs)] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_step.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_train_step.json'}")
    return 0


def _loader_throughput(args, batch_size: int, method) -> dict:
    """Images/s of the real input pipeline (PNG decode + train transform + collate) on toy-world files, with and
    without the decoded-image cache, for each worker count: to read beside the step throughput above."""
    import tempfile

    from training.backbone import create_backbone
    from training.data import ImageListDataset, make_loader
    from training.toyworld import world
    from training.workflow import train_transform

    bb = create_backbone(args.backbone, args.pretrained)
    root = Path(tempfile.gettempdir()) / "promptclip-bench-loader"
    classes = world.style_classes("clean", num_classes=20, seed=0)
    splits = world.write_style_dataset(root, "clean", classes=classes, train_per_class=32, test_per_class=1, seed=0)
    samples = splits.train  # 640 images
    tf = train_transform(bb, "crop_flip")
    out = {}
    for workers in [int(w) for w in args.loader_workers.split(",")]:
        for cache in (False, True):
            ds = ImageListDataset(samples, tf, cache_decoded=cache)
            if cache:
                for i in range(len(ds)):  # fill the cache (the first epoch in real training)
                    ds[i]
            loader = make_loader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, seed=0)
            t = time.perf_counter()
            n = sum(x.shape[0] for x, _ in loader)
            rate = n / (time.perf_counter() - t)
            out[f"workers{workers}_cache{int(cache)}"] = rate
            print(f"batch {batch_size:4d} loader workers={workers} cache={'on ' if cache else 'off'} {rate:9.1f} img/s")
    return out


if __name__ == "__main__":
    sys.exit(main())
