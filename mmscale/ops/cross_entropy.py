"""LM head + cross-entropy in row chunks, never materialising the full [N, V] logits in fp32.

The usual `F.cross_entropy(lm_head(h).float(), labels)` writes the logits, their fp32 copy, the
log-softmax and, in backward, the softmax gradient: four passes over N x V floats that at short
context cost as much as the rest of a masked mixer's step. Here each chunk of rows computes its
logits, the fp32 log-sum-exp, the loss and right away the gradients for the hidden states and the
head weight (the softmax minus the one-hot, times the head), so only one chunk of logits is ever
alive and backward merely scales the stored gradients by the incoming scalar.

    loss = chunked_cross_entropy(hidden, lm_head.weight, labels)   # mean over labels != -100
    loss = lm_head_cross_entropy(hidden, lm_head.weight, labels)   # chunked only when logits are big

Matmuls run in the autocast dtype when autocast is on (like nn.Linear), softmax and loss in fp32,
and the weight gradient is accumulated in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logit elements per chunk (rows = this // vocab): ~4 MiB of fp32 logits (256 rows at V = 4096: the
# fastest of 64..1024 rows on a 2-core CPU), small enough for the caches, large enough for GEMMs.
CHUNK_ELEMENTS = 1 << 20
# On CUDA a chunk of 2^20 elements is 32 rows at a 32k vocab: far too small a GEMM for a GPU. There
# 2^26 elements (256 MiB of fp32 logits, 2,048 rows at 32k) keep the matmuls large and the saving real.
CUDA_CHUNK_ELEMENTS = 1 << 26
# lm_head_cross_entropy chunks only from this many logits (512 MiB in fp32). Below it the plain
# path was as fast or faster inside a whole CPU training step (benchmarks/RESULTS.md: the chunked
# loss wins alone, but measured 1-5% slower in 8 of 9 step configurations at 16M logits), and
# the memory it saves is small; above it the saved memory (the fp32 logits, their low-precision
# copy and the softmax gradient) is what decides whether a batch fits.
CHUNKED_MIN_LOGITS = 1 << 27


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(hidden, weight, bias)` against `labels`: chunked when the full
    logits would be large (CHUNKED_MIN_LOGITS), the plain fp32-logits path otherwise."""
    if labels.numel() * weight.shape[0] >= CHUNKED_MIN_LOGITS:
        return chunked_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of `hidden @ weight.T (+ bias)` against `labels`.

    hidden [..., d], weight [V, d], labels [...] (same leading shape). Equal to
    `F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(),
    ignore_index=ignore_index)`, NaN when every label is ignored, as there.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)} must share their leading shape")
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    h = hidden.reshape(-1, hidden.shape[-1])
    per_chunk = CUDA_CHUNK_ELEMENTS if dev == "cuda" else CHUNK_ELEMENTS
    rows = chunk_rows or max(1, per_chunk // weight.shape[0])
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
    with torch.autocast(dev, enabled=False):
        if not want_grad:
            return _loss_only(h.to(dtype), weight.to(dtype), bias, labels.reshape(-1), ignore_index, rows)
        # the fp32 parameter goes in as it is, so its gradient is accumulated and returned in fp32
        return _ChunkedLinearCE.apply(h, weight, bias, labels.reshape(-1), ignore_index, rows, dtype)


def _chunk_terms(h_c, w, b, y_c, ignore_index):
    """fp32 logits of one chunk, their log-sum-exp, the valid mask and the safe targets."""
    logits = h_c @ w.t()
    if b is not None:
        logits = logits + b.to(logits.dtype)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = y_c != ignore_index
    target = torch.where(valid, y_c, 0)
    return logits, lse, valid, target


def _loss_only(h, w, b, y, ignore_index, rows):
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    for r0 in range(0, h.shape[0], rows):
        y_c = y[r0:r0 + rows]
        logits, lse, valid, target = _chunk_terms(h[r0:r0 + rows], w, b, y_c, ignore_index)
        nll = lse - logits.gather(1, target[:, None])[:, 0]
        total += (nll * valid).sum()
    return total / (y != ignore_index).sum()


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, b, y, ignore_index, rows, dtype):
        h, w = hidden.to(dtype), weight.to(dtype)
        n_valid = (y != ignore_index).sum()
        # mean over valid rows; every row's gradient carries 1 / n_valid
        scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
        grad_b = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32) if b is not None else None
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        for r0 in range(0, h.shape[0], rows):
            h_c, y_c = h[r0:r0 + rows], y[r0:r0 + rows]
            logits, lse, valid, target = _chunk_terms(h_c, w, b, y_c, ignore_index)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * valid).sum()
            # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones;
            # computed in place in the fp32 logits buffer, which is not needed any more
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, target[:, None], -torch.ones_like(lse[:, None]))
            g.mul_((valid.to(torch.float32) * scale)[:, None])
            g = g.to(h.dtype)
            torch.matmul(g, w, out=grad_h[r0:r0 + rows])
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), h_c)
            else:  # a low-precision product per chunk, summed over chunks in fp32
                grad_w += (g.t() @ h_c).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
                              grad_b.to(b.dtype) if b is not None else None)
        ctx.has_bias = b is not None
        return total / n_valid  # NaN when every label is ignored, as in F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = grad_w * grad_loss
        gb = grad_b * grad_loss if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None
