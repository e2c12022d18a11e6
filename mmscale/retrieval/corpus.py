"""The corpus as the model sees it: token sequences of documents (per passage mode) and queries, the cached
corpus embeddings of an export, and hard negatives mined by BM25 or by the export (cached too)."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.export.format import load_export_config
from mmscale.fsutil import atomic_write
from mmscale.retrieval import metrics as ir_metrics
from mmscale.retrieval.bm25 import BM25Index
from mmscale.retrieval.collection import Collection
from mmscale.retrieval.embedder import Embedder, tokenize_texts, windows

CACHE_VERSION = 2  # 2: near-duplicates never mined; bidirectional models embed at width n_ctx


def export_tokenizer(export: str):
    """The tokenizer an export was converted with."""
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
        buf = io.BytesIO()
        np.savez(buf, emb=emb, starts=starts, truncated=np.int64(cut))
        atomic_write(path, buf.getvalue())  # not durable: a lost cache is recomputed
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
        index = BM25Index(coll.doc_texts())
        ranked = []
        for idx in ir_metrics.query_blocks(len(coll.queries), coll.n_docs):
            s = index.scores([coll.queries[i] for i in idx])
            k = min(want, coll.n_docs)
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
            ranked.extend(np.take_along_axis(part, order, 1).tolist())
    elif kind == "model":
        emb = Embedder.from_export(export, position=position, device=choose_device("auto"))
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
        atomic_write(path, json.dumps({"kind": kind, "depth": depth, "negatives": out}))  # not durable, a cache
    return out


def choose_device(device: str) -> str:
    """`auto`: cuda when available, else cpu; any other name as it is."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
