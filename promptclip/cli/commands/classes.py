"""``classes add|list|remove`` on a state directory (torch-free: the bundle's ONNX graphs encode names and images)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from serving.classifier import Classifier
from serving.errors import RequestError


def _classifier(args: argparse.Namespace, **kw: object) -> Classifier:
    return Classifier.from_bundle(args.bundle, state_dir=args.state_dir, warmup=False, **kw)  # type: ignore[arg-type]


def _read_images(paths: list[str]) -> list[bytes]:
    blobs = []
    for p in paths:
        try:
            blobs.append(Path(p).read_bytes())
        except OSError as exc:
            raise RequestError(f"cannot read example image {p}: {exc.strerror or exc}", field="images") from exc
    return blobs


def cmd_classes_add(args: argparse.Namespace) -> int:
    by_images = args.name is not None or args.images is not None
    if by_images == (args.names is not None):
        raise RequestError("give either --names (classes by name) or --name with --images (one class from example "
                           "images)", field="names")
    if by_images and (args.name is None or not args.images):
        raise RequestError("--name and --images go together: the class's name and 1..N example image files",
                           field="images")
    if not by_images and (args.text_weight is not None or args.no_modality_shift):
        raise RequestError("--text-weight and --no-modality-shift apply to a class built from --images",
                           field="text_weight")
    clf = _classifier(args, max_class_images=args.max_images)
    try:
        if by_images:
            result = clf.add_image_class(args.name, _read_images(args.images), text_weight=args.text_weight,
                                         modality_shift=False if args.no_modality_shift else None)
        else:
            result = clf.add_classes(args.names)
    finally:
        clf.close()
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


def cmd_classes_list(args: argparse.Namespace) -> int:
    clf = _classifier(args)
    try:
        listing = clf.list_classes()
    finally:
        clf.close()
    print(json.dumps({k: listing[k] for k in ("version", "num_classes", "classes")}, ensure_ascii=False, indent=1))
    return 0


def cmd_classes_remove(args: argparse.Namespace) -> int:
    names = ([args.name] if args.name is not None else []) + list(args.names or [])
    if not names:
        raise RequestError("give the class(es) to remove: --name X or --names X Y ...", field="names")
    clf = _classifier(args)
    try:
        result = clf.remove_classes(names)
    finally:
        clf.close()
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0
