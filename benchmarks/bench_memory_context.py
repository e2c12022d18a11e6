"""Memory growth with context: peak memory of one forward + backward of mmscale's mixer and transformer,
with activation checkpointing off and on.

    python benchmarks/bench_memory_context.py --device cuda                  # d=1024, 8 layers, T 512..8192, bf16
    python benchmarks/bench_memory_context.py --d 256 --layers 4 --T 512 1024 2048 4096 8192   # CPU (+ peak RSS)

The paper (d=1024, 8 layers): the mixer grows from 2.4 GB (T=512) to 10.5 GB (T=8192), Llama needs
10.1 GB at 2048 and runs out at 4096 (HF eager attention). On CUDA this reports
torch.cuda.max_memory_allocated over one fwd+bwd at batch 1 (weights, gradients, activations; no
optimizer state); on the CPU, which keeps no allocator statistics, weights + gradients + the bytes
saved for backward (distinct storages), a lower bound of the peak, and the process's peak RSS (each
measurement in a fresh process: ru_maxrss after one fwd+bwd, and its growth over the built model).
"""
from __future__ import annotations

import argparse

import torch

import json
import resource
import subprocess
import sys

from common import emit, header, table  # noqa: I001

from mmscale.config import EngineConfig, ModelConfig
from mmscale.engines.base import prepare_model
from mmscale.models import build_model


def _rss_bytes() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024


def cpu_bytes(model, ids, labels, dtype):
    # parameters (and views of them, which token mixing saves) are counted once, as weights below
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved = set(), 0

    def pack(t):
        nonlocal saved
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen and key[0] not in params:
            seen.add(key)
            saved += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids, labels)
    loss.backward()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * weights + saved


def measure(kind, t, a, ac=False):
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, d_model=a.d, n_layers=a.layers, n_ctx=t, vocab_size=a.vocab, heads=a.heads)
    dev = torch.device(a.device).type
    model = None
    try:
        model = build_model(cfg).to(a.device)
        prepare_model(model, EngineConfig(activation_checkpointing=ac))
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
    p.add_argument("--ac", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="activation checkpointing variants")
    p.add_argument("--one", nargs=3, metavar=("KIND", "T", "AC"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:  # a child process: one measurement, JSON on stdout
        kind, t, ac = a.one[0], int(a.one[1]), a.one[2] == "on"
        measure(kind, 8, a, ac)  # lazy imports and thread pools first, so the growth is the model's
        base = _rss_bytes()
        gb = measure(kind, t, a, ac)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"gb": gb, "rss": peak / 1e9, "growth": (peak - base) / 1e9}))
        return
    cpu = torch.device(a.device).type == "cpu"
    rows = []
    for t in a.T:
        for ac in a.ac:
            row = {"T": t, "AC": ac}
            for kind in ("mixer", "transformer"):
                if cpu:
                    child = [sys.executable, __file__, "--device", "cpu", "--d", str(a.d), "--layers", str(a.layers),
                             "--heads", str(a.heads), "--vocab", str(a.vocab), "--precision", a.precision,
                             "--one", kind, str(t), ac]
                    out = subprocess.run(child, capture_output=True, text=True)
                    if out.returncode:
                        row[f"{kind} GB"] = f"failed: {out.stderr.strip().splitlines()[-1][:60]}"
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    row[f"{kind} GB"] = r["gb"]
                    row[f"{kind} peak RSS GB"] = r["rss"]
                    row[f"{kind} RSS growth GB"] = r["growth"]
                else:
                    row[f"{kind} GB"] = measure(kind, t, a, ac == "on")
            rows.append(row)
            print(row, flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    what = "peak allocated" if not cpu else "weights + grads + saved activations; peak RSS of a fresh process"
    emit(header(f"Memory of one fwd+bwd, batch 1, d={a.d}, {a.layers} layers, {a.precision} ({what})", a.device)
         + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
