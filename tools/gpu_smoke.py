"""The Python steps of tools/gpu_check.sh, one subcommand each; every one writes its result row(s) itself.

    python tools/gpu_smoke.py versions                       # versions, and which packages are missing
    python tools/gpu_smoke.py kernels  [--T 1000 1030 4096]  # Triton vs float64, fp32 and bf16
    python tools/gpu_smoke.py opbench  [--T 1024 2048 4096]  # dense, paper conv, Triton; bf16 -> CUDA_TRITON_MIN_T
    python tools/gpu_smoke.py prepare  --work DIR            # the smoke runs' dataset (story corpus, n_ctx 1024)
    python tools/gpu_smoke.py train    --work DIR --engine single|ddp|fsdp|zero2|zero3

Each appends markdown to --md (default: stdout only) and one tab-separated row per result to --rows:
`name<TAB>STATUS<TAB>detail`, STATUS one of OK, FAILED, SKIPPED. Exit status 0 when nothing FAILED. A step
that cannot run here (no CUDA, a package missing) says SKIPPED with the reason; it never raises.

`train` runs `mmscale train` through one-process torchrun in bf16 at n_ctx 1024 (the Triton path on CUDA): 3
steps with a checkpoint at 3, then a second start that resumes and runs to 6. It records the output dtype
of the first nn.Linear the training forward calls (a global forward hook installed by this script's
`_entry`, which torchrun starts instead of mmscale/train.py): float32 under bf16 is a FAILED row.
`--cpu` allows it on the CPU (gloo, n_ctx 64), which is how it is tested here.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# import name -> (package to carry, what needs it)
NEEDED = {
    "torch": ("torch", "everything"),
    "triton": ("triton", "the Triton kernels (mixer_impl auto on CUDA from T 1024)"),
    "numpy": ("numpy", "data path"),
    "yaml": ("pyyaml", "configs"),
    "sentencepiece": ("sentencepiece", "tokenizer"),
    "safetensors": ("safetensors", "exports"),
    "xxhash": ("xxhash", "checkpoint and shard digests"),
    "streaming": ("mosaicml-streaming", "the data path of every engine"),
    "zstd": ("zstd", "streaming's compression"),
    "brotli": ("brotli", "streaming's compression"),
    "snappy": ("python-snappy", "streaming's compression"),
    "cramjam": ("cramjam", "python-snappy"),
    "catalogue": ("catalogue", "streaming"),
    "deepspeed": ("deepspeed", "the ZeRO-2/3 rows"),
    "hjson": ("hjson", "deepspeed"),
    "pydantic": ("pydantic", "deepspeed"),
    "submitit": ("submitit", "mmscale launch"),
    "bm25s": ("bm25s", "mmscale retrieval eval"),
    "transformers": ("transformers", "mmscale export-hf"),
    "pytest": ("pytest", "the test suite"),
}


class Out:
    """Rows (tsv) and markdown of one subcommand."""

    def __init__(self, a):
        self.rows_path, self.md_path, self.failed = a.rows, a.md, False

    def row(self, name: str, status: str, detail: str) -> None:
        detail = " ".join(str(detail).split())[:600]
        self.failed |= status == "FAILED"
        print(f"[gpu_smoke] {name}: {status}: {detail}", flush=True)
        if self.rows_path:
            with open(self.rows_path, "a") as f:
                f.write(f"{name}\t{status}\t{detail}\n")

    def md(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n\n"
        print(text, flush=True)
        if self.md_path:
            with open(self.md_path, "a") as f:
                f.write(text)


def _cuda() -> str | None:
    """None when CUDA is usable, else the reason."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"torch does not import ({type(e).__name__}: {e})"
    return None if torch.cuda.is_available() else "no CUDA"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------- versions

