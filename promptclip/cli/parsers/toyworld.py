"""Parsers of ``toyworld`` (pretrain, preview) and ``bench`` (toyworld)."""
from __future__ import annotations

import argparse

#: the handler module of this group
HANDLERS = "promptclip.cli.commands.toyworld"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("toyworld", help="the offline toy world: pretrain toy-clip, preview the styles")
    tw = s.add_subparsers(dest="toyworld_command", required=True, metavar="ACTION")
    t = tw.add_parser("pretrain", help="contrastively pretrain toy-clip on the procedural world (deterministic)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out",
                   help="weights file (default: the packaged toy-clip weights that --pretrained toyworld loads)")
    t.set_defaults(handler=(HANDLERS, "cmd_toyworld_pretrain"))
    t = tw.add_parser("preview", help="write a PNG contact sheet of the world's styles")
    t.add_argument("--out", default="toyworld_styles.png")
    t.set_defaults(handler=(HANDLERS, "cmd_toyworld_preview"))

    s = sub.add_parser("bench", help="benchmarks: 'bench toyworld' = few-shot base-to-novel / cross-style / DG on "
                                     "the toy world")
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
                                       "base2novel,cross_style,dg; loso = leave-one-style-out multi-source DG, "
                                       "~12 min)")
    t.add_argument("--splits", help="comma-separated base/new splits of base2novel: name (new classes share "
                                    "shapes with base ones), disjoint (they share none), colour (base classes are "
                                    "one colour, new ones differ in colour); default: all three")
    t.add_argument("--loso-methods", help="methods of the leave-one-style-out protocol (default: zeroshot, "
                                          "ERM fine-tuning 'guidg[use_experts=false,loss=erm]', guidg)")
    t.add_argument("--loso-targets", help="comma-separated target styles of loso (default: every style)")
    t.add_argument("--backbone", default=None)
    t.add_argument("--pretrained", default=None)
    t.add_argument("--out", default="bench_toyworld")
    t.add_argument("--json", action="store_true", help="also print the summary as JSON")
    t.add_argument("--progress", action="store_true", help="progress bars per training run")
    t.set_defaults(handler=(HANDLERS, "cmd_bench_toyworld"))
