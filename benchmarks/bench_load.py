"""Load on a real server: req/s, p50 and p99 of ``/classify`` at several client counts, micro-batching on and off,
side by side in one run; then a worker's memory after a batch of large images (issue 16).

For each batching setting a ``bentoml serve`` process (``promptclip.server.ServerProcess``) serves the bundle; each
client is a thread with its own HTTP connection sending one JPEG (``--image``, default 160x120) per request, back to
back, for ``--duration`` seconds per client count. The memory probe sends ``/classify_batch`` with 8 large JPEGs
(decoded at draft scale) and one large PNG, and reads the resident memory of the server's processes before and after.

Run it alone on the machine (the clients share its CPUs with the server):

    python benchmarks/bench_load.py --backbone ViT-B-16 --clients 1,16,32,64 --duration 20 --out bench_out
    python benchmarks/bench_load.py --backbone tiny-test --clients 1,4 --duration 2     # a seconds-long check
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def run_level(url: str, clients: int, duration: float, blob: bytes) -> dict:
    """``clients`` threads sending ``/classify`` back to back for ``duration`` seconds."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def client() -> None:
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.post("/classify", files={"image": ("x.jpg", blob, "image/jpeg")}, data={"top_k": "3"})
                mine.append(time.perf_counter() - t)
                bad += r.status_code != 200
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "req_per_s": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}


def _rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MB (from /proc)."""
    pids = {pid}
    changed = True
    while changed:
        changed = False
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in pids:
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if ppid in pids:
                    pids.add(int(entry))
                    changed = True
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--bundle", help="an existing bundle instead of building one")
    p.add_argument("--clients", default="1,16,32,64")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per client count")
    p.add_argument("--image", default="160x120", help="WxH of the JPEG sent")
    p.add_argument("--threads", type=int, default=16, help="PROMPTCLIP_THREADS: request threads per worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--large", default="4000x3000", help="WxH of the large images of the memory probe")
    args = p.parse_args()

    import httpx
    from bench_startup import build_bundle

    from promptclip.server import ServerProcess

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else build_bundle(out, args.backbone)
    width, height = (int(v) for v in args.image.split("x"))
    blob = _jpeg(width, height)
    levels = [int(c) for c in args.clients.split(",")]
    results: dict = {"bundle": str(bundle), "image": args.image, "threads": args.threads, "workers": args.workers,
                     "duration_s": args.duration, "runs": {}}
    for batching in ("on", "off"):
        env = {"PROMPTCLIP_BATCHING": "1" if batching == "on" else "0", "PROMPTCLIP_THREADS": str(args.threads)}
        with ServerProcess(bundle, log_path=out / f"bench_load_{batching}.log", workers=args.workers,
                           state_dir=out / f"state-load-{batching}", extra_env=env) as server:
            server.wait_ready()
            run_level(server.url, 1, min(2.0, args.duration), blob)  # warm-up
            rows = [run_level(server.url, c, args.duration, blob) for c in levels]
            for r in rows:
                print(f"batching {batching:3} clients {r['clients']:3}: {r['req_per_s']:7.1f} req/s  p50 "
                      f"{r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}")
            results["runs"][batching] = rows
            if batching == "on":
                lw, lh = (int(v) for v in args.large.split("x"))
                before = _rss_mb(server.proc.pid)
                files = [("images", (f"{i}.jpg", _jpeg(lw, lh, seed=i), "image/jpeg")) for i in range(8)]
                with httpx.Client(base_url=server.url, timeout=300) as c:
                    r = c.post("/classify_batch", files=files)
                    r_png = c.post("/classify", files={"image": ("big.png", _png(lw, lh), "image/png")})
                after = _rss_mb(server.proc.pid)
                results["memory"] = {"large_image": args.large, "batch_status": r.status_code,
                                     "png_status": r_png.status_code, "rss_before_mb": before, "rss_after_mb": after}
                print(f"memory: server processes {before:.0f} MB -> {after:.0f} MB after a batch of 8 {args.large} "
                      f"JPEGs ({r.status_code}) and one {args.large} PNG ({r_png.status_code})")

    lines = ["| clients | batching on: req/s | p50 ms | p99 ms | batching off: req/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for on, off in zip(results["runs"]["on"], results["runs"]["off"]):
        lines.append(f"| {on['clients']} | {on['req_per_s']:.1f} | {on['p50_ms']:.0f} | {on['p99_ms']:.0f} | "
                     f"{off['req_per_s']:.1f} | {off['p50_ms']:.0f} | {off['p99_ms']:.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "bench_load.json").write_text(json.dumps(results, indent=1))
    (out / "bench_load.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
