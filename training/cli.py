"""The ``promptclip`` command line.

Subcommands: ``train``, ``eval``, ``export``, ``serve``, ``classify``, ``demo``, and the listings ``methods`` and
``backbones``. Heavy imports happen inside each subcommand: ``serve`` and ``classify`` never import torch.
A user mistake (any :class:`PromptclipError`) prints one ``error:`` line and exits with status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from serving.errors import PromptclipError

log = logging.getLogger("promptclip")

#: what ``bentoml serve`` loads (bentofile.yaml names the same service)
SERVICE_IMPORT_PATH = "serving.service:PromptclipService"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "httpx", "bentoml", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_sets(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise PromptclipError(f"--set expects key=value, got {item!r} (e.g. --set depth_text=3)")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _class_list(args: argparse.Namespace) -> list[str] | None:
    names: list[str] = []
    if getattr(args, "classes", None):
        names += [n for n in args.classes.split(",")]
    if getattr(args, "classes_file", None):
        path = Path(args.classes_file)
        if not path.is_file():
            raise PromptclipError(f"--classes-file {path} does not exist (expected one class name per line)")
        names += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names or None


# ----------------------------------------------------------------------------------------------- commands
def cmd_methods(args: argparse.Namespace) -> int:
    from training.methods import METHODS

    for name, cls in METHODS.items():
        caps = cls.capabilities
        flags = []
        if not caps.trainable:
            flags.append("nothing trainable")
        if caps.text_depends_on_image:
            flags.append("image-conditioned text")
        if cls.needs_domains:
            flags.append("needs several source domains: one prompt set per domain (train --target-domain)")
        elif caps.num_prompt_sets > 1:
            flags.append(f"{caps.num_prompt_sets} prompt sets")
        if caps.finetuned_image_tower:
            flags.append("fine-tunes the image tower")
        print(f"{name:10s} {cls.description}" + (f"  [{', '.join(flags)}]" if flags else ""))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from training.backbone import BACKBONES

    for name, spec in BACKBONES.items():
        print(f"{name:10s} {spec.description} (default weights: {spec.default_pretrained})")
    return 0


def _train_config(args: argparse.Namespace):
    from training.engine import TrainConfig

    values = {k: getattr(args, k) for k in ("epochs", "max_steps", "batch_size", "lr", "optimizer", "seed",
                                            "device", "precision", "num_workers", "augment", "warmup_steps")
              if getattr(args, k, None) is not None}
    return TrainConfig.from_dict(values)


def _data_arg(args: argparse.Namespace, *, seed: int) -> Any:
    """``--data``, or with ``--target-domain`` the multi-source DG task read from it (the other domains train, one
    source domain each; the target's holdout split tests)."""
    if args.target_domain:
        from training.data import multi_source_task

        return multi_source_task(args.data, args.target_domain, dataset=args.dataset, seed=seed)
    if args.dataset:
        raise PromptclipError("--dataset names a multi-domain dataset and needs --target-domain (the held-out domain)")
    return args.data


def cmd_train(args: argparse.Namespace) -> int:
    from training.workflow import train_run

    data = _data_arg(args, seed=args.seed or 0)
    subsample = args.subsample
    if args.target_domain and subsample != "all":
        log.info("--target-domain: training on every class (--subsample all)")
        subsample = "all"
    res = train_run(method_name=args.method, data_root=data, out_dir=args.out, backbone_name=args.backbone,
                    pretrained=args.pretrained, method_config=_parse_sets(args.set), train_config=_train_config(args),
                    shots=args.shots, subsample=subsample, template=args.template,
                    evaluate_splits=not args.no_eval, overwrite=args.overwrite)
    print(f"artifact: {res.artifact}")
    print(json.dumps(res.metrics, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from training.workflow import evaluate_artifact

    data = _data_arg(args, seed=args.seed)
    res = evaluate_artifact(args.artifact, data, subsample=args.subsample, split=args.split,
                            batch_size=args.batch_size, device=args.device, pretrained=args.pretrained)
    print(json.dumps(res, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.bundle import export_bundle

    path = export_bundle(args.artifact, args.out, class_names=_class_list(args), exporter=args.exporter,
                         opset=args.opset, pretrained=args.pretrained, overwrite=args.overwrite)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"bundle: {path}")

    def worst(entry: Any) -> dict[str, float]:  # one graph's figures, or the worst over several prompt sets
        items = entry if isinstance(entry, list) else [entry]
        return {"max_abs": max(e["max_abs"] for e in items), "min_cosine": min(e["min_cosine"] for e in items)}

    print(json.dumps({"classes": len(manifest["classes"]["names"]),
                      "prompt_sets": (manifest.get("prompt_sets") or {}).get("names", ["default"]),
                      "parity": {k: worst(v) for k, v in manifest["parity"].items()}}, indent=2))
    return 0


def serve_env(bundle: str | os.PathLike, state_dir: str | os.PathLike | None, token: str | None = None) -> dict[str, str]:
    """Environment for a BentoML server process on ``bundle``."""
    env = dict(os.environ)
    env["PROMPTCLIP_BUNDLE"] = str(Path(bundle).resolve())
    if state_dir:
        env["PROMPTCLIP_STATE_DIR"] = str(Path(state_dir).resolve())
    if token:
        env["PROMPTCLIP_API_TOKEN"] = token
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    return env


def serve_command(port: int, host: str, workers: int | None = None) -> list[str]:
    """argv of ``bentoml serve`` for the promptclip service (run from the repository / install root)."""
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_IMPORT_PATH, "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--api-workers", str(workers)]
    return cmd


def cmd_serve(args: argparse.Namespace) -> int:
    import subprocess

    from serving.bundle import load_bundle

    load_bundle(args.bundle)  # fail here, with a clear message, rather than inside the server
    env = serve_env(args.bundle, args.state_dir, args.token)
    cmd = serve_command(args.port, args.host, args.workers)
    log.info("starting: %s (bundle %s)", " ".join(cmd), env["PROMPTCLIP_BUNDLE"])
    return subprocess.call(cmd, env=env, cwd=str(Path(__file__).resolve().parent.parent))


def cmd_classify(args: argparse.Namespace) -> int:
    from serving.classifier import Classifier

    clf = Classifier.from_bundle(args.bundle, state_dir=args.state_dir)
    blobs = []
    for image in args.images:
        p = Path(image)
        if not p.is_file():
            raise PromptclipError(f"image {p} does not exist")
        blobs.append(p.read_bytes())
    results = clf.classify_bytes(blobs, top_k=args.top_k, class_names=_class_list(args))
    for image, preds in zip(args.images, results):
        print(json.dumps({"image": image, "predictions": preds}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    return run_demo(Path(args.out), port=args.port, steps=args.steps, backbone=args.backbone,
                    pretrained=args.pretrained)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PromptclipError(f"expected comma-separated integers, got {text!r} (e.g. --seeds 1,2,3)") from None


def cmd_toyworld_pretrain(args: argparse.Namespace) -> int:
    from training.toyworld.pretrain import DEFAULT_WEIGHTS_PATH, PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
    info = pretrain(cfg, args.out or DEFAULT_WEIGHTS_PATH)
    print(json.dumps({k: info[k] for k in ("file", "sha256", "seconds", "zero_shot_all120_by_style")}, indent=2))
    return 0


def cmd_toyworld_preview(args: argparse.Namespace) -> int:
    from training.toyworld.preview import save_contact_sheet

    path = save_contact_sheet(args.out)
    print(f"wrote {path}")
    return 0


def _method_specs(text: str) -> tuple[str, ...]:
    """Split on commas outside [...] (variants: disa[use_cir=false,use_dir=false])."""
    import re

    return tuple(m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if m.strip())


def cmd_bench_toyworld(args: argparse.Namespace) -> int:
    from training.toyworld.bench import BenchConfig, run_bench

    values: dict[str, Any] = {"shots": args.shots, "steps": args.steps, "backbone": args.backbone,
                              "pretrained": args.pretrained}
    if args.methods:
        from training.methods import get_method_class
        from training.toyworld.bench import parse_method_spec

        values["methods"] = _method_specs(args.methods)
        for m in values["methods"]:
            get_method_class(parse_method_spec(m)[0])  # unknown name -> clear error before any work
    if args.loso_methods:
        from training.methods import get_method_class
        from training.toyworld.bench import parse_method_spec

        values["loso_methods"] = _method_specs(args.loso_methods)
        for m in values["loso_methods"]:
            get_method_class(parse_method_spec(m)[0])
    if args.loso_targets:
        values["loso_targets"] = tuple(s.strip() for s in args.loso_targets.split(",") if s.strip())
    if args.seeds:
        values["seeds"] = _int_list(args.seeds)
    if args.styles:
        values["styles"] = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    if args.num_classes:
        values["num_classes"] = args.num_classes
    if args.protocols:
        values["protocols"] = tuple(x.strip() for x in args.protocols.split(",") if x.strip())
        from training.toyworld.bench import PROTOCOLS

        bad = set(values["protocols"]) - set(PROTOCOLS)
        if bad:
            raise PromptclipError(f"unknown protocol(s) {sorted(bad)}; choose from {', '.join(PROTOCOLS)}")
    cfg = BenchConfig(**{k: v for k, v in values.items() if v is not None})
    summary = run_bench(cfg, args.out, progress=args.progress)
    print((Path(args.out) / "results.md").read_text())
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from training.methods import get_method_class
    from training.protocols.reproduce import ReproduceConfig, run_reproduce

    get_method_class(args.method)
    train = {k: v for k, v in {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
                               "lr": args.lr, "device": args.device, "precision": args.precision,
                               "num_workers": args.num_workers}.items() if v is not None}
    shots = _int_list(args.shots) if args.shots is not None else (
        (1, 2, 4, 8, 16) if args.protocol == "few-shot" else (16,))
    cfg = ReproduceConfig(protocol=args.protocol, method=args.method, root=args.root,
                          datasets=tuple(d.strip() for d in (args.datasets or "").split(",") if d.strip()),
                          seeds=_int_list(args.seeds), shots=shots, source=args.source, backbone=args.backbone,
                          pretrained=args.pretrained, method_config=_parse_sets(args.set), train=train)
    run_reproduce(cfg, args.out, progress=not args.no_progress)
    print((Path(args.out) / "results.md").read_text())
    return 0


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptclip", description=(
        "Few-shot prompt learning for CLIP: train prompts, export ONNX bundles, serve open-vocabulary "
        "classification with runtime-extensible class lists."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("methods", help="list the registered prompt-learning methods")
    s.set_defaults(func=cmd_methods)
    s = sub.add_parser("backbones", help="list the registered CLIP backbones")
    s.set_defaults(func=cmd_backbones)

    s = sub.add_parser("train", help="few-shot train a method on an image folder and write a prompt artifact",
                       description="Train prompts on DATA (root/train/<class>/*.jpg [+ root/test/...] or root/<class>/*.jpg). "
                                   "With --subsample base (default) it trains on the base half of the classes and "
                                   "reports base and new accuracy and their harmonic mean.")
    s.add_argument("--method", required=True, help="method name (see 'promptclip methods')")
    s.add_argument("--data", required=True, help="image folder root (with --target-domain: ROOT/<domain>/<class>/...)")
    s.add_argument("--target-domain", help="multi-source domain generalisation: leave this domain of DATA out (it is "
                                           "tested on), train on the others (GuiDG: one expert per source domain)")
    s.add_argument("--dataset", help="with --target-domain: a DomainBed set under DATA (PACS, VLCS, OfficeHome, "
                                     "TerraIncognita, DomainNet) or imagenet-dg (target a, i or r); default: DATA "
                                     "itself is ROOT/<domain>/<class>/<image>")
    s.add_argument("--out", required=True, help="run directory (artifact in OUT/artifact, resume checkpoint in OUT/checkpoint)")
    s.add_argument("--backbone", default="ViT-B-16", help="backbone name (see 'promptclip backbones')")
    s.add_argument("--pretrained", default=None,
                   help="weights: an open_clip tag (openai), a local weights file, or none (random, testing only)")
    s.add_argument("--shots", type=int, default=16, help="images per class (0 = all)")
    s.add_argument("--subsample", default="base", choices=["base", "new", "all"], help="which classes to train on")
    s.add_argument("--template", default="a photo of a {}.", help="hand-crafted prompt template of the dataset")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config option (repeatable)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--optimizer", choices=["sgd", "adamw"])
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    s.add_argument("--num-workers", type=int)
    s.add_argument("--augment", choices=["crop_flip", "flip", "none"])
    s.add_argument("--no-eval", action="store_true", help="skip the base/new evaluation after training")
    s.add_argument("--overwrite", action="store_true", help="replace an existing artifact in OUT/artifact")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="accuracy of a prompt artifact on an image folder")
    s.add_argument("--artifact", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--subsample", default="all", choices=["base", "new", "all"])
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--target-domain", help="DATA is ROOT/<domain>/<class>/...: evaluate on this domain's held-out "
                                           "test split (the one 'train --target-domain' reports)")
    s.add_argument("--dataset", help="with --target-domain: a DomainBed set under DATA, or imagenet-dg")
    s.add_argument("--seed", type=int, default=0, help="with --target-domain: the seed of the target's holdout split")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument("--pretrained", default=None, help="backbone weights when the recorded source is not available")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export", help="export a prompt artifact to a deploy bundle (ONNX graphs + class embeddings)",
                       description="Writes image_encoder.onnx, text_encoder.onnx, class_embeddings.safetensors and "
                                   "manifest.json; checks each graph (onnx.checker, ORT-vs-torch parity at batch 1 "
                                   "and 3) and fails past tolerance.")
    s.add_argument("--artifact", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--classes", help="comma-separated class names (default: the training classes)")
    s.add_argument("--classes-file", help="a file with one class name per line")
    s.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    s.add_argument("--opset", type=int, default=18)
    s.add_argument("--pretrained", default=None)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve a bundle over HTTP with BentoML (no torch needed)")
    s.add_argument("--bundle", required=True)
    s.add_argument("--state-dir", help="where runtime class additions are persisted")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--workers", type=int, help="number of API worker processes")
    s.add_argument("--token", default=os.environ.get("PROMPTCLIP_API_TOKEN"),
                   help="bearer token required by mutating endpoints (default: $PROMPTCLIP_API_TOKEN)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("classify", help="classify local images with a bundle (no server, no torch)")
    s.add_argument("--bundle", required=True)
    s.add_argument("images", nargs="+")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--classes", help="comma-separated ad-hoc class list for this call")
    s.add_argument("--classes-file")
    s.add_argument("--state-dir")
    s.set_defaults(func=cmd_classify)

    s = sub.add_parser("demo", help="offline end-to-end demo: data -> train ivlp -> export -> HTTP serve -> classify")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--backbone", default="toy-clip", help="toy-clip (pretrained offline on the toy world) or tiny-test")
    s.add_argument("--pretrained", default=None)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("reproduce", help="run a paper protocol on datasets in the CoOp/DomainBed layouts; tables + plots",
                       description="Train and evaluate per dataset and seed, resume after an interruption, and write "
                                   "the table the papers print (markdown, CSV, JSON) plus PNG plots. Datasets: "
                                   "the names of training.data.list_datasets(), or toyworld-<style>.")
    s.add_argument("protocol", choices=["base2novel", "cross-dataset", "domain-generalization", "few-shot",
                                        "multi-source-dg"])
    s.add_argument("--method", required=True)
    s.add_argument("--root", required=True, help="folder holding the datasets (CoOp DATASETS.md layout)")
    s.add_argument("--datasets", help="comma-separated (default: the protocol's standard list)")
    s.add_argument("--seeds", default="1,2,3")
    s.add_argument("--shots", help="comma-separated (default 16; few-shot: 1,2,4,8,16)")
    s.add_argument("--source", default="ImageNet", help="source dataset of cross-dataset / domain-generalization")
    s.add_argument("--out", required=True)
    s.add_argument("--backbone", default="ViT-B-16")
    s.add_argument("--pretrained", default=None)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="method config option (repeatable)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--device")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    s.add_argument("--num-workers", type=int)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_reproduce)

    s = sub.add_parser("toyworld", help="the offline toy world: pretrain toy-clip, preview the styles")
    tw = s.add_subparsers(dest="toyworld_command", required=True, metavar="ACTION")
    t = tw.add_parser("pretrain", help="contrastively pretrain toy-clip on the procedural world (deterministic)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", help="weights file (default: the packaged toy-clip weights that --pretrained toyworld loads)")
    t.set_defaults(func=cmd_toyworld_pretrain)
    t = tw.add_parser("preview", help="write a PNG contact sheet of the world's styles")
    t.add_argument("--out", default="toyworld_styles.png")
    t.set_defaults(func=cmd_toyworld_preview)

    s = sub.add_parser("bench", help="benchmarks: 'bench toyworld' = few-shot base-to-novel / cross-style / DG on the toy world")
    bw = s.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    t = bw.add_parser("toyworld", help="every registered method on the toy world's styles; tables + PNG charts",
                      description="Base-to-novel per style, cross-style transfer and domain generalisation on the toy "
                                  "world; resumes finished runs from OUT/runs.jsonl.")
    t.add_argument("--methods", help="comma-separated (default: every registered method); a variant for ablations: "
                                     "'disa[use_cir=false,use_dir=false]'")
    t.add_argument("--seeds", help="comma-separated (default 1,2,3)")
    t.add_argument("--shots", type=int)
    t.add_argument("--steps", type=int, help="optimisation steps per training run")
    t.add_argument("--styles", help="comma-separated subset of clean,sketch,noisy,lowres,palette")
    t.add_argument("--num-classes", type=int, help="classes per style")
    t.add_argument("--protocols", help="comma-separated subset of base2novel,cross_style,dg,loso (default: "
                                       "base2novel,cross_style,dg; loso = leave-one-style-out multi-source DG, ~12 min)")
    t.add_argument("--loso-methods", help="methods of the leave-one-style-out protocol (default: zeroshot, "
                                          "ERM fine-tuning 'guidg[use_experts=false,loss=erm]', guidg)")
    t.add_argument("--loso-targets", help="comma-separated target styles of loso (default: every style)")
    t.add_argument("--backbone", default=None)
    t.add_argument("--pretrained", default=None)
    t.add_argument("--out", default="bench_toyworld")
    t.add_argument("--json", action="store_true", help="also print the summary as JSON")
    t.add_argument("--progress", action="store_true", help="progress bars per training run")
    t.set_defaults(func=cmd_bench_toyworld)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except PromptclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
