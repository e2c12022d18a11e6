"""One-GPU smoke runs of `mmscale train` through torchrun, for each engine (tools/gpu_check.sh step 3).

    python tools/gpu_smoke.py --engines single ddp fsdp deepspeed --per-engine-timeout 40 --out RESULTS.md

Makes a tiny prepared dataset itself (the built-in story corpus, a BPE tokenizer, `mmscale prepare`),
then per engine: 24 steps with a checkpoint at 12 (the loss must fall, the checkpoint must exist), and a
second start with max_steps 32 that must resume from step 24 and reach 32. Engines whose packages are
missing (deepspeed; mosaicml-streaming for all) are reported as skipped, with the reason. Also runs on
CPU (gloo), which is how it is tested here. Exit status: 0 when every engine that ran passed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mmscale.distributed import free_port  # noqa: E402


def make_dataset(root: Path, n_ctx: int, vocab: int) -> Path:
    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.synth import write_corpus
    from mmscale.data.tokenizer import train_tokenizer

    corpus = root / "corpus"
    write_corpus(corpus, 600, 0)
    text = corpus / "stories.txt"
    tok = root / "tok.model"
    train_tokenizer([str(text)], vocab, tok)
    out = root / "data"
    prepare(PrepareOptions(inputs=[str(text)], tokenizer=str(tok), n_ctx=n_ctx, out=str(out), val_fraction=0.05,
                           progress=False))
    return out


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def run_engine(engine: str, data: Path, root: Path, timeout: float) -> tuple[str, str]:
    run_dir = root / f"run-{engine}"
    extra = {"single": [], "ddp": [], "fsdp": [], "deepspeed": ["engine.zero_stage=2"]}[engine]
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(REPO / "mmscale" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
            f"engine.kind={engine}", *extra, f"data.train={data}", f"run.dir={run_dir}", "model.n_ctx=64",
            "model.vocab_size=512", "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=4",
            "train.eval_every=12", "checkpoint.every=12", "log.wandb=disabled", "log.progress=false", "log.every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.time()
    for max_steps in (24, 32):
        env["MASTER_PORT"] = str(free_port())
        try:
            out = subprocess.run(base + [f"train.max_steps={max_steps}"], capture_output=True, text=True, env=env,
                                 timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return "timed out", f"max_steps={max_steps} ran past {timeout:.0f} s"
        if out.returncode != 0:
            tail = [ln for ln in out.stderr.splitlines() if ln.strip()][-3:]
            return f"failed (rc {out.returncode})", " / ".join(tail)[:400]
        if max_steps == 24:
            losses = _losses(run_dir)
            ckpt = run_dir / "checkpoints" / "step_00000012"
            first, last = losses.get(1), losses.get(24)
            if first is None or last is None or not last < first - 0.3:
                return "failed", f"loss did not fall: step 1 {first}, step 24 {last}"
            if not ckpt.is_dir():
                return "failed", f"no checkpoint at {ckpt}"
    losses = _losses(run_dir)
    if "resumed from" not in out.stderr + out.stdout or 32 not in losses or 25 not in losses:
        return "failed", "the second start did not resume from step 24 and run to 32"
    return "ok", (f"loss {losses[1]:.3f} -> {losses[24]:.3f} -> {losses[32]:.3f} (resumed at 24); "
                  f"{time.time() - t0:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="+", default=["single", "ddp", "fsdp", "deepspeed"])
    p.add_argument("--per-engine-timeout", type=float, default=40.0, help="seconds for each of the two starts")
    p.add_argument("--out", default=None, help="append a markdown table here")
    a = p.parse_args()
    rows = []
    if importlib.util.find_spec("streaming") is None:
        rows = [(e, "skipped", "mosaicml-streaming is not installed (carry its wheel)") for e in a.engines]
    else:
        with tempfile.TemporaryDirectory(prefix="mmscale_gpu_smoke_") as tmp:
            root = Path(tmp)
            os.environ["TMPDIR"] = tmp  # streaming's lock files
            data = make_dataset(root, n_ctx=64, vocab=512)
            for engine in a.engines:
                if engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
                    rows.append((engine, "skipped", "deepspeed is not installed (carry its wheel)"))
                    continue
                status, detail = run_engine(engine, data, root, a.per_engine_timeout)
                rows.append((engine, status, detail))
                print(f"[gpu_smoke] {engine}: {status}: {detail}", flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    text = [f"### mmscale train through torchrun, 1 process, {device}", "",
            "| engine | status | detail |", "|---|---|---|"] + [f"| {e} | {s} | {d} |" for e, s, d in rows]
    print("\n".join(text))
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(text) + "\n\n")
    return 0 if all(s in ("ok", "skipped") for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
