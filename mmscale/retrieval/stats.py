"""What a retrieval run's embeddings look like while it trains: the sums of loss.batch_stats between log
steps (RetrievalStats: the retrieval columns of metrics.jsonl) and the collapse rule (its warning, and
`mmscale report`'s). Plain Python, no torch."""
from __future__ import annotations

COLLAPSE_COS = 0.9


class RetrievalStats:
    """Sums of batch_stats between two reads: the retrieval columns of metrics.jsonl and the collapse warning.

    Rank-local (rank 0's micro-batches are what metrics.jsonl shows). read() returns the means since the last
    read, and a one-line warning the first time the batch's documents look collapsed (mean pairwise cosine
    >= COLLAPSE_COS while in-batch accuracy is below twice chance)."""

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
               "alignment": s["align"] / q, "uniformity": s["unif"] / b}
        self.first = self.first or {"step": step, **row}
        self.history.append({"step": step, **row})
        note = None
        if not self.warned and row["doc_cos"] >= COLLAPSE_COS and row["inbatch_acc"] < 2 * row["inbatch_chance"]:
            self.warned = True
            note = (f"warning: step {step}: the embeddings are collapsing: the batch's documents have mean pairwise "
                    f"cosine {row['doc_cos']:.3f} (step {self.first['step']}: {self.first['doc_cos']:.3f}) and "
                    f"in-batch accuracy is {row['inbatch_acc']:.3f} (chance {row['inbatch_chance']:.3f}); see "
                    "docs/retrieval-collapse.md (retrieval.position=mean, a lower train.lr, train.warmup_steps)")
        return row, note


LAST_STATS: list[RetrievalStats] = []  # the stats of the model the last retrieval_model_factory built (train.py);
# PairGroups.log_metrics reads them on log steps


def collapsed(row: dict) -> bool:
    """The collapse rule of RetrievalStats' warning, on one metrics.jsonl row."""
    return (row.get("doc_cos") is not None and row.get("inbatch_acc") is not None
            and row["doc_cos"] >= COLLAPSE_COS and row["inbatch_acc"] < 2 * row.get("inbatch_chance", 0.0))
