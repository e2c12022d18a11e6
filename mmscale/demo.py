"""`make demo`: the main job, end to end, on 2 CPU ranks in about --minutes (default 4) on any CPU.

    python -m mmscale.demo                       # the built-in story corpus, about 4 minutes
    python -m mmscale.demo --minutes 8           # a longer run: more steps, a better story
    python -m mmscale.demo --data my_texts/ a.txt  # your own text files instead

1. corpus      `mmscale data synth` (or your --data files)
2. tokenizer   `mmscale tokenizer train` (BPE)
3. shards      `mmscale prepare` (packed windows of n_ctx + 1 tokens, MDS + zstd)
4. training    `deepspeed --num_gpus 2 mmscale/train.py` (ZeRO-2, engine.precision=auto: bf16 where the CPU
               computes it natively (AVX512-BF16 / AMX), else fp32; half the cores per rank): a masked mixer,
               for as many steps as fit the time left (a measured probe of one rank's step sizes it)
5. export      `mmscale convert` when present, else the ZeRO checkpoint consolidated with DeepSpeed's zero_to_fp32
6. evaluation  `mmscale eval` on the held-out split, and a story from `mmscale generate`; `mmscale report`

Sizing by time: after the data steps, a few training steps of the demo's model are timed in two processes
side by side (each one rank's micro-batch on its own threads, in the precision the run will use); the steps that fit
--minutes minus the time already spent and the fixed costs (launch, export, eval, story, report) are trained,
between MIN_STEPS (enough to show learning) and MAX_STEPS. --steps N trains exactly N steps instead.

Every step is a subprocess whose progress streams to the terminal. Everything goes under
--workdir (default runs/demo): data is built once and reused; each demo run trains in a new
run directory, so nothing earlier is overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmscale import precision as prec
from mmscale.config import load_config
from mmscale.distributed import free_port
from mmscale.errors import UserError, exit_status
from mmscale.fsutil import usable_cpus
from mmscale.models import build_model
from mmscale.run import checkpoint as ckpt
from mmscale.run.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent

# a small masked mixer that learns the story corpus in a few CPU minutes
DEMO_OVERRIDES = [
    "model.kind=mixer", "model.d_model=256", "model.n_layers=6", "model.n_ctx=128", "model.mixer=flat",
    "train.micro_batch_size=16", "train.grad_accum=1", "train.lr=2e-3", "train.warmup_steps=30",
    "train.weight_decay=0.1", "train.grad_clip=1.0", "train.eval_batches=8",
    "engine.kind=deepspeed", "engine.zero_stage=2", "engine.precision=auto",
    "log.every=10", "log.wandb=offline",
]


MIN_STEPS, MAX_STEPS = 120, 2000
# the time outside the training steps once the data exist (the launcher and the ranks' start-up, checkpoints and
# held-out evaluations, export, eval, generate and report: each a fresh Python importing torch and mmscale),
# in units of the probe processes' own start-up, which slows down with the machine's load as they do
FIXED_STARTUPS = 12.0
# the ZeRO-2 step over the probe's (ranks computing side by side): gradient reduce-scatter and parameter
# all-gather over gloo, the data loader (calibrated on an idle machine, where it is largest: 0.27 s trained against
# a 0.19 s probe, benchmarks/RESULTS.md, "make demo sizing"; a loaded machine slows the probe more than the
# step, so there the demo ends early rather than late)
RANK_OVERHEAD = 1.4


def _say(msg: str) -> None:
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise UserError(f"demo step failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...; see the output above")


def _mmscale(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmscale.cli", *args]


def export_checkpoint(run_dir: Path, tokenizer: Path, out: Path) -> Path:
    """The latest checkpoint as an export (`mmscale convert`)."""
    _run(_mmscale("convert", str(run_dir), "--out", str(out), "--tokenizer", str(tokenizer)))
    return out


def _probe_rank(vocab_size: int, threads: int, chosen: str, steps: int, barrier, results, ready) -> None:
    """One probe rank (a child process): median seconds of forward, backward and AdamW of the demo model's
    micro-batch on `threads` threads in precision `chosen`, timed after every rank is ready."""
    torch.set_num_threads(threads)
    cfg = load_config(None, DEMO_OVERRIDES + [f"model.vocab_size={vocab_size}"])
    g = torch.Generator().manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    window = torch.randint(4, vocab_size, (cfg.train.micro_batch_size, cfg.model.n_ctx + 1), generator=g)
    ready.put(time.time())
    barrier.wait(timeout=300)
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=chosen == "bf16"):
            loss = model(window[:, :-1], labels=window)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    results.put(times[len(times) // 2])


def auto_precision_line() -> str:
    """What `engine.precision=auto` picks on this machine, and why (mmscale/precision.py)."""
    return prec.choose("auto", prec.cpu_facts(), override=os.environ.get(prec.ENV_AUTO) or None)[1]


def probe_step_seconds(vocab_size: int, threads: int, ranks: int = 2,
                       steps: int = 3) -> tuple[float, float, str]:
    """(seconds of one training step of the demo model, seconds a fresh process takes to import torch and
    mmscale and build the model, the precision line): `ranks` processes with `threads` threads each run the
    step's compute at the same time, as the ranks will (so they contend for the cores as the run will, other
    people's work included), in the precision `engine.precision=auto` picks here; the slowest rank's median."""

    cfg = load_config(None, DEMO_OVERRIDES + [f"model.vocab_size={vocab_size}"])
    chosen, line = prec.choose(cfg.engine.precision, prec.cpu_facts(),
                               override=os.environ.get(prec.ENV_AUTO) or None)
    ctx = mp.get_context("spawn")
    barrier, results, ready = ctx.Barrier(ranks), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_probe_rank, args=(vocab_size, threads, chosen, steps, barrier, results, ready),
                         daemon=True) for _ in range(ranks)]
    t0 = time.time()
    for p in procs:
        p.start()
    try:
        startup = max(ready.get(timeout=600) for _ in procs) - t0
        seconds = [results.get(timeout=600) for _ in procs]
    except Exception:  # queue.Empty: a probe rank died or hung
        raise UserError("the training-speed probe did not finish; pass --steps N to train a fixed number of "
                        "steps instead") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return max(seconds), startup, line


def plan_steps(budget_s: float, spent_s: float, step_s: float, startup_s: float) -> tuple[int, str]:
    """(training steps, why) for a demo of `budget_s` seconds of which `spent_s` are gone, with training steps
    of `step_s` and fresh processes that start in `startup_s`."""
    left = budget_s - spent_s - FIXED_STARTUPS * startup_s
    fit = int(left / (step_s * RANK_OVERHEAD)) if left > 0 else 0
    steps = min(MAX_STEPS, max(MIN_STEPS, fit))
    why = (f"{left:.0f} s left for training at ~{step_s * RANK_OVERHEAD:.2f} s/step -> {fit} steps"
           + (f", raised to the {MIN_STEPS} that show learning (the demo will run over its time)" if fit < MIN_STEPS
              else f", capped at {MAX_STEPS}" if fit > MAX_STEPS else ""))
    return steps, why


def training_summary(run_dir: Path) -> tuple[str, float | None]:
    """(held-out losses by step, measured seconds per step) from the run's metrics.jsonl."""
    rows = read_jsonl(run_dir / "metrics.jsonl")[0]
    vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    timed = [(r["step"], r["time"]) for r in rows if "loss" in r and "time" in r]
    per_step = None
    if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
        per_step = (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0])
    return ", ".join(f"step {s}: {v:.3f}" for s, v in vals), per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", metavar="PATH", help="your own text files / folders (default: built-in stories)")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="wall-clock target for the whole demo; a measured probe sizes the training to it "
                             f"(at least {MIN_STEPS} steps) (default 4)")
    parser.add_argument("--steps", type=int, default=0, help="train exactly this many steps (default 0: sized by "
                                                             "--minutes)")
    parser.add_argument("--stories", type=int, default=6000, help="size of the built-in corpus")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    return exit_status("mmscale demo", _demo, args)


