"""Retrieval fine-tuning (InfoNCE) and evaluation on whole collections: `mmscale retrieval train|eval|import`.

    mmscale retrieval import --format smart --docs CISI.ALL --queries CISI.QRY --qrels CISI.REL --out cisi
    mmscale retrieval train --init exports/mixer --collection cisi --split train --negatives bm25 run.dir=runs/ret
    torchrun --standalone --nproc_per_node 2 -m mmscale.cli retrieval train --init ... engine.kind=fsdp
    mmscale convert runs/ret exports/mixer-retrieval
    mmscale retrieval eval exports/mixer-retrieval --collection cisi --candidates 32,128

A collection is a BEIR-layout directory or a pairs JSONL (mmscale.retrieval_data); `--pairs corpus:MODE...`
with a collection trains on pairs made from its corpus (CorpusPairs: title -> body, crop -> window, sentence ->
rest), optionally mixed with its judged queries. The paper's method (Badger 2024, v2+): the generative model
without its LM head embeds a text by its hidden state at one token (mmscale.embedder); here the default is the
mean over the text's tokens (retrieval.position mean: last-token embeddings of small models made InfoNCE
collapse, docs/retrieval-collapse.md), and every log step records in-batch accuracy, alignment, uniformity
and the batch's document cosine, with a warning on collapse (RetrievalStats). Training uses InfoNCE on cosine similarity with temperature tau: each
example is a group of 1 query, one of its relevant documents and group_size - 2 negatives (the
query's given or mined hard negatives first, then random documents). A document judged relevant to
the query (or an exact or near duplicate of one: word 3-shingle Jaccard >= 0.8,
retrieval_data.near_duplicates) is never its negative: not in its group, and, with
retrieval.gather_negatives (every query also scores the candidates of all other groups on all ranks,
gathered without gradient), masked out of the gathered candidates. A pair made from the corpus counts as
its document: with several corpus modes (corpus:crop+ict) two items of one document (or of duplicates)
in one gathered batch are never each other's negatives, and neither is a corpus view of a relevant document.

Training is the pre-training loop (mmscale.train.train) with a retrieval model and data factory,
so every engine, checkpoints, resume, signals and metrics work unchanged: the model's `forward`
is replaced on the instance by the InfoNCE loss (parameter names, hence checkpoints and
`mmscale convert`, are those of the language model), and a batch is {"input_ids": Long[B*G, n_ctx]
(right-padded groups), "labels": Long[B*G + words]}: the number of real tokens of each sequence,
then the bit-packed mask [B, candidates] of candidates that must not count as negatives.

Evaluation ranks every document of the corpus for every query (mmscale.ir_metrics): nDCG@10,
Recall@10/100, MRR@10, MAP, and the paper's top-1 among n, beside a BM25 row on the same queries,
corpus and candidates (mmscale.bm25) and a hybrid row (BM25 and model scores interpolated with a weight
chosen on another split's queries, or reciprocal-rank fusion), with paired per-query comparisons. Corpus embeddings are cached, keyed by the export's files, the
corpus, the passage mode and the embedding position.

Long documents (retrieval.passage_mode): `truncate` embeds the first n_ctx tokens of title + text;
`first_window` the first window of the max_chunk split (the title, then the text's first tokens);
`max_chunk` splits the text into windows of n_ctx tokens, each starting with the title, and scores a
document by its best window. Training always embeds the first window (truncate or first_window);
both say how many documents were longer than the window.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from mmscale.errors import UserError
from mmscale.retrieval_data import Collection, collection_from_pairs, load_collection, read_pairs  # noqa: F401

CACHE_VERSION = 2  # 2: near-duplicates never mined; bidirectional models embed at width n_ctx


# ---------------------------------------------------------------------------------------------
# groups

def pack_mask(mask) -> "torch.Tensor":
    """bool [B, C] -> Long[B * ceil(C / 32)]: 32 bits per word."""
    import torch

    B, C = mask.shape
    words = (C + 31) // 32
    padded = torch.zeros(B, words * 32, dtype=torch.long)
    padded[:, :C] = torch.as_tensor(mask, dtype=torch.long)
    shifts = torch.arange(32, dtype=torch.long)
    return (padded.view(B, words, 32) << shifts).sum(-1).reshape(-1)


def unpack_mask(words, rows: int, cols: int):
    """The inverse of pack_mask: bool [rows, cols]."""
    import torch

    w = words.view(rows, -1)
    shifts = torch.arange(32, dtype=torch.long, device=words.device)
    bits = (w.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, -1)[:, :cols].bool()


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
        import torch

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
        import torch

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
        import torch

        from mmscale.embedder import pad_batch

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
        return _STATS[0].read(step) if _STATS else ({}, None)

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


# ---------------------------------------------------------------------------------------------
# the loss

def info_nce(emb, group_size: int, temperature: float, gather: bool = False, mask=None, stats=None):
    """Mean InfoNCE loss of normalised embeddings [B*G, d] laid out as groups [query, positive, negatives].

    Without `gather` each query scores its own group's G - 1 candidates; with it, the candidates of
    every group on every rank (other ranks' embeddings without gradient). `mask` (bool [B, C], or the
    packed words of PairGroups) marks candidates that are relevant to the query: left out of its softmax.
    `stats` (a RetrievalStats) collects batch_stats of the step (no gradient).
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    d = emb.shape[-1]
    groups = emb.view(-1, group_size, d)
    B = groups.shape[0]
    queries, cands = groups[:, 0], groups[:, 1:]
    if not gather:
        logits = torch.einsum("bd,bkd->bk", queries, cands) / temperature
        target = torch.zeros(B, dtype=torch.long, device=emb.device)
    else:
        flat = cands.reshape(-1, d)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if world > 1:
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat.detach().contiguous())
            parts[rank] = flat  # this rank's candidates keep their gradient
            flat = torch.cat(parts)
        logits = queries @ flat.T / temperature
        target = (rank * B + torch.arange(B, device=emb.device)) * (group_size - 1)
    logits = logits.float()
    if mask is not None:
        if mask.dtype != torch.bool:
            mask = unpack_mask(mask, B, logits.shape[1])
        logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
    loss = F.cross_entropy(logits, target)
    if stats is not None:
        stats.add(batch_stats(queries.detach(), cands.detach(), logits.detach(), target))
    return loss


