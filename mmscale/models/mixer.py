"""The masked mixer language model (Badger 2024, arXiv 2409.01482).

An MLP-Mixer turned into a causal LM: attention is replaced by a learned T x T matrix over token
positions (T = n_ctx, fixed), lower-triangular so that position i only sees positions j <= i.

    x = embed(ids)                                  # no positional encoding: the mixing matrix is positional
    for block in blocks:
        x = x + TokenMixing(LayerNorm(x))           # tril(W) @ x + b, shared by all channels
        x = x + FFN(LayerNorm(x))                   # Linear(d, 4d) -> GELU -> Linear(4d, d)
    logits = lm_head(norm(x))                       # norm is Identity unless model.final_norm

The causal mask is applied functionally inside mmscale.ops.token_mix (no mask tensor is kept), never
written into the weight: state dicts hold clean parameters, masked entries get exactly zero gradient,
and sharded engines (FSDP2, ZeRO-3) see a pure function.

Inputs shorter than n_ctx are right-padded with zero vectors after the embedding and the output is
cut back: with causal mixing, padding after position i cannot change position i. (With
`bidirectional` the padded zeros are part of what every position sees.)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmscale.models.common import CausalLM
from mmscale.ops import token_mix


class TokenMixer(nn.Module):
    """Masked mixing over the sequence axis: `heads` x `kernel_size` matrices of size T x T.

    x [B, T, C] with C split into `heads` groups; group h, output position i, channel c:
        out[i, h, c] = sum_{j, t} (W * mask)[h, t, i, j] * x_pad[j, h, c + t]  (+ bias[i])
    i.e. the paper's Conv1d(T, T, kernel_size, padding=k//2) that slides over the feature axis,
    with one masked T x T matrix per tap. kernel_size 1 and one head is the paper's flat mixer.
    """

    def __init__(self, n_ctx: int, heads: int = 1, kernel_size: int = 1, bias: bool = True,
                 causal: bool = True, impl: str = "auto"):
        super().__init__()
        self.n_ctx, self.heads, self.kernel_size, self.causal = n_ctx, heads, kernel_size, causal
        self.impl = impl  # how mmscale.ops.token_mix computes it (model.mixer_impl); all exact
        self.weight = nn.Parameter(torch.empty(heads, kernel_size, n_ctx, n_ctx))
        self.bias = nn.Parameter(torch.empty(n_ctx)) if bias else None
        # no mask buffer: mmscale.ops masks functionally, and a T x T buffer per layer would only sit
        # in device memory (2 GiB at T 8192 x 8 layers) and be broadcast by DDP every step
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the paper's Conv1d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = T * k; then the
        # future entries zeroed so the stored weight equals the weight in use
        bound = 1.0 / math.sqrt(self.n_ctx * self.kernel_size)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.causal:
                w = self.weight_4d()
                w.copy_(torch.tril(w))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def weight_4d(self) -> torch.Tensor:
        """The weight as [heads, k, T, T] (a view; the parameter itself when it is not flattened)."""
        return self.weight.view(self.heads, self.kernel_size, self.n_ctx, self.n_ctx)

    def flatten_weight_(self) -> None:
        """Store the weight as its [heads * k * T, T] row view (same values, same memory order, same math).

        For FSDP2 (mmscale.engines.fsdp): torch shards unevenly only on dim 0 and pads every rank to the first
        chunk, so on [heads, k, T, T] with one head a rank held the whole T x T matrix; on the rows of the flat
        view each rank holds ceil(heads * k * T / ranks) rows for any rank count. The engine keeps checkpoints
        in the [heads, k, T, T] layout; the state dict of a flattened module is [heads * k * T, T].
        """
        if self.weight.dim() == 2:
            return
        flat = self.weight.detach().reshape(self.heads * self.kernel_size * self.n_ctx, self.n_ctx)
        self.weight = nn.Parameter(flat, requires_grad=self.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mmscale.ops masks functionally too (zero gradient above the diagonal) and skips the
        # masked half where that is faster; its layout is [H, T, T, k] weights, [B, H, T, C] inputs
        H, k, T = self.heads, self.kernel_size, self.n_ctx
        # views only (their backward is a view too): with one tap [H, 1, T, T] is [H, T, T, 1] in memory
        w = self.weight.view(H, T, T, 1) if k == 1 else self.weight_4d().permute(0, 2, 3, 1)
        B, L, C = x.shape
        if H == 1:
            return token_mix(w.squeeze(0), x, causal=self.causal, impl=self.impl, bias=self.bias)
        xh = x.reshape(B, L, H, C // H).transpose(1, 2)
        out = token_mix(w, xh, causal=self.causal, impl=self.impl).transpose(1, 2).reshape(B, L, C)
        return out if self.bias is None else out + self.bias[:, None]


class MultiHeadTokenMixing(nn.Module):
    """Project to `heads` groups of d/heads channels, mix each group with its own masked matrix, project out."""

    def __init__(self, d_model: int, n_ctx: int, heads: int, kernel_size: int, causal: bool, impl: str = "auto"):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_model)
        self.mixer = TokenMixer(n_ctx, heads, kernel_size, bias=False, causal=causal, impl=impl)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.mixer(self.in_proj(x)))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MixerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        causal = not cfg.bidirectional
        self.mix_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.mixer == "flat":
            self.mixing = TokenMixer(cfg.n_ctx, 1, cfg.kernel_size, bias=True, causal=causal, impl=cfg.mixer_impl)
        else:
            self.mixing = MultiHeadTokenMixing(cfg.d_model, cfg.n_ctx, cfg.heads, cfg.kernel_size, causal,
                                               impl=cfg.mixer_impl)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_hidden or cfg.ffn_mult * cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixing(self.mix_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class MaskedMixerLM(CausalLM):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MixerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # torch's N(0, 1) embedding would give logits of std sqrt(d) through a tied head
            nn.init.normal_(self.embed.weight, std=cfg.init_std)
            self.lm_head.weight = self.embed.weight

    def _run_blocks(self, x: torch.Tensor, n: int) -> torch.Tensor:
        L = x.shape[1]
        if L < self.config.n_ctx:  # the mixing matrices are T x T: pad to T, cut back below
            x = F.pad(x, (0, 0, 0, self.config.n_ctx - L))
        for block in self.blocks[:n]:
            x = block(x)
        return x[:, :L]

    def flops_per_token(self, backward: bool = True) -> dict:
        """Matmul FLOPs per token (2 per multiply-add; fwd + bwd = 3 x fwd when `backward`).

        "dense": the full T x T mixing matrices (what a dense matmul executes);
        "causal": only the live lower triangle (position i mixes i + 1 positions: (T + 1) / 2 on average).
        Norms, biases, GELU and the embedding lookup are not counted.
        """
        c = self.config
        d, T, k = c.d_model, c.n_ctx, c.kernel_size
        ffn = 4 * d * (c.ffn_hidden or c.ffn_mult * d)
        proj = 4 * d * d if c.mixer == "multihead" else 0
        mix_dense, mix_causal = 2 * T * d * k, (T + 1) * d * k
        if c.bidirectional:
            mix_causal = mix_dense
        head = 2 * d * c.vocab_size
        mult = 3 if backward else 1
        per_layer = lambda mix: ffn + proj + mix  # noqa: E731
        return {"dense": mult * (c.n_layers * per_layer(mix_dense) + head),
                "causal": mult * (c.n_layers * per_layer(mix_causal) + head)}
