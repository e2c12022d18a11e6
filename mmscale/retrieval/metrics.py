"""Ranking metrics over a whole corpus, the paper's top-1 among n candidates, blocked exact scoring.

Everything here is numpy on score rows: `scores[q, d]` of every document d for a query q, however they
were computed (dot products of embeddings, the best chunk of a document, BM25).

Metrics (graded relevance; a document is relevant when its judged grade is > 0):
  nDCG@10   linear gains (the grade), discount 1 / log2(rank + 1), ideal ranking from the judgments
  Recall@k  relevant documents in the top k / relevant documents judged for the query (k = 10, 100)
  MRR@10    1 / rank of the first relevant document, 0 beyond rank 10
  MAP       mean over relevant documents of precision at its rank (binary, the whole ranking)
Ties are split fairly: every metric is its expected value when tied documents are put in a uniformly
random order (exact closed forms, no sampling), so two identical passages neither both win nor both
lose. Queries without a relevant document are not evaluated (the collection loader drops them).

Top-1 among n (Badger 2024): for every (query, relevant document) pair, the document and n - 1
distractors drawn without replacement from the documents that are *not* relevant to the query (nor
exact duplicates of a relevant one); top-1 counts 1 / (1 + t) when t distractors tie with the document
and none beats it, MRR is the expected reciprocal rank under the same fair tie order. The draws depend
only on (seed, n) and the order of the pairs, so every scorer (a model, BM25) sees the same candidates.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from mmscale.errors import UserError

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map")


# ---------------------------------------------------------------------------------------------
# one query

def tie_groups(row: np.ndarray, rel_idx: np.ndarray, grades: np.ndarray) -> list[tuple[int, int, int, float, int]]:
    """The tie groups of a ranking that hold relevant documents, best first.

    Each is (above, size, n_relevant, gain, relevant_above): `above` documents score strictly higher,
    `size` documents (relevant or not) share the score, `n_relevant` of them are relevant with summed
    grade `gain`, and `relevant_above` relevant documents rank strictly higher.
    """
    s = row[rel_idx]
    out, rel_above = [], 0
    for v in np.unique(s)[::-1]:
        members = s == v
        above, size = int(np.count_nonzero(row > v)), int(np.count_nonzero(row == v))
        r = int(members.sum())
        out.append((above, size, r, float(grades[members].sum()), rel_above))
        rel_above += r
    return out


def _discounts(start: int, stop: int) -> np.ndarray:
    """1 / log2(rank + 1) for ranks start+1 .. stop."""
    ranks = np.arange(start + 1, stop + 1, dtype=np.float64)
    return 1.0 / np.log2(ranks + 1.0)


def metrics_from_groups(groups, grades: np.ndarray, k_ndcg: int = 10, k_recall: Sequence[int] = (10, 100),
                        k_mrr: int = 10) -> dict:
    """Expected nDCG@k, Recall@k, MRR@k and AP of one query under a fair (uniformly random) tie order."""
    R = len(grades)
    ideal = np.sort(np.asarray(grades, dtype=np.float64))[::-1][:k_ndcg]
    idcg = float((ideal * _discounts(0, len(ideal))).sum())
    dcg, ap = 0.0, 0.0
    recall = {k: 0.0 for k in k_recall}
    for above, size, r, gain, rel_above in groups:
        # every position of the group holds gain / size in expectation
        if above < k_ndcg:
            dcg += gain / size * float(_discounts(above, min(above + size, k_ndcg)).sum())
        for k in k_recall:
            recall[k] += r / size * min(max(k - above, 0), size)
        # P(position p of the group is relevant) = r / size; then the other r - 1 relevant documents
        # are spread over the other size - 1 positions: (r - 1)(p - 1)/(size - 1) of them before p
        p = np.arange(1, size + 1, dtype=np.float64)
        before = (r - 1) * (p - 1) / (size - 1) if size > 1 else np.zeros(1)
        ap += float((r / size * (rel_above + 1 + before) / (above + p)).sum())
    rr = 0.0
    if groups:
        above, size, r, _, _ = groups[0]
        # P(the first relevant document of the group sits at offset j) = prod_{i<j} (size-r-i)/(size-i) * r/(size-j)
        prob_none_yet = 1.0
        for j in range(0, min(size - r, k_mrr - above - 1) + 1):
            if above + j + 1 > k_mrr:
                break
            rr += prob_none_yet * r / (size - j) / (above + j + 1)
            prob_none_yet *= (size - r - j) / (size - j)
    out = {f"ndcg@{k_ndcg}": dcg / idcg if idcg > 0 else 0.0}
    out.update({f"recall@{k}": recall[k] / R for k in k_recall})
    out[f"mrr@{k_mrr}"] = rr
    out["map"] = ap / R
    return out


def query_metrics(row: np.ndarray, relevant: dict[int, float]) -> dict:
    """The metrics of one query from its score row over the corpus and its {doc index: grade > 0}."""
    rel_idx = np.fromiter(relevant.keys(), dtype=np.int64, count=len(relevant))
    grades = np.fromiter(relevant.values(), dtype=np.float64, count=len(relevant))
    return metrics_from_groups(tie_groups(np.asarray(row), rel_idx, grades), grades)


def fair_top1(true_score: float, distractor_scores: np.ndarray) -> tuple[float, float]:
    """(top-1 credit, expected reciprocal rank) of a true candidate among distractors, ties split fairly."""
    higher = int(np.count_nonzero(distractor_scores > true_score))
    ties = int(np.count_nonzero(distractor_scores == true_score))
    rr = float(np.mean(1.0 / np.arange(higher + 1, higher + ties + 2)))
    return (1.0 / (ties + 1) if higher == 0 else 0.0), rr


# ---------------------------------------------------------------------------------------------
# a whole evaluation

class Evaluator:
    """Accumulates the metrics of score rows given query block by query block, in query order.

    `relevant[q]` is {doc index: grade > 0}; `excluded[q]` the sorted doc indices that may never be
    distractors of q (its relevant documents and their exact duplicates). With `record`, the drawn
    distractors are kept in `self.draws[n]` as (query, relevant doc, distractors) for inspection.
    """

    def __init__(self, relevant: Sequence[dict], excluded: Sequence[np.ndarray], n_docs: int,
                 candidates: Sequence[int] = (), seed: int = 0, record: bool = False):
        self.relevant, self.excluded, self.N = relevant, excluded, n_docs
        self.candidates = sorted(set(candidates))
        pool_min = min((n_docs - len(e) for e in excluded), default=n_docs)
        for n in self.candidates:
            if n < 2 or n - 1 > pool_min:
                raise UserError(f"--candidates {n}: needs 2 <= n <= {pool_min + 1} (the held-out passages that are "
                                f"not relevant to a query, plus its own); pass smaller values or more documents")
        self.rngs = {n: np.random.default_rng([seed, n]) for n in self.candidates}
        self.sums = {m: 0.0 for m in METRICS}
        self.top1 = {n: [0.0, 0.0, 0] for n in self.candidates}
        self.next_query, self.record = 0, record
        self.draws = {n: [] for n in self.candidates}
        self.per_query: list[dict] = []

    def _distractors(self, q: int, n: int) -> np.ndarray:
        excl = self.excluded[q]
        draw = self.rngs[n].choice(self.N - len(excl), n - 1, replace=False)
        # map positions in the pool (all documents but the excluded, in order) back to document indices
        return draw + np.searchsorted(excl - np.arange(len(excl)), draw, side="right")

    def add(self, queries: Sequence[int], scores: np.ndarray) -> None:
        for row_i, q in enumerate(queries):
            if q != self.next_query:
                raise ValueError(f"queries must come in order: expected {self.next_query}, got {q}")
            self.next_query += 1
            row = scores[row_i]
            m = query_metrics(row, self.relevant[q])
            self.per_query.append(m)
            for k in METRICS:
                self.sums[k] += m[k]
            for n in self.candidates:
                acc = self.top1[n]
                for d in self.relevant[q]:
                    dis = self._distractors(q, n)
                    if self.record:
                        self.draws[n].append((q, d, dis))
                    hit, rr = fair_top1(row[d], row[dis])
                    acc[0] += hit
                    acc[1] += rr
                    acc[2] += 1

    def result(self) -> dict:
        nq = self.next_query
        if nq != len(self.relevant):
            raise ValueError(f"evaluated {nq} of {len(self.relevant)} queries")
        out = {k: self.sums[k] / nq for k in METRICS}
        out["top1"] = [{"candidates": n, "top1": t / c, "mrr": r / c, "queries": nq, "pairs": c}
                       for n, (t, r, c) in self.top1.items()]
        return out


def dot_scorer(query_emb: np.ndarray, doc_emb: np.ndarray, doc_starts: np.ndarray | None = None,
               doc_block: int = 65536) -> Callable[[np.ndarray], np.ndarray]:
    """scores(query indices) -> [len, N]: exact dot products, document block by document block.

    With `doc_starts` the rows of `doc_emb` are chunks of documents, document i owning rows
    doc_starts[i] .. doc_starts[i+1] - 1 (contiguous, at least one each), and a document scores the
    best of its chunks.
    """
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    d = np.ascontiguousarray(doc_emb, dtype=np.float32)
    n_docs = len(doc_starts) if doc_starts is not None else len(d)

    def scores(idx):
        idx = np.asarray(idx)
        out = np.empty((len(idx), n_docs), dtype=np.float32)
        qb = q[idx]
        if doc_starts is None:
            for s in range(0, n_docs, doc_block):
                out[:, s:s + doc_block] = qb @ d[s:s + doc_block].T
        else:
            chunk = qb @ d.T
            out[:] = np.maximum.reduceat(chunk, doc_starts, axis=1)
        return out

    scores.cols = len(d)  # the width of the score matrix one query block computes (query_blocks' budget)
    return scores


def query_blocks(n_queries: int, n_docs: int, budget: int = 1 << 24) -> Iterator[np.ndarray]:
    """Query index blocks whose score matrix holds at most ~`budget` floats."""
    step = max(1, min(n_queries, budget // max(n_docs, 1)))
    for s in range(0, n_queries, step):
        yield np.arange(s, min(s + step, n_queries))


def evaluate_scores(scorer: Callable[[np.ndarray], np.ndarray], relevant, excluded, n_docs: int,
                    candidates=(), seed: int = 0, record: bool = False, progress: str | None = None) -> Evaluator:
    ev = Evaluator(relevant, excluded, n_docs, candidates, seed, record)
    blocks = list(query_blocks(len(relevant), max(n_docs, getattr(scorer, "cols", 0))))
    if progress:
        blocks = tqdm(blocks, desc=progress, unit="block", leave=False)
    for idx in blocks:
        ev.add(idx.tolist(), scorer(idx))
    return ev


# ---------------------------------------------------------------------------------------------
# fusion (the hybrid row) and paired comparisons

RRF_K = 60


def min_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based competition ranks of each row's scores, best first: tied scores share the best rank of their tie
    (1 + the number of strictly higher scores)."""
    s = np.asarray(scores, dtype=np.float64)
    neg_sorted = np.sort(-s, axis=1)
    return np.stack([np.searchsorted(neg_sorted[i], -s[i], side="left") + 1 for i in range(len(s))]) \
        if len(s) else np.zeros_like(s, dtype=np.int64)


