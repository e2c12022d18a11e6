"""Masked token mixing: out[b, h, i, c] = sum_{j <= i} W[h, i, j] x[b, h, j, c] (all j when not causal).

This is the masked mixer's replacement for attention: one learned T x T matrix per head (or per
layer), lower-triangular when causal. Three exact implementations:

- "dense":   mask the weight (`W * tril`) and multiply everything: one `F.conv1d` for the flat
             mixer (channels = token positions, kernel 1 over the feature axis, as the paper's
             Conv1d), an einsum per head otherwise. Half of its work is on masked zeros.
- "blocked": cut the T x T matrix into square blocks and compute only those on or below the
             diagonal, in the forward and in both gradients (`BlockedMix`). The CPU path: one
             2-D GEMM per block and batch element. On CUDA it works but launches too many small
             GEMMs to be fast; `auto` never picks it there.
- "triton":  a Triton kernel that visits only lower-triangular tiles (mmscale.ops.triton_mixing).

"auto" picks per device and size (see `choose_impl`). Masked weight entries get exactly zero
gradient on every path, so checkpoints hold the raw parameter and the mask is purely functional.

Shapes: `weight` [T, T] with `x` [B, T, C] (the flat mixer) or `weight` [H, T, T] with
`x` [B, H, T, C] (the multi-head mixer). A trailing tap axis on the weight ([T, T, k] or
[H, T, T, k], k odd) gives the paper's kernel_size > 1 variant: the mixing conv also slides over the
feature axis, out[.., i, c] = sum_j sum_t W[i, j, t] x[.., j, c + t - k // 2], zero padded.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmscale.fsutil import atomic_write
from mmscale.precision import cpu_key

IMPLS = ("auto", "dense", "blocked", "triton")
# part of the key of the measured choice (measured_cpu_choice): raised when an implementation changes speed
IMPL_VERSION = 2

# Rows per block of the blocked path. Measured on a 2-core CPU (benchmarks/RESULTS.md): smaller
# blocks skip more of the masked half but run smaller, less efficient GEMMs.
CPU_BLOCK_ROWS = 128
# Below this context the masked half is too small to pay for the extra calls.
CPU_BLOCKED_MIN_T = 256
# From this many [T, C] slices (batch x heads) torch's CPU conv uses oneDNN and dense wins
# (as it does with more than one thread; see choose_impl).
CPU_DENSE_MIN_BATCH = 16
# CUDA: Triton from this context up, dense below it. Not yet measured on a GPU (no device was lent
# to this work): a guess from the tile counts, to be set from tools/gpu_check.sh results.
CUDA_TRITON_MIN_T = 1024


def token_mix(weight: torch.Tensor, x: torch.Tensor, causal: bool = True, impl: str = "auto",
              block_rows: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mix tokens of `x` with the (masked, when causal) matrix `weight`; see the module docstring.

    `bias` [T] (optional) is added per output position; the flat dense path fuses it into the conv.
    """
    weight4, x4, flat = _canonical(weight, x)
    # Under autocast, compute in the autocast dtype as F.conv1d would (the parameter stays fp32;
    # its gradient flows back through the cast). The weight is cast where it is used: the dense path
    # casts (and masks) inside its own autograd function, so no T x T copy is kept for backward.
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x4 = x4.to(torch.get_autocast_dtype(dev))
    if bias is not None:
        bias = bias.to(x4.dtype)
    with torch.autocast(dev, enabled=False):
        out = _dispatch(weight4, x4, causal, impl, block_rows, bias)
    return out.squeeze(1) if flat else out


