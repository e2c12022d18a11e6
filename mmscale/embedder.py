"""Sentence embeddings from a generative export: the model without its LM head.

    from mmscale import Embedder
    emb = Embedder.from_export("exports/mixer")
    vectors = emb.encode(["a story about a cat", "a summary"], batch_size=32)   # [2, d], unit rows

A text is embedded by the residual stream (after the final norm, when the model has one) at one
token: the last real token by default, or any index into the real tokens (the paper uses -2,
because the last position of a window is never trained by the shifted LM loss); or by the mean of
the residual stream over its real tokens (`position="mean"`; padding never counts). Texts are
right-padded; for causal models padding after a position cannot change it, so the embedding of a
text does not depend on its batch.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from mmscale.errors import UserError


def parse_position(position: int | str) -> int | str | None:
    """`"last"` -> None (the last real token); `"mean"` -> "mean" (the mean over the real tokens); an integer
    (or its string) -> that index."""
    if position is None or position == "last":
        return None
    if position == "mean":
        return "mean"
    try:
        return int(position)
    except (TypeError, ValueError):
        raise UserError(f"embedding position must be 'last', 'mean' or an integer index, got {position!r}") from None


def token_indices(lengths, position: int | None):
    """Index of the embedding token of each sequence, from its number of real tokens.

    Negative positions count back from the last real token (-1 = last); indices are clamped into
    [0, length - 1] so that short texts still give an embedding.
    """
    import torch

    lengths = torch.as_tensor(lengths)
    if position is None:
        idx = lengths - 1
    elif position < 0:
        idx = lengths + position
    else:
        idx = torch.full_like(lengths, position)
    return torch.minimum(idx.clamp(min=0), lengths - 1)


def pooled_embeddings(model, input_ids, lengths, position: int | str | None = None):
    """L2-normalised embeddings [B, d] of right-padded `input_ids` [B, L] (differentiable).

    position "mean": the mean of the hidden states over each row's first `lengths` tokens (padding excluded)."""
    import torch
    import torch.nn.functional as F

    hidden = model.hidden(input_ids)                       # [B, L, d], after the final norm
    lengths = torch.as_tensor(lengths).to(hidden.device)
    if position == "mean":
        real = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).float()
        picked = (hidden.float() * real[..., None]).sum(1) / lengths.clamp(min=1)[:, None].float()
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


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pad token lists into Long[B, max_len]; returns (ids, lengths)."""
    import torch

    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), max(pad_id, 0), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


class Embedder:
    """Embeds texts with an export's hidden states; see the module docstring."""

    def __init__(self, model, tokenizer, position: int | str = "last", device="cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.position = parse_position(position)
        self.device = device
        self.n_ctx = model.config.n_ctx
        self.dim = model.config.d_model

    @classmethod
    def from_export(cls, path: str | os.PathLike, position: int | str = "last", device="cpu", dtype=None) -> "Embedder":
        from pathlib import Path

        from mmscale.export.format import load_export_with_tokenizer

        # refuses a tokenizer with more pieces than the model's vocab (one line, not an IndexError later)
        model, _, sp = load_export_with_tokenizer(Path(path), dtype=dtype, device=device)
        return cls(model, sp, position=position, device=device)

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
        import numpy as np
        import torch

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
            from tqdm import tqdm
            batches = tqdm(batches, desc=progress if isinstance(progress, str) else "embedding", unit="batch",
                           leave=False)
        pad = self.tokenizer.pad_id()
        with torch.no_grad():
            for start in batches:
                rows = order[start:start + batch_size]
                ids, lengths = pad_batch([seqs[i] for i in rows], pad)
                emb = pooled_embeddings(self.model, ids.to(self.device), lengths, pos)
                out[rows] = emb.cpu().numpy()
        return out
