"""Models: causality, masking, the forward contract, counts, and references computed another way."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmscale.config import ModelConfig
from mmscale.models import LlamaLM, MaskedMixerLM, TokenMixer, build_model

V, D, T = 37, 24, 12


pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "flat": dict(kind="mixer", mixer="flat"),
    "flat-k3": dict(kind="mixer", mixer="flat", kernel_size=3),
    "multihead": dict(kind="mixer", mixer="multihead", heads=4),
    "multihead-k3": dict(kind="mixer", mixer="multihead", heads=2, kernel_size=3),
    "mixer-tied-norm": dict(kind="mixer", tie_embeddings=True, final_norm=True),
    "transformer": dict(kind="transformer", heads=4),
    "transformer-gqa-tied": dict(kind="transformer", heads=4, kv_heads=2, tie_embeddings=True),
}


def make(seed: int = 0, **kw) -> nn.Module:
    base = dict(d_model=D, n_layers=2, n_ctx=T, vocab_size=V)
    base.update(kw)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**base)).eval()


def token_mixers(model) -> list[TokenMixer]:
    return [m for m in model.modules() if isinstance(m, TokenMixer)]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("length", [T, T - 4])  # full context, and one padded internally
def test_perturbing_a_token_changes_no_earlier_logit(name, length):
    model = make(**VARIANTS[name])
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, V, (2, length), generator=g)
        j = int(torch.randint(1, length, (1,), generator=g))
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 1 + torch.randint(0, V - 1, (2,), generator=g)) % V
        with torch.no_grad():
            a, b = model(ids), model(changed)
        assert torch.equal(a[:, :j], b[:, :j]), f"{name}: perturbing token {j} changed an earlier logit"
        assert (a[:, j] - b[:, j]).abs().max() > 1e-4, f"{name}: perturbing token {j} did not change its own logit"


@pytest.mark.parametrize("name", ["flat", "flat-k3", "multihead", "transformer"])
def test_bidirectional_sees_the_future(name):
    model = make(**VARIANTS[name], bidirectional=True)
    ids = torch.randint(0, V, (2, T))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    with torch.no_grad():
        diff = (model(ids)[:, 0] - model(changed)[:, 0]).abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize("name", ["flat", "flat-k3", "multihead", "multihead-k3"])
def test_masked_weights_get_zero_gradient_and_start_at_zero(name):
    model = make(**VARIANTS[name]).train()
    future = ~torch.tril(torch.ones(T, T, dtype=torch.bool))
    for tm in token_mixers(model):
        assert torch.all(tm.weight.detach()[..., future] == 0), "upper triangle must be initialised to zero"
    window = torch.randint(0, V, (3, T + 1))  # labels of length T + 1 train every position
    model(window[:, :-1], window).backward()
    for tm in token_mixers(model):
        grad = tm.weight.grad
        assert torch.all(grad[..., future] == 0), "a masked (future) weight received gradient"
        assert (grad[..., ~future] != 0).float().mean() > 0.9, "live weights should receive gradient"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_has_only_parameters_and_loads_strictly(name):
    model = make(seed=1, **VARIANTS[name])
    sd = model.state_dict()
    assert not any(k.endswith(("mask", "rope_cos", "rope_sin")) for k in sd), "buffers leaked into the state dict"
    assert set(sd) == {k for k, _ in model.named_parameters(remove_duplicate=False)}
    other = make(seed=2, **VARIANTS[name])
    other.load_state_dict(sd, strict=True)
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        assert torch.equal(model(ids), other(ids))


@pytest.mark.parametrize("heads,k", [(1, 1), (1, 3), (3, 1), (2, 5)])
def test_token_mixer_matches_the_papers_conv1d(heads, k):
    """Reference: per head, Conv1d(T, T, k, padding=k//2) over the feature axis with the masked weight (float64)."""
    torch.manual_seed(heads * 10 + k)
    tm = TokenMixer(T, heads=heads, kernel_size=k, bias=True).double()
    with torch.no_grad():
        tm.weight.normal_()  # also fill the upper triangle: the mask, not the init, must hide it
    x = torch.randn(2, T, 6 * heads, dtype=torch.float64)
    w = (tm.weight * torch.tril(torch.ones(T, T, dtype=torch.float64))).detach()
    ref = []
    for h, xh in enumerate(x.chunk(heads, dim=-1)):
        conv = nn.Conv1d(T, T, k, padding=k // 2, bias=False).double()
        conv.weight.data = w[h].permute(1, 2, 0).contiguous()  # [taps, i, j] -> [i, j, taps]
        ref.append(conv(xh))
    ref = torch.cat(ref, dim=-1) + tm.bias.detach()[:, None]
    torch.testing.assert_close(tm(x), ref, rtol=1e-12, atol=1e-12)


def test_multihead_differs_from_flat():
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        flat, multi = make(**VARIANTS["flat"])(ids), make(**VARIANTS["multihead"])(ids)
    assert flat.shape == multi.shape
    assert (flat - multi).abs().max() > 1e-3
    heads = token_mixers(make(**VARIANTS["multihead"]))
    assert all(tm.weight.shape == (4, 1, T, T) for tm in heads)  # one T x T matrix per head


def test_forward_contract_loss_padding_and_errors():
    torch.manual_seed(3)
    model = make(**VARIANTS["flat"])
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, T, V)
        # labels of length L: the usual shifted loss
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(model(ids, ids), ref)
        # labels of length L + 1: every position is trained; -100 ignored
        window = torch.randint(0, V, (2, T + 1))
        window[0, 5] = -100
        keep = window[:, 1:] != -100
        ref = F.cross_entropy(model(window[:, :-1].clamp(min=0))[keep], window[:, 1:][keep])
        torch.testing.assert_close(model(window[:, :-1].clamp(min=0), window), ref)
        # shorter input == the prefix of the full-length output
        torch.testing.assert_close(model(ids[:, :5]), logits[:, :5], rtol=1e-5, atol=1e-5)
        # hidden(): embeddings in, upto, final norm
        emb = model.embed(ids)
        torch.testing.assert_close(model.hidden(inputs_embeds=emb), model.hidden(ids))
        assert torch.equal(model.hidden(ids, upto=0), emb)
        torch.testing.assert_close(model.lm_head(model.hidden(ids)), logits)
    with pytest.raises(ValueError, match="n_ctx = 12"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(ids, ids[:, :1])


@pytest.mark.parametrize("name", ["flat", "transformer"])
def test_bf16_forward_runs(name):
    model = make(**VARIANTS[name]).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, T))
    loss = model(ids, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_equals_hand_count(name):
    kw = VARIANTS[name]
    model = make(**kw)
    c = model.config
    d, k, L = D, c.kernel_size, c.n_layers
    if c.kind == "mixer":
        h = c.heads if c.mixer == "multihead" else 1
        mixing = h * k * T * T + (T if c.mixer == "flat" else 2 * (d * d + d))
        ffn = d * 4 * d + 4 * d + 4 * d * d + d
        norms = 2 * 2 * d
        per_layer = {"mixing": mixing, "ffn": ffn, "norm": norms}
        final = 2 * d if c.final_norm else 0
    else:
        kv = (c.kv_heads or c.heads) * (d // c.heads)
        per_layer = {"mixing": 2 * d * d + 2 * d * kv, "ffn": 3 * d * 4 * d, "norm": 2 * d}
        final = d
    expected = {"embedding": V * d, "head": 0 if c.tie_embeddings else V * d,
                "mixing": L * per_layer["mixing"], "ffn": L * per_layer["ffn"], "norm": L * per_layer["norm"] + final}
    expected["total"] = sum(expected.values())
    assert model.param_breakdown() == expected
    assert model.num_params() == expected["total"]


@pytest.mark.parametrize("name", ["flat", "flat-k3", "multihead-k3", "transformer", "transformer-gqa-tied"])
def test_dense_flops_match_torch_flop_counter(name):
    """The dense convention is what dense kernels execute: torch's FLOP counter over a real fwd + bwd."""
    model = make(**VARIANTS[name]).train()
    ids = torch.randint(0, V, (2, T))
    # the math attention backend runs as plain matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd_counter:
            logits = model(ids)
        with FlopCounterMode(display=False) as total_counter:
            model(ids).sum().backward()
    expected = model.flops_per_token()
    assert fwd_counter.get_total_flops() / ids.numel() == model.flops_per_token(backward=False)["dense"]
    # the first block's input gradient flows into the embedding, so every matmul runs 3x in training
    assert total_counter.get_total_flops() / ids.numel() == expected["dense"]
    assert logits.shape[-1] == V


@pytest.mark.parametrize("name", ["flat", "flat-k3", "multihead", "transformer"])
def test_causal_flops_count_only_the_live_triangle(name):
    model = make(**VARIANTS[name])
    c, f = model.config, model.flops_per_token(backward=False)
    k = c.kernel_size
    # hand count: position i sees i + 1 of the T positions; averaged, (T + 1) / 2 instead of T
    per_dense_position = 2 * D * k if c.kind == "mixer" else 4 * D
    saved = c.n_layers * per_dense_position * (T - (T + 1) / 2)
    assert f["dense"] - f["causal"] == saved
    bidir = make(**VARIANTS[name], bidirectional=True).flops_per_token()
    assert bidir["dense"] == bidir["causal"]


@pytest.mark.parametrize("name", ["flat", "multihead", "flat-k3", "transformer"])
def test_loss_falls_on_a_repetitive_sequence(name):
    model = make(seed=5, **VARIANTS[name]).train()
    g = torch.Generator().manual_seed(0)
    period = torch.randint(0, V, (5,), generator=g)
    ids = period.repeat(T // 5 + 2)[: T + 1].expand(4, -1)  # window of T + 1 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(ids[:, :-1], ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_build_model_types_and_seeding():
    assert isinstance(make(kind="mixer"), MaskedMixerLM)
    assert isinstance(make(kind="transformer"), LlamaLM)
    a, b = make(seed=7), make(seed=7)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    tied = make(**VARIANTS["mixer-tied-norm"])
    assert tied.lm_head.weight is tied.embed.weight
    assert isinstance(make().norm, nn.Identity)  # the paper's mixer: no final norm
    assert dataclasses.asdict(tied.config)["tie_embeddings"] is True


def test_transformer_matches_a_float64_reference():
    """A naive Llama (explicit heads, explicit causal softmax, complex-number interleaved RoPE as llama2.c)
    computes the same logits once wq/wk rows are permuted as tools/import_llama2c.py does."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("import_llama2c", Path(__file__).parents[1] / "tools/import_llama2c.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    model = make(seed=11, kind="transformer", heads=4, kv_heads=2).double()
    c, hd = model.config, D // 4
    g = torch.Generator().manual_seed(1)
    # raw llama2.c-layout q/k weights; the model gets them permuted
    raw = {}
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            raw[i] = (torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3,
                      torch.randn(2 * hd, D, generator=g, dtype=torch.float64) * 0.3)
            blk.attn.wq.weight.copy_(tool.interleaved_to_rotate_half(raw[i][0], 4))
            blk.attn.wk.weight.copy_(tool.interleaved_to_rotate_half(raw[i][1], 2))
            blk.attn_norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(0, V, (2, T), generator=g)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w

    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freqs = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), pos * freqs)

    def rope_interleaved(x):  # x [B, T, hd]: pairs (2m, 2m + 1) as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(x.shape)

    with torch.no_grad():
        x = model.embed.weight[ids]
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for i, blk in enumerate(model.blocks):
            h = rms(x, blk.attn_norm.weight)
            q, k, v = h @ raw[i][0].T, h @ raw[i][1].T, h @ blk.attn.wv.weight.T
            heads = []
            for head in range(4):
                kvh = head // 2
                qh = rope_interleaved(q[..., head * hd:(head + 1) * hd])
                kh = rope_interleaved(k[..., kvh * hd:(kvh + 1) * hd])
                scores = (qh @ kh.transpose(1, 2)) / hd ** 0.5
                scores = scores.masked_fill(~causal, float("-inf"))
                heads.append(scores.softmax(-1) @ v[..., kvh * hd:(kvh + 1) * hd])
            x = x + torch.cat(heads, -1) @ blk.attn.wo.weight.T
            h = rms(x, blk.ffn_norm.weight)
            f = blk.ffn
            x = x + (F.silu(h @ f.w1.weight.T) * (h @ f.w3.weight.T)) @ f.w2.weight.T
        ref = rms(x, model.norm.weight) @ model.lm_head.weight.T
        # atol: the RoPE tables are stored in fp32; a wrong permutation is off by O(1)
        torch.testing.assert_close(model(ids), ref, rtol=1e-6, atol=1e-6)