def _canonical(weight, x):
    """-> weight [H, T, T, k], x [B, H, T, C], and whether the caller's x had no head axis."""
    if weight.dim() not in (2, 3, 4):
        raise ValueError(f"token_mix: weight must be [T, T], [H, T, T] or with a tap axis, got {tuple(weight.shape)}")
    flat = x.dim() == 3
    if flat:
        x = x.unsqueeze(1)
        if weight.dim() == 2:
            weight = weight[None, :, :, None]
        elif weight.dim() == 3:  # [T, T, k]
            weight = weight[None]
        else:
            raise ValueError(f"token_mix: x [B, T, C] needs weight [T, T] or [T, T, k], got {tuple(weight.shape)}")
    else:
        if x.dim() != 4:
            raise ValueError(f"token_mix: x must be [B, T, C] or [B, H, T, C], got {tuple(x.shape)}")
        if weight.dim() == 3:
            weight = weight[..., None]
        elif weight.dim() != 4:
            raise ValueError("token_mix: x [B, H, T, C] needs weight [H, T, T] or [H, T, T, k], "
                             f"got {tuple(weight.shape)}")
    h, t = x.shape[1], x.shape[2]
    if weight.shape[0] != h or weight.shape[1] != t or weight.shape[2] != t:
        raise ValueError(f"token_mix: weight {tuple(weight.shape)} does not match x {tuple(x.shape)} "
                         f"(heads {h}, tokens {t})")
    if weight.shape[3] % 2 != 1:
        raise ValueError(f"token_mix: the tap axis must be odd, got {weight.shape[3]}")
    return weight, x, flat


def choose_impl(t: int, device: torch.device | str, causal: bool, batch: int = 1,
                threads: int | None = None, channels: int | None = None, dtype=torch.float32) -> str:
    """The fastest exact path for this size and device.

    CPU, from CPU_BLOCKED_MIN_T up: measured once per shape, dtype and thread count (`measured_cpu_choice`:
    dense vs blocked, forward + backward), kept in memory and in a small cache file, so a run and its resumes
    on one machine take the same path. Measurement needs `channels`; without it (or with
    MMSCALE_TOKEN_MIX_AUTO=rule) the fixed rule from benchmarks/RESULTS.md: the blocked path wins
    single-threaded (1.35-1.7x at T >= 512) below 16 [T, C] slices (`batch` = batch x heads); with more
    threads or slices torch runs the dense conv through oneDNN and dense wins.
    CUDA: Triton from CUDA_TRITON_MIN_T, dense below.
    """
    if not causal:
        return "dense"  # nothing is masked: no work to skip
    dev = torch.device(device).type
    if dev == "cuda":
        from mmscale.ops import triton_mixing  # lazy: imports triton (slow, CUDA-only use)
        if t >= CUDA_TRITON_MIN_T and triton_mixing.available():
            return "triton"
        return "dense"
    threads = torch.get_num_threads() if threads is None else threads
    if t < CPU_BLOCKED_MIN_T:
        return "dense"
    if channels is not None and os.environ.get("MMSCALE_TOKEN_MIX_AUTO", "measure") != "rule":
        return measured_cpu_choice(t, channels, batch, threads, dtype)
    if threads == 1 and batch < CPU_DENSE_MIN_BATCH:
        return "blocked"
    return "dense"


_CHOSEN: dict[str, str] = {}


def _cache_file() -> Path:
    root = os.environ.get("MMSCALE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmscale")
    return Path(root) / "token_mix_auto.json"


