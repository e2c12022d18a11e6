"""The lexical baseline: BM25 through the `bm25s` package (Lucene's variant, k1 1.5, b 0.75).

Texts are tokenized by bm25s's own tokenizer (lower-cased words of 2+ characters, English stop words
removed, no stemming), documents whole (BM25 has no window: it sees every word of a long document).

    index = BM25Index(["doc one", "doc two"])
    index.scores(["a query"])          # float32 [1, 2]: the score of every document
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmscale.errors import UserError

STOPWORDS = "en"
PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}
NAME = "BM25 (bm25s, lucene k1 1.5 b 0.75)"


def load_bm25s():
    """The bm25s module, or a one-line UserError naming the fix."""
    try:  # lazy: an optional dependency (only the BM25 rows and BM25-mined negatives need it)
        import bm25s
    except ImportError:
        raise UserError("the BM25 baseline needs the bm25s package: pip install bm25s (tools/setup_env.sh "
                        "installs it), or pass --no-baseline") from None
    return bm25s


class BM25Index:
    def __init__(self, docs: Sequence[str]):
        bm25s = load_bm25s()
        self.retriever = bm25s.BM25(**PARAMS)
        self.retriever.index(bm25s.tokenize(list(docs), stopwords=STOPWORDS, show_progress=False),
                             show_progress=False)
        self.n_docs = len(docs)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        bm25s = load_bm25s()
        toks = bm25s.tokenize(list(queries), stopwords=STOPWORDS, show_progress=False, return_ids=False)
        out = np.zeros((len(toks), self.n_docs), dtype=np.float32)
        for i, t in enumerate(toks):
            if t:  # a query of stop words only scores nothing
                out[i] = self.retriever.get_scores(t)
        return out