def cmd_versions(a, out: Out) -> None:
    lines = [f"python {sys.version.split()[0]} ({sys.executable})"]
    missing = []
    for mod, (pkg, why) in NEEDED.items():
        if importlib.util.find_spec(mod) is None:
            missing.append(f"{pkg} ({why})")
            continue
        try:
            if mod == "streaming":  # importing it pulls in streaming.vision (torchvision); the spec suffices
                from importlib.metadata import version
                ver = version("mosaicml-streaming")
            else:
                m = importlib.import_module(mod)
                ver = getattr(m, "__version__", "present")
            lines.append(f"{pkg} {ver}  ({Path(importlib.util.find_spec(mod).origin or '?').parent})")
        except Exception as e:  # noqa: BLE001 - a package that is there but broken is a row, not a crash
            missing.append(f"{pkg} (does not import: {type(e).__name__}: {str(e)[:120]})")
    try:
        import torch
        dev = (f"{torch.cuda.get_device_name()} | CUDA {torch.version.cuda} | capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability()))}" if torch.cuda.is_available()
               else "no CUDA device visible to torch")
    except Exception as e:  # noqa: BLE001
        dev = f"torch does not import: {e}"
    lines.insert(0, f"device: {dev}")
    out.md(["### Versions", ""] + [f"    {x}" for x in lines] +
           ["", "Missing: " + ("; ".join(missing) if missing else "none")])
    out.row("versions", "OK", dev + " | missing: " + (", ".join(m.split(" (")[0] for m in missing) or "none"))


# ---------------------------------------------------------------------------------------------- kernels

