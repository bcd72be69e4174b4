"""``serve`` and ``classify``: torch-free (a serving host has no torch installed)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from pathlib import Path

from promptclip.cli.values import class_list
from promptclip.server import SERVICE_ROOT, serve_command, serve_env
from serving.bundle import load_bundle
from serving.classifier import Classifier
from serving.errors import PromptclipError
from serving.runtime import PROVIDERS_ENV, resolve_providers

log = logging.getLogger("promptclip")


def cmd_serve(args: argparse.Namespace) -> int:
    # fail here, with a clear message, rather than inside the server; the server process verifies every file's hash
    # at startup, so hashing here too would read the graphs twice (hash once: cold start)
    load_bundle(args.bundle, verify_hashes=False)
    env = serve_env(args.bundle, args.state_dir, args.token)
    if getattr(args, "runtime", None):
        env["PROMPTCLIP_RUNTIME"] = args.runtime
    if getattr(args, "providers", None):
        env[PROVIDERS_ENV] = args.providers
    cmd = serve_command(args.port, args.host, args.workers)
    log.info("starting: %s (bundle %s)", " ".join(cmd), env["PROMPTCLIP_BUNDLE"])
    return subprocess.call(cmd, env=env, cwd=str(SERVICE_ROOT))


def cmd_classify(args: argparse.Namespace) -> int:
    runtime = getattr(args, "runtime", None) or os.environ.get("PROMPTCLIP_RUNTIME", "").strip() or "auto"
    providers = getattr(args, "providers", None)
    clf = Classifier.from_bundle(args.bundle, state_dir=args.state_dir, runtime=runtime,
                                 providers=resolve_providers(providers) if providers else None)
    blobs = []
    for image in args.images:
        p = Path(image)
        if not p.is_file():
            raise PromptclipError(f"image {p} does not exist")
        blobs.append(p.read_bytes())
    results = clf.classify_bytes(blobs, top_k=args.top_k, class_names=class_list(args))
    for image, preds in zip(args.images, results):
        print(json.dumps({"image": image, "predictions": preds}))
    return 0
