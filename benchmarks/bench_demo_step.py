"""The `make demo` training step in fp32 and bf16 on this CPU, as the demo's time probe measures it.

    python benchmarks/bench_demo_step.py                                   # this CPU's own kernels
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_demo_step.py
                                        # the same CPU limited to AVX2 kernels: a stand-in for an AVX2-only
                                        # CPU (no AVX-512, no bf16 instructions), such as issue 22's AMD EPYC

Each precision runs mmscale.demo.probe_step_seconds: the demo model (d 256, 6 layers, n_ctx 128, micro-batch
16) trained for a few steps in two processes side by side, one thread each (the demo's two ranks on two
cores), median seconds of the slower process; and the seconds a fresh process took to import torch and mmscale
and build the model. MMSCALE_AUTO_PRECISION picks the precision for each row.
"""
from __future__ import annotations

import argparse
import os

from common import emit, header, table  # noqa: I001

from mmscale import demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process after one warm-up")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--out", default="", help="also append the markdown to this file")
    a = ap.parse_args()
    isa = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    rows = []
    saved = os.environ.get("MMSCALE_AUTO_PRECISION")
    try:
        for prec in a.precision:
            os.environ["MMSCALE_AUTO_PRECISION"] = prec
            step, startup, _ = demo.probe_step_seconds(a.vocab, demo.threads_per_rank(), steps=a.steps)
            rows.append({"precision": prec, "s/step (slower of 2 ranks)": step, "process start s": startup,
                         "load average": os.getloadavg()[0]})
    finally:
        if saved is None:
            os.environ.pop("MMSCALE_AUTO_PRECISION", None)
        else:
            os.environ["MMSCALE_AUTO_PRECISION"] = saved
    limits = ", ".join(f"{k}={v}" for k, v in isa.items()) or "none (the CPU's own kernels)"
    emit(header(f"make demo's training step, fp32 vs bf16 (kernel limits: {limits})", "cpu") + "\n" + table(rows),
         a.out)


if __name__ == "__main__":
    main()
