"""The Triton token-mixing kernels (forward, input and weight gradients) against a float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, small sizes: it is
slow); with CUDA (tools/gpu_check.sh) the same tests run the compiled kernels at larger sizes.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
# triton decorates its own library when first imported: if another test (torch.compile, say) imported
# it before the interpreter was switched on, the kernels run in a fresh process instead (test below)
IN_SUBPROCESS = not ON_CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_CUDA and not IN_SUBPROCESS:
    # must be set before triton and the kernels are imported (triton decorates its own library at
    # import): re-import if another test imported them first
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
if not ON_CUDA and not IN_SUBPROCESS:
    if "mmscale.ops.triton_mixing" in sys.modules:
        importlib.reload(sys.modules["mmscale.ops.triton_mixing"])

from mmscale.errors import UserError  # noqa: E402
from mmscale.ops import token_mix  # noqa: E402
from mmscale.ops import triton_mixing  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
# (heads or None for the flat layout, T, C); T not multiples of the tile (16 interpreted, 64 on GPU)
SIZES = [(None, 37, 12), (2, 16, 20), (None, 5, 3)] if not ON_CUDA else \
    [(None, 37, 12), (2, 200, 40), (None, 1000, 96), (4, 1030, 64)]

in_this_process = pytest.mark.skipif(IN_SUBPROCESS, reason="run by test_interpreted_kernels_in_a_fresh_process")


def test_interpreted_kernels_in_a_fresh_process():
    if not IN_SUBPROCESS:
        return  # the tests below run right here
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def reference(weight, x):
    w = weight.double() * torch.ones(weight.shape[-1], weight.shape[-1], dtype=torch.float64,
                                     device=weight.device).tril()
    x = x.double()
    return torch.matmul(w, x) if x.dim() == 4 else w @ x


@in_this_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
def test_triton_matches_float64_reference(dtype, size):
    heads, t, c = size
    torch.manual_seed(t)
    w_shape = (t, t) if heads is None else (heads, t, t)
    x_shape = (2, t, c) if heads is None else (2, heads, t, c)
    weight = (torch.randn(w_shape, device=DEVICE) / t ** 0.5).requires_grad_(True)
    x = torch.randn(x_shape, device=DEVICE, requires_grad=True)
    gout = torch.randn(x_shape, device=DEVICE)

    out = token_mix(weight, x.to(dtype), causal=True, impl="triton")
    gw, gx = torch.autograd.grad(out, (weight, x), gout.to(dtype))

    wr = weight.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    ref = reference(wr, xr)
    rgw, rgx = torch.autograd.grad(ref, (wr, xr), gout.double())

    tol = 2e-5 if dtype == torch.float32 else 3e-2
    if ON_CUDA and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = 5e-3
    for got, want in ((out, ref), (gx, rgx), (gw, rgw)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    assert out.dtype == dtype and gw.dtype == torch.float32
    # masked entries: exactly zero gradient
    assert (gw.reshape(-1, t, t)[:, torch.ones(t, t, dtype=torch.bool, device=DEVICE).triu(1)] == 0).all()


@in_this_process
def test_triton_matches_blocked_path():
    torch.manual_seed(7)
    t = 40 if not ON_CUDA else 700
    weight = torch.randn(t, t, device=DEVICE, requires_grad=True)
    x = torch.randn(3, t, 16, device=DEVICE, requires_grad=True)
    outs = []
    for impl in ("blocked", "triton"):
        out = token_mix(weight, x, True, impl)
        outs.append((out,) + torch.autograd.grad(out.square().sum(), (weight, x)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


@in_this_process
def test_triton_with_kernel_size_3_and_a_clear_error_off_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the dense reference conv, on CUDA
    torch.manual_seed(8)
    weight = torch.randn(20, 20, 3, dtype=torch.float32, device=DEVICE)
    x = torch.randn(2, 20, 8, device=DEVICE)
    torch.testing.assert_close(token_mix(weight, x, True, "triton"), token_mix(weight, x, True, "dense"),
                               rtol=1e-4, atol=1e-4)
    if not ON_CUDA:
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            with pytest.raises(UserError, match="runs on CUDA"):
                triton_mixing.triton_mix(weight[..., 0], x.unsqueeze(1))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


@in_this_process
def test_weight_gradient_is_a_fixed_order_sum_of_per_split_partials():
    """Deterministic weight gradient: each of the SPLIT programs of a tile writes the sum over its own batch
    elements (s, s + SPLIT, ...) into its own slice, with no atomics, and the slices are added in a fixed
    order, so two runs give the same bits (with atomic adds the order, and the last bits, varied on CUDA;
    the interpreter runs programs one by one, so here the check is on the structure, and on CUDA also on
    repeated runs)."""
    import inspect

    kernel = triton_mixing._bwd_w_kernel
    assert "tl.atomic_" not in inspect.getsource(getattr(kernel, "fn", kernel))
    torch.manual_seed(11)
    b, h, t, c = (3, 2, 37, 12) if not ON_CUDA else (64, 2, 1030, 64)
    x = torch.randn(b, h, t, c, device=DEVICE)
    dout = torch.randn(b, h, t, c, device=DEVICE)
    split = 2 if not ON_CUDA else 4
    parts = triton_mixing._weight_grad_partials(x, dout, split)
    assert parts.shape == (split, h, t, t) and parts.dtype == torch.float32
    for s in range(split):  # slice s is exactly the gradient of its own batch elements
        own = triton_mixing._weight_grad_partials(x[s::split].contiguous(), dout[s::split].contiguous(), 1)[0]
        assert torch.equal(parts[s], own), s
    # and the whole is the partials added in order, bit for bit, on every run
    w = torch.zeros(h, t, t, device=DEVICE)
    runs = [triton_mixing.mix_backward_w(w, x, dout.contiguous()) for _ in range(2 if not ON_CUDA else 5)]
    want_split = triton_mixing._weight_grad_split(
        triton.cdiv(t, triton_mixing._blocks(t, c, x.dtype)[0]) ** 2, b) if ON_CUDA else 2
    if want_split == split:
        ordered = parts[0]
        for s in range(1, split):
            ordered = ordered + parts[s]
        assert torch.equal(runs[0], ordered)
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    # against float64: the sum over the whole batch (lower triangle; exactly 0 above)
    ref = torch.einsum("bhic,bhjc->hij", dout.double(), x.double()).tril()
    torch.testing.assert_close(runs[0].double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
