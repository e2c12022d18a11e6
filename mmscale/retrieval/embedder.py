"""Sentence embeddings from a generative export: the model without its LM head.

    from mmscale import Embedder
    emb = Embedder.from_export("exports/mixer")
    vectors = emb.encode(["a story about a cat", "a summary"], batch_size=32)   # [2, d], unit rows

A text is embedded by the residual stream (after the final norm, when the model has one) at one
token: the last real token by default, or any index into the real tokens (the paper uses -2,
because the last position of a window is never trained by the shifted LM loss); or by the mean of
the residual stream over its real tokens (`position="mean"`; padding never counts), or that mean weighted by
each token's inverse document frequency in the corpus being searched (`position="idf"`, `set_corpus`): a small
model's mean is dominated by frequent, uninformative tokens (docs/retrieval-collapse.md). Texts are
right-padded; for causal models padding after a position cannot change it, so the embedding of a
text does not depend on its batch. A bidirectional model sees the padding, so for it every batch is
n_ctx wide, as `retrieval train`'s batches are, and its padding positions are zero vectors (not pad-token
embeddings; for the mixer that is the same as the text alone, and what the HF export computes): a text
embeds the same in training, in evaluation and in any batch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmscale.errors import UserError
from mmscale.export.format import load_export_with_tokenizer


def parse_position(position: int | str) -> int | str | None:
    """`"last"` -> None (the last real token); `"mean"` -> "mean" (the mean over the real tokens); `"idf"` -> "idf"
    (their mean weighted by each token's inverse document frequency in the corpus); an integer (or its string)
    -> that index."""
    if position is None or position == "last":
        return None
    if position in ("mean", "idf"):
        return position
    try:
        return int(position)
    except (TypeError, ValueError):
        raise UserError(f"embedding position must be 'last', 'mean' or an integer index (or 'idf': the "
                        f"mean weighted by a corpus's inverse document frequency), got {position!r}") from None


def idf_weights(doc_tokens: Iterable[Sequence[int]], vocab_size: int):
    """Float32 tensor [vocab_size]: BM25's inverse document frequency of every token id over the documents
    (token lists), ln(1 + (N - df + 0.5) / (df + 0.5)): a token in every document weighs ln(1 + 0.5 / (N + 0.5))
    ~ 0, one in no document ln(2 N + 2). The weights of `position="idf"` pooling, computed from the corpus
    being searched (as BM25's are), so frequent tokens do not dominate the mean."""
    df = np.zeros(vocab_size, dtype=np.float64)
    n = 0
    for toks in doc_tokens:
        n += 1
        u = np.unique(np.asarray(list(toks), dtype=np.int64))
        df[u[(u >= 0) & (u < vocab_size)]] += 1
    return torch.from_numpy(np.log1p((n - df + 0.5) / (df + 0.5))).float()


def token_indices(lengths, position: int | None):
    """Index of the embedding token of each sequence, from its number of real tokens.

    Negative positions count back from the last real token (-1 = last); indices are clamped into
    [0, length - 1] so that short texts still give an embedding.
    """
    lengths = torch.as_tensor(lengths)
    if position is None:
        idx = lengths - 1
    elif position < 0:
        idx = lengths + position
    else:
        idx = torch.full_like(lengths, position)
    return torch.minimum(idx.clamp(min=0), lengths - 1)


def pooled_embeddings(model, input_ids, lengths, position: int | str | None = None, weights=None):
    """L2-normalised embeddings [B, d] of right-padded `input_ids` [B, L] (differentiable).

    position "mean": the mean of the hidden states over each row's first `lengths` tokens (padding excluded);
    "idf": their mean weighted by `weights[token id]` (idf_weights)."""
    lengths = torch.as_tensor(lengths).to(input_ids.device)
    if getattr(model.config, "bidirectional", False):
        # a bidirectional model sees the padding: pad positions are zero vectors (what the mixer pads a short
        # window with, and the HF export does), never pad-token embeddings, in training and evaluation alike
        real_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None]
        hidden = model.hidden(inputs_embeds=model.embed(input_ids) * real_ids[..., None].to(model.embed.weight.dtype))
    else:
        hidden = model.hidden(input_ids)                   # [B, L, d], after the final norm
    lengths = lengths.to(hidden.device)
    if position in ("mean", "idf"):
        real = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).float()
        if position == "idf":
            if weights is None:
                raise UserError("position 'idf' needs token weights (idf_weights of the corpus)")
            real = real * weights.to(hidden.device)[input_ids]
        picked = (hidden.float() * real[..., None]).sum(1) / real.sum(1).clamp(min=1e-6)[:, None]
        return F.normalize(picked, dim=-1)
    idx = token_indices(lengths, position)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return F.normalize(picked.float(), dim=-1)


