"""`make demo`: the main job, end to end, on 2 CPU ranks in under 10 minutes.

    python -m mmscale.demo                       # the built-in story corpus
    python -m mmscale.demo --data my_texts/ a.txt  # your own text files instead

1. corpus      `mmscale data synth` (or your --data files)
2. tokenizer   `mmscale tokenizer train` (BPE)
3. shards      `mmscale prepare` (packed windows of n_ctx + 1 tokens, MDS + zstd)
4. training    `deepspeed --num_gpus 2 mmscale/train.py` (ZeRO-2, bf16, OMP_NUM_THREADS=1): a masked mixer
5. export      `mmscale convert` when present, else the ZeRO checkpoint consolidated with DeepSpeed's zero_to_fp32
6. evaluation  `mmscale eval` on the held-out split, and a story from `mmscale generate`; `mmscale report`

Every step is a subprocess whose progress streams to the terminal. Everything goes under
--workdir (default runs/demo): data is built once and reused; each demo run trains in a new
run directory, so nothing earlier is overwritten.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from mmscale.distributed import free_port
from mmscale.errors import UserError, exit_status

REPO = Path(__file__).resolve().parent.parent

# a small masked mixer that learns the story corpus in a few CPU minutes
DEMO_OVERRIDES = [
    "model.kind=mixer", "model.d_model=256", "model.n_layers=6", "model.n_ctx=128", "model.mixer=flat",
    "train.micro_batch_size=16", "train.grad_accum=1", "train.lr=2e-3", "train.warmup_steps=30",
    "train.weight_decay=0.1", "train.grad_clip=1.0", "train.eval_batches=8",
    "engine.kind=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
    "log.every=10", "log.wandb=offline",
]


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
    """The latest checkpoint as an export: `mmscale convert` if it exists, else zero_to_fp32 + save_export."""
    try:
        import mmscale.export.convert  # noqa: F401
        _run(_mmscale("convert", str(run_dir), "--out", str(out), "--tokenizer", str(tokenizer)))
        return out
    except ImportError:
        pass
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmscale import checkpoint as ckpt
    from mmscale.export.format import save_export

    step_dir = ckpt.find_latest(ckpt.checkpoints_root(run_dir))
    meta = ckpt.read_meta(step_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds")
    state = {k: v.contiguous() for k, v in state.items()}
    save_export(out, state, meta["model"], tokenizer, info={"steps": meta["step"], "tokens": meta["tokens_seen"],
                                                           "source": str(step_dir)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", metavar="PATH", help="your own text files / folders (default: built-in stories)")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500: ~4 min on 2 cores)")
    parser.add_argument("--stories", type=int, default=6000, help="size of the built-in corpus")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    return exit_status("mmscale demo", _demo, args)


def _demo(args) -> int:
    t0 = time.time()
    work = (REPO / args.workdir).resolve() if not Path(args.workdir).is_absolute() else Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        missing = [p for p in args.data if not Path(p).exists()]
        if missing:
            raise UserError(f"--data: '{missing[0]}' does not exist; pass text files or folders of them")
        inputs = [str(Path(p).resolve()) for p in args.data]
        import hashlib
        # derived files are named after the inputs, built once, never overwritten
        tag = "user_" + hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:10]
    else:
        corpus = work / "corpus"
        if not (corpus / "stories.txt").is_file():
            _say(f"1/6 building the built-in story corpus ({args.stories} stories)")
            _run(_mmscale("data", "synth", "--out", str(corpus), "--stories", str(args.stories)))
        else:
            _say(f"1/6 corpus: reusing {corpus}")
        inputs = [str(corpus / "stories.txt")]
        tag = "stories"
    n_ctx = next(int(o.split("=")[1]) for o in DEMO_OVERRIDES if o.startswith("model.n_ctx="))
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

    run_dir = work / time.strftime("run_%Y%m%d_%H%M%S")
    _say(f"4/6 training a masked mixer on 2 CPU ranks with DeepSpeed ZeRO-2 (bf16), {args.steps} steps")
    eval_every = max(1, args.steps // 4)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    _run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "mmscale/train.py",
          *DEMO_OVERRIDES, f"model.vocab_size={args.vocab_size}", f"data.train={data_dir}",
          f"train.max_steps={args.steps}", f"train.eval_every={eval_every}", f"checkpoint.every={eval_every * 2}",
          f"log.sample_every={eval_every * 2}", f"run.dir={run_dir}", "run.resume=never"],
         env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})

    _say("5/6 exporting the trained model")
    export = export_checkpoint(run_dir, tokenizer, run_dir / "export")
    _say("6/6 held-out loss and a generated story")
    _run(_mmscale("eval", str(export), "--data", str(data_dir), "--max-batches", "10"))
    _run(_mmscale("generate", str(export), "--prompt", "Once upon a time", "--max-new-tokens", str(n_ctx - 8),
                  "--temperature", "0.7", "--top-k", "20"))
    _run(_mmscale("report", str(run_dir), "--out", str(run_dir / "report.html")))

    from mmscale import checkpoint as ckpt
    latest = ckpt.find_latest(ckpt.checkpoints_root(run_dir))
    print(f"\nmmscale demo finished in {time.time() - t0:.0f} s\n"
          f"  checkpoint   {latest}\n"
          f"  export       {export}\n"
          f"  metrics      {run_dir / 'metrics.jsonl'}\n"
          f"  loss plot    {run_dir / 'loss_curve.png'}\n"
          f"  wandb files  {run_dir / 'wandb'}  (offline: `wandb sync` it to upload)\n"
          f"  config       {run_dir / 'config.yaml'}\n"
          f"  report       {run_dir / 'report.html'}  (curves, numbers, samples; one file, no network)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
