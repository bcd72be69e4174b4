"""The GPU check in one run: images/s at batch 1, 32 and 256 and batch-1 latency of the image tower for plain open_clip
fp16 (torch), our onnxruntime CUDA path at fp32 and fp16 (IO binding), and our TensorRT engine, with parity (cosine
to torch fp32 eager), side by side. Issue 14's goal for ViT-B/16: the product's GPU path >= 1.5x open_clip fp16 at
batch 256 and <= 2 ms at batch 1.

What a host lacks is skipped with the reason printed (no CUDA: torch fp16 and ORT CUDA; no TensorRT: the engine);
on a CPU host the onnxruntime CPU path and torch fp32 are measured instead, so the script proves itself in seconds:

    python benchmarks/gpu_check.py --backbone tiny-test --batches 1,4 --seconds 0.3 --out /tmp/gpu_check   # CPU
    python benchmarks/gpu_check.py --wheels .whl --out gpu_check       # a GPU host, ViT-B-16, < 8 minutes

``--wheels DIR`` installs the wheels in DIR (onnxruntime-gpu and what it needs; TensorRT and cuda-python) into
DIR/site with pip --no-index before anything imports onnxruntime. Weights are random (``--pretrained none``) unless
``--pretrained`` names a file: speed does not depend on them; parity is measured on the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _install_wheels(wheels: Path) -> None:
    target = wheels / "site"
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), *files], check=True)
    sys.path.insert(0, str(target))
    print(f"installed {len(files)} wheel(s) into {target} in {time.perf_counter() - t:.0f}s")


def _measure(run, batch: int, seconds: float, sync=lambda: None) -> dict[str, float]:
    """images/s over ~``seconds`` after 3 warm-up runs; median ms per call."""
    for _ in range(3):
        run()
    sync()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    return {"images_per_s": batch * len(times) / sum(times), "median_ms": statistics.median(times) * 1000}


def _cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant and batch")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--wheels", type=Path, help="install these wheels (onnxruntime-gpu, tensorrt, ...) first")
    p.add_argument("--exporter", default="torchscript", choices=["dynamo", "torchscript"])
    p.add_argument("--max-batch", type=int, default=None, help="TensorRT profile max (default: largest batch)")
    args = p.parse_args()
    if args.wheels:
        _install_wheels(args.wheels)
    t_start = time.perf_counter()

    import numpy as np
    import onnxruntime as ort
    import torch

    from export.bundle import export_bundle
    from serving.bundle import load_bundle
    from serving.runtime import OrtRuntime
    from training.artifact import load_prompt_artifact, save_prompt_artifact
    from training.backbone import create_backbone
    from training.methods import create_method, method_config_for_backbone

    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    print(f"host: {gpu or 'no CUDA GPU'}; torch {torch.__version__}; onnxruntime {ort.__version__} "
          f"{ort.get_available_providers()}")

    art_dir = out / f"artifact-{args.backbone}"
    if not (art_dir / "prompt_config.json").exists():
        bb = create_backbone(args.backbone, args.pretrained)
        method = create_method("ivlp", bb, method_config_for_backbone("ivlp", args.backbone))
        save_prompt_artifact(art_dir, method, bb, overwrite=True, trained_on={"classnames": ["a", "b", "c"]})
    bundles = {}
    for precision in ("fp32", "fp16"):
        bundles[precision] = out / f"bundle-{args.backbone}-{precision}"
        if not (bundles[precision] / "manifest.json").exists():
            t = time.perf_counter()
            export_bundle(art_dir, bundles[precision], exporter=args.exporter, precision=precision, overwrite=True)
            print(f"export {precision}: {time.perf_counter() - t:.0f}s")
    art = load_prompt_artifact(art_dir)
    method = art.method.eval()
    h, w = art.backbone.image_size
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, h, w)).astype(np.float32) for b in batches}
    probe = rng.standard_normal((8, 3, h, w)).astype(np.float32)
    device = "cuda" if cuda else "cpu"
    method.to(device)
    with torch.inference_mode():
        ref = method.encode_image(torch.from_numpy(probe).to(device)).float().cpu().numpy()  # torch fp32, prompts

    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}

    def add(name: str, run_factory, parity_fn, sync=lambda: None) -> None:
        try:
            row = {"parity_cosine": parity_fn()}
            for b in batches:
                row[f"batch{b}"] = _measure(run_factory(b), b, args.seconds, sync)
            rows[name] = row
        except Exception as exc:  # a variant that fails is reported, the others still run
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
        print(f"  {name}: {'done' if name in rows else skipped[name]}", flush=True)

    if cuda:
        plain = art.backbone.model.to("cuda").eval()  # plain open_clip, no prompts: what users compare with
        with torch.inference_mode():
            ref_plain = torch.nn.functional.normalize(plain.encode_image(torch.from_numpy(probe).cuda()), dim=-1)
            clip16 = plain.half()

            def torch_fp16(b):
                x = torch.from_numpy(inputs[b]).to("cuda").half()
                return lambda: torch.nn.functional.normalize(clip16.encode_image(x), dim=-1)

            def torch_parity() -> float:  # against the same open_clip model in fp32
                got = torch.nn.functional.normalize(clip16.encode_image(torch.from_numpy(probe).cuda().half()), dim=-1)
                return _cosine(got.float().cpu().numpy(), ref_plain.float().cpu().numpy())

            add("open_clip fp16 (torch)", torch_fp16, torch_parity, torch.cuda.synchronize)
        plain.float()
    else:
        skipped["open_clip fp16 (torch)"] = "needs a CUDA GPU (torch.cuda.is_available() is False)"

        def torch_fp32(b):
            x = torch.from_numpy(inputs[b])
            return lambda: method.encode_image(x)

        with torch.inference_mode():
            add("torch fp32 eager (CPU)", torch_fp32, lambda: 1.0)

    for precision in ("fp32", "fp16"):
        name = f"promptclip ORT CUDA {precision}"
        if not ort_cuda:
            skipped[name] = "onnxruntime has no CUDAExecutionProvider (bring onnxruntime-gpu wheels: --wheels)"
            continue
        rt = OrtRuntime(load_bundle(bundles[precision]), providers=["CUDAExecutionProvider"])
        add(name, lambda b, rt=rt: (lambda: rt.run_image(inputs[b])), lambda rt=rt: _cosine(rt.run_image(probe), ref))
    if not ort_cuda:
        rt = OrtRuntime(load_bundle(bundles["fp32"]), providers=["CPUExecutionProvider"])
        add("promptclip ORT CPU fp32", lambda b: (lambda: rt.run_image(inputs[b])),
            lambda: _cosine(rt.run_image(probe), ref))

    name = "promptclip TensorRT fp16"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        skipped[name] = "TensorRT is not installed (bring tensorrt and cuda-python wheels: --wheels)"
    else:
        if not cuda:
            skipped[name] = "needs a CUDA GPU"
        else:
            from serving.tensorrt_engines import build_engines
            from serving.tensorrt_runtime import TensorRTRuntime

            t = time.perf_counter()
            trt_major = int(tensorrt.__version__.split(".")[0])
            src = bundles["fp16" if trt_major >= 11 else "fp32"]
            try:
                build_engines(load_bundle(src), max_batch=args.max_batch or max(batches), precision="fp16",
                              progress=print)
                print(f"engine build: {time.perf_counter() - t:.0f}s")
                trt_rt = TensorRTRuntime(load_bundle(src))
                add(name, lambda b: (lambda: trt_rt.run_image(inputs[b])),
                    lambda: _cosine(trt_rt.run_image(probe), ref))
            except Exception as exc:
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"

    header = f"{'variant':<28}{'parity':>9}" + "".join(f"{'img/s b' + str(b):>13}" for b in batches) + \
        f"{'b1 ms':>9}"
    print(f"\n{args.backbone} image tower on {gpu or 'CPU'} ({time.perf_counter() - t_start:.0f}s in all)")
    print(header)
    for name, row in rows.items():
        b1 = row.get("batch1", {}).get("median_ms", float("nan"))
        print(f"{name:<28}{row['parity_cosine']:>9.5f}"
              + "".join(f"{row[f'batch{b}']['images_per_s']:>13.1f}" for b in batches) + f"{b1:>9.2f}")
    for name, why in skipped.items():
        print(f"{name:<28} skipped: {why}")
    (out / "gpu_check.json").write_text(json.dumps({"backbone": args.backbone, "gpu": gpu, "rows": rows,
                                                    "skipped": skipped, "batches": batches}, indent=2))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