def _time_impl(impl: str, t: int, channels: int, slices: int, dtype, repeats: int = 3) -> float:
    """Median seconds of one forward + backward of `impl` on random data of this shape."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, t, t, generator=g).to(dtype).requires_grad_(True)
    x = torch.randn(slices, 1, t, channels, generator=g).to(dtype).requires_grad_(True)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = dense_mix(w, x) if impl == "dense" else BlockedMix.apply(w, x, _default_block_rows(t))
        out.sum().backward()
        times.append(time.perf_counter() - t0)
        w.grad = x.grad = None
    return sorted(times[1:])[len(times[1:]) // 2]


def measured_cpu_choice(t: int, channels: int, slices: int, threads: int, dtype) -> str:
    """dense or blocked for this CPU shape, whichever ran faster here (measured once, then cached).

    The key names the CPU (model and speed-relevant ISA flags, precision.cpu_key): a cache file carried to
    another machine (a shared home, a copied ~/.cache) is measured again there, never reused."""
    key = (f"T{t}-C{channels}-S{slices}-threads{threads}-{str(dtype).replace('torch.', '')}-torch{torch.__version__}"
           f"-v{IMPL_VERSION}-cpu[{cpu_key()}]")
    if key in _CHOSEN:
        return _CHOSEN[key]
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    choice = cached.get(key) if isinstance(cached, dict) else None
    if choice not in ("dense", "blocked"):
        with torch.enable_grad():
            cost = {impl: _time_impl(impl, t, channels, slices, dtype) for impl in ("dense", "blocked")}
        choice = min(cost, key=cost.get)
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = choice
        try:  # best effort: a read-only home only means measuring again in the next process
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(cached, indent=0, sort_keys=True))  # a cache: not durable
        except OSError:
            pass
    _CHOSEN[key] = choice
    return choice


def _dispatch(weight, x, causal, impl, block_rows, bias=None):
    if impl not in IMPLS:
        raise ValueError(f"token_mix: impl must be one of {IMPLS}, got {impl!r}")
    t, taps = x.shape[2], weight.shape[3]
    if impl == "auto":
        impl = choose_impl(t, x.device, causal, x.shape[0] * x.shape[1], channels=x.shape[3], dtype=x.dtype)
    if taps > 1:
        # kernel_size k: one masked T x T matrix per tap over the feature-shifted input
        out = sum(_dispatch(weight[..., i:i + 1], _shift(x, i - taps // 2), causal, impl, block_rows)
                  for i in range(taps))
        return out if bias is None else out + bias[:, None]
    # squeeze, not weight[..., 0]: a view whose backward is a view too (indexing's backward allocates a
    # zero T x T gradient and copies into it, every step)
    weight = weight.squeeze(-1)
    if impl == "dense" or not causal:
        return dense_mix(weight, x, causal, bias)
    weight = weight.to(x.dtype)
    if impl == "triton":
        from mmscale.ops import triton_mixing  # lazy: imports triton (slow, CUDA-only use)
        out = triton_mixing.triton_mix(weight, x)
        return out if bias is None else out + bias[:, None]
    return BlockedMix.apply(weight, x, block_rows or _default_block_rows(t), bias)


def _shift(x, offset):
    """y[..., c] = x[..., c + offset], zero outside (the zero padding of Conv1d(padding=k // 2))."""
    if offset == 0:
        return x
    c = x.shape[-1]
    if offset > 0:
        return F.pad(x[..., offset:], (0, min(offset, c)))
    return F.pad(x[..., :c + offset], (min(-offset, c), 0))


def _default_block_rows(t: int) -> int:
    # at least 2 blocks, at most ~T / CPU_BLOCK_ROWS of them
    return max(1, min(CPU_BLOCK_ROWS, math.ceil(t / 2)))


def dense_mix(weight, x, causal=True, bias=None):
    """weight [H, T, T] (raw, any float dtype), x [B, H, T, C]: mask the whole matrix and multiply in x's
    dtype, masked half included."""
    return DenseMix.apply(weight, x, bias, causal)


def _dense_weight(weight, dtype, causal):
    w = weight.to(dtype)
    return w.tril() if causal else w


class DenseMix(torch.autograd.Function):
    """The dense product with the mask and the cast to x's dtype recomputed in backward, so only the raw
    parameter is kept for it: autograd through `weight.to(dtype).tril()` would keep a T x T copy per
    layer until backward (256 MiB a layer in fp32 at T 8192). Flat (one head): the paper's op, a Conv1d
    with channels = positions and kernel 1, bias fused in; its backward is the conv's own
    (aten.convolution_backward), so gradients equal autograd's through F.conv1d. Heads: an einsum.
    Masked entries get exactly zero gradient."""

    @staticmethod
    def forward(ctx, weight, x, bias, causal):
        w = _dense_weight(weight, x.dtype, causal)
        ctx.save_for_backward(weight, x)
        ctx.causal, ctx.has_bias = causal, bias is not None
        if x.shape[1] == 1:
            return F.conv1d(x.squeeze(1), w.squeeze(0).unsqueeze(-1), bias).unsqueeze(1)
        out = torch.einsum("hij,bhjc->bhic", w, x)
        return out if bias is None else out + bias[:, None]

    @staticmethod
    def backward(ctx, grad_out):
        weight, x = ctx.saved_tensors
        w = _dense_weight(weight, x.dtype, ctx.causal)
        need_w, need_x, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        gw = gx = gb = None
        if x.shape[1] == 1:
            w3 = w.squeeze(0).unsqueeze(-1)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out.squeeze(1), x.squeeze(1), w3, [w3.shape[0]] if ctx.has_bias else None,
                [1], [0], [1], False, [0], 1, [need_x, need_w, need_b and ctx.has_bias])
            gx = None if gx is None else gx.unsqueeze(1)
            gw = None if gw is None else gw.squeeze(-1).unsqueeze(0)
        else:
            if need_x:
                gx = torch.einsum("hij,bhic->bhjc", w, grad_out)
            if need_w:
                gw = torch.einsum("bhic,bhjc->hij", grad_out, x)
            if need_b and ctx.has_bias:
                gb = grad_out.sum(dim=(0, 1, 3))
        if gw is not None:
            if ctx.causal:
                gw = gw.tril()
            gw = gw.to(weight.dtype)
        return gw, gx, gb, None


def _blocks(t, rows):
    return [(r0, min(r0 + rows, t)) for r0 in range(0, t, rows)]


class BlockedMix(torch.autograd.Function):
    """Causal mixing by square blocks of the T x T matrix, computing only the blocks on or below the
    diagonal, in the forward and in both gradients (the work drops to (k + 1) / 2k of dense for k
    blocks). Only the diagonal blocks are masked, so no full-size masked copy is ever made.

    The batch is folded into the feature axis: per head, x is laid out [T, B*C] (one copy), so every
    product is one plain 2-D GEMM per block (row) with a long inner or outer dimension, writing into a
    contiguous row range of its output, whatever the batch size (per batch element, small batches of
    long rows ran many small GEMMs that two threads could not keep busy).

    weight [H, T, T] (raw), x [B, H, T, C], bias [T] or None (added per output position, in the first GEMM).
    """

    @staticmethod
    def forward(ctx, weight, x, rows, bias=None):
        b, h, t, c = x.shape
        xt = x.permute(1, 2, 0, 3).reshape(h, t, b * c)  # [H, T, B*C]: a copy
        out = torch.empty_like(xt)
        for hd in range(h):
            w, xs, o = weight[hd], xt[hd], out[hd]
            for r0, r1 in _blocks(t, rows):
                dst = o[r0:r1]
                if bias is None:
                    torch.mm(w[r0:r1, r0:r1].tril(), xs[r0:r1], out=dst)
                else:
                    torch.addmm(bias[r0:r1, None], w[r0:r1, r0:r1].tril(), xs[r0:r1], out=dst)
                if r0 > 0:
                    dst.addmm_(w[r0:r1, :r0], xs[:r0])
        ctx.save_for_backward(weight, xt)
        ctx.rows, ctx.shape, ctx.has_bias = rows, (b, h, t, c), bias is not None
        return out.view(h, t, b, c).permute(2, 0, 1, 3)

    @staticmethod
    def backward(ctx, grad_out):
        weight, xt = ctx.saved_tensors
        b, h, t, c = ctx.shape
        blocks = _blocks(t, ctx.rows)
        gt = grad_out.permute(1, 2, 0, 3).reshape(h, t, b * c)  # [H, T, B*C]
        need_w, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # every block on or below the diagonal is written below: only those above it need zeros
        grad_w = torch.empty_like(weight) if need_w else None
        grad_xt = torch.empty_like(xt) if need_x else None
        for hd in range(h):
            w, g, xs = weight[hd], gt[hd], xt[hd]
            if need_x:
                # dx[j] = sum_{i >= j} W[i, j] g[i]: column block [c0, c1) reads rows c0..T only
                dx = grad_xt[hd]
                for c0, c1 in blocks:
                    dst = dx[c0:c1]
                    torch.mm(w[c0:c1, c0:c1].tril().t(), g[c0:c1], out=dst)
                    if c1 < t:
                        dst.addmm_(w[c1:, c0:c1].t(), g[c1:])
            if need_w:
                # dW[i, j] = sum_{b, c} g[b, i, c] x[b, j, c] for j <= i: one GEMM per block row over a
                # contiguous prefix of rows, the batch in the long inner dimension
                gw = grad_w[hd]
                for r0, r1 in blocks:
                    gw[r0:r1, :r1] = g[r0:r1] @ xs[:r1].t()
                    gw[r0:r1, r0:r1].tril_()  # masked entries of the diagonal block: exactly zero
                    gw[r0:r1, r1:].zero_()
        grad_x = None if grad_xt is None else grad_xt.view(h, t, b, c).permute(2, 0, 1, 3)
        grad_b = gt.sum(dim=(0, 2)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_w, grad_x, None, grad_b
