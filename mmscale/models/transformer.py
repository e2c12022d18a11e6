"""The Llama-style transformer baseline: RMSNorm, RoPE, SwiGLU, grouped-query causal attention.

    x = embed(ids)
    for block in blocks:
        x = x + Attention(RMSNorm(x))     # RoPE on q and k, kv_heads <= heads (GQA), causal SDPA
        x = x + SwiGLU(RMSNorm(x))        # w2(silu(w1 x) * w3 x)
    logits = lm_head(RMSNorm(x))

RoPE uses the rotate-half layout of Hugging Face Llama (dimension m of a head pairs with m + head_dim/2).
Meta's and llama2.c's checkpoints pair adjacent dimensions (2m, 2m + 1) instead; tools/import_llama2c.py
permutes the rows of wq and wk on import so the two layouts compute the same function.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmscale.models.common import CausalLM, RMSNorm


def rope_tables(n_ctx: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n_ctx, head_dim] for rotate-half RoPE (frequencies repeated for both halves)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_ctx, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, hd]; rotates the pair (m, m + hd/2) by position * inv_freq[m]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads or cfg.heads
        self.head_dim = cfg.d_model // cfg.heads
        self.causal = not cfg.bidirectional
        self.wq = nn.Linear(cfg.d_model, self.heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.heads:  # query head h reads kv head h // (heads / kv_heads), as llama2.c
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden or cfg.ffn_mult * cfg.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class LlamaLM(CausalLM):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # Llama always has a final norm
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.n_ctx, cfg.d_model // cfg.heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        # GPT-2 / Llama-style: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers)
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("attn.wo.weight", "ffn.w2.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def _run_blocks(self, x: torch.Tensor, n: int) -> torch.Tensor:
        L = x.shape[1]
        cos, sin = self.rope_cos[:L].to(x.dtype), self.rope_sin[:L].to(x.dtype)
        for block in self.blocks[:n]:
            x = block(x, cos, sin)
        return x

    def flops_per_token(self, backward: bool = True) -> dict:
        """Matmul FLOPs per token (2 per multiply-add; fwd + bwd = 3 x fwd when `backward`).

        "dense": full attention, every position against all T = n_ctx keys (scores + values: 4 T d);
        "causal": only the unmasked half, position i against i + 1 keys (2 (T + 1) d on average).
        Norms, RoPE, softmax and the embedding lookup are not counted.
        """
        c = self.config
        d, T = c.d_model, c.n_ctx
        kv_dim = (c.kv_heads or c.heads) * (d // c.heads)
        proj = 2 * d * (2 * d + 2 * kv_dim)
        ffn = 6 * d * (c.ffn_hidden or c.ffn_mult * d)
        attn_dense, attn_causal = 4 * T * d, 2 * (T + 1) * d
        if c.bidirectional:
            attn_causal = attn_dense
        head = 2 * d * c.vocab_size
        mult = 3 if backward else 1
        return {"dense": mult * (c.n_layers * (proj + ffn + attn_dense) + head),
                "causal": mult * (c.n_layers * (proj + ffn + attn_causal) + head)}
