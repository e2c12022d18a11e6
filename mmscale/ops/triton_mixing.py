"""Triton kernels for causal token mixing that visit only the lower-triangular tiles.

    out[g, i, c]  = sum_{j <= i} W[h, i, j] x[g, j, c]        g = (batch, head), h = head of g
    dx[g, j, c]   = sum_{i >= j} W[h, i, j] dout[g, i, c]
    dW[h, i, j]   = sum_{b, c} dout[(b, h), i, c] x[(b, h), j, c]   for j <= i, exactly 0 above

The forward walks key tiles 0..i_tile, the input gradient walks output tiles j_tile..end, and the
weight gradient launches one program per lower-triangular (i, j) tile pair; the tiles above the
diagonal are never read or computed. Accumulation is fp32; inputs may be fp32, bf16 or fp16.
Runs on the CPU under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""
from __future__ import annotations

import os

import torch

from mmscale.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # the op falls back to the torch paths
    triton = None


def available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tuned(kernel):
    """On a GPU, let Triton pick warps and pipeline stages per (T, C) from a few configurations (the tiles
    stay those of `_blocks`, which the grids and the weight-gradient tile lists are built from). The CPU
    interpreter has neither, so there the kernel runs as written."""
    if triton is None or _interpreting():
        return kernel
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w, st in ((4, 2), (4, 3), (8, 3), (8, 4))]
    return triton.autotune(configs=configs, key=["T", "C"])(kernel)


if triton is not None:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        # Triton 3.9's CPU interpreter returns garbage for bf16 tl.dot; it upcasts there only
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PREC)

    @_tuned
    @triton.jit
    def _fwd_kernel(w_ptr, x_ptr, out_ptr, T, C, H,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
        g = tl.program_id(0)
        it = tl.program_id(1)
        ct = tl.program_id(2)
        h = g % H
        rows = it * BLOCK_I + tl.arange(0, BLOCK_I)
        cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
        w_base = w_ptr + h.to(tl.int64) * T * T
        x_base = x_ptr + g.to(tl.int64) * T * C
        tl.static_assert(BLOCK_I == BLOCK_J)  # square tiles: the diagonal tile is the last key tile
        row_ok = rows[:, None] < T
        col_ok = cols[None, :] < C
        # key tiles strictly below the diagonal: every j < every row and < T, so only the bounds of the
        # last row tile and of the channels are masked (no causal test per weight element)
        diag0 = it * BLOCK_I
        for j0 in range(0, diag0, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            w = tl.load(w_base + rows[:, None] * T + js[None, :], mask=row_ok, other=0.0)
            x = tl.load(x_base + js[:, None] * C + cols[None, :], mask=col_ok, other=0.0)
            acc += _dot(w, x, PREC, UPCAST)
        # the diagonal tile: the causal mask, and the bounds of T
        js = diag0 + tl.arange(0, BLOCK_J)
        w = tl.load(w_base + rows[:, None] * T + js[None, :], mask=row_ok & (js[None, :] <= rows[:, None]),
                    other=0.0)
        x = tl.load(x_base + js[:, None] * C + cols[None, :], mask=(js[:, None] < T) & col_ok, other=0.0)
        acc += _dot(w, x, PREC, UPCAST)
        o_mask = (rows[:, None] < T) & (cols[None, :] < C)
        tl.store(out_ptr + g.to(tl.int64) * T * C + rows[:, None] * C + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=o_mask)

    @_tuned
    @triton.jit
    def _bwd_x_kernel(w_ptr, dout_ptr, dx_ptr, T, C, H,
                      BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr):
        g = tl.program_id(0)
        jt = tl.program_id(1)
        ct = tl.program_id(2)
        h = g % H
        js = jt * BLOCK_J + tl.arange(0, BLOCK_J)
        cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
        w_base = w_ptr + h.to(tl.int64) * T * T
        d_base = dout_ptr + g.to(tl.int64) * T * C
        tl.static_assert(BLOCK_I == BLOCK_J)  # square tiles: the diagonal tile is the first output tile
        col_ok = cols[None, :] < C
        # the diagonal tile: the causal mask (i >= j) and the bounds of T; W^T tile [j, i]
        diag0 = jt * BLOCK_J
        rows = diag0 + tl.arange(0, BLOCK_I)
        wt_mask = (js[:, None] < T) & (rows[None, :] < T) & (js[:, None] <= rows[None, :])
        wt = tl.load(w_base + rows[None, :] * T + js[:, None], mask=wt_mask, other=0.0)
        d = tl.load(d_base + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < T) & col_ok, other=0.0)
        acc += _dot(wt, d, PREC, UPCAST)
        # output tiles strictly below: every i > every j, so only the bounds of T (last tile) are masked
        for i0 in range(diag0 + BLOCK_I, T, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            row_ok = rows[None, :] < T
            wt = tl.load(w_base + rows[None, :] * T + js[:, None], mask=row_ok & (js[:, None] < T), other=0.0)
            d = tl.load(d_base + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < T) & col_ok, other=0.0)
            acc += _dot(wt, d, PREC, UPCAST)
        o_mask = (js[:, None] < T) & (cols[None, :] < C)
        tl.store(dx_ptr + g.to(tl.int64) * T * C + js[:, None] * C + cols[None, :],
                 acc.to(dx_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _bwd_w_kernel(x_ptr, dout_ptr, dw_ptr, T, C, H, B, tile_i_ptr, tile_j_ptr,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        part = tl.program_id(2)  # this program sums batch elements part, part + SPLIT, ...
        it = tl.load(tile_i_ptr + pid)
        jt = tl.load(tile_j_ptr + pid)
        rows = it * BLOCK_I + tl.arange(0, BLOCK_I)
        js = jt * BLOCK_J + tl.arange(0, BLOCK_J)
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        # sum over batch (g = b * H + h) and the feature axis
        for b in range(part, B, SPLIT):
            g = b * H + h
            d_base = dout_ptr + g.to(tl.int64) * T * C
            x_base = x_ptr + g.to(tl.int64) * T * C
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                d = tl.load(d_base + rows[:, None] * C + cs[None, :],
                            mask=(rows[:, None] < T) & (cs[None, :] < C), other=0.0)
                xt = tl.load(x_base + js[None, :] * C + cs[:, None],
                             mask=(js[None, :] < T) & (cs[:, None] < C), other=0.0)
                acc += _dot(d, xt, PREC, UPCAST)
        keep = (rows[:, None] < T) & (js[None, :] < T)
        acc = tl.where(js[None, :] <= rows[:, None], acc, 0.0)
        # each program stores its own partial sum in its own slice [part] of the buffer (no atomics: the
        # caller adds the slices in a fixed order, so the result is the same bits on every run)
        dst = dw_ptr + (part.to(tl.int64) * H + h) * T * T + rows[:, None] * T + js[None, :]
        tl.store(dst, acc.to(dw_ptr.dtype.element_ty), mask=keep)


def _blocks(t: int, c: int, dtype: torch.dtype):
    if _interpreting():  # the interpreter is slow per program: few, small tiles
        return 16, 16, 16
    bi = 64 if t >= 64 else 16
    bc = 64 if c >= 64 else max(16, triton.next_power_of_2(c))
    return bi, bi, bc


def _flags(dtype) -> dict:
    return {"PREC": _precision(dtype), "UPCAST": _interpreting()}


def _precision(dtype) -> str:
    """fp32 follows torch's CUDA matmul setting: exact ("ieee") unless TF32 was allowed.

    Read through the fp32_precision API only: torch.compile saves and restores the CUDA matmul setting
    through it (torch/_dynamo/convert_frame.py), after which reading the legacy `allow_tf32` raises
    ("you have used mix of the legacy and new APIs"). "none" means "inherit the generic setting"
    (torch.backends.fp32_precision). Setting the legacy flag, or torch.set_float32_matmul_precision,
    is still seen here: torch mirrors both into the new API."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flag is the only one
        return "tf32" if matmul.allow_tf32 else "ieee"
    prec = matmul.fp32_precision
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if prec == "tf32" else "ieee"