def rrf_scores(score_mats: Sequence[np.ndarray], k: int = RRF_K) -> np.ndarray:
    """Reciprocal-rank fusion (Cormack et al. 2009): sum over the systems of 1 / (k + rank), ranks by min_ranks."""
    return sum(1.0 / (k + min_ranks(m)) for m in score_mats)


def rrf_scorer(scorers: Sequence[Callable[[np.ndarray], np.ndarray]], k: int = RRF_K):
    """scores(query indices) -> the RRF of the given scorers' rows (each over the same documents)."""
    def scores(idx):
        return rrf_scores([f(idx) for f in scorers], k)
    scores.cols = max(getattr(f, "cols", 0) for f in scorers)
    return scores


def minmax_rows(scores: np.ndarray) -> np.ndarray:
    """Each row scaled to [0, 1] by its own min and max (a constant row becomes 0)."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = s.min(1, keepdims=True), s.max(1, keepdims=True)
    return np.where(hi > lo, (s - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)


def interpolate_scores(lexical: np.ndarray, dense: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * minmax(lexical) + weight * minmax(dense), row by row."""
    return (1.0 - weight) * minmax_rows(lexical) + weight * minmax_rows(dense)


WEIGHT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def choose_weight(lexical: np.ndarray, dense: np.ndarray, relevant, grid=WEIGHT_GRID) -> tuple[float, dict]:
    """The interpolation weight of `grid` with the best mean nDCG@10 over the given (training) queries, the
    smallest on ties; and {weight: mean nDCG@10}."""
    table = {}
    for w in grid:
        fused = interpolate_scores(lexical, dense, w)
        table[w] = float(np.mean([query_metrics(fused[i], relevant[i])["ndcg@10"] for i in range(len(relevant))]))
    best = max(table.values())
    return min(w for w, v in table.items() if v == best), table


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Per-query a - b: mean, standard error of the mean (sample SD / sqrt n), and how many queries a wins,
    ties, loses."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(d.mean()) if n else float("nan"), "se": se, "n": n, "wins": int((d > 0).sum()),
            "ties": int((d == 0).sum()), "losses": int((d < 0).sum())}


# ---------------------------------------------------------------------------------------------
# top k (mining hard negatives)

def have_faiss() -> bool:
    try:  # lazy: faiss is optional (exact top k on large corpora), numpy does the rest
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def top_k(query_emb: np.ndarray, doc_emb: np.ndarray, k: int, backend: str = "auto") -> np.ndarray:
    """Indices [Q, k] of the k best documents per query by dot product (exact), best first.

    backend: "numpy" (blocked matmul + argpartition), "faiss" (an exact flat inner-product index),
    "auto" (faiss when installed and the corpus has more than 100,000 rows).
    """
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    d = np.ascontiguousarray(doc_emb, dtype=np.float32)
    k = min(k, len(d))
    if backend == "auto":
        backend = "faiss" if len(d) > 100_000 and have_faiss() else "numpy"
    if backend == "faiss":
        import faiss  # lazy: optional, see have_faiss

        index = faiss.IndexFlatIP(d.shape[1])
        index.add(d)
        return index.search(q, k)[1].astype(np.int64)
    out = np.empty((len(q), k), dtype=np.int64)
    for idx in query_blocks(len(q), len(d)):
        s = q[idx] @ d.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
        out[idx] = np.take_along_axis(part, order, 1)
    return out
