"""``export``: a prompt artifact to a deploy bundle."""
from __future__ import annotations

import argparse
import json
from typing import Any

from export.bundle import export_bundle
from promptclip.cli.values import class_list
from serving.manifest import bundle_digest


def _worst(entry: Any) -> dict[str, float]:
    """One graph's parity figures, or the worst over several prompt sets."""
    items = entry if isinstance(entry, list) else [entry]
    return {"max_abs": max(e["max_abs"] for e in items), "min_cosine": min(e["min_cosine"] for e in items)}


def cmd_export(args: argparse.Namespace) -> int:
    path = export_bundle(args.artifact, args.out, class_names=class_list(args), exporter=args.exporter,
                         opset=args.opset, pretrained=args.pretrained, overwrite=args.overwrite,
                         precision=args.precision, optimize=args.optimize,
                         calibration=None if args.calibration == "none" else args.calibration,
                         keep_rate=args.keep_rate, open_set_rule=args.open_set_rule,
                         calibration_per_class=args.calibration_per_class,
                         calibration_max_images=args.calibration_max_images)
    manifest = json.loads((path / "manifest.json").read_text())
    print(f"bundle: {path}")
    print(f"digest: {bundle_digest(path)}   (pin it: serve/classify --bundle-digest, PROMPTCLIP_BUNDLE_DIGEST)")
    print(json.dumps({"classes": len(manifest["classes"]["names"]),
                      "prompt_sets": (manifest.get("prompt_sets") or {}).get("names", ["default"]),
                      "parity": {k: _worst(v) for k, v in manifest["parity"].items()},
                      "calibration": manifest.get("calibration")}, indent=2))
    if manifest.get("calibration") is None:
        print("no open-set calibration: none_of_these will be null (pass --calibration DIR)")
    return 0
