"""Where a masked mixer's training step goes: each component's forward + backward timed alone, side by side.

    python benchmarks/bench_breakdown.py --T 64 128 256 2048 --d 256

Components, at the shapes of one step of an 8-layer mixer (batch = tokens // T): token mixing (the
paper's Conv1d with tril into weight.data, and mmscale's token_mix), the feed-forward, the two
LayerNorms, the LM head + cross-entropy (plain fp32 logits, and mmscale's chunked loss), and the
AdamW step. Each share is of the paper-style step (paper mixing + plain head); the last columns
show what mmscale's two replacements save.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import add_clock_args, apply_clock_args, emit, header, table, time_side_by_side  # noqa: I001

from mmscale.ops import token_mix
from mmscale.ops.cross_entropy import chunked_cross_entropy


def components(b, t, d, vocab, layers, amp):
    torch.manual_seed(0)
    x = torch.randn(b, t, d, requires_grad=True)
    conv = nn.Conv1d(t, t, 1)
    w = nn.Parameter(conv.weight.detach()[..., 0].clone())
    ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    norm = nn.LayerNorm(d)
    head = nn.Linear(d, vocab, bias=False)
    labels = torch.randint(0, vocab, (b, t))
    params = [p for m in [ffn, norm] for p in m.parameters()] * layers + [w] * layers + [head.weight]
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def fb(fn, n=1):
        def run():
            for _ in range(n):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    out = fn()
                out.float().sum().backward() if out.dim() else out.backward()
        return run

    def paper_mix():
        conv.weight.data = torch.tril(conv.weight.data[..., 0])[..., None]
        return conv(x)

    def plain_head():
        return F.cross_entropy(head(x).float().flatten(0, 1), labels.flatten())

    return {
        "mixing (paper)": fb(paper_mix, layers),
        "mixing (mmscale)": fb(lambda: token_mix(w, x, True, "auto"), layers),
        "feed-forward": fb(lambda: ffn(x), layers),
        "layernorms": fb(lambda: norm(x), 2 * layers),
        "head+CE (plain)": fb(plain_head),
        "head+CE (chunked)": fb(lambda: chunked_cross_entropy(x, head.weight, labels)),
        "AdamW step": opt.step,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[64, 128, 256, 2048])
    p.add_argument("--d", type=int, nargs="+", default=[256])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    add_clock_args(p)
    a = p.parse_args()
    apply_clock_args(a)
    rows = []
    for d in a.d:
        for t in a.T:
            b = max(1, a.tokens // t)
            res = time_side_by_side(components(b, t, d, a.vocab, a.layers, a.precision == "bf16"),
                                    repeats=a.repeats)
            ms = {k: v[0] * 1e3 for k, v in res.items()}
            paper = ms["mixing (paper)"] + ms["feed-forward"] + ms["layernorms"] + ms["head+CE (plain)"] + ms["AdamW step"]
            ours = ms["mixing (mmscale)"] + ms["feed-forward"] + ms["layernorms"] + ms["head+CE (chunked)"] + ms["AdamW step"]
            row = {"d": d, "T": t, "B": b}
            for k in ("mixing (paper)", "feed-forward", "layernorms", "head+CE (plain)", "AdamW step"):
                row[f"{k} %"] = 100 * ms[k] / paper
            row["paper sum ms"] = paper
            row["mixing x"] = ms["mixing (paper)"] / ms["mixing (mmscale)"]
            row["head+CE x"] = ms["head+CE (plain)"] / ms["head+CE (chunked)"]
            row["mmscale sum ms"] = ours
            row["sum x"] = paper / ours
            rows.append(row)
            print(row, flush=True)
    emit(header(f"Step breakdown ({a.layers} layers, vocab {a.vocab}, {a.precision}, {a.tokens} tokens)", "cpu")
         + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
