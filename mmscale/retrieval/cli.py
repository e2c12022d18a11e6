"""`mmscale retrieval train|eval|import`: the arguments and the dispatch (the work is in train.py,
evaluate.py and importer.py; the package docstring explains the method)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmscale.config import load_config
from mmscale.engines import engine_class
from mmscale.errors import UserError
from mmscale.fsutil import atomic_write
from mmscale.retrieval.corpus import PASSAGE_MODES
from mmscale.retrieval.evaluate import evaluate_export, format_table
from mmscale.retrieval.importer import add_import_arguments, import_collection
from mmscale.retrieval.train import prepare_config, train_retrieval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # on the command itself: `mmscale` moves --no-progress in front of the action (mmscale.cli.conventions)
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="InfoNCE fine-tuning of an export (any engine)")
    t.add_argument("--init", help="the export to start from (sets train.init_from)")
    t.add_argument("--collection", help="a BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv "
                                        "(sets retrieval.collection)")
    t.add_argument("--split", help="the qrels split to train on (default: train, or the only one)")
    t.add_argument("--pairs", help="JSONL of {\"query\", \"passage\"[, \"negatives\"]} (sets retrieval.pairs); or "
                                   "corpus:MODE[+MODE..][+judged] with --collection: pairs made from its corpus, MODE "
                                   "title-body, crop or ict, +judged mixes in its judged queries")
    t.add_argument("--negatives", choices=["random", "bm25", "model"],
                   help="hard negatives: random documents, BM25's or the export's top-ranked non-relevant documents "
                        "(mined once, cached under run.dir/retrieval_cache; sets retrieval.negatives)")
    t.add_argument("--config", default=None, help="YAML config (model.* comes from the export)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. retrieval.group_size=32 engine.kind=fsdp")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("eval", help="nDCG@10, Recall@10/100, MRR@10, MAP over the whole corpus, top-1 among n, "
                                    "beside BM25")
    e.add_argument("export")
    e.add_argument("--collection", help="a BEIR-layout directory (or a pairs JSONL)")
    e.add_argument("--split", help="the qrels split (default: test, or the only one)")
    e.add_argument("--pairs", help="held-out pairs (JSONL): a collection with one relevant passage per query")
    e.add_argument("--candidates", default="32", help="comma-separated n of top-1 among n, e.g. 32,64,128 (default 32)")
    e.add_argument("--seed", type=int, default=0, help="seed of the distractor sampling")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--position", default="mean",
                   help="what embeds a text: mean (over its real tokens; what retrieval train uses by default), idf "
                        "(that mean weighted by the corpus's inverse document frequency), last, "
                        "or a token index such as -2; use the run's retrieval.position")
    e.add_argument("--passage-mode", default="truncate", choices=list(PASSAGE_MODES),
                   help="long documents: truncate (the first n_ctx tokens of title + text), max_chunk (the best of "
                        "title-prefixed windows), or first_window (max_chunk's first window: the same tokens as "
                        "truncate unless the title has n_ctx/2 tokens or more, which it cuts to n_ctx/2)")
    e.add_argument("--cache-dir", default=None,
                   help="where corpus embeddings are cached (default: retrieval_cache/ beside --json)")
    e.add_argument("--no-cache", action="store_true", help="embed the corpus without reading or writing a cache")
    e.add_argument("--no-baseline", action="store_true", help="skip the BM25 and hybrid rows")
    e.add_argument("--hybrid-split", default=None,
                   help="the qrels split whose queries choose the hybrid's interpolation weight (default: dev, else "
                        "train; never the evaluated split; reciprocal-rank fusion when there is none)")
    e.add_argument("--hybrid-weight", type=float, default=None,
                   help="the model's weight in the hybrid (0..1) instead of choosing it")
    e.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    e.add_argument("--json", default=None, help="also write the results as JSON to FILE (bare --json: JSON on stdout); "
                   "without it only the table is printed and nothing is written")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    i = sub.add_parser("import", help="raw files (pairs JSONL, SMART .I/.T/.W + qrels) -> a BEIR-layout collection")
    add_import_arguments(i)


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        overrides = list(args.overrides) + (["log.progress=false"] if getattr(args, "no_progress", False) else [])
        cfg = prepare_config(load_config(args.config, overrides), args.init, args.pairs, args.collection,
                             args.split, args.negatives)
        return engine_class(cfg.engine.kind).finish_process(train_retrieval(cfg))
    if args.action == "import":
        counts = import_collection(args)
        splits = ", ".join(f"qrels/{k}.tsv: {n} queries" for k, n in counts["splits"].items())
        empty = counts.get("empty_documents", 0)
        print(f"wrote {args.out}: {counts['documents']} documents"
              + (f" ({empty} without .T or .W text, kept as empty documents)" if empty else "")
              + f", {counts['queries']} queries, {counts['judgments']} judgments ({splits})")
        return 0
    try:
        candidates = sorted({int(x) for x in args.candidates.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--candidates must be comma-separated integers such as 32,64,128, got {args.candidates!r}") from None
    if not candidates:
        raise UserError("--candidates is empty; pass e.g. 32,64,128")
    if bool(args.pairs) == bool(args.collection):
        raise UserError("pass --collection DIR (BEIR layout) or --pairs FILE.jsonl, one of them")
    out = Path(args.json) if args.json else None
    if out is not None and out.exists() and not args.overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite or another --json path")
    # a bare --json prints the JSON on stdout (mmscale.cli.conventions hands run() a temporary file): then the
    # table goes to stderr; the embedding cache is kept beside a --json FILE or in --cache-dir, never in the
    # working directory unasked
    json_to_stdout = out is not None and out.name.startswith("mmscale-json-")
    cache = None if args.no_cache else (args.cache_dir or (out.parent / "retrieval_cache"
                                                           if out is not None and not json_to_stdout else None))
    result = evaluate_export(args.export, args.collection or args.pairs, candidates, seed=args.seed,
                             batch_size=args.batch_size, position=args.position, split=args.split,
                             passage_mode=args.passage_mode, cache_dir=cache, baseline=not args.no_baseline,
                             device=args.device, hybrid_split=args.hybrid_split,
                             hybrid_fixed=args.hybrid_weight, progress=not (getattr(args, "no_progress", False)
                                                                or getattr(args, "_no_progress", False)))
    print(format_table(result), file=sys.stderr if json_to_stdout else sys.stdout)
    if out is None:
        return 0
    atomic_write(out, json.dumps(result, indent=2) + "\n")  # not durable, as every --json
    return 0
