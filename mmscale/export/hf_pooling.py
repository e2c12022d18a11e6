"""sentence-transformers pooling of an mmscale export (written into exports by `mmscale export-hf`).

A text is embedded by the hidden state at one token, as `mmscale.Embedder` does: the last real token
("last"), or an index into the real tokens, or the mean over the real tokens ("mean") (the paper uses -2: the last position of a window is never
trained by the shifted LM loss; negative indices count back from the last real token, indices are
clamped into the text), then L2-normalised. Self-contained: torch only.

    SentenceTransformer(EXPORT, trust_remote_code=True).encode(["a text"])
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenPooling(nn.Module):
    def __init__(self, dimension: int, position="last", normalize: bool = True):
        super().__init__()
        if position not in ("last", "mean"):
            position = int(position)
        self.dimension, self.position, self.normalize = int(dimension), position, bool(normalize)

    def forward(self, features: dict) -> dict:
        hidden = features["token_embeddings"]                     # [B, L, d]
        mask = features.get("attention_mask")
        bsz, length = hidden.shape[:2]
        if mask is None:
            mask = torch.ones(bsz, length, dtype=torch.long, device=hidden.device)
        mask = mask.bool()
        lengths = mask.sum(1)
        if self.position == "mean":  # the mean over the real tokens (retrieval.position=mean)
            emb = (hidden.float() * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
            if self.normalize:
                emb = F.normalize(emb, dim=-1)
            features["sentence_embedding"] = emb
            return features
        if self.position == "last":
            idx = lengths - 1
        elif self.position < 0:
            idx = lengths + self.position
        else:
            idx = torch.full_like(lengths, self.position)
        idx = torch.minimum(idx.clamp(min=0), (lengths - 1).clamp(min=0))
        # the idx-th real position of each row (works for left and right padding)
        real_first = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        pos = real_first.gather(1, idx[:, None]).squeeze(1)
        emb = hidden[torch.arange(bsz, device=hidden.device), pos].float()
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        features["sentence_embedding"] = emb
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension

    def get_embedding_dimension(self) -> int:  # the name sentence-transformers 5.x asks for
        return self.dimension

    def get_config_dict(self) -> dict:
        return {"dimension": self.dimension, "position": self.position, "normalize": self.normalize}

    def save(self, output_path: str, *args, **kwargs) -> None:
        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, "config.json"), "w") as f:
            json.dump(self.get_config_dict(), f, indent=2)

    @staticmethod
    def load(input_path: str) -> "TokenPooling":
        with open(os.path.join(input_path, "config.json")) as f:
            return TokenPooling(**json.load(f))
