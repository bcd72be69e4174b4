"""``serve`` and ``classify``: torch-free (a serving host has no torch installed)."""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from promptclip.cli.values import class_list
from promptclip.server import SERVICE_ROOT, serve_command, serve_env, supervise
from serving.bundle import load_bundle
from serving.classifier import Classifier, check_bundle_digest, open_class_registry
from serving.errors import PromptclipError
from serving.image_classes import check_image_classes, describe_stale
from serving.runtime import PROVIDERS_ENV, resolve_providers

log = logging.getLogger("promptclip")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``bentoml serve`` as a supervised process tree (stopped as a whole by SIGTERM/SIGINT)."""
    # fail here, with a clear message, rather than inside the server; the server process verifies every file's hash
    # at startup, so hashing here too would read the graphs twice (hash once: cold start)
    bundle = load_bundle(args.bundle, verify_hashes=False)
    if args.bundle_digest:
        check_bundle_digest(bundle.root, args.bundle_digest)
    if args.workers is not None and args.workers < 1:
        raise PromptclipError(f"--workers must be >= 1, got {args.workers}")
    if (args.workers or 1) > 1 and not args.state_dir:
        raise PromptclipError(f"--workers {args.workers} needs --state-dir: the workers share the class list "
                              "through it (without one each worker would keep its own)")
    if args.state_dir:  # a corrupt, unreadable or lost state file stops here (non-zero exit, the message)
        registry = open_class_registry(bundle, args.state_dir, start_empty=args.start_empty)
        stale = check_image_classes(bundle, args.state_dir, registry.names())
        if stale:  # the server starts (so /remove_classes can fix it) but refuses to rank with them
            log.error("%s Until then /classify answers 503.", describe_stale(stale))
    extra = {"PROMPTCLIP_START_EMPTY": "1"} if args.start_empty else {}
    if args.bundle_digest:
        extra["PROMPTCLIP_BUNDLE_DIGEST"] = args.bundle_digest
    if args.runtime:
        extra["PROMPTCLIP_RUNTIME"] = args.runtime
    if args.providers:
        extra[PROVIDERS_ENV] = args.providers
    if args.open_writes and not args.token:
        extra["PROMPTCLIP_OPEN_WRITES"] = "1"
        log.warning("!!! --open-writes: EVERY client that reaches %s:%d can add and remove classes (no token) !!!",
                    args.host, args.port)
    elif not args.token:
        log.warning("no --token (PROMPTCLIP_API_TOKEN): /add_classes and /remove_classes are refused; pass a token "
                    "to allow them, or --open-writes to open them to every client")
    env = serve_env(args.bundle, args.state_dir, args.token, workers=args.workers, extra=extra)
    cmd = serve_command(args.port, args.host)
    log.info("starting: %s (bundle %s, %s worker(s))", " ".join(cmd), env["PROMPTCLIP_BUNDLE"], args.workers or 1)
    return supervise(cmd, env, SERVICE_ROOT)


def cmd_classify(args: argparse.Namespace) -> int:
    runtime = args.runtime or os.environ.get("PROMPTCLIP_RUNTIME", "").strip() or "auto"
    clf = Classifier.from_bundle(args.bundle, state_dir=args.state_dir, runtime=runtime,
                                 providers=resolve_providers(args.providers) if args.providers else None,
                                 expected_digest=args.bundle_digest or None)
    blobs = []
    for image in args.images:
        p = Path(image)
        if not p.is_file():
            raise PromptclipError(f"image {p} does not exist")
        blobs.append(p.read_bytes())
    r = clf.classify_bytes_detailed(blobs, top_k=args.top_k, class_names=class_list(args), keep_rate=args.keep_rate,
                                    open_set_rule=args.open_set_rule)
    for image, preds, none in zip(args.images, r.predictions, r.none_of_these):
        print(json.dumps({"image": image, "predictions": preds, "none_of_these": none, "open_set": r.open_set}))
    return 0