def batch_stats(queries, cands, logits, target) -> dict:
    """What a step's embeddings look like (all float sums over the micro-batch, with their counts):

    acc: in-batch accuracy, the positive scored above every other unmasked candidate (a tie with k others
    counts 1/(k+1)); chance: 1 / the number of unmasked candidates; cos: mean pairwise cosine of the
    documents (positives and negatives) of the batch; align: mean squared distance of query and positive
    (Wang & Isola 2020, alpha 2); unif: log of the mean exp(-2 * squared distance) over pairs of documents.
    Collapse shows as cos -> 1, unif -> 0, acc -> chance."""
    import torch

    B, d = queries.shape[0], queries.shape[-1]
    pos = logits.gather(1, target[:, None])
    live = torch.isfinite(logits)
    greater = ((logits > pos) & live).sum(1).float()
    ties = ((logits == pos) & live).sum(1).float() - 1
    acc = ((greater == 0).float() / (1 + ties)).sum()
    chance = (1.0 / live.sum(1).float()).sum()
    docs = cands.reshape(-1, d).float()
    n = docs.shape[0]
    sim = docs @ docs.T
    off = ~torch.eye(n, dtype=torch.bool, device=docs.device)
    cos = sim[off].mean() if n > 1 else sim.new_tensor(1.0)
    unif = torch.log(torch.exp(-4.0 + 4.0 * sim[off]).mean()) if n > 1 else sim.new_tensor(0.0)
    align = (2.0 - 2.0 * (queries.float() * cands[:, 0].float()).sum(-1)).sum()
    return {"acc": float(acc), "chance": float(chance), "queries": B, "cos": float(cos), "unif": float(unif),
            "align": float(align), "batches": 1}


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


_STATS: list[RetrievalStats] = []  # the stats of the model the last retrieval_model_factory built

REPORT_COLUMNS = (("inbatch_acc", "in-batch accuracy"), ("inbatch_chance", "chance"),
                  ("doc_cos", "documents' mean cosine"), ("alignment", "alignment"), ("uniformity", "uniformity"))


