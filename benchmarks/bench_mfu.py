"""Model FLOP utilisation of the trainer itself: `mmscale.train.train` (the loop, an engine, its optimizer,
precision policy and collectives) on synthetic tokens, for the mixer and the transformer.

    python benchmarks/bench_mfu.py --device cuda                          # d=1024, 16 layers, T=1024, bf16
    python benchmarks/bench_mfu.py --engines single fsdp deepspeed --variants plain ac
    python benchmarks/bench_mfu.py --d 128 --layers 2 --T 128 --steps 6   # a CPU smoke run (no MFU: no peak)

Tokens/s is the median of the loop's own `tokens_per_s` rows in metrics.jsonl (the first
--skip steps dropped: warm-up, compile). MFU = model FLOPs per token x tokens/s / peak FLOP/s, under
both conventions: "dense" counts the full T x T mixing matrix (what a dense kernel executes),
"causal" only its live lower triangle (for the transformer the same two conventions for attention's
score and value products; `model.flops_per_token()`). The peak is --peak-tflops, else the per-device
table the trainer uses (mmscale/peak_flops.py, by torch.cuda.get_device_name and precision).
Engines run as one process (DeepSpeed and FSDP2 start a one-process group); the device is CUDA when
there is one, so --device only names what is expected.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from common import Stopped, emit, header, stop_on_sigterm, table  # noqa: I001

from mmscale.config import config_from_dict
from mmscale.models import build_model


class RandomTokens:
    """Uniform random windows, the data-loader contract of the loop (iterable, state_dict, resumable)."""

    def __init__(self, seed, micro_batch, n_ctx, vocab):
        self.g = torch.Generator().manual_seed(seed)
        self.mb, self.n_ctx, self.vocab, self.batches = micro_batch, n_ctx, vocab, 0

    def __iter__(self):
        while True:
            window = torch.randint(0, self.vocab, (self.mb, self.n_ctx + 1), generator=self.g)
            self.batches += 1
            yield {"input_ids": window[:, :-1].contiguous(), "labels": window}

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def peak_flops(a) -> tuple[float | None, str]:
    if a.peak_tflops:
        return a.peak_tflops * 1e12, "--peak-tflops"
    try:
        from mmscale.peak_flops import device_peak
    except ImportError:
        return None, "no peak table; pass --peak-tflops"
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return device_peak(dev, a.precision)


def measure(a, kind: str, engine: str, variant: str, root: Path) -> dict:
    run_dir = root / f"{kind}-{engine}-{variant}"
    cfg = config_from_dict({
        "model": {"kind": kind, "d_model": a.d, "n_layers": a.layers, "n_ctx": a.T, "vocab_size": a.vocab,
                  "heads": a.heads},
        "train": {"max_steps": a.steps, "micro_batch_size": a.batch, "lr": 1e-4, "warmup_steps": 0,
                  "eval_every": 0},
        "engine": {"kind": engine, "precision": a.precision, "zero_stage": a.zero_stage,
                   "compile": "compile" in variant, "activation_checkpointing": "ac" in variant},
        "checkpoint": {"every": 0, "keep": 1},
        "run": {"dir": str(run_dir), "seed": 0},
        "log": {"wandb": "disabled", "progress": False, "every": 1},
    })
    from mmscale.run.train import train

    status = train(cfg, data_factory=lambda c, info, mb: (RandomTokens(info.rank, mb, a.T, a.vocab), None))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r.get("tokens_per_s") and r["step"] > a.skip]
    if status != 0 or not steps:
        raise RuntimeError(f"the trainer exited {status} with {len(steps)} timed steps")
    tps = statistics.median(r["tokens_per_s"] for r in steps)
    flops = _flops(cfg)
    peak, _ = peak_flops(a)
    row = {"model": kind, "engine": engine, "variant": variant, "tokens/s": tps,
           "step ms": statistics.median(r["step_time"] for r in steps) * 1e3,
           "data wait ms": statistics.median(r["data_wait"] for r in steps) * 1e3,
           "TFLOP/s causal": flops["causal"] * tps / 1e12, "TFLOP/s dense": flops["dense"] * tps / 1e12}
    if peak:
        row["MFU causal %"] = 100 * flops["causal"] * tps / peak
        row["MFU dense %"] = 100 * flops["dense"] * tps / peak
    mem = [r.get("peak_mem") for r in steps if r.get("peak_mem")]
    row["peak mem GiB"] = max(mem) / 1024 if mem else float("nan")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the end-of-run checkpoint: GBs at this size
    return row


def _flops(cfg) -> dict:
    with torch.device("meta"):  # only the counts: no memory for the weights
        return build_model(cfg.model).flops_per_token()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="informational: the trainer takes CUDA when there is one")
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["mixer", "transformer"])
    p.add_argument("--engines", nargs="+", default=["single"], choices=["single", "ddp", "fsdp", "deepspeed"])
    p.add_argument("--variants", nargs="+", default=["plain", "ac"], choices=["plain", "compile", "ac", "compile+ac"])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per measurement")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the median (warm-up, compile)")
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    a.skip = min(a.skip, a.steps - 1)
    rows = []
    stop_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="mmscale_mfu_"))
    try:
        # variants outer, models inner: a run cut short by its time limit still has both models' first rows
        for v, engine, kind in ((v, e, k) for v in a.variants for e in a.engines for k in a.models):
            try:
                rows.append(measure(a, kind, engine, v, root))
            except Stopped:
                rows.append({"model": kind, "engine": engine, "variant": v, "tokens/s": "stopped (time limit)"})
                break
            except Exception as e:  # OOM, or a compile failure: record it and go on with the rest
                err = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {str(e)[:80]}"
                rows.append({"model": kind, "engine": engine, "variant": v, "tokens/s": err})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in keys} for r in rows]
    peak, source = peak_flops(a)
    emit(header(f"MFU of the trainer: d={a.d}, {a.layers} layers, T={a.T}, micro-batch {a.batch}, {a.precision}, "
                f"vocab {a.vocab}; peak {peak / 1e12 if peak else 0:g} TFLOP/s ({source})", a.device)
         + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
