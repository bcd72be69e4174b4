"""Parsers of ``methods``, ``backbones``, ``train`` and ``eval``."""
from __future__ import annotations

import argparse

from .options import add_training_options

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.train"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("methods", help="list the registered prompt-learning methods")
    s.set_defaults(handler=(HANDLERS, "cmd_methods"))
    s = sub.add_parser("backbones", help="list the registered CLIP backbones")
    s.set_defaults(handler=(HANDLERS, "cmd_backbones"))

    s = sub.add_parser("train", help="few-shot train a method on an image folder and write a prompt artifact",
                       description="Train prompts on DATA (root/train/<class>/*.jpg [+ root/test/...] or "
                                   "root/<class>/*.jpg). "
                                   "With --subsample base (default) it trains on the base half of the classes and "
                                   "reports base and new accuracy and their harmonic mean.")
    s.add_argument("--method", required=True, help="method name (see 'promptclip methods')")
    s.add_argument("--data", required=True, help="image folder root (with --target-domain: ROOT/<domain>/<class>/...)")
    s.add_argument("--target-domain", help="multi-source domain generalisation: leave this domain of DATA out (it is "
                                           "tested on), train on the others (GuiDG: one expert per source domain)")
    s.add_argument("--dataset", help="with --target-domain: a DomainBed set under DATA (PACS, VLCS, OfficeHome, "
                                     "TerraIncognita, DomainNet) or imagenet-dg (target a, i or r); default: DATA "
                                     "itself is ROOT/<domain>/<class>/<image>")
    s.add_argument("--out", required=True,
                   help="run directory (artifact in OUT/artifact, resume checkpoint in OUT/checkpoint)")
    s.add_argument("--backbone", default="ViT-B-16", help="backbone name (see 'promptclip backbones')")
    s.add_argument("--pretrained", default=None,
                   help="weights: an open_clip tag (openai), a local weights file, or none (random, testing only)")
    s.add_argument("--shots", type=int, default=16, help="images per class (0 = all)")
    s.add_argument("--subsample", default="base", choices=["base", "new", "all"], help="which classes to train on")
    s.add_argument("--template", default="a photo of a {}.", help="hand-crafted prompt template of the dataset")
    add_training_options(s)
    s.add_argument("--seed", type=int)
    s.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step (GPU)")
    s.add_argument("--no-eval", action="store_true", help="skip the base/new evaluation after training")
    s.add_argument("--overwrite", action="store_true", help="replace an existing artifact in OUT/artifact")
    s.set_defaults(handler=(HANDLERS, "cmd_train"))

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
    s.add_argument("--per-image", action="store_true",
                   help="also print every image's top-1 class and class scores (softmax, as 'classify' gives them)")
    s.set_defaults(handler=(HANDLERS, "cmd_eval"))