def collapsed(row: dict) -> bool:
    """The collapse rule of RetrievalStats' warning, on one metrics.jsonl row."""
    return (row.get("doc_cos") is not None and row.get("inbatch_acc") is not None
            and row["doc_cos"] >= COLLAPSE_COS and row["inbatch_acc"] < 2 * row.get("inbatch_chance", 0.0))


def report_section(runs: list[dict], names: list[str]) -> list[str]:
    """HTML lines for `mmscale report`: per retrieval run (rows with inbatch_acc), its retrieval statistics at
    the first, best-accuracy and last log step, and the collapse warning `retrieval train` printed (recomputed
    from the rows with the same rule); nothing when no run is a retrieval run."""
    from html import escape

    rows_of = [(n, [r for r in run["train"] if r.get("inbatch_acc") is not None]) for n, run in zip(names, runs)]
    rows_of = [(n, rows) for n, rows in rows_of if rows]
    if not rows_of:
        return []
    out = ['<h2 id="retrieval">Retrieval training</h2><table id="retrieval-table"><tr><th>run</th><th>step</th>'
           + "".join(f"<th>{escape(h)}</th>" for _, h in REPORT_COLUMNS) + "</tr>"]
    notes = []
    for n, rows in rows_of:
        best = max(rows, key=lambda r: r["inbatch_acc"])
        for label, r in (("first", rows[0]), ("best accuracy", best), ("last", rows[-1])):
            out.append(f'<tr data-run="{escape(n)}"><td>{escape(n)} ({label})</td><td class="num">{r["step"]}</td>'
                       + "".join(f'<td class="num" data-key="{k}">'
                                 + ("" if r.get(k) is None else f"{r[k]:.3f}") + "</td>" for k, _ in REPORT_COLUMNS)
                       + "</tr>")
        bad = next((r for r in rows if collapsed(r)), None)
        if bad is not None:
            notes.append(f"{n}: warning: step {bad['step']}: the embeddings collapsed: documents' mean cosine "
                         f"{bad['doc_cos']:.3f} (step {rows[0]['step']}: {rows[0]['doc_cos']:.3f}), in-batch accuracy "
                         f"{bad['inbatch_acc']:.3f} (chance {bad['inbatch_chance']:.3f}); see "
                         "docs/retrieval-collapse.md")
    out.append("</table>")
    out.append('<p class="muted">in-batch accuracy: the share of queries whose positive scores highest among the '
               "batch's candidates (chance: 1 / candidates); alignment: mean squared distance query-positive; "
               "uniformity: log mean exp(-2 squared distance) over the batch's documents (lower: more spread); "
               f"collapse: documents' cosine >= {COLLAPSE_COS} with accuracy below twice chance.</p>")
    if notes:
        out.append('<ul class="warn" id="retrieval-warnings">' + "".join(f"<li>{escape(x)}</li>" for x in notes)
                   + "</ul>")
    return out


def install_retrieval_loss(model, rcfg, stats: RetrievalStats | None = None, weights=None) -> None:
    """Replace `model.forward` (on the instance) by the InfoNCE loss; see the module docstring."""
    from mmscale.embedder import parse_position, pooled_embeddings

    position = parse_position(rcfg.position)
    lm_forward = model.forward

    def forward(input_ids, labels=None):
        if labels is None or labels.dim() != 1:
            return lm_forward(input_ids, labels)
        n = input_ids.shape[0]
        emb = pooled_embeddings(model, input_ids, labels[:n], position, weights)
        mask = labels[n:] if labels.shape[0] > n else None
        return info_nce(emb, rcfg.group_size, rcfg.temperature, rcfg.gather_negatives, mask,
                        stats if model.training else None)

    model.forward = forward


# ---------------------------------------------------------------------------------------------
# tokens of documents and queries

def _tokenizer_of(export: str):
    from mmscale.data.tokenizer import load_tokenizer
    from mmscale.export.format import load_export_config

    meta = load_export_config(export)
    tok = Path(export) / (meta.get("tokenizer") or "tokenizer.model")
    if not tok.is_file():
        raise UserError(f"export '{export}' has no tokenizer.model; re-run `mmscale convert` with --tokenizer")
    return load_tokenizer(tok)