def tokenize_texts(sp, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (its pieces, as in training data: no BOS), whole."""
    if isinstance(texts, str):
        raise UserError("encode() takes a list of texts, not a single string; wrap it: encode([text])")
    out = []
    for i, ids in enumerate(sp.encode(list(texts))):
        ids = list(ids)
        if not ids:
            raise UserError(f"text {i} encodes to no tokens (an empty string?); remove it or give it some text")
        out.append(ids)
    return out


def tokenize_texts_or_empty(sp, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, whole; an empty text is an empty list."""
    return [list(ids) for ids in sp.encode(list(texts))]


def encode_texts(sp, texts: Sequence[str], n_ctx: int) -> list[list[int]]:
    """Token ids of each text (its pieces, as in training data: no BOS), cut to the first n_ctx."""
    return [ids[:n_ctx] for ids in tokenize_texts(sp, texts)]


def windows(ids: Sequence[int], n_ctx: int, prefix: Sequence[int] = ()) -> list[list[int]]:
    """Split token ids into consecutive windows of at most n_ctx tokens, each starting with `prefix`
    (a document's title), which leaves n_ctx - len(prefix) tokens of text per window. A prefix of
    n_ctx // 2 tokens or more is cut to that. Without text, one window holding the prefix."""
    prefix = list(prefix)[:n_ctx // 2]
    step = n_ctx - len(prefix)
    ids = list(ids)
    if not ids:
        return [prefix[:n_ctx]]
    return [prefix + ids[s:s + step] for s in range(0, len(ids), step)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None):
    """Right-pad token lists into Long[B, max_len] (Long[B, width] when given); returns (ids, lengths)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), max(int(lengths.max()), width or 0)), max(pad_id, 0), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


class Embedder:
    """Embeds texts with an export's hidden states; see the module docstring."""

    def __init__(self, model, tokenizer, position: int | str = "last", device="cpu", token_weights=None):
        self.model = model.eval()
        self.token_weights = token_weights   # position "idf": idf_weights of the corpus (set_corpus)
        self.tokenizer = tokenizer
        self.position = parse_position(position)
        self.device = device
        self.n_ctx = model.config.n_ctx
        self.dim = model.config.d_model

    @classmethod
    def from_export(cls, path: str | os.PathLike, position: int | str = "last", device="cpu", dtype=None) -> "Embedder":
        # refuses a tokenizer with more pieces than the model's vocab (one line, not an IndexError later)
        model, _, sp = load_export_with_tokenizer(Path(path), dtype=dtype, device=device)
        return cls(model, sp, position=position, device=device)

    def set_corpus(self, texts: Sequence[str]) -> None:
        """Position "idf": take the token weights from these documents (the corpus being searched)."""
        self.token_weights = idf_weights(tokenize_texts_or_empty(self.tokenizer, texts), self.model.config.vocab_size)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts, self.n_ctx)

    def encode(self, texts: Sequence[str] | Iterable[str], batch_size: int = 32, position: int | str | None = None,
               progress: bool = False):
        """L2-normalised float32 numpy array [len(texts), d_model]."""
        seqs = self.tokenize(list(texts) if not isinstance(texts, str) else texts)
        return self.encode_ids(seqs, batch_size=batch_size, position=position, progress=progress)

    def encode_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 32, position: int | str | None = None,
                   progress: bool | str = False):
        """Embeddings of token sequences (each at most n_ctx tokens): float32 [len(seqs), d_model], unit rows."""
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        pos = self.position if position is None else parse_position(position)
        seqs = [list(s) for s in seqs]
        if any(len(s) > self.n_ctx or not s for s in seqs):
            raise UserError(f"token sequences must hold 1 to n_ctx = {self.n_ctx} tokens; split or cut them first")
        # sort by length so each batch pads little; the output keeps the input order
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        batches = range(0, len(order), batch_size)
        if progress:
            batches = tqdm(batches, desc=progress if isinstance(progress, str) else "embedding", unit="batch",
                           leave=False)
        pad = self.tokenizer.pad_id()
        # a bidirectional model sees right padding: n_ctx wide, as retrieval training is (PairGroups.batch_at)
        width = self.n_ctx if getattr(self.model.config, "bidirectional", False) else None
        with torch.no_grad():
            for start in batches:
                rows = order[start:start + batch_size]
                ids, lengths = pad_batch([seqs[i] for i in rows], pad, width)
                emb = pooled_embeddings(self.model, ids.to(self.device), lengths, pos, self.token_weights)
                out[rows] = emb.cpu().numpy()
        return out
