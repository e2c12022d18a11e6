"""Per-rank peak memory of real CPU training runs (gloo), held against `mmscale plan --device cpu`.

    .venv/bin/python tools/plan_vs_measured_memory.py --out /tmp/mem.json                 # measure (the RESULTS.md grid)
    .venv/bin/python tools/plan_vs_measured_memory.py --compare /tmp/mem.json             # the table: plan vs measured
    .venv/bin/python tools/plan_vs_measured_memory.py --models mixer-s --layouts z3 fsdp --ranks 1 2 --out /tmp/m.json
    .venv/bin/python tools/plan_vs_measured_memory.py --cuda --models mixer-m llama-m --ranks 1 --batch 8 --out $OUT/m.json

Each (model, layout, ranks) runs in fresh processes under torchrun (OMP_NUM_THREADS=1): the real engine
(DeepSpeed ZeRO-1/2/3 or FSDP2, mmscale's precision policy), two optimizer steps at micro-batch --batch, then
each rank reports
  peak_rss   the process's peak resident memory (ru_maxrss: includes torch itself, the model built in fp32 on
             the CPU before the engine shards it, activations and buffers)
  base_rss   its resident memory before the model existed (torch + the engine's imports + the process group)
  params / optimizer   bytes of the rank's parameter and optimizer tensors after the steps (ZeRO-3: `ds_tensor`
             partitions; FSDP2: local DTensor shards; ZeRO: fp32 master partitions + Adam moments)
The comparison uses the largest peak over the ranks (what a machine has to hold per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# two sizes of each model family, small enough for a shared 2-core CPU, large enough that model state and
# activations (not torch's own ~0.3 GB) decide the peak
MODELS = {
    "mixer-s": ["model.kind=mixer", "model.d_model=256", "model.n_layers=4", "model.n_ctx=256",
                "model.vocab_size=4096"],
    "mixer-m": ["model.kind=mixer", "model.d_model=512", "model.n_layers=8", "model.n_ctx=512",
                "model.vocab_size=4096"],
    "llama-s": ["model.kind=transformer", "model.d_model=256", "model.n_layers=4", "model.n_ctx=256",
                "model.heads=4", "model.vocab_size=4096"],
    "llama-m": ["model.kind=transformer", "model.d_model=384", "model.n_layers=6", "model.n_ctx=384",
                "model.heads=6", "model.vocab_size=4096"],
}
LAYOUTS = {"z1": ("deepspeed", 1), "z2": ("deepspeed", 2), "z3": ("deepspeed", 3), "fsdp": ("fsdp", 0)}
LAYOUT_NAMES = {"z1": "ZeRO-1", "z2": "ZeRO-2", "z3": "ZeRO-3", "fsdp": "FSDP2"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        model = engine.wrapped.module
        params = sum(_tensor_bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _tensor_bytes(p)
                     for p in model.parameters())
        zero = engine.wrapped.optimizer
        flat = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", [])
        master = sum(_tensor_bytes(t) for t in flat)
        return {"params": params, "optimizer": master + _state_bytes(zero.optimizer)}
    params = sum(_tensor_bytes(p) for p in engine.module().parameters())
    return {"params": params, "optimizer": _state_bytes(engine.optimizer)}


def worker(args) -> None:
    import torch

    from mmscale import distributed as dist_
    from mmscale.config import load_config
    from mmscale.engines import build_engine, engine_class
    from mmscale.models import build_model

    kind, stage = LAYOUTS[args.layout]
    cfg = load_config(None, MODELS[args.model] + [f"engine.kind={kind}", f"engine.precision={args.precision}",
                                                  f"engine.zero_stage={stage or 2}",
                                                  f"engine.activation_checkpointing={str(args.ac).lower()}",
                                                  f"train.micro_batch_size={args.batch}"])
    info = dist_.detect()
    device = dist_.device_for(info)
    engine_class(kind).start_process_group(info, device, timeout_min=10)
    if kind == "deepspeed":
        import deepspeed  # noqa: F401  (imported by the engine anyway: its memory belongs to the base)
    base = _rss()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(cfg, model, info, device)
    for step in range(2):
        ids = torch.randint(cfg.model.vocab_size, (args.batch, cfg.model.n_ctx + 1))
        engine.forward_backward({"input_ids": ids[:, :-1], "labels": ids}, last=True)
        engine.step(1e-4)
    row = {**measure(engine), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "base_rss": base, "rank": info.rank}
    if device.type == "cuda":  # the caching allocator's peaks (the CUDA context is outside them)
        row.update(cuda_allocated=torch.cuda.max_memory_allocated(device),
                   cuda_reserved=torch.cuda.max_memory_reserved(device), device_name=torch.cuda.get_device_name(device))
    rows = [None] * info.world_size
    torch.distributed.all_gather_object(rows, row)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    sys.stdout.flush()
    os._exit(0)


def run_one(model: str, layout: str, ranks: int, batch: int, precision: str, ac: bool, cuda: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--model", model, "--layout", layout, "--precision", precision,
               "--batch", str(batch), "--out", str(out)] + (["--ac"] if ac else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
        if not cuda:
            env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = {"model": model, "set": MODELS[model], "layout": layout, "ranks": ranks, "batch": batch,
               "precision": precision, "ac": ac, "wall_s": round(time.perf_counter() - t0, 1),
               "children_cpu_s": round(cpu.ru_utime + cpu.ru_stime, 1)}
        if proc.returncode != 0 or not out.is_file():
            return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return {**row, "per_rank": json.loads(out.read_text())}


def compare(path: str) -> None:
    """Markdown table: the plan's per-rank total (device cpu) against the measured peak RSS of each run."""
    from mmscale.config import load_config
    from mmscale.plan import layout_memory

    rows = json.loads(Path(path).read_text())
    mib = 2 ** 20
    print("| model | params | layout | ranks | plan MiB (states + act + buffers + runtime) | measured peak MiB "
          "(max over ranks; CPU: RSS, CUDA: allocator reserved) | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | {LAYOUT_NAMES[r['layout']]} | {r['ranks']} | failed: {r['error']} | | |")
            continue
        kind, stage = LAYOUTS[r["layout"]]
        cfg = load_config(None, r["set"] + [f"engine.precision={r['precision']}",
                                            f"train.micro_batch_size={r['batch']}",
                                            f"engine.activation_checkpointing={str(r['ac']).lower()}"])
        cuda = "cuda_reserved" in r["per_rank"][0]
        m, n = layout_memory(cfg, kind, stage, r["ranks"], device="cuda" if cuda else "cpu")
        if cuda:  # the allocator's peak does not hold the context: compare without the plan's allowance for it
            m = {**m, "total": m["total"] - m["runtime"], "runtime": 0}
            meas = max(x["cuda_reserved"] for x in r["per_rank"])
        else:
            meas = max(x["peak_rss"] for x in r["per_rank"])
        ratio = m["total"] / meas
        worst = max(worst, abs(ratio - 1))
        print(f"| {r['model']} | {n / 1e6:.1f}M | {LAYOUT_NAMES[r['layout']]} | {r['ranks']} | {m['total'] / mib:,.0f} "
              f"({(m['params'] + m['grads'] + m['optimizer']) / mib:,.0f} + {m['activations'] / mib:,.0f} + "
              f"{m['buffers'] / mib:,.0f} + {m['runtime'] / mib:,.0f}) | {meas / mib:,.0f} | {ratio:.3f} |")
    print(f"\nlargest deviation: {worst * 100:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--ac", action="store_true", help="activation checkpointing on")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU(s) (one rank per GPU); the comparison "
                        "then holds the plan's total less its CUDA-context allowance against the caching "
                        "allocator's peak reserved memory")
    parser.add_argument("--out", help="write the measured rows (JSON) here")
    parser.add_argument("--compare", metavar="JSON", help="print the plan-vs-measured table of a --out file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.compare:
        return compare(args.compare)
    if not args.out:
        parser.error("give --out FILE (measure) or --compare FILE (table)")
    rows = []
    for model in args.models:
        for layout in args.layouts:
            for n in args.ranks:
                r = run_one(model, layout, n, args.batch, args.precision, args.ac, args.cuda)
                rows.append(r)
                Path(args.out).write_text(json.dumps(rows, indent=1))
                peak = max((x["peak_rss"] for x in r.get("per_rank", [])), default=0) / 2 ** 20
                print(f"{model} {layout} x{n}: {r.get('error') or f'peak {peak:,.0f} MiB'} ({r['wall_s']} s)",
                      file=sys.stderr, flush=True)
    print(f"children CPU time: {rows[-1]['children_cpu_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