PASSAGE_MODES = ("truncate", "first_window", "max_chunk")


def doc_sequences(sp, coll: Collection, n_ctx: int, mode: str) -> tuple[list[list[int]], np.ndarray, int]:
    """(token sequences, doc_starts, documents longer than the window) of a corpus under a passage mode.

    doc_starts[i] is the first sequence of document i (one sequence per document unless max_chunk). A
    document without text (or whose text encodes to no tokens) is the one token empty_text_tokens(sp).
    """
    from mmscale.embedder import windows

    if mode not in PASSAGE_MODES:
        raise UserError(f"retrieval.passage_mode must be one of {', '.join(PASSAGE_MODES)}, got {mode!r}")
    empty = empty_text_tokens(sp)
    if mode == "truncate":
        full = [list(ids) or empty for ids in sp.encode(coll.doc_texts())]
        return [ids[:n_ctx] for ids in full], np.arange(len(full)), sum(len(ids) > n_ctx for ids in full)
    # the title and the text tokenized apart: the title starts every window
    texts = [sp.encode(coll.texts[i]) if coll.texts[i] else [] for i in range(coll.n_docs)]
    titles = [sp.encode(coll.titles[i]) if coll.titles[i] else [] for i in range(coll.n_docs)]
    seqs, starts, cut = [], [], 0
    for i, (title, text) in enumerate(zip(titles, texts)):
        w = windows(text, n_ctx, title)
        if not w[0]:
            w = [empty]
        cut += len(w) > 1 or len(title) > n_ctx // 2
        starts.append(len(seqs))
        seqs.extend(w if mode == "max_chunk" else w[:1])
    return seqs, np.array(starts, dtype=np.int64), cut


def empty_text_tokens(sp) -> list[int]:
    """What an empty document embeds as: the end-of-text token alone (pad when the tokenizer has no EOS)."""
    eos = sp.eos_id()
    return [eos if eos >= 0 else max(sp.pad_id(), 0)]


def query_sequences(sp, coll: Collection, n_ctx: int) -> tuple[list[list[int]], int]:
    from mmscale.embedder import tokenize_texts

    full = tokenize_texts(sp, coll.queries)
    return [ids[:n_ctx] for ids in full], sum(len(ids) > n_ctx for ids in full)


def truncation_note(n_docs_cut: int, n_docs: int, n_q_cut: int, n_ctx: int, mode: str) -> str:
    what = {"truncate": "cut to their first n_ctx tokens", "first_window": "cut to their first window",
            "max_chunk": "split into windows (scored by the best one)"}[mode]
    return (f"{n_docs_cut} of {n_docs} documents ({100 * n_docs_cut / max(n_docs, 1):.0f}%) are longer than "
            f"n_ctx {n_ctx} tokens and were {what} (retrieval.passage_mode {mode}); "
            f"{n_q_cut} queries were cut to n_ctx")


# ---------------------------------------------------------------------------------------------
# the corpus cache

