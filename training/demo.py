"""``promptclip demo``: the whole product, offline, in a few minutes on 2 CPU cores.

Steps (each prints its result): make a small labelled image set -> train ``ivlp`` on the base classes ->
evaluate base and new -> export a bundle -> start ``bentoml serve`` on loopback -> classify an image over HTTP ->
add a class name at runtime -> classify again -> stop the server.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real ``bentoml serve`` process on loopback, started and stopped by pid."""

    def __init__(self, bundle: Path, *, port: int | None = None, state_dir: Path | None = None,
                 token: str | None = None, log_path: Path | None = None) -> None:
        from training.cli import serve_command, serve_env

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = serve_env(bundle, state_dir, token)
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(serve_command(self.port, "127.0.0.1"), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parent.parent),
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; log: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f}s; log: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log)"

    def stop(self) -> None:
        """SIGTERM the server's process group (bentoml starts workers), SIGKILL after 15 s."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _say(step: str, text: str) -> None:
    print(f"[demo] {step}: {text}", flush=True)


def _show(preds: list[dict]) -> str:
    return ", ".join(f"{p['name']} ({100 * p['score']:.1f}%)" for p in preds)


def run_demo(out: Path, *, port: int = 0, steps: int = 60, backbone: str = "tiny-test",
             pretrained: str | None = None) -> int:
    """Run the offline demo into ``out`` (recreated); returns 0 on success."""
    import httpx

    from export.bundle import export_bundle
    from training.data import make_shapes_dataset, read_image_folder, subsample_classes
    from training.engine import TrainConfig
    from training.workflow import train_run

    t0 = time.monotonic()
    out = Path(out)
    for sub in ("run", "bundle", "state"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    from training.backbone import get_backbone_spec

    size = int(get_backbone_spec(backbone).model_cfg["vision_cfg"]["image_size"]) if get_backbone_spec(backbone).model_cfg else 224
    splits = make_shapes_dataset(out / "data", train_per_class=16, test_per_class=8, size=size, seed=0)
    base = subsample_classes(splits, "base").classnames
    new = subsample_classes(splits, "new").classnames
    _say("data", f"{len(splits.classnames)} classes of coloured shapes in {out / 'data'}; base {base}; new {new}")

    cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=16, lr=0.01, precision="fp32", device="auto", seed=1,
                      log_every=10)
    res = train_run(method_name="ivlp", data_root=out / "data", out_dir=out / "run", backbone_name=backbone,
                    pretrained=pretrained, method_config=_fit_depth(backbone), train_config=cfg, shots=16,
                    subsample="base")
    m = res.metrics
    _say("weights", m["weights"])
    if "RANDOM" in m["weights"]:
        _say("note", "random weights: the accuracies below exercise the code path and mean nothing about CLIP")
    _say("train", f"ivlp, {m['train_steps']} steps in {m['train_seconds']:.1f}s "
                  f"({m['train_images_per_second']:.0f} img/s); train acc {100 * m['train_accuracy']:.1f}%")
    _say("eval", f"base acc {100 * m['base_accuracy']:.1f}%, new acc {100 * m['new_accuracy']:.1f}%, "
                 f"HM {100 * m['harmonic_mean']:.1f}% (chance {100 / len(base):.0f}%)")

    bundle = export_bundle(res.artifact, out / "bundle", class_names=base)
    manifest = json.loads((bundle / "manifest.json").read_text())
    par = manifest["parity"]
    _say("export", f"{bundle}: image parity max abs {par['image']['max_abs']:.1e}, text {par['text']['max_abs']:.1e}; "
                   f"classes {manifest['classes']['names']}")

    probe_class = new[0]
    test = read_image_folder(out / "data").test
    label = splits.classnames.index(probe_class)
    image_path = next(s.path for s in test if s.label == label)
    with ServerProcess(bundle, port=port or None, state_dir=out / "state", log_path=out / "server.log") as server:
        server.wait_ready()
        _say("serve", f"bentoml serve up at {server.url} (pid {server.proc.pid})")
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            before = _classify(client, image_path)
            _say("classify", f"{Path(image_path).name} (a {probe_class!r}) -> {_show(before)}")
            r = client.post("/add_classes", json={"names": [probe_class]})
            r.raise_for_status()
            _say("add class", f"added {probe_class!r} at runtime -> {r.json()}")
            after = _classify(client, image_path, top_k=len(base) + 1)
            rank = [p["name"] for p in after].index(probe_class) + 1 if probe_class in [p["name"] for p in after] else None
            if rank is None:
                raise RuntimeError(f"runtime-added class {probe_class!r} missing from the answer: {after}")
            _say("classify", f"{Path(image_path).name} again -> {_show(after[:3])}; the added class "
                             f"{probe_class!r} ranks {rank} of {len(after)}")
        _say("stop", f"stopping server pid {server.proc.pid}")
    _say("done", f"in {time.monotonic() - t0:.0f}s; artifacts under {out}")
    return 0


def _classify(client, image_path: str, top_k: int = 3) -> list[dict]:
    with open(image_path, "rb") as f:
        r = client.post("/classify", files={"image": (Path(image_path).name, f, "image/png")},
                        data={"top_k": str(top_k)})
    if r.status_code != 200:
        raise RuntimeError(f"/classify answered {r.status_code}: {r.text}")
    body = r.json()
    return body["predictions"] if isinstance(body, dict) else body


def _fit_depth(backbone: str) -> dict[str, int]:
    from training.backbone import get_backbone_spec

    spec = get_backbone_spec(backbone)
    if spec.model_cfg is None:
        return {}
    layers = min(int(spec.model_cfg["vision_cfg"]["layers"]), int(spec.model_cfg["text_cfg"]["layers"]))
    return {"depth_text": min(9, layers), "depth_vision": min(9, layers)}


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")))
