"""`mmscale retrieval import`: raw files (a pairs JSONL, or a SMART-style .I/.T/.W collection with a qrels
file) -> a BEIR-layout collection (collection.py), written with fsutil.atomic_write (not durable) and
corpus.jsonl last, so an interrupted import never looks complete."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np

from mmscale.cli.conventions import check_output_path
from mmscale.errors import UserError, check_text_file
from mmscale.fsutil import atomic_write
from mmscale.retrieval.collection import collection_from_pairs, read_pairs


def split_qrels(qrels: list[tuple[str, str, float]], split: str, test_fraction: float, seed: int) -> dict:
    """{split: qrels}, or {"train": ..., "test": ...} with a seeded test_fraction of the queries held out."""
    if test_fraction <= 0:
        return {split: qrels}
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    qids = list(dict.fromkeys(q for q, _, _ in qrels))
    n_test = max(1, round(len(qids) * test_fraction))
    if n_test >= len(qids):
        raise UserError(f"--test-fraction {test_fraction} leaves no training query of {len(qids)}; lower it")
    order = np.random.default_rng(seed).permutation(len(qids))
    test = {qids[i] for i in order[:n_test]}
    return {"train": [r for r in qrels if r[0] not in test], "test": [r for r in qrels if r[0] in test]}


def write_beir(out: str | os.PathLike, doc_ids, titles, texts, queries: dict[str, str],
               qrels: list[tuple[str, str, float]] | dict, split: str = "test", overwrite: bool = False) -> Path:
    """Write the layout; `qrels` is one split's lines, or {split: lines}."""
    root = Path(out)
    if (root / "corpus.jsonl").exists() and not overwrite:
        raise UserError(f"'{root}' already holds a collection; pass --overwrite or another --out")
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    # corpus.jsonl is what makes the folder a collection: removed first and written last, so an interrupted
    # (over)write never leaves a collection that looks complete (a new corpus beside old qrels, or no qrels)
    (root / "corpus.jsonl").unlink(missing_ok=True)
    atomic_write(root / "queries.jsonl", "".join(json.dumps({"_id": i, "text": x}, ensure_ascii=False) + "\n"
                                                  for i, x in queries.items()))

    def fmt(s: float) -> str:
        return str(int(s)) if float(s).is_integer() else repr(float(s))

    for name, lines in (qrels if isinstance(qrels, dict) else {split: qrels}).items():
        atomic_write(root / "qrels" / f"{name}.tsv",
                      "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{fmt(s)}\n" for q, d, s in lines))
    atomic_write(root / "corpus.jsonl", "".join(json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=False) + "\n"
                                                 for i, t, x in zip(doc_ids, titles, texts)))
    return root


