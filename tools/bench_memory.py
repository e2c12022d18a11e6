"""Per-rank parameter + optimizer memory of DeepSpeed ZeRO-3 and FSDP2 at 1 and 2 ranks (gloo on CPU).

    .venv/bin/python tools/bench_memory.py                        # the paper's mixer (d 512, 8 layers, n_ctx 512)
    .venv/bin/python tools/bench_memory.py --precision fp32 --ranks 1 2 --set model.d_model=256

Counts the bytes each rank holds after one optimizer step (so Adam's states exist):
  params     the rank's model parameters (ZeRO-3: its `ds_tensor` partitions; FSDP2: local DTensor shards)
  optimizer  ZeRO-3: the fp32 master partitions + Adam moments; FSDP2: Adam moments of the local shards
             (FSDP2 keeps fp32 parameters, which are then also the master weights)
and reports the peak RSS of the process (includes torch itself, activations and buffers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = ["model.kind=mixer", "model.d_model=512", "model.n_layers=8", "model.n_ctx=512",
                 "model.vocab_size=4096"]


def _tensor_bytes(t) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _state_bytes(opt) -> int:
    import torch
    return sum(_tensor_bytes(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
               and v.dim() > 0)


def measure(engine) -> dict:
    if engine.kind == "deepspeed":
        model = engine.engine.module
        params = sum(_tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _tensor_bytes(p)
                     for p in model.parameters())
        zero = engine.engine.optimizer
        master = sum(_tensor_bytes(t) for t in zero.fp32_partitioned_groups_flat)  # fp32 master partitions
        return {"params": params, "optimizer": master + _state_bytes(zero.optimizer)}  # + Adam moments
    params = sum(_tensor_bytes(p) for p in engine.model.parameters())
    return {"params": params, "optimizer": _state_bytes(engine.optimizer)}


def worker(args) -> None:
    import torch

    from mmscale import distributed as dist_
    from mmscale.config import load_config
    from mmscale.engines import build_engine, engine_class
    from mmscale.models import build_model

    cfg = load_config(None, args.set + [f"engine.kind={args.engine}", f"engine.precision={args.precision}",
                                        "engine.zero_stage=3", "train.micro_batch_size=1"])
    info = dist_.detect()
    device = dist_.device_for(info)
    engine_class(args.engine).start_process_group(info, device, timeout_min=10)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, info, device)
    ids = torch.randint(cfg.model.vocab_size, (1, cfg.model.n_ctx + 1))
    engine.forward_backward({"input_ids": ids[:, :-1], "labels": ids}, last=True)
    engine.step(1e-4)
    row = {**measure(engine), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "n_params": n_params}
    rows = [None] * info.world_size
    torch.distributed.all_gather_object(rows, row)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["deepspeed", "fsdp"], choices=["deepspeed", "fsdp"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--set", nargs="*", default=DEFAULT_MODEL, help="config overrides for the model")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    mib = 2 ** 20
    print(f"model: {' '.join(args.set)}; precision {args.precision}; per rank, MiB", file=sys.stderr)
    print("| engine | ranks | params | optimizer | params + optimizer | peak RSS |")
    print("|---|---|---|---|---|---|")
    for engine in args.engines:
        for n in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "rows.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                       __file__, "--worker", "--engine", engine, "--precision", args.precision, "--out", str(out),
                       "--set", *args.set]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TMPDIR": tmp}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0 or not out.is_file():
                    print(f"| {engine} | {n} | failed: {proc.stderr.strip().splitlines()[-1:]} |||")
                    continue
                rows = json.loads(out.read_text())
                r = rows[0]
                name = "ZeRO-3" if engine == "deepspeed" else "FSDP2"
                print(f"| {name} | {n} | {r['params'] / mib:.1f} | {r['optimizer'] / mib:.1f} | "
                      f"{(r['params'] + r['optimizer']) / mib:.1f} | {r['peak_rss'] / mib:.0f} |", flush=True)
    print(f"\n{rows[0]['n_params']:,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
