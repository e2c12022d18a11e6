"""What a retrieval run's embeddings look like while it trains: the sums of loss.batch_stats between log
steps (RetrievalStats: the retrieval columns of metrics.jsonl) and the collapse rule (its warning, and
`mmscale report`'s). Plain Python, no torch."""
from __future__ import annotations

COLLAPSE_COS = 0.9
# the rule is read over at least this many queries: a log step of 4 queries (an experiment's micro-batch) has an
# in-batch accuracy of 0, 0.25 or 0.5 by chance, and a pretrained model starts at a cosine near 0.9, so one row
# alone raised false alarms on runs that ended at accuracy 1.0 (docs/experiments/paper-small-tinystories)
COLLAPSE_QUERIES = 64


class RetrievalStats:
    """Sums of batch_stats between two reads: the retrieval columns of metrics.jsonl and the collapse warning.

    Rank-local (rank 0's micro-batches are what metrics.jsonl shows). read() returns the means since the last
    read, and a one-line warning the first time the embeddings look collapsed (`collapse_at`: over the last
    COLLAPSE_QUERIES queries or more, documents' mean pairwise cosine >= COLLAPSE_COS while in-batch accuracy is
    below twice chance)."""

    def __init__(self):
        self._sum: dict = {}
        self.first: dict | None = None
        self.warned = False
        self.history: list[dict] = []

    def add(self, s: dict) -> None:
        for k, v in s.items():
            self._sum[k] = self._sum.get(k, 0.0) + v

    def read(self, step: int) -> tuple[dict, str | None]:
        s, self._sum = self._sum, {}
        if not s.get("queries"):
            return {}, None
        q, b = s["queries"], s["batches"]
        row = {"inbatch_acc": s["acc"] / q, "inbatch_chance": s["chance"] / q, "doc_cos": s["cos"] / b,
               "alignment": s["align"] / q, "uniformity": s["unif"] / b, "inbatch_queries": int(q)}
        self.first = self.first or {"step": step, **row}
        self.history.append({"step": step, **row})
        note = None
        w = None if self.warned else window_means(self.history, len(self.history) - 1)
        if w is not None and is_collapsed(w):
            self.warned = True
            note = (f"warning: step {step}: the embeddings are collapsing: over the last {w['queries']} queries the "
                    f"batches' documents have mean pairwise cosine {w['doc_cos']:.3f} (step {self.first['step']}: "
                    f"{self.first['doc_cos']:.3f}) and in-batch accuracy is {w['inbatch_acc']:.3f} (chance "
                    f"{w['inbatch_chance']:.3f}); see docs/retrieval-collapse.md (retrieval.position=mean, a lower "
                    "train.lr, train.warmup_steps)")
        return row, note


LAST_STATS: list[RetrievalStats] = []  # the stats of the model the last retrieval_model_factory built (train.py);
# PairGroups.log_metrics reads them on log steps


def is_collapsed(m: dict) -> bool:
    """Documents' mean cosine >= COLLAPSE_COS while in-batch accuracy is below twice chance (on window means)."""
    return m["doc_cos"] >= COLLAPSE_COS and m["inbatch_acc"] < 2 * m["inbatch_chance"]


def window_means(rows: list[dict], end: int) -> dict | None:
    """Query-weighted means of rows[..end] going back until they hold COLLAPSE_QUERIES queries; None before that.
    A row without a query count (metrics.jsonl of older runs) counts as enough on its own."""
    tot = {"inbatch_acc": 0.0, "inbatch_chance": 0.0, "doc_cos": 0.0}
    q = 0
    for r in (rows[i] for i in range(end, -1, -1)):  # no copy of the history per log step
        if r.get("doc_cos") is None or r.get("inbatch_acc") is None:
            continue
        n = r.get("inbatch_queries") or COLLAPSE_QUERIES
        for k in tot:
            tot[k] += n * (r.get(k) or 0.0)
        q += n
        if q >= COLLAPSE_QUERIES:
            return {**{k: v / q for k, v in tot.items()}, "queries": q}
    return None


def first_collapse(rows: list[dict]) -> tuple[dict, dict] | None:
    """(row, window means) of the first metrics.jsonl row at which the warning's rule holds, or None."""
    for i, r in enumerate(rows):
        w = window_means(rows, i)
        if w is not None and is_collapsed(w):
            return r, w
    return None