def read_smart(path: str | os.PathLike, kind: str) -> list[tuple[str, str, str]]:
    """Records of a SMART-style file: [(id, title, text)] from `.I id`, `.T` title and `.W` text fields."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{kind} file '{path}' does not exist")
    check_text_file(p, f"{kind} file")  # refused, not decoded with U+FFFD (a Latin-1 collection: iconv it first)
    records, cur, fieldname = [], None, None
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            m = re.match(r"^\.([A-Z])\b\s*(.*)$", line.rstrip("\n"))
            if m:
                tag, rest = m.group(1), m.group(2)
                if tag == "I":
                    if not rest.strip():
                        raise UserError(f"{path}:{n}: '.I' without an id; records start with '.I ID'")
                    cur = {"id": rest.strip().split()[0], "T": [], "W": [], "line": n}
                    records.append(cur)
                    fieldname = None
                elif cur is None:
                    raise UserError(f"{path}:{n}: field '.{tag}' before the first '.I ID' record")
                else:
                    fieldname = tag
                    if rest.strip() and tag in ("T", "W"):
                        cur[tag].append(rest.strip())
                continue
            if cur is not None and fieldname in ("T", "W") and line.strip():
                cur[fieldname].append(line.strip())
    if not records:
        raise UserError(f"{kind} file '{path}' holds no '.I ID' records; is it a SMART-style (.I/.T/.W) file?")
    out, seen = [], {}
    for r in records:
        if r["id"] in seen:
            raise UserError(f"{path}:{r['line']}: duplicate id '.I {r['id']}' (first on line {seen[r['id']]})")
        seen[r["id"]] = r["line"]
        out.append((r["id"], " ".join(r["T"]), " ".join(r["W"])))
    return out


def read_raw_qrels(path: str | os.PathLike, fmt: str = "auto") -> list[tuple[str, str, float]]:
    """Raw relevance files: 'q d' (relevant), 'q d score', TREC 'q 0 d score', or CISI-style 'q d 0 0.0'."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"qrels file '{path}' does not exist")
    check_text_file(p, "qrels file")
    with open(p, encoding="utf-8") as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip()]
    if lines and lines[0][1][0].lower() in ("query-id", "query_id", "qid"):
        lines = lines[1:]
    if not lines:
        raise UserError(f"qrels file '{path}' is empty")
    widths = {len(parts) for _, parts in lines}
    if len(widths) != 1:
        raise UserError(f"qrels file '{path}' mixes lines of {sorted(widths)} columns; give one format")
    width = widths.pop()
    if fmt == "auto":
        if width in (2, 3):
            fmt = {2: "pair", 3: "score"}[width]
        elif width == 4 and all(parts[2] == "0" and _is_zero(parts[3]) for _, parts in lines):
            fmt = "pair-00"
        elif width == 4 and all(parts[1] == "0" for _, parts in lines):
            fmt = "trec"
        else:
            raise UserError(f"cannot tell the format of qrels file '{path}' ({width} columns); pass "
                            "--qrels-format pair|score|trec|pair-00")
    need = {"pair": 2, "score": 3, "trec": 4, "pair-00": 4}[fmt]
    if width != need:
        raise UserError(f"qrels file '{path}' has {width} columns; --qrels-format {fmt} needs {need}")
    out = []
    for n, parts in lines:
        if fmt == "trec":
            q, d, s = parts[0], parts[2], parts[3]
        elif fmt == "score":
            q, d, s = parts
        else:
            q, d, s = parts[0], parts[1], "1"
        try:
            out.append((q, d, float(s)))
        except ValueError:
            raise UserError(f"{path}:{n}: score {s!r} is not a number") from None
    return out


def _is_zero(s: str) -> bool:
    try:
        return float(s) == 0.0
    except ValueError:
        return False


def parse_relevance_map(spec: str) -> dict[float, float]:
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            raw, grade = item.split(":")
            out[float(raw)] = float(grade)
        except ValueError:
            raise UserError(f"--relevance-map must look like '1:4,2:3,3:2,4:1,5:0', got {spec!r}") from None
    return out


