"""Parser of ``reproduce``."""
from __future__ import annotations

import argparse

from .options import add_training_options

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.reproduce"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("reproduce",
                       help="run a paper protocol on datasets in the CoOp/DomainBed layouts; tables + plots",
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
    s.add_argument("--recipe", default="paper", choices=["paper", "none"],
                   help="paper (default): the method's official training recipe for the protocol (README table); "
                        "every option below overrides one of its values. none: training defaults + these options")
    add_training_options(s)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(handler=(HANDLERS, "cmd_reproduce"))
