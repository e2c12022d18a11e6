"""Training pairs: PairGroups, the endless stream of InfoNCE groups with the trainer's data-loader contract,
and CorpusPairs, (query, positive) views made from a corpus's own documents (`--pairs corpus:MODE`)."""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from mmscale.errors import UserError
from mmscale.retrieval.collection import Collection
from mmscale.retrieval.embedder import pad_batch
from mmscale.retrieval.loss import pack_mask
from mmscale.retrieval.stats import LAST_STATS


class PairGroups:
    """Endless groups of token sequences for InfoNCE, with the data-loader contract of the trainer.

    The stream is the (query, relevant document) pairs, a seeded permutation per epoch; global batch
    k holds stream positions [k W B, (k + 1) W B) and rank r its slice [k W B + r B, k W B + (r + 1) B),
    so the samples depend only on the global batch size (resume onto another world size continues it).
    The negatives of stream position t depend only on (seed, t).

    queries, docs: token lists; negatives[q]: the query's hard negatives, doc indices (or token lists);
    pairs: the stream items (query, doc) (default: query i with doc i), or ("corpus", mode, doc) items whose query,
    positive and excluded documents `views.view(item, t)` makes (CorpusPairs); excluded[q]: doc indices that
    are never negatives of q (default: doc q); hard_per_group: None takes the hard negatives in order
    (up to G - 2), k draws k of them per group with the seed.
    """

    def __init__(self, queries, passages, negatives, *, group_size: int, micro_batch: int, n_ctx: int,
                 seed: int, rank: int = 0, world: int = 1, pad_id: int = 0, pairs=None, excluded=None,
                 hard_per_group: int | None = None, gather: bool = False, views=None):
        self.q, self.p, self.negs, self.views = queries, passages, negatives, views
        self.pairs = pairs if pairs is not None else [(i, i) for i in range(len(queries))]
        self.excluded = excluded if excluded is not None else [np.array([i]) for i in range(len(queries))]
        self._excl_sets = [set(int(x) for x in e) for e in self.excluded]
        self.G, self.B, self.n_ctx, self.seed = group_size, micro_batch, n_ctx, seed
        self.rank, self.world, self.pad = rank, world, max(pad_id, 0)
        self.hard_per_group, self.gather = hard_per_group, gather
        most = max(len(e) for e in self.excluded)
        if group_size > 2 and len(passages) - most < group_size - 2:
            raise UserError(f"retrieval.group_size is {group_size} but a query has only {len(passages) - most} "
                            f"passages that are not relevant to it; set retrieval.group_size <= "
                            f"{len(passages) - most + 2} or add documents")
        self.batches = 0
        self._perm_epoch, self._perm = -1, None

    def _pair_at(self, t: int) -> tuple[int, int]:
        n = len(self.pairs)
        epoch = t // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        return self.pairs[self._perm[t % n]]

    def group_docs(self, t: int) -> tuple[list[int], list, set]:
        """(query tokens, [positive, negatives...], the doc indices never negatives of it) of stream position t:
        candidates are doc indices, or token lists (negatives given as text, corpus-pair positives)."""
        item = self._pair_at(t)
        if len(item) == 3:  # a pair made from the corpus (CorpusPairs): random documents as negatives
            query, positive, excl = self.views.view(item, t)
            cands, hard = [positive], []
        else:
            qi, di = item
            query, excl = self.q[qi], self._excl_sets[qi]
            hard = [x for x in self.negs[qi] if not (isinstance(x, int) and x in excl)] if self.negs else []
            cands = [di]
        if self.hard_per_group is None:
            hard = hard[:self.G - 2]
        elif hard:
            rng = np.random.default_rng([self.seed, 104_729, t])
            k = min(self.hard_per_group, len(hard), self.G - 2)
            hard = [hard[j] for j in rng.choice(len(hard), k, replace=False)]
        cands = cands + hard
        need = self.G - 1 - len(cands)
        if need > 0:
            rng = np.random.default_rng([self.seed, 7_919, t])
            taken = excl | {x for x in hard if isinstance(x, int)}
            while need > 0:
                for x in rng.integers(0, len(self.p), size=2 * need + 8).tolist():
                    if x not in taken:
                        taken.add(x)
                        cands.append(x)
                        need -= 1
                        if need == 0:
                            break
        return query, cands, excl

    def group(self, t: int) -> list[list[int]]:
        """[query, passage, negatives...] token lists of stream position t."""
        query, cands, _ = self.group_docs(t)
        return [query] + [self.p[x] if isinstance(x, int) else x for x in cands]

    def _sources(self, t: int, cands: list) -> list:
        """The document each candidate of stream position t comes from: a doc index as itself, a corpus pair's
        positive (a token list made from document d) as d, a negative given as text as None (unknown)."""
        item = self._pair_at(t)
        first = item[2] if len(item) == 3 else None
        return [x if isinstance(x, int) else (first if j == 0 else None) for j, x in enumerate(cands)]

    def _mask(self, k: int, own: dict) -> "torch.Tensor":
        """bool [B, C]: the candidates of this rank's queries that are relevant to them (never the own positive):
        a candidate counts as the document it comes from (_sources), so another view of the query's own
        document (or of a duplicate or a relevant one) is masked like the document itself.

        `own` maps this rank's stream positions to their group_docs."""
        start = (k * self.world + self.rank) * self.B
        if self.gather:
            everyone = range(k * self.world * self.B, (k + 1) * self.world * self.B)
            flat = [s for u in everyone
                    for s in self._sources(u, (own[u] if u in own else self.group_docs(u))[1])]
        mask = []
        for b, t in enumerate(range(start, start + self.B)):
            _, cands, excl = own[t]
            row = [s is not None and s in excl for s in (flat if self.gather else self._sources(t, cands))]
            row[(self.rank * self.B + b) * (self.G - 1) if self.gather else 0] = False
            mask.append(row)
        return torch.tensor(mask, dtype=torch.bool)

    def batch_at(self, k: int) -> dict:
        start = (k * self.world + self.rank) * self.B
        own = {t: self.group_docs(t) for t in range(start, start + self.B)}
        seqs = [s for t in own for s in [own[t][0]] + [self.p[x] if isinstance(x, int) else x for x in own[t][1]]]
        ids, lengths = pad_batch(seqs, self.pad)
        full = torch.full((len(seqs), self.n_ctx), self.pad, dtype=torch.long)
        full[:, :ids.shape[1]] = ids  # a fixed width: the same shapes every step (compile-friendly)
        return {"input_ids": full, "labels": torch.cat([lengths, pack_mask(self._mask(k, own))])}

    def log_metrics(self, step: int) -> tuple[dict, str | None]:
        """The trainer's hook on log steps: (columns for metrics.jsonl, a warning line or None): the retrieval
        statistics (RetrievalStats) of the model being trained, since the last log step."""
        return LAST_STATS[0].read(step) if LAST_STATS else ({}, None)

    def __iter__(self):
        while True:
            batch = self.batch_at(self.batches)
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "world": self.world, "micro_batch": self.B}

    def load_state_dict(self, state: dict) -> None:
        # the same global batch on another world size: scale the batch count
        self.batches = state["batches"] * state["world"] * state.get("micro_batch", self.B) // (self.world * self.B)