def cmd_kernels(a, out: Out) -> None:
    reason = None if _interpreting() else _cuda()
    if reason is None and importlib.util.find_spec("triton") is None:
        reason = "triton is not installed"
    if reason:
        out.row("triton vs float64", "SKIPPED", reason)
        return
    import torch

    from mmscale.ops import triton_mixing

    dev = "cpu" if _interpreting() else "cuda"
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
    lines = ["### Triton kernels vs float64 (random inputs, B 2, H 1, C 64)", "",
             "| T | dtype | out rel err | dx rel err | dw rel err | dw above diagonal | dw twice: max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for t in a.T:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"triton T {t} {str(dtype).split('.')[-1]}"
            try:
                g = torch.Generator(device="cpu").manual_seed(t)
                w = (torch.randn(1, t, t, generator=g) / t ** 0.5).to(dev, dtype)
                x = torch.randn(2, 1, t, 64, generator=g).to(dev, dtype)
                dout = torch.randn(2, 1, t, 64, generator=g).to(dev, dtype)
                y = triton_mixing.triton_mix(w, x)
                dw, dx = triton_mixing.mix_backward_w(w, x, dout), triton_mixing.mix_backward_x(w, dout)
                dw2 = triton_mixing.mix_backward_w(w, x, dout)
                w64, x64, d64 = (v.double() for v in (w.tril(), x, dout))  # the same rounded inputs
                ref_y = torch.matmul(w64, x64)
                ref_dx = torch.matmul(w64.transpose(-1, -2), d64)
                ref_dw = torch.matmul(d64, x64.transpose(-1, -2)).sum(0).tril()

                def rel(u, v):
                    return ((u.double() - v).abs().max() / v.abs().max()).item()

                errs = rel(y, ref_y), rel(dx, ref_dx), rel(dw, ref_dw)
                upper = dw.float().triu(1)
                upper_zero = bool((upper == 0).all())
                twice = (dw.float() - dw2.float()).abs().max().item()
                ok = all(e < tol[dtype] for e in errs) and upper_zero
                lines.append(f"| {t} | {str(dtype).split('.')[-1]} | {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} | "
                             f"{'exactly 0' if upper_zero else f'NOT ZERO (max {upper.abs().max().item():.1e})'} "
                             f"| {twice:.1e}{' (bitwise equal)' if twice == 0 else ''} |")
                out.row(name, "OK" if ok else "FAILED",
                        f"rel err out {errs[0]:.1e} dx {errs[1]:.1e} dw {errs[2]:.1e} (limit {tol[dtype]:g}); "
                        f"dw upper triangle {'exactly 0' if upper_zero else 'NOT ZERO'}; dw twice max diff {twice:.1e}")
            except Exception as e:  # noqa: BLE001 - one size failing must not hide the others
                lines.append(f"| {t} | {str(dtype).split('.')[-1]} | error: {type(e).__name__}: {str(e)[:100]} |||||")
                out.row(name, "FAILED", f"{type(e).__name__}: {e}")
    out.md(lines)


# ---------------------------------------------------------------------------------------------- op benchmark

def cmd_opbench(a, out: Out) -> None:
    reason = _cuda()
    if reason:
        out.row("op benchmark", "SKIPPED", reason)
        return
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_token_mixing import bench  # the benchmark's own measurement, one T at a time

    from mmscale.ops import token_mixing

    rows = []
    for t in a.T:
        try:
            r = bench(t, a.d, a.batch, "cuda", torch.bfloat16, [], a.repeats)
        except Exception as e:  # noqa: BLE001 - OOM or a kernel failure: the row says so
            out.row(f"op bench T {t}", "FAILED", f"{type(e).__name__}: {e}")
            continue
        rows.append(r)
        out.row(f"op bench T {t}", "OK", " ".join(f"{k} {r[k]:.3f}" for k in
                                                  ("paper Conv1d ms", "dense ms", "triton ms") if k in r))
    if not rows:
        return
    cols = ["paper Conv1d ms", "dense ms", "triton ms"]
    lines = [f"### Token-mixing op, fwd+bwd, bf16, d {a.d}, batch {a.batch} (median of {a.repeats})", "",
             "| T | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['T']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols) + " |" for r in rows]
    # the smallest measured T from which Triton is faster than dense at every larger measured T
    wins = [r["T"] for r in rows if "triton ms" in r and r["triton ms"] < r["dense ms"]]
    suggested = None
    for r in sorted(rows, key=lambda r: r["T"]):
        if all(x["T"] in wins for x in rows if x["T"] >= r["T"]):
            suggested = r["T"]
            break
    verdict = (f"Triton is faster than dense from T {suggested}: CUDA_TRITON_MIN_T = {suggested} "
               f"(mmscale/ops/token_mixing.py has {token_mixing.CUDA_TRITON_MIN_T})" if suggested else
               f"Triton is not faster than dense at every T from some measured T on: keep dense below "
               f"{max(r['T'] for r in rows) * 2} at least (the file has {token_mixing.CUDA_TRITON_MIN_T})")
    out.md(lines + ["", verdict])
    out.row("CUDA_TRITON_MIN_T", "OK", verdict)


# ---------------------------------------------------------------------------------------------- train

ENGINES = {"single": ["engine.kind=single"], "ddp": ["engine.kind=ddp"], "fsdp": ["engine.kind=fsdp"],
           "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"]}


def _n_ctx(a) -> int:
    return a.n_ctx or (1024 if not a.cpu else 64)


def cmd_prepare(a, out: Out) -> None:
    if importlib.util.find_spec("streaming") is None:
        out.row("smoke dataset", "SKIPPED", "mosaicml-streaming is not installed (carry its wheel: tools/gpu_wheels.sh)")
        return
    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.synth import write_corpus
    from mmscale.data.tokenizer import train_tokenizer

    t0 = time.time()
    root = Path(a.work)
    corpus = root / "corpus"
    write_corpus(corpus, a.stories, 0, overwrite=True)
    text = corpus / "stories.txt"
    tok = root / "tok.model"
    train_tokenizer([str(text)], a.vocab, tok)
    data = root / "data"
    prepare(PrepareOptions(inputs=[str(text)], tokenizer=str(tok), n_ctx=_n_ctx(a), out=str(data),
                           val_fraction=0.05, progress=False))
    out.row("smoke dataset", "OK", f"{a.stories} stories, vocab {a.vocab}, n_ctx {_n_ctx(a)} in {time.time() - t0:.0f} s")


def _losses(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def cmd_train(a, out: Out) -> None:
    name = f"train {a.engine}"
    reason = None if a.cpu else _cuda()
    data = Path(a.work) / "data"
    if reason is None and importlib.util.find_spec("streaming") is None:
        reason = "mosaicml-streaming is not installed (carry its wheel: tools/gpu_wheels.sh)"
    if reason is None and a.engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        reason = "deepspeed is not installed (carry its wheel: tools/gpu_wheels.sh)"
    if reason is None and not data.is_dir():
        reason = f"no smoke dataset at {data} (the prepare step did not run or failed)"
    if reason:
        out.row(name, "SKIPPED", reason)
        return
    from mmscale.distributed import free_port

    run_dir = Path(a.work) / f"run-{a.engine}"
    dtype_file = run_dir / "linear_out_dtype.txt"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(Path(__file__).resolve()), "_entry", str(dtype_file),
            "--config", str(REPO / "configs" / "tiny.yaml"), *ENGINES[a.engine], "engine.precision=bf16",
            f"data.train={data}", f"run.dir={run_dir}", f"model.n_ctx={_n_ctx(a)}", f"model.vocab_size={a.vocab}",
            "train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=1", "train.eval_every=3",
            "checkpoint.every=3", "log.wandb=disabled", "log.progress=false", "log.every=1"]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.time()
    logs = []
    for max_steps in (3, 6):
        env["MASTER_PORT"] = str(free_port())
        p = subprocess.run(base + [f"train.max_steps={max_steps}"], capture_output=True, text=True, env=env,
                           cwd=REPO)
        logs.append(p.stdout + p.stderr)
        Path(a.work, f"train-{a.engine}-{max_steps}.log").write_text(logs[-1])
        if p.returncode != 0:
            tail = [ln for ln in (p.stderr or p.stdout).splitlines() if ln.strip()][-3:]
            out.row(name, "FAILED", f"max_steps={max_steps}: rc {p.returncode}: " + " / ".join(tail))
            return
        if max_steps == 3 and not (run_dir / "checkpoints" / "step_00000003").is_dir():
            out.row(name, "FAILED", f"no checkpoint at {run_dir / 'checkpoints' / 'step_00000003'}")
            return
    losses = _losses(run_dir)
    dtype = dtype_file.read_text().strip() if dtype_file.exists() else "not seen (no nn.Linear ran?)"
    if "resumed from" not in logs[1] or not {1, 3, 4, 6} <= set(losses):
        out.row(name, "FAILED", f"the second start did not resume at 3 and reach 6 (steps logged: {sorted(losses)})")
        return
    detail = (f"loss {losses[1]:.3f} -> {losses[3]:.3f} | resumed -> {losses[6]:.3f}; Linear output {dtype}; "
              f"{time.time() - t0:.0f} s for both starts")
    ok = dtype == "torch.bfloat16" and all(v == v and abs(v) != float("inf") for v in losses.values())
    out.row(name, "OK" if ok else "FAILED", detail + ("" if ok else " (bf16 run: want torch.bfloat16, finite losses)"))


def _entry(argv: list[str]) -> int:
    """torchrun's worker: install the Linear-dtype hook, then run mmscale.train with the rest of argv."""
    import torch

    dtype_file = Path(argv[0])
    seen = []

    def hook(module, args, output):
        if not seen and isinstance(module, torch.nn.Linear) and module.training and torch.is_tensor(output):
            seen.append(str(output.dtype))
            if int(os.environ.get("RANK", "0")) == 0:
                dtype_file.parent.mkdir(parents=True, exist_ok=True)
                dtype_file.write_text(seen[0] + "\n")

    torch.nn.modules.module.register_module_forward_hook(hook)
    from mmscale.run.train import main as train_main
    return train_main(argv[1:])


# ----------------------------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_entry":
        code = _entry(sys.argv[2:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=["versions", "kernels", "opbench", "prepare", "train"])
    p.add_argument("--rows", default=None, help="append tab-separated result rows here")
    p.add_argument("--md", default=None, help="append markdown here")
    p.add_argument("--T", type=int, nargs="+", default=None)
    p.add_argument("--d", type=int, default=1024, help="opbench: channels")
    p.add_argument("--batch", type=int, default=8, help="opbench: batch")
    p.add_argument("--repeats", type=int, default=10, help="opbench: timed rounds")
    p.add_argument("--work", default=None, help="prepare/train: the scratch directory (dataset, runs)")
    p.add_argument("--engine", choices=list(ENGINES), default="single")
    p.add_argument("--n-ctx", type=int, default=0, help="prepare/train: 1024 (64 with --cpu)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--stories", type=int, default=3000)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (gloo): the script's own test")
    a = p.parse_args()
    if a.T is None:
        a.T = [1000, 1030, 4096] if a.cmd == "kernels" else [1024, 2048, 4096]
    if a.cmd in ("prepare", "train") and not a.work:
        p.error(f"{a.cmd} needs --work DIR")
    out = Out(a)
    try:
        {"versions": cmd_versions, "kernels": cmd_kernels, "opbench": cmd_opbench, "prepare": cmd_prepare,
         "train": cmd_train}[a.cmd](a, out)
    except Exception as e:  # noqa: BLE001 - the row says what broke; the script goes on
        out.row(a.cmd if a.cmd != "train" else f"train {a.engine}", "FAILED", f"{type(e).__name__}: {e}")
    return 1 if out.failed else 0


if __name__ == "__main__":
    sys.exit(main())
