"""Why mmscale uses torch's fused AdamW on the CPU: the masked mixer's optimizer state is half exact zeros.

    python benchmarks/bench_adamw_zeros.py [--T 2048] [--threads 2] [--repeats 30]

1. torch.sqrt over a T x T tensor of positive floats, of exact zeros, and of a lower-triangular one (what the
   masked half of a mixing matrix leaves in AdamW's exp_avg_sq); numpy's sqrt and torch.rsqrt on zeros for
   comparison.
2. One AdamW step (weight decay 0.1) over a lower-triangular T x T mixing matrix plus a 256 x 1024 matrix, with
   gradients masked like the mixer's: the per-parameter loop (torch's default on CPU), foreach, and fused;
   and the largest difference of each from the loop's result after 12 steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from common import emit, header  # noqa: I001


def seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def adamw_steps(kind: str, t: int, steps: int = 12):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1, 1, t, t).tril())
    m = torch.nn.Parameter(torch.randn(256, 1024))
    flag = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    opt = torch.optim.AdamW([w, m], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **flag)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        w.grad = torch.randn(1, 1, t, t, generator=g).tril()
        m.grad = torch.randn(256, 1024, generator=g)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]), w.detach().clone(), m.detach().clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t = a.T
    out = torch.empty(t, t)
    pos, zeros = torch.rand(t, t) + 0.1, torch.zeros(t, t)
    tril = pos.tril()
    rows = [("torch.sqrt, positive", seconds(lambda: torch.sqrt(pos, out=out), a.repeats)),
            ("torch.sqrt, exact zeros", seconds(lambda: torch.sqrt(zeros, out=out), a.repeats)),
            ("torch.sqrt, lower triangle (half zeros)", seconds(lambda: torch.sqrt(tril, out=out), a.repeats)),
            ("numpy.sqrt, exact zeros", seconds(lambda: np.sqrt(zeros.numpy(), out=out.numpy()), a.repeats)),
            ("torch.rsqrt, exact zeros", seconds(lambda: torch.rsqrt(zeros, out=out), a.repeats))]
    lines = ["| op on a %d x %d float32 tensor | median ms |" % (t, t), "|---|---|"]
    lines += [f"| {name} | {s * 1e3:.2f} |" for name, s in rows]
    ref = None
    lines += ["", f"| AdamW step, {t} x {t} lower-triangular matrix + 256 x 1024 | median ms | max abs diff vs loop |",
              "|---|---|---|"]
    for kind in ("loop", "foreach", "fused"):
        s, w, m = adamw_steps(kind, t)
        if ref is None:
            ref = (w, m)
        diff = max((w - ref[0]).abs().max().item(), (m - ref[1]).abs().max().item())
        lines.append(f"| {kind} | {s * 1e3:.2f} | {diff:.2g} |")
    emit(header("Square roots of zeros and the AdamW kernel", "cpu") + "\n" + "\n".join(lines), a.out)


if __name__ == "__main__":
    main()