def _demo(args) -> int:
    t0 = time.time()
    if not args.minutes > 0 or args.steps < 0:
        raise UserError(f"--minutes must be > 0 and --steps >= 0 (got {args.minutes:g} and {args.steps}); "
                        "e.g. --minutes 4, or --steps 500 for a fixed length", 2)
    work = (REPO / args.workdir).resolve() if not Path(args.workdir).is_absolute() else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inputs, tag = _corpus(args, work)
    n_ctx = next(int(o.split("=")[1]) for o in DEMO_OVERRIDES if o.startswith("model.n_ctx="))
    tokenizer, data_dir = _tokenize(args, work, inputs, tag, n_ctx)

    run_dir = work / time.strftime("run_%Y%m%d_%H%M%S")
    steps, vals = _train(args, data_dir, run_dir, t0)

    _say("5/6 exporting the trained model")
    export = export_checkpoint(run_dir, tokenizer, run_dir / "export")
    _say("6/6 held-out loss and a generated story")
    _run(_mmscale("eval", str(export), "--data", str(data_dir), "--max-batches", "10"))
    _run(_mmscale("generate", str(export), "--prompt", "Once upon a time", "--max-new-tokens", str(n_ctx - 8),
                  "--temperature", "0.7", "--top-k", "20"))
    _run(_mmscale("report", str(run_dir), "--out", str(run_dir / "report.html")))

    latest = ckpt.find_latest(ckpt.checkpoints_root(run_dir))
    print(f"\nmmscale demo finished in {time.time() - t0:.0f} s (target {args.minutes:g} min), {steps} steps\n"
          f"  held-out loss  {vals or 'not evaluated'}  (untrained: ln {args.vocab_size} = "
          f"{math.log(args.vocab_size):.2f})\n"
          f"  checkpoint   {latest}\n"
          f"  export       {export}\n"
          f"  metrics      {run_dir / 'metrics.jsonl'}\n"
          f"  loss plot    {run_dir / 'loss_curve.png'}\n"
          f"  wandb files  {run_dir / 'wandb'}  (offline: `wandb sync` it to upload)\n"
          f"  config       {run_dir / 'config.yaml'}\n"
          f"  report       {run_dir / 'report.html'}  (curves, numbers, samples; one file, no network)", flush=True)
    return 0