# ---------------------------------------------------------------------------------------------
# pairs made from the corpus itself

CORPUS_MODES = ("title-body", "crop", "ict")


def parse_corpus_pairs(spec: str) -> tuple[list[str], bool]:
    """`corpus:MODE[+MODE...][+judged]` (',' or '|' also separate) -> (corpus modes, whether the collection's
    judged queries are mixed in). UserError naming the modes otherwise."""
    body = spec[len("corpus:"):] if spec.startswith("corpus:") else ""
    parts = [x.strip() for x in re.split(r"[+,|]", body) if x.strip()]
    bad = [x for x in parts if x not in CORPUS_MODES + ("judged",)]
    modes = [x for x in dict.fromkeys(parts) if x in CORPUS_MODES]
    if bad or not modes:
        raise UserError(f"--pairs {spec!r}: corpus pairs are 'corpus:MODE[+MODE...][+judged]' with MODE one of "
                        f"{', '.join(CORPUS_MODES)} (e.g. corpus:crop+judged)")
    return modes, "judged" in parts


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: split after . ! ? followed by white space (abbreviations may split too)."""
    return [x for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x]


class CorpusPairs:
    """(query, positive) views of a corpus's documents for InfoNCE, deterministic in (seed, stream position t):

    title-body  the title -> the text (first n_ctx tokens), for documents with both;
    crop        a random span of 10-50% of the document (title + text), at most n_ctx tokens -> an independent
                random window of n_ctx tokens of it (the whole document when shorter), as unsupervised dense retrievers train
                (Izacard et al. 2021); documents of at least 8 tokens;
    ict         one sentence (starting in the first 3/4 of the window) -> the title and the rest of the document
                without it, cut to n_ctx (inverse cloze, Lee et al. 2019); documents of 2+ sentences.

    titles, texts: token lists per document; sentences: per document, the token lists of its text's
    sentences; duplicates[d]: the documents with the same text as d or near-duplicates of it (d included;
    Collection.duplicate_sets), never its negatives.
    """

    def __init__(self, titles, texts, sentences, duplicates, n_ctx: int, seed: int):
        self.titles, self.texts, self.sentences = titles, texts, sentences
        self.dups, self.n_ctx, self.seed = duplicates, n_ctx, seed

    @classmethod
    def from_collection(cls, sp, coll: Collection, n_ctx: int, seed: int) -> "CorpusPairs":
        titles = [list(x) for x in sp.encode(list(coll.titles))]
        texts = [list(x) for x in sp.encode(list(coll.texts))]
        sents = [split_sentences(t) for t in coll.texts]
        flat = sp.encode([x for ss in sents for x in ss]) if any(sents) else []
        sentences, k = [], 0
        for ss in sents:
            sentences.append([list(x) for x in flat[k:k + len(ss)]])
            k += len(ss)
        return cls(titles, texts, sentences, coll.duplicate_sets(), n_ctx, seed)

    def _ict_choices(self, d: int) -> list[int]:
        sents = self.sentences[d]
        if len(sents) < 2:
            return []
        out, at = [], min(len(self.titles[d]), self.n_ctx // 2)
        for j, s in enumerate(sents):
            if at >= self.n_ctx * 3 // 4:
                break
            if len(s) >= 3:
                out.append(j)
            at += len(s)
        return out

    def eligible(self, mode: str) -> list[int]:
        """The documents that can make a pair of this mode."""
        n = len(self.texts)
        if mode == "title-body":
            return [d for d in range(n) if self.titles[d] and self.texts[d]]
        if mode == "crop":
            return [d for d in range(n) if len(self.titles[d]) + len(self.texts[d]) >= 8]
        return [d for d in range(n) if self._ict_choices(d)]

    def items(self, modes) -> list[tuple]:
        return [("corpus", m, d) for m in modes for d in self.eligible(m)]

    def view(self, item: tuple, t: int) -> tuple[list[int], list[int], set]:
        """(query tokens, positive tokens, excluded doc indices) of a ("corpus", mode, doc) item at stream position t."""
        _, mode, d = item
        n = self.n_ctx
        rng = np.random.default_rng([self.seed, 524_287, t])
        if mode == "title-body":
            return self.titles[d][:n], self.texts[d][:n], self.dups[d]
        if mode == "crop":
            doc = self.titles[d] + self.texts[d]
            L = len(doc)
            lo = min(n, max(1, math.ceil(0.1 * L)))
            hi = max(lo, min(n, math.ceil(0.5 * L)))
            ql = int(rng.integers(lo, hi + 1))
            qs = int(rng.integers(0, L - ql + 1))
            pl = min(n, L)
            ps = int(rng.integers(0, L - pl + 1))
            return doc[qs:qs + ql], doc[ps:ps + pl], self.dups[d]
        if mode == "ict":
            choices = self._ict_choices(d)
            j = choices[int(rng.integers(0, len(choices)))]
            rest = [tok for k, s in enumerate(self.sentences[d]) if k != j for tok in s]
            title = self.titles[d][:n // 2]
            return self.sentences[d][j][:n], (title + rest)[:n], self.dups[d]
        raise UserError(f"unknown corpus pair mode {mode!r}; choose from {', '.join(CORPUS_MODES)}")



def is_corpus_pairs(pairs: str) -> bool:
    return bool(pairs) and pairs.startswith("corpus:")
