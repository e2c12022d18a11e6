"""The token-mixing op alone, forward + backward: paper's Conv1d vs dense vs blocked vs Triton.

    python benchmarks/bench_token_mixing.py                       # CPU grid
    python benchmarks/bench_token_mixing.py --device cuda --T 256 1024 4096 8192 --batch 8 --dtype bf16

Every candidate runs side by side in one process, interleaved round by round; the table gives the
median time and the speed-up over the paper's op (median over rounds of the per-round ratio) (nn.Conv1d(T, T, 1) with tril written into
weight.data every forward). "blocked/R" is the blocked path with R rows per block.
"""
from __future__ import annotations

import argparse

import torch

from common import Stopped, stop_on_sigterm, add_clock_args, apply_clock_args, emit, header, round_ratio, spread, table, time_side_by_side  # noqa: I001

from mmscale.ops import triton_mixing
from mmscale.ops.token_mixing import token_mix


class PaperMix(torch.nn.Module):
    """The paper's causal token mixing, as written there."""

    def __init__(self, t):
        super().__init__()
        self.conv = torch.nn.Conv1d(t, t, 1, bias=False)

    def forward(self, x):
        self.conv.weight.data = torch.tril(self.conv.weight.data[..., 0])[..., None]
        return self.conv(x)


def bench(t, d, batch, device, dtype, block_rows, repeats):
    torch.manual_seed(0)
    x = torch.randn(batch, t, d, device=device, requires_grad=True)
    paper = PaperMix(t).to(device)
    weight = torch.nn.Parameter(paper.conv.weight.detach()[..., 0].clone())
    amp = dtype != torch.float32

    def step(fn):
        def run():
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=amp):
                out = fn()
            out.float().sum().backward()
        return run

    cands = {"paper Conv1d": step(lambda: paper(x)),
             "dense": step(lambda: token_mix(weight, x, True, "dense"))}
    for r in block_rows:
        if r < t:
            cands[f"blocked/{r}"] = step(lambda r=r: token_mix(weight, x, True, "blocked", block_rows=r))
    cands["auto"] = step(lambda: token_mix(weight, x, True, "auto"))
    if torch.device(device).type == "cuda" and triton_mixing.available():
        cands["triton"] = step(lambda: token_mix(weight, x, True, "triton"))
    res = time_side_by_side(cands, device, warmup=1, repeats=repeats)
    row = {"T": t, "d": d, "B": batch}
    for k, (med, times) in res.items():
        row[f"{k} ms"] = med * 1e3
    for k, (med, _) in res.items():
        if k != "paper Conv1d":
            row[f"{k} x"] = round_ratio(res, "paper Conv1d", k)
    row["max spread"] = max(spread(v[1]) for v in res.values())
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--T", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--d", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block-rows", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    add_clock_args(p)
    a = p.parse_args()
    apply_clock_args(a)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    rows = []
    stop_on_sigterm()
    try:
        for d in a.d:
            for t in a.T:
                rows.append(bench(t, d, a.batch, a.device, dtype, a.block_rows, a.repeats))
                print(rows[-1], flush=True)
    except Stopped:
        print("stopped by SIGTERM: writing the rows measured so far", flush=True)
    if not rows:
        return
    # blocked columns differ by T (blocks >= T are skipped): fill gaps for one table
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    emit(header(f"Token mixing op, fwd+bwd, {a.dtype}", a.device) + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
