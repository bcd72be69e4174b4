"""``promptclip demo``: the whole product, offline, in a few minutes on 2 CPU cores.

Steps (each prints its result): make a small labelled image set -> train ``ivlp`` on the base classes ->
evaluate base and new -> export a bundle (with open-set calibration from the held-out images) -> start
``bentoml serve`` on loopback -> classify an image over HTTP (prediction, confidence, none_of_these) -> add a class
name at runtime -> classify again -> stop the server.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import httpx

from export.bundle import export_bundle
from promptclip.server import ServerProcess
from training.data import subsample_classes
from training.engine import TrainConfig
from training.methods import method_config_for_backbone
from training.toyworld import world
from training.workflow import train_run

log = logging.getLogger(__name__)


def _say(step: str, text: str) -> None:
    print(f"[demo] {step}: {text}", flush=True)


def _show(preds: list[dict]) -> str:
    return ", ".join(f"{p['name']} ({100 * p['score']:.1f}%" + (
        f", confidence {p['confidence']:.2f})" if p.get("confidence") is not None else ")") for p in preds)


#: demo classes (none held out from toy-clip's pretraining); base = first half of the sorted names (CoOp rule)
DEMO_CLASSES = (("blue", "circle"), ("green", "triangle"), ("orange", "star"), ("pink", "heart"),
                ("purple", "hexagon"), ("red", "circle"), ("teal", "diamond"), ("yellow", "square"))
#: a colour-shape combination toy-clip never saw in pretraining, added at runtime
RUNTIME_CLASS = ("green", "crescent")


def run_demo(out: Path, *, port: int = 0, steps: int = 60, backbone: str = "toy-clip",
             pretrained: str | None = None) -> int:
    """Run the offline demo into ``out``; returns 0 on success."""
    t0 = time.monotonic()
    out = Path(out)
    for sub in ("run", "bundle", "state"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    splits = world.write_style_dataset(out / "toyworld_data", "clean", classes=DEMO_CLASSES, train_per_class=16,
                                       test_per_class=8, seed=0)
    base = subsample_classes(splits, "base").classnames
    new = subsample_classes(splits, "new").classnames
    _say("data", f"{len(splits.classnames)} toy-world classes (clean style) in {out / 'toyworld_data'}; "
                 f"base {base}; new {new}")

    cfg = TrainConfig(epochs=1000, max_steps=steps, batch_size=16, lr=0.01, precision="auto", device="auto", seed=1,
                      log_every=10)
    res = train_run(method_name="ivlp", data_root=out / "toyworld_data", out_dir=out / "run", backbone_name=backbone,
                    pretrained=pretrained, method_config=method_config_for_backbone("ivlp", backbone),
                    train_config=cfg, shots=16, subsample="base")
    m = res.metrics
    _say("weights", m["weights"])
    if "RANDOM" in m["weights"]:
        _say("note", "random weights: the accuracies below exercise the code path and mean nothing about CLIP")
    _say("train", f"ivlp on the {len(base)} base classes, {m['train_steps']} steps in {m['train_seconds']:.1f}s "
                  f"({m['train_images_per_second']:.0f} img/s); train acc {100 * m['train_accuracy']:.1f}%")
    _say("eval", f"base acc {100 * m['base_accuracy']:.1f}%, new acc {100 * m['new_accuracy']:.1f}%, "
                 f"HM {100 * m['harmonic_mean']:.1f}% (chance {100 / len(base):.0f}%)")

    # calibration: the held-out test images of the exported classes, for open-set answers (none_of_these)
    bundle = export_bundle(res.artifact, out / "bundle", class_names=splits.classnames,
                           calibration=out / "toyworld_data")
    manifest = json.loads((bundle / "manifest.json").read_text())
    par = manifest["parity"]
    _say("export", f"{bundle}: image parity max abs {par['image']['max_abs']:.1e}, text {par['text']['max_abs']:.1e}; "
                   f"{len(manifest['classes']['names'])} classes (base + new: new names need no training); "
                   f"open-set calibration from {manifest['calibration']['num_images']} held-out images")

    # probe images: unseen images drawn like the dataset's (another seed), so the calibration applies to them
    probe_split = world.write_style_dataset(out / "probes", "clean", classes=[("red", "circle"), RUNTIME_CLASS],
                                            train_per_class=1, test_per_class=1, seed=123)
    probes = {probe_split.classnames[s.label]: Path(s.path) for s in probe_split.test}
    added = world.class_name(*RUNTIME_CLASS)
    with ServerProcess(bundle, port=port or None, state_dir=out / "state", log_path=out / "server.log") as server:
        server.wait_ready()
        _say("serve", f"bentoml serve up at {server.url} (pid {server.proc.pid})")
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            preds, none = _classify(client, probes["red circle"])
            _say("classify", f"an image of a red circle -> {_show(preds)}; none_of_these: {none}")
            preds, none = _classify(client, probes[added])
            _say("classify", f"an image of a {added} (not a class yet) -> {_show(preds)}; none_of_these: {none}")
            r = client.post("/add_classes", json={"names": [added]})
            r.raise_for_status()
            _say("add class", f"added {added!r} at runtime (a combination toy-clip never saw) -> {r.json()}")
            after, none = _classify(client, probes[added], top_k=len(splits.classnames) + 1)
            names = [p["name"] for p in after]
            if added not in names:
                raise RuntimeError(f"runtime-added class {added!r} missing from the answer: {after}")
            _say("classify", f"the {added} image again -> {_show(after[:3])}; {added!r} ranks "
                             f"{names.index(added) + 1} of {len(after)}; none_of_these: {none}")
        _say("stop", f"stopping server pid {server.proc.pid}")
    _say("done", f"in {time.monotonic() - t0:.0f}s; artifacts under {out}")
    return 0


def _classify(client: httpx.Client, image_path: Path, top_k: int = 3) -> tuple[list[dict], bool | None]:
    """The predictions and the open-set answer ``none_of_these`` for one image."""
    with open(image_path, "rb") as f:
        r = client.post("/classify", files={"image": (Path(image_path).name, f, "image/png")},
                        data={"top_k": str(top_k)})
    if r.status_code != 200:
        raise RuntimeError(f"/classify answered {r.status_code}: {r.text}")
    body = r.json()
    return body["predictions"], body.get("none_of_these")


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")))
