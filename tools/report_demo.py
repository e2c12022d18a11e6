"""Make the README's report screenshot (docs/report.png) from two short runs on the built-in story corpus.

    .venv/bin/python tools/report_demo.py [--workdir runs/report-demo] [--steps 120] [--png docs/report.png]

A masked mixer and the transformer baseline of the same width train on the same shards (the mixer is
preempted half-way with SIGTERM and run again, so the page shows a resume marker), with samples every 40 steps; then
`mmscale report` compares them and headless Chromium takes the screenshot (about 1-2 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def mmscale(*args: str) -> None:
    print("$ mmscale " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "mmscale.cli", *args], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/report-demo", help="where data, runs and report.html go")
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--png", default="docs/report.png", help="the screenshot to write")
    args = p.parse_args()
    work = (REPO / args.workdir).resolve()
    corpus, tok, data = work / "corpus", work / "tok.model", work / "data"
    if not (data / "manifest.json").is_file():
        mmscale("data", "synth", "--out", str(corpus), "--stories", "2000", "--overwrite")
        mmscale("tokenizer", "train", "--data", str(corpus / "stories.txt"), "--vocab-size", "512",
                "--out", str(tok), "--overwrite")
        mmscale("prepare", "--data", str(corpus / "stories.txt"), "--tokenizer", str(tok), "--n-ctx", "64",
                "--out", str(data), "--val-fraction", "0.05", "--overwrite", "--no-progress")
    common = [f"data.train={data}", "model.n_ctx=64", "model.vocab_size=512", "model.d_model=128",
              "model.n_layers=2", "train.micro_batch_size=16", "train.lr=3e-3", "train.warmup_steps=10",
              f"train.eval_every={max(1, args.steps // 6)}", f"checkpoint.every={max(1, args.steps // 3)}",
              "log.wandb=disabled", "log.sample_every=40", "log.sample_tokens=40", "log.sample_temperature=0.7",
              "engine.precision=fp32", "--no-progress"]
    mixer, transformer = work / "mixer", work / "transformer"
    for d in (mixer, transformer):
        shutil.rmtree(d, ignore_errors=True)
    # the mixer is preempted half-way (SIGTERM, as SLURM does: checkpoint, exit 75) and run again: it resumes
    cmd = ["train", *common, "model.kind=mixer", f"run.dir={mixer}", f"train.max_steps={args.steps}"]
    proc = subprocess.Popen([sys.executable, "-m", "mmscale.cli", *cmd], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    metrics = mixer / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.is_file() and f'"step": {args.steps // 2},' in metrics.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    if proc.wait() != 75:
        raise SystemExit(f"the preempted run ended with status {proc.returncode}, not 75")
    mmscale(*cmd)  # the same command again: resumes from the checkpoint
    mmscale("train", *common, "model.kind=transformer", "model.heads=4", f"run.dir={transformer}",
            f"train.max_steps={args.steps}")
    page = work / "report.html"
    mmscale("report", str(mixer), str(transformer), "--out", str(page))

    from tests._report_helpers import ensure_chromium, run_chromium
    chromium, why = ensure_chromium()
    if chromium is None:
        print(f"no screenshot: {why}", file=sys.stderr)
        return 1
    png = (REPO / args.png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    raw = work / "report-raw.png"
    run_chromium(chromium, ["--hide-scrollbars", f"--screenshot={raw}", "--window-size=1280,1180",
                            page.as_uri()], work / "chromium-profile")
    from PIL import Image
    # a 256-colour palette keeps the PNG small enough to commit (the page is mostly flat colour)
    Image.open(raw).convert("RGB").quantize(colors=256).save(png, optimize=True)
    print(f"{png} ({png.stat().st_size // 1024} KiB); report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
