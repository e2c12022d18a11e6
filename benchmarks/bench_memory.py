"""Memory growth with context: peak memory of one forward + backward of mmscale's mixer and transformer.

    python benchmarks/bench_memory.py --device cuda                  # d=1024, 8 layers, T 512..8192, bf16
    python benchmarks/bench_memory.py --d 256 --T 512 1024 2048       # CPU

The paper (d=1024, 8 layers): the mixer grows from 2.4 GB (T=512) to 10.5 GB (T=8192), Llama needs
10.1 GB at 2048 and runs out at 4096 (HF eager attention). On CUDA this reports
torch.cuda.max_memory_allocated over one fwd+bwd at batch 1 (weights, gradients, activations; no
optimizer state); on the CPU, which keeps no allocator statistics, weights + gradients + the bytes
saved for backward (distinct storages), a lower bound of the peak.
"""
from __future__ import annotations

import argparse

import torch

from common import emit, header, table  # noqa: I001

from mmscale.config import ModelConfig
from mmscale.models import build_model


def cpu_bytes(model, ids, labels, dtype):
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            saved += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids, labels)
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights + saved


def measure(kind, t, a):
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, d_model=a.d, n_layers=a.layers, n_ctx=t, vocab_size=a.vocab, heads=a.heads)
    dev = torch.device(a.device).type
    model = None
    try:
        model = build_model(cfg).to(a.device)
        ids = torch.randint(0, a.vocab, (1, t + 1), device=a.device)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(ids[:, :-1], ids)
            loss.backward()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        return cpu_bytes(model, ids[:, :-1], ids, dtype) / 1e9
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for t in a.T:
        row = {"T": t}
        for kind in ("mixer", "transformer"):
            row[f"{kind} GB"] = measure(kind, t, a)
        rows.append(row)
        print(row, flush=True)
    what = "peak allocated" if torch.device(a.device).type == "cuda" else "weights + grads + saved activations"
    emit(header(f"Memory of one fwd+bwd, batch 1, d={a.d}, {a.layers} layers, {a.precision} ({what})", a.device)
         + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