def export_fingerprint(export: str | os.PathLike) -> str:
    """sha256 over the export's config.json, weights and tokenizer: changes whenever the export does."""
    root = Path(export)
    h = hashlib.sha256()
    for name in sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model")):
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def corpus_embeddings(embedder, export, coll: Collection, mode: str, *, batch_size: int = 32,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True,
                      fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(embeddings of every sequence, doc_starts, info) of the corpus, from the cache when it matches.

    The cache file is `cache_dir/corpus-<export path hash>-<key>.npz`; the key hashes the export's
    files, the corpus, the passage mode, n_ctx and the embedding position, so any change recomputes
    (and replaces the files this export left before).
    """
    n_ctx = embedder.n_ctx
    # `where` names what is embedded and how; `key` the export's content: a changed export replaces its entry
    where = hashlib.sha256(json.dumps({
        "path": str(Path(export).resolve()), "corpus": coll.fingerprint(), "mode": mode, "n_ctx": n_ctx,
        "position": str(embedder.position), "version": CACHE_VERSION}).encode()).hexdigest()[:12]
    key = hashlib.sha256((fingerprint or export_fingerprint(export)).encode()).hexdigest()[:16]
    info = {"cache": None, "hit": False}
    path = None
    if cache_dir:
        path = Path(cache_dir) / f"corpus-{where}-{key}.npz"
        info["cache"] = str(path)
        if path.is_file():
            try:
                with np.load(path) as z:
                    info.update(hit=True, truncated=int(z["truncated"]), sequences=int(len(z["emb"])))
                    return z["emb"], z["starts"], info
            except (OSError, KeyError, ValueError):
                pass  # a damaged cache file is recomputed
    seqs, starts, cut = doc_sequences(embedder.tokenizer, coll, n_ctx, mode)
    emb = embedder.encode_ids(seqs, batch_size=batch_size, progress="embedding corpus" if progress else False)
    info.update(truncated=int(cut), sequences=len(seqs))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, emb=emb, starts=starts, truncated=np.int64(cut))
        os.replace(tmp, path)
        for old in path.parent.glob(f"corpus-{where}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    return emb, starts, info


# ---------------------------------------------------------------------------------------------
# hard negatives

def mine_negatives(kind: str, coll: Collection, *, depth: int, export: str | None = None, mode: str = "truncate",
                   position: str = "last", cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                   progress: bool = False) -> list[list[int]]:
    """Per query, up to `depth` documents ranked highest by BM25 or by the export's embeddings, best first,
    never one of its relevant documents or their duplicates or near-duplicates. Cached under cache_dir."""
    from mmscale import ir_metrics

    excluded = coll.excluded(near=True)
    fp = export_fingerprint(export) if kind == "model" else ""
    # BM25's ranking depends on neither the passage mode nor the embedding position
    key = hashlib.sha256(json.dumps({"kind": kind, "collection": coll.fingerprint_all(), "depth": depth,
                                     "export": fp, "mode": mode if kind == "model" else "",
                                     "position": str(position) if kind == "model" else "",
                                     "version": CACHE_VERSION}).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"negatives-{kind}-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())["negatives"]
    want = depth + max(len(e) for e in excluded)
    if kind == "bm25":
        from mmscale.bm25 import BM25Index

        index = BM25Index(coll.doc_texts())
        ranked = []
        for idx in ir_metrics.query_blocks(len(coll.queries), coll.n_docs):
            s = index.scores([coll.queries[i] for i in idx])
            k = min(want, coll.n_docs)
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
            ranked.extend(np.take_along_axis(part, order, 1).tolist())
    elif kind == "model":
        from mmscale.embedder import Embedder

        emb = Embedder.from_export(export, position=position, device=_device("auto"))
        if emb.position == "idf":
            emb.set_corpus(coll.doc_texts())
        d, starts, _ = corpus_embeddings(emb, export, coll, mode, batch_size=batch_size, cache_dir=cache_dir,
                                         progress=progress, fingerprint=fp)
        if mode == "max_chunk":  # rank chunks, keep each document's first (best) appearance
            d_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(d))))
            q = emb.encode_ids(query_sequences(emb.tokenizer, coll, emb.n_ctx)[0], batch_size=batch_size)
            chunks = ir_metrics.top_k(q, d, min(len(d), want * 4))
            ranked = [list(dict.fromkeys(d_of[c].tolist())) for c in chunks]
        else:
            q = emb.encode_ids(query_sequences(emb.tokenizer, coll, emb.n_ctx)[0], batch_size=batch_size)
            ranked = ir_metrics.top_k(q, d, want).tolist()
    else:
        raise UserError(f"retrieval.negatives must be random, bm25 or model, got {kind!r}")
    out = []
    for qi, docs in enumerate(ranked):
        excl = set(excluded[qi].tolist())
        out.append([int(x) for x in docs if x not in excl][:depth])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"kind": kind, "depth": depth, "negatives": out}))
        os.replace(tmp, path)
    return out


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# training

def retrieval_model_factory(cfg):
    from mmscale.export.format import load_export_state
    from mmscale.models import build_model

    model = build_model(cfg.model)
    model.load_state_dict(load_export_state(cfg.train.init_from, cfg.model), strict=True)
    if not cfg.model.tie_embeddings:
        # the head is not part of the embedder: frozen, it stays the pre-trained one in the export
        model.lm_head.weight.requires_grad_(False)
    stats = RetrievalStats()
    _STATS[:] = [stats]  # the data factory's loader reads it on log steps (PairGroups.log_metrics)
    weights = None
    if cfg.retrieval.position == "idf":   # the training corpus's inverse document frequencies
        from mmscale.embedder import idf_weights, tokenize_texts_or_empty

        coll = train_collection(cfg.retrieval)
        weights = idf_weights(tokenize_texts_or_empty(_tokenizer_of(cfg.train.init_from), coll.doc_texts()),
                              cfg.model.vocab_size)
    install_retrieval_loss(model, cfg.retrieval, stats, weights)
    return model


def train_collection(rcfg) -> Collection:
    path = rcfg.collection if (rcfg.collection or is_corpus_pairs(rcfg.pairs)) else rcfg.pairs
    return load_collection(path, rcfg.split or None, prefer="train")


def hard_per_group(rcfg) -> int:
    return rcfg.hard_negatives if rcfg.hard_negatives > 0 else math.ceil((rcfg.group_size - 2) / 2)


def retrieval_data_factory(cfg, info, micro_batch_size: int):
    r = cfg.retrieval
    sp = _tokenizer_of(cfg.train.init_from)
    coll = train_collection(r)
    n_ctx = cfg.model.n_ctx
    queries, q_cut = query_sequences(sp, coll, n_ctx)
    mode = "first_window" if r.passage_mode == "max_chunk" else r.passage_mode
    docs, _, d_cut = doc_sequences(sp, coll, n_ctx, mode)
    if info.rank == 0:
        print(f"retrieval: {coll.summary()} ({coll.source}, split {coll.split}); "
              + truncation_note(d_cut, coll.n_docs, q_cut, n_ctx, mode)
              + ("; training embeds the first window (max_chunk applies to eval and mining)"
                 if r.passage_mode == "max_chunk" else ""), flush=True)
    negatives = [list(n) for n in coll.negatives]
    per_group = None
    if r.negatives != "random":
        cache = r.cache_dir or str(Path(cfg.run.dir) / "retrieval_cache")
        mined = mine_negatives(r.negatives, coll, depth=r.mine_depth, export=cfg.train.init_from,
                               mode=r.passage_mode, position=r.position, cache_dir=cache,
                               progress=info.rank == 0 and cfg.log.progress)
        negatives = [list(dict.fromkeys(g + m)) for g, m in zip(negatives, mined)]
        per_group = hard_per_group(r)
    pairs = [(qi, d) for qi, rel in enumerate(coll.relevant) for d in sorted(rel)]
    views = None
    if is_corpus_pairs(r.pairs):
        modes, judged = parse_corpus_pairs(r.pairs)
        views = CorpusPairs.from_collection(sp, coll, n_ctx, cfg.run.seed)
        made = {m: len(views.eligible(m)) for m in modes}
        if not sum(made.values()):
            raise UserError(f"--pairs {r.pairs}: no document of '{coll.source}' makes a pair of this kind "
                            f"({', '.join(f'{m}: 0' for m in modes)}); choose another mode")
        pairs = (pairs if judged else []) + views.items(modes)
        if info.rank == 0:
            print("retrieval: pairs per epoch: " + ", ".join(f"{m} {k}" for m, k in made.items())
                  + (f", judged {sum(len(x) for x in coll.relevant)}" if judged else " (judged queries not used)"),
                  flush=True)
    loader = PairGroups(queries, docs, negatives, group_size=r.group_size, micro_batch=micro_batch_size,
                        n_ctx=n_ctx, seed=cfg.run.seed, rank=info.rank, world=info.world_size, pad_id=sp.pad_id(),
                        pairs=pairs, excluded=coll.excluded(near=True), hard_per_group=per_group, gather=r.gather_negatives,
                        views=views)
    return loader, None


def is_corpus_pairs(pairs: str) -> bool:
    return bool(pairs) and pairs.startswith("corpus:")


def prepare_config(cfg, init: str | None, pairs: str | None, collection: str | None = None,
                   split: str | None = None, negatives: str | None = None):
    """Fill train.init_from / retrieval.pairs|collection and take the model config from the export."""
    from mmscale.config import ModelConfig, build_section
    from mmscale.export.format import load_export_config

    if init:
        cfg.train.init_from = init
    if pairs:
        cfg.retrieval.pairs = pairs
    if collection:
        cfg.retrieval.collection = collection
    if split:
        cfg.retrieval.split = split
    if negatives:
        cfg.retrieval.negatives = negatives
    if not cfg.train.init_from:
        raise UserError("retrieval training starts from an export: pass --init EXPORT (or train.init_from=EXPORT)")
    if not cfg.retrieval.pairs and not cfg.retrieval.collection:
        raise UserError("no training data: pass --collection DIR (BEIR layout) or --pairs PAIRS.jsonl")
    if is_corpus_pairs(cfg.retrieval.pairs):
        parse_corpus_pairs(cfg.retrieval.pairs)
        if not cfg.retrieval.collection:
            raise UserError(f"--pairs {cfg.retrieval.pairs} makes pairs from a collection's corpus: pass --collection DIR too")
    elif cfg.retrieval.pairs and cfg.retrieval.collection:
        raise UserError("pass either --pairs or --collection (retrieval.pairs or retrieval.collection), not both "
                        "(or --pairs corpus:MODE with --collection: pairs made from its corpus)")
    meta = load_export_config(cfg.train.init_from)
    cfg.model = build_section(ModelConfig, meta["model"], "model")
    coll = train_collection(cfg.retrieval)  # bad data fails before any process group starts
    most = max(len(e) for e in coll.excluded(near=True))
    if cfg.retrieval.group_size > 2 and coll.n_docs - most < cfg.retrieval.group_size - 2:
        raise UserError(f"retrieval.group_size is {cfg.retrieval.group_size} but a query of "
                        f"'{coll.source}' has only {coll.n_docs - most} documents that are not relevant to it; "
                        f"set retrieval.group_size <= {coll.n_docs - most + 2} or add documents")
    if cfg.retrieval.negatives == "bm25":
        from mmscale.bm25 import _bm25s
        _bm25s()
    return cfg


def train_retrieval(cfg) -> int:
    from mmscale.run.train import train

    return train(cfg, model_factory=retrieval_model_factory, data_factory=retrieval_data_factory)


# ---------------------------------------------------------------------------------------------
# evaluation

def top1_table(query_emb, passage_emb, candidates: list[int], seed: int = 0, chunk: int = 64) -> list[dict]:
    """Top-1 accuracy and MRR of each query's own passage (row i of passage_emb) among n candidates.

    Candidates: the true passage plus n - 1 distractors drawn without replacement from the other
    passages with a seed fixed per (seed, n); ties split fairly (mmscale.ir_metrics).
    """
    from mmscale import ir_metrics

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
    from mmscale import ir_metrics
    from mmscale.embedder import Embedder

    coll = load_collection(collection, split, prefer="test")
    relevant, excluded = coll.relevant, coll.excluded()
    ir_metrics.Evaluator(relevant, excluded, coll.n_docs, candidates, seed)  # bad --candidates fail before embedding
    if passage_mode not in PASSAGE_MODES:
        raise UserError(f"--passage-mode must be one of {', '.join(PASSAGE_MODES)}, got {passage_mode!r}")
    emb = Embedder.from_export(export, position=position, device=_device(device))
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
        from mmscale import bm25

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
    from mmscale import ir_metrics
    from mmscale.retrieval_data import load_collection

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


# ---------------------------------------------------------------------------------------------
# `mmscale retrieval`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmscale.retrieval_data import add_import_arguments

    # on the command itself: `mmscale` moves --no-progress in front of the action (cli_conventions)
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
        from mmscale.config import load_config

        overrides = list(args.overrides) + (["log.progress=false"] if getattr(args, "no_progress", False) else [])
        cfg = prepare_config(load_config(args.config, overrides), args.init, args.pairs, args.collection,
                             args.split, args.negatives)
        from mmscale.engines import engine_class

        return engine_class(cfg.engine.kind).finish_process(train_retrieval(cfg))
    if args.action == "import":
        from mmscale.retrieval_data import import_collection

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
    # a bare --json prints the JSON on stdout (mmscale.cli_conventions hands run() a temporary file): then the
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
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return 0
