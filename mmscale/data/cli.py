"""`mmscale data`: `synth` writes the built-in story corpus (mmscale/data/synth.py), `verify` checks a prepared
dataset (mmscale/data/verify.py)."""
from __future__ import annotations

import argparse

from mmscale.data.synth import write_corpus
from mmscale.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("synth", help="write the built-in story corpus (stories.txt + pairs.jsonl)")
    s.add_argument("--out", required=True, help="directory to write into")
    s.add_argument("--stories", type=int, default=20000, help="number of stories (default 20000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace existing stories.txt / pairs.jsonl")
    v = sub.add_parser("verify", help="check a prepared dataset: manifest, every shard's size and digest, "
                                      "token ids within the vocab")
    v.add_argument("dataset", help="a folder made by `mmscale prepare`")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        out = write_corpus(args.out, args.stories, args.seed, overwrite=args.overwrite)
        print(f"wrote {args.stories} stories to {out / 'stories.txt'} and {out / 'pairs.jsonl'}")
        return 0
    if args.action == "verify":
        from mmscale.data.verify import run_verify  # lazy: it loads torch (through the loader); synth needs none
        return run_verify(args.dataset, bool(getattr(args, "json", False)))
    raise UserError(f"unknown action {args.action!r}; use `mmscale data synth` or `mmscale data verify`")