def import_collection(args: argparse.Namespace) -> dict:
    """`mmscale retrieval import`: raw files -> the BEIR layout under args.out; returns counts."""
    inputs = [getattr(args, k, None) for k in ("pairs", "docs", "queries", "qrels")]
    # an existing folder is written into (refused below only when it holds a collection, without --overwrite)
    check_output_path(args.out, "--out", overwrite=True, inputs=inputs)
    if (Path(args.out) / "corpus.jsonl").exists() and not args.overwrite:
        raise UserError(f"'{args.out}' already holds a collection; pass --overwrite or another --out")
    if args.format == "pairs":
        if not args.pairs:
            raise UserError("--format pairs needs --pairs FILE.jsonl")
        c = collection_from_pairs(read_pairs(args.pairs), source=args.pairs)
        qrels = [(c.query_ids[q], c.doc_ids[d], s) for q, rel in enumerate(c.relevant) for d, s in rel.items()]
        splits = split_qrels(qrels, args.split, args.test_fraction, args.seed)
        write_beir(args.out, c.doc_ids, c.titles, c.texts, dict(zip(c.query_ids, c.queries)), splits, args.split,
                   args.overwrite)
        return {"documents": c.n_docs, "queries": len(c.queries), "judgments": len(qrels),
                "splits": {k: len({q for q, _, _ in v}) for k, v in splits.items()}}
    for name in ("docs", "queries", "qrels"):
        if not getattr(args, name):
            raise UserError(f"--format smart needs --docs, --queries and --qrels; --{name} is missing")
    docs = read_smart(args.docs, "documents")
    queries = read_smart(args.queries, "queries")
    if args.query_ids == "order":
        queries = [(str(i + 1), t, x) for i, (_, t, x) in enumerate(queries)]
    doc_ids = [d for d, _, _ in docs]
    # records without .T or .W are kept as empty documents (they may be judged relevant), and counted
    empty = sum(1 for _, t, x in docs if not t and not x)
    qmap = {}
    for q, t, x in queries:
        text = " ".join(s for s in (t, x) if s)
        if not text:
            raise UserError(f"{args.queries}: query '.I {q}' has no .W (or .T) text; remove it or give it text")
        qmap[q] = text
    grades = parse_relevance_map(args.relevance_map) if args.relevance_map else None
    known_docs = set(doc_ids)
    qrels = []
    for q, d, s in read_raw_qrels(args.qrels, args.qrels_format):
        if q not in qmap:
            hint = (" (Cranfield-style qrels number queries 1..n in file order: pass --query-ids order)"
                    if args.query_ids == "record" else "")
            raise UserError(f"{args.qrels} names query '{q}', which is not in {args.queries}{hint}")
        if d not in known_docs:
            raise UserError(f"{args.qrels} names document '{d}', which is not in {args.docs}; fix the id or "
                            "remove the line")
        if grades is not None:
            if s not in grades:
                raise UserError(f"{args.qrels}: score {s:g} is not in --relevance-map {args.relevance_map}")
            s = grades[s]
        qrels.append((q, d, s))
    splits = split_qrels(qrels, args.split, args.test_fraction, args.seed)
    write_beir(args.out, doc_ids, [t for _, t, _ in docs], [x for _, _, x in docs], qmap, splits, args.split,
               args.overwrite)
    return {"documents": len(docs), "queries": len(qmap), "judgments": len(qrels), "empty_documents": empty,
            "splits": {k: len({q for q, _, _ in v}) for k, v in splits.items()}}


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["pairs", "smart"], required=True,
                   help="pairs: a JSONL of {\"query\", \"passage\"}; smart: .I/.T/.W files with a qrels file")
    p.add_argument("--out", required=True, help="the collection directory to write (BEIR layout)")
    p.add_argument("--pairs", help="--format pairs: the JSONL file")
    p.add_argument("--docs", help="--format smart: the documents file (e.g. CISI.ALL, cran.all.1400)")
    p.add_argument("--queries", help="--format smart: the queries file (e.g. CISI.QRY, cran.qry)")
    p.add_argument("--qrels", help="--format smart: relevance file (e.g. CISI.REL, cranqrel)")
    p.add_argument("--qrels-format", default="auto", choices=["auto", "pair", "score", "trec", "pair-00"],
                   help="pair: 'q d'; score: 'q d grade'; trec: 'q 0 d grade'; pair-00: 'q d 0 0.0' (CISI); "
                        "auto tells them apart")
    p.add_argument("--query-ids", default="record", choices=["record", "order"],
                   help="record: the '.I' numbers; order: 1..n in file order (what Cranfield's qrels use)")
    p.add_argument("--relevance-map", default="",
                   help="raw score -> grade, e.g. '1:4,2:3,3:2,4:1,5:0,-1:0' (Cranfield: 1 is the most relevant)")
    p.add_argument("--split", default="test", help="the qrels file name: qrels/SPLIT.tsv (default test)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction of the judged queries: writes qrels/train.tsv and qrels/test.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction split")
    p.add_argument("--overwrite", action="store_true")
