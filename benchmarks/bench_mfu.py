"""Model FLOP utilisation of a training step, under both FLOP conventions, with and without compile
and activation checkpointing: mmscale's mixer and transformer.

    python benchmarks/bench_mfu.py --device cuda                    # d=1024, 16 layers, T=1024, bf16
    python benchmarks/bench_mfu.py --d 128 --layers 2 --T 128       # a CPU smoke run (no MFU: peak unknown)

MFU = model FLOPs per token x tokens/s / peak FLOP/s. "dense" counts the full T x T mixing matrix
(what a dense kernel executes), "causal" only its live lower triangle (the mixer's honest figure);
for the transformer, the same two conventions for attention's score and value products
(model.flops_per_token()). Norms, biases, activations and the embedding are not counted. The peak
is --peak-tflops, or 989 (bf16 dense, no sparsity) on an H100/H200.
"""
from __future__ import annotations

import argparse

import torch

from common import Stopped, emit, header, stop_on_sigterm, table, time_fn  # noqa: I001

from mmscale.config import EngineConfig, ModelConfig
from mmscale.engines.base import prepare_model
from mmscale.models import build_model

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device, given):
    if given:
        return given
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v
    return 0.0


def measure(kind, a, compile_, ac):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_model=a.d, n_layers=a.layers, n_ctx=a.T, vocab_size=a.vocab,
                                    heads=a.heads)).to(a.device)
    prepare_model(model, EngineConfig(activation_checkpointing=ac, compile=compile_))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(a.device).type == "cuda")
    ids = torch.randint(0, a.vocab, (a.batch, a.T + 1), device=a.device)
    dev = torch.device(a.device).type

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compile / warm-up outside the timing
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, _ = time_fn(step, a.device, warmup=a.warmup, repeats=a.repeats)
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    tps = a.batch * a.T / med
    flops = model.flops_per_token()
    peak = peak_tflops(a.device, a.peak_tflops) * 1e12
    row = {"model": kind, "compile": compile_, "AC": ac, "tokens/s": tps, "step ms": med * 1e3,
           "TFLOP/s causal": flops["causal"] * tps / 1e12, "TFLOP/s dense": flops["dense"] * tps / 1e12}
    if peak:
        row["MFU causal %"] = 100 * flops["causal"] * tps / peak
        row["MFU dense %"] = 100 * flops["dense"] * tps / peak
    row["peak GiB"] = mem
    del model, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--models", nargs="+", default=["mixer", "transformer"])
    p.add_argument("--variants", nargs="+", default=["plain", "compile", "ac", "compile+ac"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if torch.device(a.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    stop_on_sigterm()
    # variants outer, models inner: a run cut short by its time limit still has both models' first rows
    for v, kind in ((v, k) for v in a.variants for k in a.models):
        flags = {"model": kind, "compile": "compile" in v, "AC": "ac" in v}
        try:
            rows.append(measure(kind, a, flags["compile"], flags["AC"]))
        except Stopped:
            rows.append({**flags, "tokens/s": "stopped (time limit)"})
            break
        except Exception as e:  # OOM, or a compile failure: record it and go on with the rest
            err = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:80]}"
            rows.append({**flags, "tokens/s": err})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    emit(header(f"MFU: d={a.d}, {a.layers} layers, T={a.T}, batch {a.batch}, bf16, vocab {a.vocab}, "
                f"peak {peak_tflops(a.device, a.peak_tflops):g} TFLOP/s", a.device) + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
