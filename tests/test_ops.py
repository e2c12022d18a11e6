"""mmscale.ops against plain references: the dense masked matmul in float64, F.cross_entropy in float64."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmscale.ops import choose_impl, token_mix
from mmscale.ops import cross_entropy
from mmscale.ops.cross_entropy import chunked_cross_entropy, lm_head_cross_entropy


def reference_mix(weight, x, causal):
    """float64 einsum over the explicitly masked matrix; taps handled as zero-padded shifts."""
    w = weight.double()
    flat = x.dim() == 3
    if flat:
        x = x.unsqueeze(1)
        w = w.unsqueeze(0)
    if w.dim() == 3:
        w = w.unsqueeze(-1)
    x = x.double()
    t, c, taps = x.shape[2], x.shape[3], w.shape[3]
    if causal:
        w = w * torch.ones(t, t, dtype=torch.float64).tril()[None, :, :, None]
    out = torch.zeros_like(x)
    for k in range(taps):
        off = k - taps // 2
        shifted = torch.zeros_like(x)
        lo, hi = max(0, -off), min(c, c - off)
        shifted[..., lo:hi] = x[..., lo + off:hi + off]
        out += torch.einsum("hij,bhjc->bhic", w[..., k], shifted)
    return out.squeeze(1) if flat else out


def grads(fn, weight, x, grad_out):
    w = weight.detach().clone().requires_grad_(True)
    xx = x.detach().clone().requires_grad_(True)
    out = fn(w, xx)
    gw, gx = torch.autograd.grad(out, (w, xx), grad_out.to(out.dtype))
    return out, gw, gx


# (name, weight shape fn of T, x shape fn of T): flat, multi-head, kernel_size 3
SHAPES = {
    "flat": (lambda t: (t, t), lambda t: (3, t, 12)),
    "multihead": (lambda t: (2, t, t), lambda t: (2, 2, t, 8)),
    "taps3": (lambda t: (t, t, 3), lambda t: (2, t, 10)),
}
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float64: (1e-10, 1e-10)}


@pytest.mark.parametrize("impl", ["dense", "blocked"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("t", [1, 7, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_mix_matches_float64_reference(impl, shape, t, dtype):
    torch.manual_seed(t)
    w_shape, x_shape = SHAPES[shape]
    weight = torch.randn(w_shape(t)) / t ** 0.5
    x = torch.randn(x_shape(t))
    gout = torch.randn(x_shape(t))
    # block rows that do not divide T, so the last block is ragged
    fn = lambda w, xx: token_mix(w, xx.to(dtype), causal=True, impl=impl, block_rows=24)  # noqa: E731
    out, gw, gx = grads(fn, weight, x, gout)
    ref, rgw, rgx = grads(lambda w, xx: reference_mix(w, xx, True), weight.double(), x.double(), gout.double())
    rtol, atol = TOL[dtype]
    scale = lambda r: atol * max(1.0, r.abs().max().item())  # noqa: E731
    assert out.dtype == dtype and gw.dtype == torch.float32 and gx.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=scale(ref))
    torch.testing.assert_close(gx.double(), rgx, rtol=rtol, atol=scale(rgx))
    torch.testing.assert_close(gw.double(), rgw, rtol=rtol, atol=scale(rgw))
    # the entries above the diagonal are masked: their gradient is exactly zero
    upper = torch.ones(t, t, dtype=torch.bool).triu(1)
    mats = gw.permute(2, 0, 1) if shape == "taps3" else gw.reshape(-1, t, t)
    assert (mats[:, upper] == 0).all()


@pytest.mark.parametrize("impl", ["dense", "blocked"])
@pytest.mark.parametrize("shape", ["flat", "multihead"])
def test_token_mix_bias_and_its_gradient_match_float64(impl, shape):
    """The bias per output position (fused into the first GEMM of the blocked path, into the conv of the dense
    one) and its gradient, against float64 autograd of tril(W) @ x + b."""
    torch.manual_seed(5)
    t = 70
    w_shape, x_shape = SHAPES[shape]
    weight, x = torch.randn(w_shape(t)) / t ** 0.5, torch.randn(x_shape(t))
    bias, gout = torch.randn(t), torch.randn(x_shape(t))
    ins = [v.clone().requires_grad_(True) for v in (weight, x, bias)]
    out = token_mix(ins[0], ins[1], causal=True, impl=impl, block_rows=24, bias=ins[2])
    got = torch.autograd.grad(out, ins, gout)
    ref_ins = [v.double().requires_grad_(True) for v in (weight, x, bias)]
    ref = reference_mix(ref_ins[0], ref_ins[1], True) + ref_ins[2][:, None]
    want = torch.autograd.grad(ref, ref_ins, gout.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-5 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("impl", ["dense", "blocked", "auto"])
def test_bidirectional_is_the_full_matmul(impl):
    torch.manual_seed(0)
    weight, x = torch.randn(2, 33, 33, dtype=torch.float64), torch.randn(3, 2, 33, 5, dtype=torch.float64)
    out = token_mix(weight, x, causal=False, impl=impl)
    torch.testing.assert_close(out, torch.einsum("hij,bhjc->bhic", weight, x))


def test_blocked_matches_dense_exactly_in_float64_at_many_block_sizes():
    torch.manual_seed(1)
    t = 50
    weight, x = torch.randn(t, t, dtype=torch.float64), torch.randn(2, t, 6, dtype=torch.float64)
    ref = token_mix(weight, x, True, "dense")
    for rows in (1, 3, 16, 49, 50, 80):
        torch.testing.assert_close(token_mix(weight, x, True, "blocked", block_rows=rows), ref)


def test_autocast_bf16_computes_in_bf16_and_returns_fp32_weight_grads():
    torch.manual_seed(2)
    weight = torch.randn(40, 40, requires_grad=True)
    x = torch.randn(2, 40, 16, requires_grad=True)
    for impl in ("dense", "blocked"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = token_mix(weight, x, True, impl)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert (weight.grad.triu(1) == 0).all()
        weight.grad = x.grad = None


def test_auto_measures_once_per_shape_and_caches_the_winner(tmp_path, monkeypatch):
    from mmscale.ops import token_mixing as tm

    monkeypatch.setenv("MMSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tm, "_CHOSEN", {})
    calls = []
    costs = {"dense": 2.0, "blocked": 1.0}
    monkeypatch.setattr(tm, "_time_impl", lambda impl, *a, **k: calls.append(impl) or costs[impl])
    assert choose_impl(512, "cpu", True, batch=2, threads=2, channels=64) == "blocked"
    assert sorted(calls) == ["blocked", "dense"]
    costs.update(dense=0.5)  # faster now, but the first measurement stands (resumes take the same path)
    assert choose_impl(512, "cpu", True, batch=2, threads=2, channels=64) == "blocked" and len(calls) == 2
    monkeypatch.setattr(tm, "_CHOSEN", {})  # a new process: the cache file answers, nothing is timed
    assert choose_impl(512, "cpu", True, batch=2, threads=2, channels=64) == "blocked" and len(calls) == 2
    assert choose_impl(512, "cpu", True, batch=2, threads=1, channels=64) == "dense"  # another key: measured
    assert len(calls) == 4 and len(json.loads((tmp_path / "token_mix_auto.json").read_text())) == 2
    assert choose_impl(128, "cpu", True, channels=64) == "dense" and len(calls) == 4  # short: never timed
    monkeypatch.setenv("MMSCALE_TOKEN_MIX_AUTO", "rule")
    assert choose_impl(4096, "cpu", True, threads=1, channels=64) == "blocked" and len(calls) == 4
    # the real timer runs both paths and returns positive seconds
    monkeypatch.undo()
    assert tm._time_impl("blocked", 256, 8, 1, torch.float32, repeats=1) > 0


def test_auto_cache_from_one_cpu_is_never_reused_on_another(tmp_path, monkeypatch):
    from mmscale import precision
    from mmscale.ops import token_mixing as tm

    monkeypatch.setenv("MMSCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tm, "_CHOSEN", {})
    calls, costs = [], {"dense": 2.0, "blocked": 1.0}
    monkeypatch.setattr(tm, "_time_impl", lambda impl, *a, **k: calls.append(impl) or costs[impl])
    cpu = {"name": "Intel(R) Xeon(R) Platinum 8481C", "flags": {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}}
    monkeypatch.setattr(precision, "_cpuinfo", lambda: (cpu["name"], cpu["flags"]))
    assert choose_impl(1024, "cpu", True, batch=2, threads=2, channels=64) == "blocked" and len(calls) == 2
    # the same cache file on an AVX2-only EPYC (a shared home): measured again there, its own answer kept
    cpu.update(name="AMD EPYC 7B13", flags={"avx2", "fma"})
    monkeypatch.setattr(tm, "_CHOSEN", {})
    costs.update(dense=0.5)
    assert choose_impl(1024, "cpu", True, batch=2, threads=2, channels=64) == "dense" and len(calls) == 4
    # same model name, other ISA (a VM that hides AVX-512): another key too
    cpu.update(name="Intel(R) Xeon(R) Platinum 8481C", flags={"avx2", "fma"})
    monkeypatch.setattr(tm, "_CHOSEN", {})
    assert choose_impl(1024, "cpu", True, batch=2, threads=2, channels=64) == "dense" and len(calls) == 6
    keys = json.loads((tmp_path / "token_mix_auto.json").read_text())
    assert len(keys) == 3 and sum("AMD EPYC 7B13" in k for k in keys) == 1
    # back on the first CPU in a new process: its own cached answer, nothing timed
    cpu.update(flags={"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(tm, "_CHOSEN", {})
    assert choose_impl(1024, "cpu", True, batch=2, threads=2, channels=64) == "blocked" and len(calls) == 6


def test_auto_selection_by_device_and_size():
    assert choose_impl(64, "cpu", True, threads=1) == "dense"
    assert choose_impl(4096, "cpu", True, threads=1) == "blocked"
    assert choose_impl(4096, "cpu", True, batch=32, threads=1) == "dense"
    assert choose_impl(4096, "cpu", True, threads=2) == "dense"
    assert choose_impl(4096, "cpu", False, threads=1) == "dense"


def test_bad_shapes_and_impl_are_named():
    w, x = torch.randn(8, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_mix(w, x, True, "fast")
    with pytest.raises(ValueError, match="does not match"):
        token_mix(torch.randn(9, 9), x)
    with pytest.raises(ValueError, match="tap axis must be odd"):
        token_mix(torch.randn(8, 8, 2), x)


# ---------------------------------------------------------------------------------------------
# chunked LM head + cross-entropy

def reference_ce(hidden, weight, labels, bias=None):
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_ce_matches_float64_reference(chunk_rows, with_bias):
    torch.manual_seed(3)
    b, l, d, v = 3, 21, 16, 53
    hidden = torch.randn(b, l, d, requires_grad=True)
    weight = (torch.randn(v, d) / d ** 0.5).requires_grad_(True)
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (b, l))
    labels[0, :5] = -100
    ins = [hidden, weight] + ([bias] if with_bias else [])
    loss = chunked_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=chunk_rows)
    got = torch.autograd.grad(loss * 2.5, ins)  # a non-unit upstream gradient
    ref_ins = [t.detach().double().requires_grad_(True) for t in ins]
    ref = reference_ce(ref_ins[0], ref_ins[1], labels, ref_ins[2] if with_bias else None)
    want = torch.autograd.grad(ref * 2.5, ref_ins)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_chunked_ce_under_bf16_autocast_is_close_and_keeps_fp32_grads():
    torch.manual_seed(4)
    hidden = torch.randn(4, 30, 32, requires_grad=True)
    weight = (torch.randn(97, 32) / 32 ** 0.5).requires_grad_(True)
    labels = torch.randint(0, 97, (4, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_rows=16)
        plain = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), labels.flatten())
    g = torch.autograd.grad(loss, (hidden, weight))
    gp = torch.autograd.grad(plain, (hidden, weight))
    assert loss.dtype == torch.float32 and g[0].dtype == torch.float32 and g[1].dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-2, atol=1e-2)
    for a, b in zip(g, gp):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-2 * b.abs().max().item())


def test_lm_head_cross_entropy_chunks_only_large_logits(monkeypatch):
    torch.manual_seed(9)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.randint(0, 13, (2, 10))
    calls = []
    real = cross_entropy.chunked_cross_entropy
    monkeypatch.setattr(cross_entropy, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = reference_ce(hidden, weight, labels)
    for threshold, chunked in ((2 * 10 * 13 + 1, False), (2 * 10 * 13, True)):
        monkeypatch.setattr(cross_entropy, "CHUNKED_MIN_LOGITS", threshold)
        calls.clear()
        loss = lm_head_cross_entropy(hidden, weight, labels)
        assert bool(calls) == chunked
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_chunked_ce_no_grad_and_all_ignored():
    torch.manual_seed(5)
    hidden, weight = torch.randn(2, 9, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, chunk_rows=4),
                                   reference_ce(hidden, weight, labels).float())
    ignored = torch.full((2, 9), -100)
    assert torch.isnan(chunked_cross_entropy(hidden, weight, ignored))
    with pytest.raises(ValueError, match="leading shape"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])


# ---------------------------------------------------------------------------------------------
# inside the model: every mixer_impl gives the same loss and gradients, with and without compile

def _mixer(impl, **kw):
    from mmscale.config import ModelConfig
    from mmscale.models import build_model
    torch.manual_seed(6)
    cfg = dict(kind="mixer", d_model=16, n_layers=2, n_ctx=40, vocab_size=50, mixer_impl=impl)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg))


def _loss_and_grads(model, ids):
    loss = model(ids, ids)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss, grads


@pytest.mark.parametrize("chunked_loss", [False, True])
@pytest.mark.parametrize("variant", [dict(), dict(mixer="multihead", heads=2, kernel_size=3)])
def test_model_impls_agree_with_a_plain_float64_forward(variant, chunked_loss, monkeypatch):
    if chunked_loss:
        monkeypatch.setattr(cross_entropy, "CHUNKED_MIN_LOGITS", 1)
    ids = torch.randint(0, 50, (3, 37), generator=torch.Generator().manual_seed(0))
    results = {impl: _loss_and_grads(_mixer(impl, **variant), ids) for impl in ("dense", "blocked")}
    # reference: the same weights in float64, the LM head and loss computed the plain way
    ref_model = _mixer("dense", **variant).double()
    h = ref_model.hidden(ids)
    ref_loss = F.cross_entropy(ref_model.lm_head(h[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    for impl, (loss, grads) in results.items():
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_compiled_model_with_blocked_mixing_and_chunked_loss_matches_eager(monkeypatch):
    # dynamo traces both autograd functions into the graph (aot_eager: the capture and autograd
    # split that break on untraceable code, without inductor's minutes of C++ codegen on 2 cores)
    monkeypatch.setattr(cross_entropy, "CHUNKED_MIN_LOGITS", 1)  # the model's loss takes the chunked path
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    eager = _loss_and_grads(_mixer("blocked", n_layers=1), ids)
    model = _mixer("blocked", n_layers=1)
    model.compile(backend="aot_eager", fullgraph=True)
    compiled = _loss_and_grads(model, ids)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(compiled[1], eager[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_dense_path_keeps_no_masked_copy_for_backward_and_matches_autograd(heads, autocast):
    """The dense path recomputes mask and cast in backward: what it keeps is the raw parameter itself, no
    T x T copy (fp32 masked, or bf16 cast); its gradients (bias included) equal autograd through the plain
    masked product in float64."""
    torch.manual_seed(heads)
    t, c, b = 24, 6, 3
    weight = torch.randn(heads, t, t, requires_grad=True)
    bias = torch.randn(t, requires_grad=True)
    x = torch.randn(b, t, c, requires_grad=True)
    w_in = weight[0] if heads == 1 else weight
    x_in = x if heads == 1 else x.unsqueeze(1).expand(b, heads, t, c)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = token_mix(w_in, x_in, causal=True, impl="dense", bias=bias)
    square = [s for s in saved if s.shape[-2:] == (t, t) or s.shape[-3:] == (t, t, 1)]
    assert square and all(s.dtype == torch.float32 and s.untyped_storage().data_ptr()
                          == weight.untyped_storage().data_ptr() for s in square), \
        [(tuple(s.shape), s.dtype) for s in square]
    gout = torch.randn_like(out, dtype=torch.float32)
    grads_got = torch.autograd.grad(out.float(), (weight, bias, x), gout)
    w64, b64, x64 = (v.detach().double().requires_grad_(True) for v in (weight, bias, x))
    ref = torch.einsum("hij,bjc->bhic", w64 * torch.ones(t, t, dtype=torch.float64).tril(), x64) + b64[:, None]
    ref = ref[:, 0] if heads == 1 else ref
    grads_ref = torch.autograd.grad(ref, (w64, b64, x64), gout.double())
    rtol, atol = (3e-2, 3e-2) if autocast else (1e-5, 1e-5)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol * ref.abs().max().item())
    for got, want in zip(grads_got, grads_ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))
    assert (grads_got[0][:, torch.ones(t, t, dtype=torch.bool).triu(1)] == 0).all()
