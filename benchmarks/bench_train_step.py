"""Training-step throughput and memory, side by side in one process: mmscale's mixer, the paper's mixer
as the paper wrote it, and mmscale's transformer (SDPA).

    python benchmarks/bench_train_step.py                                   # CPU grid (fp32 + bf16)
    python benchmarks/bench_train_step.py --device cuda --tokens 65536      # GPU

Each step: forward with labels (mean shifted cross-entropy), backward, AdamW step, zero_grad; all
models get the same batch, dims, precision (fp32, or bf16 autocast over fp32 weights) and AdamW
hyperparameters; the AdamW kernel is each trainer's own unless --optimizer says otherwise.
The candidates are timed round by round, interleaved; the table gives median tokens/s and the
median over rounds of the speed ratio to the paper-style mixer (see common.round_ratio). Memory:
peak allocated on CUDA; on the CPU (no allocator statistics) the bytes saved for backward by one
forward (activations), plus parameters, gradients and AdamW state.

"mmscale mixer (chunked CE)" is mmscale's mixer with the un-chunked loss, to separate the two changes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Stopped, stop_on_sigterm, add_clock_args, apply_clock_args, emit, header, round_ratio, spread, table, time_side_by_side  # noqa: I001

from mmscale.config import ModelConfig
from mmscale.models import build_model, common as model_common
from mmscale.ops.cross_entropy import chunked_cross_entropy


class PaperMixerBlock(nn.Module):
    def __init__(self, d, t):
        super().__init__()
        self.mix_norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(t, t, 1)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        # the paper's masking: write tril(W) into the parameter before every forward
        self.conv.weight.data = torch.tril(self.conv.weight.data[..., 0])[..., None]
        x = x + self.conv(self.mix_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class PaperMixerLM(nn.Module):
    """A fresh implementation of the paper's causal masked mixer (Conv1d(T, T, 1) token mixing)."""

    def __init__(self, vocab, d, t, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PaperMixerBlock(d, t) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, labels):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(x)
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())


def chunked_lm_loss(hidden, lm_head, labels):
    n = labels.shape[1] - 1
    return chunked_cross_entropy(hidden[:, :n], lm_head.weight, labels[:, 1:])


class ChunkedCE(nn.Module):
    """Runs a model with the chunked loss at any size (swaps mmscale.models.common.lm_loss during
    the call); mmscale's own lm_loss chunks only from CHUNKED_MIN_LOGITS logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        saved = model_common.lm_loss
        model_common.lm_loss = chunked_lm_loss
        try:
            return self.model(ids, labels)
        finally:
            model_common.lm_loss = saved


def build(name, d, t, layers, vocab, heads):
    torch.manual_seed(0)
    if name == "paper mixer":
        return PaperMixerLM(vocab, d, t, layers)
    kind = "transformer" if name == "mmscale transformer" else "mixer"
    m = build_model(ModelConfig(kind=kind, d_model=d, n_layers=layers, n_ctx=t, vocab_size=vocab, heads=heads))
    return ChunkedCE(m) if name.endswith("(chunked CE)") else m


def state_bytes(model):
    # parameters + gradients + two AdamW moments
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def saved_activation_bytes(model, ids, amp_dtype, device):
    # parameters (and views of them, which mmscale's token mixing saves) are counted in state_bytes
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and key[0] not in params:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(ids, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def make_optimizer(name: str, model, which: str):
    """AdamW with the same hyperparameters for every model; the kernel per --optimizer: "each" = what each
    trainer runs (the paper's code: torch's default, the per-parameter loop on CPU, foreach on CUDA; mmscale: the fused kernel,
    mmscale.engines.base.build_optimizer), "loop" or "fused" = that kernel for every model."""
    if which == "fused" or (which == "each" and name.startswith("mmscale")):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if which == "loop":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)  # torch's default kernel for the device


def run(args, d, t, amp_dtype, names):
    device = args.device
    batch = max(1, args.tokens // t)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (batch, t), generator=gen).to(device)
    models = {n: build(n, d, t, args.layers, args.vocab, args.heads).to(device) for n in names}
    opts = {n: make_optimizer(n, m, args.optimizer) for n, m in models.items()}
    dev = torch.device(device).type

    def step_fn(n):
        def step():
            with torch.autocast(dev, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = models[n](ids, ids)
            loss.backward()
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
        return step

    res = time_side_by_side({n: step_fn(n) for n in names}, device, warmup=1, repeats=args.repeats)
    mem = {}
    for n in names:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step_fn(n)()
            torch.cuda.synchronize()
            mem[n] = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem[n] = (saved_activation_bytes(models[n], ids, amp_dtype, device) + state_bytes(models[n])) / 2**20
    rows = []
    for n in names:
        med, times = res[n]
        rows.append({"d": d, "T": t, "B": batch, "precision": "bf16" if amp_dtype else "fp32", "model": n,
                     "tokens/s": batch * t / med, "x paper": round_ratio(res, "paper mixer", n),
                     "memory MiB": mem[n], "spread": spread(times)})
    del models, opts
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, nargs="+", default=[256, 512])
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens // T)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+",
                   default=["paper mixer", "mmscale mixer", "mmscale mixer (chunked CE)", "mmscale transformer"])
    p.add_argument("--optimizer", default="each", choices=["each", "loop", "fused"],
                   help="AdamW kernel: each trainer's own (default), or one for all models (see make_optimizer)")
    p.add_argument("--out", default=None)
    add_clock_args(p)
    a = p.parse_args()
    apply_clock_args(a)
    if "paper mixer" not in a.models:
        a.models = ["paper mixer"] + a.models
    rows = []
    stop_on_sigterm()
    try:
        for prec in a.precision:
            for d in a.d:
                for t in a.T:
                    for r in run(a, d, t, torch.bfloat16 if prec == "bf16" else None, a.models):
                        print(r, flush=True)
                        rows.append(r)
    except Stopped:
        print("stopped by SIGTERM: writing the rows measured so far", flush=True)
    if not rows:
        return
    emit(header(f"Training step ({a.layers} layers, vocab {a.vocab}, AdamW: {a.optimizer})", a.device) + "\n"
         + table(rows), a.out)


if __name__ == "__main__":
    main()
