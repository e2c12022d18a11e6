"""`mmscale retrieval eval`: an export ranks every document of a collection for every query; nDCG@10,
Recall@10/100, MRR@10, MAP and top-1 among n beside the BM25 and hybrid rows, with paired per-query
comparisons (see the package docstring); format_table prints them."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mmscale.errors import UserError
from mmscale.retrieval import bm25
from mmscale.retrieval import metrics as ir_metrics
from mmscale.retrieval.collection import Collection, load_collection
from mmscale.retrieval.corpus import PASSAGE_MODES, choose_device, corpus_embeddings, query_sequences
from mmscale.retrieval.embedder import Embedder


def top1_table(query_emb, passage_emb, candidates: list[int], seed: int = 0, chunk: int = 64) -> list[dict]:
    """Top-1 accuracy and MRR of each query's own passage (row i of passage_emb) among n candidates.

    Candidates: the true passage plus n - 1 distractors drawn without replacement from the other
    passages with a seed fixed per (seed, n); ties split fairly (metrics.py).
    """
    q, p = np.asarray(query_emb, dtype=np.float32), np.asarray(passage_emb, dtype=np.float32)
    N = len(q)
    for n in candidates:
        if n < 2 or n > N:
            raise UserError(f"--candidates {n}: needs 2 <= n <= {N}, the number of held-out passages; "
                            f"pass smaller values or more pairs")
    ev = ir_metrics.Evaluator([{i: 1.0} for i in range(N)], [np.array([i]) for i in range(N)], N, candidates, seed)
    scorer = ir_metrics.dot_scorer(q, p)
    for s in range(0, N, chunk):
        idx = np.arange(s, min(s + chunk, N))
        ev.add(idx.tolist(), scorer(idx))
    return [{k: r[k] for k in ("candidates", "top1", "mrr", "queries")} for r in ev.result()["top1"]]


def evaluate_export(export: str, collection: str, candidates: list[int], *, seed: int = 0, batch_size: int = 32,
                    position: str = "last", progress: bool = True, split: str | None = None,
                    passage_mode: str = "truncate", cache_dir: str | os.PathLike | None = None,
                    baseline: bool = True, device: str = "auto", record: bool = False,
                    hybrid_split: str | None = None, hybrid_fixed: float | None = None) -> dict:
    """Full-corpus metrics and top-1 among n of an export (and of BM25) on a collection; see the module docstring.

    The hybrid row's weight: `hybrid_fixed` when given, else chosen on the qrels split `hybrid_split` (default: dev
    when the collection has one, else train), else reciprocal-rank fusion."""
    coll = load_collection(collection, split, prefer="test")
    relevant, excluded = coll.relevant, coll.excluded()
    ir_metrics.Evaluator(relevant, excluded, coll.n_docs, candidates, seed)  # bad --candidates fail before embedding
    if passage_mode not in PASSAGE_MODES:
        raise UserError(f"--passage-mode must be one of {', '.join(PASSAGE_MODES)}, got {passage_mode!r}")
    emb = Embedder.from_export(export, position=position, device=choose_device(device))
    if emb.position == "idf":
        emb.set_corpus(coll.doc_texts())
    qseqs, q_cut = query_sequences(emb.tokenizer, coll, emb.n_ctx)
    q = emb.encode_ids(qseqs, batch_size=batch_size, progress="embedding queries" if progress else False)
    d, starts, cache = corpus_embeddings(emb, export, coll, passage_mode, batch_size=batch_size,
                                         cache_dir=cache_dir, progress=progress)
    scorer = ir_metrics.dot_scorer(q, d, starts if passage_mode == "max_chunk" else None)
    model = ir_metrics.evaluate_scores(scorer, relevant, excluded, coll.n_docs, candidates, seed, record,
                                       progress="ranking" if progress else None)
    mres = model.result()
    out = {"export": str(export), "collection": str(collection), "split": coll.split,
           "n_queries": len(coll.queries), "n_corpus": coll.n_docs,
           "n_relevant": sum(len(r) for r in relevant), "n_judgments": coll.judgments,
           "dropped_queries": coll.dropped_queries, "n_pairs": len(coll.queries), "seed": seed,
           "position": position, "passage_mode": passage_mode, "n_ctx": emb.n_ctx,
           "truncated": {"documents": cache["truncated"], "queries": q_cut}, "corpus_windows": cache["sequences"],
           "corpus_cache": {"path": cache["cache"], "hit": cache["hit"]},
           "metrics": {k: mres[k] for k in ir_metrics.METRICS}, "results": mres["top1"], "baseline": None}
    if record:
        out["_evaluators"] = {"model": model}
    if baseline:
        index = bm25.BM25Index(coll.doc_texts())
        lex = ir_metrics.evaluate_scores(lambda idx: index.scores([coll.queries[i] for i in idx]), relevant,
                                         excluded, coll.n_docs, candidates, seed, record,
                                         progress="BM25" if progress else None)
        lres = lex.result()
        out["baseline"] = {"name": bm25.NAME, "metrics": {k: lres[k] for k in ir_metrics.METRICS},
                           "results": lres["top1"]}
        # the hybrid: BM25 and the model interpolated with a weight chosen on the collection's train queries,
        # or fused by reciprocal rank when it has none (never tuned on the queries it is measured on)
        lex_scores = lambda idx: index.scores([coll.queries[i] for i in idx])  # noqa: E731
        if hybrid_fixed is not None:
            if not 0 <= hybrid_fixed <= 1:
                raise UserError(f"--hybrid-weight must be in [0, 1], got {hybrid_fixed}")
            weight, how = hybrid_fixed, "weight given"
        else:
            weight, how = hybrid_weight(emb, coll, collection, index, passage_mode, d, starts, batch_size,
                                        hybrid_split)
        if weight is None:
            fused, name = ir_metrics.rrf_scorer([lex_scores, scorer]), \
                f"BM25 + model, reciprocal-rank fusion (k {ir_metrics.RRF_K}; {how})"
        else:
            def fused(idx):
                return ir_metrics.interpolate_scores(lex_scores(idx), scorer(idx), weight)
            fused.cols = getattr(scorer, "cols", coll.n_docs)
            name = f"BM25 + model, {1 - weight:.2f} x BM25 + {weight:.2f} x model (min-max per query; {how})"
        hyb = ir_metrics.evaluate_scores(fused, relevant, excluded, coll.n_docs, candidates, seed, record,
                                         progress="hybrid" if progress else None)
        hres = hyb.result()
        per = {name_: [m["ndcg@10"] for m in ev.per_query] for name_, ev in (("model", model), ("bm25", lex),
                                                                             ("hybrid", hyb))}
        out["hybrid"] = {"name": name, "weight": weight,
                         "metrics": {k: hres[k] for k in ir_metrics.METRICS}, "results": hres["top1"]}
        out["paired_ndcg@10"] = {"hybrid - bm25": ir_metrics.paired_difference(per["hybrid"], per["bm25"]),
                                 "model - bm25": ir_metrics.paired_difference(per["model"], per["bm25"])}
        if record:
            out["_evaluators"]["bm25"] = lex
            out["_evaluators"]["hybrid"] = hyb
    return out


def hybrid_weight(emb, coll: Collection, collection: str, index, passage_mode: str, d, starts, batch_size: int,
                  split: str | None = None) -> tuple[float | None, str]:
    """(the model's weight in the BM25 + model interpolation, chosen on the queries of another qrels split of the
    collection: `split`, else dev, else train; or None when there is none besides the evaluated one, then the
    hybrid is reciprocal-rank fusion), and how. A model fine-tuned on the judged train queries looks better on
    them than on new queries: give it a dev split (or --hybrid-weight) for an unbiased weight."""
    root = Path(collection)
    if split:
        if not (root.is_dir() and (root / "qrels" / f"{split}.tsv").is_file()):
            raise UserError(f"--hybrid-split {split}: '{collection}' has no qrels/{split}.tsv")
        if split == coll.split:
            raise UserError(f"--hybrid-split {split} is the evaluated split; choose the weight on other queries")
    else:
        split = next((n for n in ("dev", "train") if root.is_dir() and (root / "qrels" / f"{n}.tsv").is_file()
                      and n != coll.split), None)
        if split is None:
            return None, "no other split to choose an interpolation weight on"
    train = load_collection(root, split)
    q = emb.encode_ids(query_sequences(emb.tokenizer, train, emb.n_ctx)[0], batch_size=batch_size)
    dense = ir_metrics.dot_scorer(q, d, starts if passage_mode == "max_chunk" else None)(np.arange(len(q)))
    w, _ = ir_metrics.choose_weight(index.scores(train.queries), dense, train.relevant)
    return w, f"weight chosen on the {len(train.queries)} {split} queries"


def format_table(result: dict) -> str:
    names = {"ndcg@10": "nDCG@10", "recall@10": "Recall@10", "recall@100": "Recall@100", "mrr@10": "MRR@10",
             "map": "MAP"}
    rows = [("model", result["metrics"], result["results"])]
    if result.get("baseline"):
        b = result["baseline"]
        rows.append((b["name"].split(" (")[0] + " (bm25s)", b["metrics"], b["results"]))
    if result.get("hybrid"):
        rows.append(("hybrid (BM25+model)", result["hybrid"]["metrics"], result["hybrid"]["results"]))
    w = max(len(r[0]) for r in rows) + 2
    t = result["truncated"]
    lines = [f"{result['collection']} (split {result['split']}): {result['n_queries']} queries, "
             f"{result['n_corpus']} documents, {result['n_relevant']} relevant judgments; "
             f"{t['documents']} documents longer than n_ctx {result['n_ctx']} ({result['passage_mode']}"
             + (f": {result['corpus_windows']} windows embedded" if result['passage_mode'] == "max_chunk" else "")
             + f"), {t['queries']} queries cut",
             f"{'':<{w}}" + "".join(f"{names[k]:>12}" for k in names)]
    for name, m, _ in rows:
        lines.append(f"{name:<{w}}" + "".join(f"{m[k]:>12.4f}" for k in names))
    if result.get("hybrid"):
        lines.append(f"hybrid: {result['hybrid']['name']}")
    for name, p in (result.get("paired_ndcg@10") or {}).items():
        lines.append(f"paired per-query nDCG@10, {name}: {p['mean']:+.4f} +- {p['se']:.4f} (SE, {p['n']} queries; "
                     f"{p['wins']} better, {p['ties']} equal, {p['losses']} worse)")
    lines.append(f"top-1 among n candidates (other relevant documents never distractors; ties split), "
                 f"{result['results'][0]['pairs'] if result['results'] else 0} query-document pairs, "
                 f"seed {result['seed']}:")
    head = f"{'candidates':>10}" + "".join(f"  {name + ' top-1':>16}  {name + ' MRR':>14}" for name, _, _ in
                                           [(r[0].split(' (')[0], 0, 0) for r in rows])
    lines.append(head)
    for i, r in enumerate(result["results"]):
        cells = "".join(f"  {rw[2][i]['top1']:>16.4f}  {rw[2][i]['mrr']:>14.4f}" for rw in rows)
        lines.append(f"{r['candidates']:>10}{cells}")
    cache = result["corpus_cache"]
    if cache["path"]:
        lines.append(f"corpus embeddings {'read from' if cache['hit'] else 'cached in'} {cache['path']}")
    return "\n".join(lines)