def _corpus(args, work: Path) -> tuple[list[str], str]:
    """Step 1: (the text inputs, the tag naming what is derived from them): --data, else the built-in stories."""
    if args.data:
        missing = [p for p in args.data if not Path(p).exists()]
        if missing:
            raise UserError(f"--data: '{missing[0]}' does not exist; pass text files or folders of them")
        inputs = [str(Path(p).resolve()) for p in args.data]
        # derived files are named after the inputs, built once, never overwritten
        return inputs, "user_" + hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:10]
    corpus = work / "corpus"
    if not (corpus / "stories.txt").is_file():
        _say(f"1/6 building the built-in story corpus ({args.stories} stories)")
        _run(_mmscale("data", "synth", "--out", str(corpus), "--stories", str(args.stories)))
    else:
        _say(f"1/6 corpus: reusing {corpus}")
    return [str(corpus / "stories.txt")], "stories"


def _tokenize(args, work: Path, inputs: list[str], tag: str, n_ctx: int) -> tuple[Path, Path]:
    """Steps 2 and 3: (the tokenizer, the prepared shards), each built once and reused."""
    tokenizer = work / f"tokenizer_{tag}_{args.vocab_size}.model"
    data_dir = work / f"data_{tag}_{n_ctx}"
    if not tokenizer.is_file():
        _say(f"2/6 training a {args.vocab_size}-piece BPE tokenizer")
        _run(_mmscale("tokenizer", "train", "--data", *inputs, "--vocab-size", str(args.vocab_size),
                      "--out", str(tokenizer)))
    else:
        _say(f"2/6 tokenizer: reusing {tokenizer}")
    if not (data_dir / "manifest.json").is_file():
        _say(f"3/6 tokenizing into MDS shards of {n_ctx + 1}-token windows")
        _run(_mmscale("prepare", "--data", *inputs, "--tokenizer", str(tokenizer), "--n-ctx", str(n_ctx),
                      "--out", str(data_dir), "--val-fraction", "0.02"))
    else:
        _say(f"3/6 shards: reusing {data_dir}")
    return tokenizer, data_dir


def _train(args, data_dir: Path, run_dir: Path, t0: float) -> tuple[int, str]:
    """Step 4: size the run (--steps, or the probe against the time left), train it with DeepSpeed on 2 CPU
    ranks; (steps, the held-out losses by step)."""
    threads = usable_cpus(2)  # the two ranks share the cores (1 each on a 2-core machine)
    if args.steps:  # a fixed length: nothing to time
        steps, why, probe = args.steps, "--steps", ""
        precision_line = auto_precision_line()
    else:
        step_s, startup_s, precision_line = probe_step_seconds(args.vocab_size, threads)
        steps, why = plan_steps(args.minutes * 60, time.time() - t0, step_s, startup_s)
        probe = f"; probe: {step_s:.2f} s per rank step, {startup_s:.1f} s to start a process"
    _say(f"4/6 training a masked mixer on 2 CPU ranks ({threads} thread(s) each) with DeepSpeed ZeRO-2, {steps} "
         f"steps ({why})\n   {precision_line}{probe}")
    eval_every = max(1, steps // 4)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    _run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "mmscale/train.py",
          *DEMO_OVERRIDES, f"model.vocab_size={args.vocab_size}", f"data.train={data_dir}",
          f"train.max_steps={steps}", f"train.eval_every={eval_every}", f"checkpoint.every={eval_every * 2}",
          f"log.sample_every={eval_every * 2}", f"run.dir={run_dir}", "run.resume=never"],
         env={"OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    vals, per_step = training_summary(run_dir)
    if per_step and not args.steps:
        print(f"   trained at {per_step:.2f} s/step (sized for {step_s * RANK_OVERHEAD:.2f})", file=sys.stderr)
    return steps, vals


if __name__ == "__main__":
    sys.exit(main())