def _weight_grad_split(programs: int, batch: int) -> int:
    """How many programs share one weight-gradient tile, each summing every SPLIT-th batch element.

    One program per lower tile is about one wave on a GPU at T 1024 (136 tiles of 64 for 132 SMs) with a
    long serial loop over batch x channels; splitting the batch gives >= 4 waves. Each program writes its
    partial sum to its own slice of an fp32 buffer [SPLIT, H, T, T] and the slices are added in a fixed
    order (_weight_grad_partials, _mix_backward_w): deterministic, bit for bit, for a given GPU model (the
    split follows its SM count). At most 16 slices (the buffer's memory). The CPU interpreter splits in two
    when it can, so the tests run the split path.
    """
    if _interpreting():
        return min(2, batch)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(batch, 16, -(-4 * sms // max(1, programs))))


def _lower_tiles(n_tiles: int, device):
    it, jt = torch.tril_indices(n_tiles, n_tiles, device=device)
    return it.to(torch.int32).contiguous(), jt.to(torch.int32).contiguous()


def _launch(kernel):
    # the kernels as torch.compile sees them (wrap_triton: traceable, fullgraph-safe)
    return wrap_triton(kernel)


def _mix_forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [H, T, T], x [B, H, T, C] (contiguous) -> [B, H, T, C]."""
    b, h, t, c = x.shape
    out = torch.empty_like(x)
    bi, bj, bc = _blocks(t, c, x.dtype)
    grid = (b * h, triton.cdiv(t, bi), triton.cdiv(c, bc))
    _launch(_fwd_kernel)[grid](w, x, out, t, c, h, BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc, **_flags(x.dtype))
    return out


def _mix_backward_x(w: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    b, h, t, c = dout.shape
    bi, bj, bc = _blocks(t, c, dout.dtype)
    dx = torch.empty_like(dout)
    grid = (b * h, triton.cdiv(t, bj), triton.cdiv(c, bc))
    _launch(_bwd_x_kernel)[grid](w, dout, dx, t, c, h, BLOCK_J=bj, BLOCK_I=bi, BLOCK_C=bc, **_flags(dout.dtype))
    return dx


def _weight_grad_partials(x: torch.Tensor, dout: torch.Tensor, split: int) -> torch.Tensor:
    """[split, H, T, T] fp32: slice s is the weight gradient summed over batch elements s, s + split, ...
    (zero above the diagonal: those tiles are never launched)."""
    b, h, t, c = x.shape
    bi, bj, bc = _blocks(t, c, x.dtype)
    assert bi == bj
    parts = torch.zeros(split, h, t, t, device=x.device, dtype=torch.float32)
    ti, tj = _lower_tiles(triton.cdiv(t, bi), x.device)
    grid = (ti.numel(), h, split)
    _launch(_bwd_w_kernel)[grid](x, dout, parts, t, c, h, b, ti, tj, BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc,
                                 SPLIT=split, **_flags(x.dtype))
    return parts


def _mix_backward_w(w: torch.Tensor, x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    b, h, t, c = x.shape
    bi = _blocks(t, c, x.dtype)[0]
    split = _weight_grad_split(triton.cdiv(t, bi) * (triton.cdiv(t, bi) + 1) // 2 * h, b)
    parts = _weight_grad_partials(x, dout, split)
    # the per-split partial sums, added in a fixed order (slice 0, then 1, ...): the same bits on every run
    dw = parts[0]
    for s in range(1, split):
        dw = dw + parts[s]
    return dw.to(w.dtype)


if triton is not None:
    from torch.library import register_autograd, triton_op, wrap_triton

    # Custom ops (torch.library.triton_op): torch.compile traces into the kernels instead of breaking the
    # graph at an autograd.Function with raw launches, and activation checkpointing recomputes them as ops.
    mix_forward = triton_op("mmscale::triton_mix", mutates_args=())(_mix_forward)
    mix_backward_x = triton_op("mmscale::triton_mix_backward_x", mutates_args=())(_mix_backward_x)
    mix_backward_w = triton_op("mmscale::triton_mix_backward_w", mutates_args=())(_mix_backward_w)

    def _setup_context(ctx, inputs, output):
        w, x = inputs
        ctx.save_for_backward(w, x)

    def _backward(ctx, dout):
        w, x = ctx.saved_tensors
        dout = dout.contiguous()
        dw = mix_backward_w(w, x, dout) if ctx.needs_input_grad[0] else None
        dx = mix_backward_x(w, dout) if ctx.needs_input_grad[1] else None
        return dw, dx

    register_autograd("mmscale::triton_mix", _backward, setup_context=_setup_context)


def triton_mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Causal token mixing: w [H, T, T] (raw, unmasked), x [B, H, T, C], same dtype."""
    # a configuration the machine cannot run (model.mixer_impl): a one-line error, exit status 2
    if triton is None:
        raise UserError("token_mix impl 'triton' needs the triton package; pip install triton, "
                        "or set model.mixer_impl to auto, dense or blocked", exit_code=2)
    if x.device.type != "cuda" and not _interpreting():
        raise UserError("token_mix impl 'triton' runs on CUDA (or on the CPU with TRITON_INTERPRET=1); "
                        "set model.mixer_impl to auto, dense or blocked", exit_code=2)
    return mix_forward(w.contiguous(), x.contiguous())
