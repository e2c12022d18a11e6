"""Pieces both language models share: RMSNorm, the LM loss, and the base class with the forward contract.

The forward contract (see mmscale/ARCHITECTURE.md):
    model(input_ids)          -> logits [B, L, V]
    model(input_ids, labels)  -> mean fp32 cross-entropy of logits[:, :M-1] against labels[:, 1:M],
                                 ignoring IGNORE_INDEX (M = labels.shape[1], 2 <= M <= L + 1)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmscale.ops.cross_entropy import lm_head_cross_entropy

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as llama2.c and HF Llama do) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, through_head: bool = False
            ) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of `lm_head(hidden)` against `labels`, ignoring -100.

    hidden [B, L, d], labels [B, M] with 2 <= M <= L + 1: position t (< M - 1) predicts labels[:, t + 1].
    The chunked cross-entropy (mmscale/ops) reads the head's weight directly and never materialises the
    full [B, L, V] logits; `through_head` calls lm_head's own forward instead (for a wrapper that makes the
    weight whole only inside that forward, as ZeRO-3 partitioning does).
    """
    n_pred = labels.shape[1] - 1
    if not through_head:
        return lm_head_cross_entropy(hidden[:, :n_pred], lm_head.weight, labels[:, 1:], bias=lm_head.bias,
                                     ignore_index=IGNORE_INDEX)
    logits = lm_head(hidden[:, :n_pred])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


class CausalLM(nn.Module):
    """Base class: subclasses define .config .embed .blocks .norm .lm_head and `_run_blocks`.

    `loss_through_head` (default False): compute the loss through lm_head's forward rather than the chunked
    cross-entropy on its weight; set by an engine whose partitioning gathers weights only inside forwards.
    """

    loss_through_head = False

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, length], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.shape[1] > self.config.n_ctx:
            raise ValueError(f"input length {input_ids.shape[1]} exceeds the model's context n_ctx = "
                             f"{self.config.n_ctx}; cut the input to at most n_ctx tokens")

    def hidden(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
               upto: int | None = None) -> torch.Tensor:
        """The residual stream [B, L, d] after blocks[:upto] (all blocks and the final norm when upto is None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self._check_ids(input_ids)
            x = self.embed(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] > self.config.n_ctx:
                raise ValueError(f"inputs_embeds must be [batch, length <= n_ctx = {self.config.n_ctx}, d_model], "
                                 f"got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        n = len(self.blocks) if upto is None else upto
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"upto must be in [0, {len(self.blocks)}], got {upto}")
        x = self._run_blocks(x, n)
        return self.norm(x) if upto is None else x

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(input_ids)
        if labels is None:
            return self.lm_head(h)
        if labels.dim() != 2 or labels.shape[0] != input_ids.shape[0] or not 2 <= labels.shape[1] <= h.shape[1] + 1:
            raise ValueError(f"labels must be [batch, M] with 2 <= M <= input length + 1 = {h.shape[1] + 1}, "
                             f"got {tuple(labels.shape)}")
        return lm_loss(h, self.lm_head, labels, self.loss_through_head)

    # -- sizes ---------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Trainable parameters, a tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def param_breakdown(self) -> dict:
        """{"embedding", "mixing", "ffn", "norm", "head", "total"}: parameter counts by role.

        "mixing" is token mixing (mixer) or attention (transformer); "head" is 0 when tied.
        """
        groups = {"embedding": 0, "mixing": 0, "ffn": 0, "norm": 0, "head": 0}
        for name, p in self.named_parameters():  # tied weights appear once, under embed
            groups[self._param_group(name)] += p.numel()
        groups["total"] = sum(groups.values())
        return groups

    def _param_group(self, name: str) -> str:
        if name.startswith("embed."):
            return "embedding"
        if name.startswith("lm_head."):
            return "head"
        if name.startswith("norm.") or "_norm." in name:
            return "norm"
        if ".ffn." in name:
            return "ffn"
        return "mixing"
