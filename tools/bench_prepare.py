"""Throughput of `mmscale prepare` (tokenize + pack + write zstd MDS shards), in tokens per second.

    .venv/bin/python tools/bench_prepare.py                       # TinyStories sample, 4k BPE, n_ctx 512
    .venv/bin/python tools/bench_prepare.py --input a.txt --vocab-size 8192 --workers 2 --repeat 5

Trains the tokenizer once (not timed), then runs the preparation --repeat times into fresh
temporary directories and reports, per run, tokens / seconds of the tokenize-pack-write phase
(worker start-up overlaps the input checking pass and is not in it) and of the whole `prepare()`
call (worker start-up and the mosaicml-streaming import included). The machine's load average
is printed too: on a shared machine the numbers move with it; the CPU cost (tokens per CPU-second
of this process and its workers) does not, and times the cores estimates an idle machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_INPUT = Path(__file__).resolve().parent.parent.parent / "shared/data/tinystories/train_sample.txt"


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the tokenizer workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(DEFAULT_INPUT))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--layout", default="packed", choices=["packed", "padded"])
    ap.add_argument("--workers", type=int, default=0, help="0 = one per core")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not Path(args.input).is_file():
        print(f"bench_prepare: input '{args.input}' does not exist; pass --input FILE", file=sys.stderr)
        return 2

    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="mmscale-bench-prepare-"))
    try:
        tok = work / "tok.model"
        train_tokenizer([args.input], args.vocab_size, tok, model_type=args.model_type)
        phase, whole, per_cpu = [], [], []
        for i in range(args.repeat):
            cpu0 = _cpu_seconds()
            t0 = time.perf_counter()
            m = prepare(PrepareOptions(inputs=[args.input], tokenizer=str(tok), n_ctx=args.n_ctx,
                                       out=str(work / f"out{i}"), layout=args.layout, workers=args.workers,
                                       progress=False))
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds() - cpu0
            tokens = m["source_tokens"]
            phase.append(tokens / m["tokenize_seconds"])
            whole.append(tokens / wall)
            per_cpu.append(tokens / cpu)
            print(f"run {i}: {tokens} tokens, phase {m['tokenize_seconds']:.3f} s = {phase[-1] / 1e6:.2f}M tok/s, "
                  f"whole call {wall:.2f} s = {whole[-1] / 1e6:.2f}M tok/s, {cpu:.2f} CPU-s = "
                  f"{per_cpu[-1] / 1e6:.2f}M tok per CPU-s, load avg {os.getloadavg()[0]:.2f}")
            shutil.rmtree(work / f"out{i}")
        print(f"\n{Path(args.input).name}: {args.model_type} {args.vocab_size}, n_ctx {args.n_ctx}, {args.layout}, "
              f"workers {args.workers or os.cpu_count()}, {os.cpu_count()} cores")
        print(f"tokenize+pack+write: median {statistics.median(phase) / 1e6:.2f}M tok/s, best {max(phase) / 1e6:.2f}M")
        print(f"whole prepare() call: median {statistics.median(whole) / 1e6:.2f}M tok/s, best {max(whole) / 1e6:.2f}M")
        # CPU time does not depend on what else runs on the machine: tokens per CPU-second times
        # the cores is what an otherwise idle machine would reach (if the work spreads evenly)
        print(f"CPU cost (this process + workers): median {statistics.median(per_cpu) / 1e6:.2f}M tok per CPU-s "
              f"-> {statistics.median(per_cpu) * (args.workers or os.cpu_count()) / 1e6:.2f}M tok/s on "
              f"{args.workers or os.cpu_count()} idle cores")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
