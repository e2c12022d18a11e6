"""Shared helpers of the benchmark scripts: timing medians, machine description, markdown tables."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, ROOT)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# "wall": perf_counter. "cpu": this process's CPU time (time.process_time), which on a shared machine
# leaves out the time the scheduler gives to other processes; meaningful with one thread
# (--threads 1), where it is the single-core compute time. Set from the scripts' --clock option.
CLOCK = {"fn": time.perf_counter}


def set_clock(name: str) -> None:
    CLOCK["fn"] = {"wall": time.perf_counter, "cpu": time.process_time}[name]


def add_clock_args(parser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu = process CPU time, robust on a shared machine (use with --threads 1)")


def apply_clock_args(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    set_clock(args.clock)


def time_fn(fn, device="cpu", warmup=1, repeats=5):
    """Median and all times (s) of `fn()` over `repeats` runs after `warmup` runs."""
    clock = CLOCK["fn"]
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times), times


def time_side_by_side(fns: dict, device="cpu", warmup=1, repeats=5):
    """Interleave the candidates round by round so that load from other processes hits all alike.

    Returns {name: (median_s, [times])}.
    """
    clock = CLOCK["fn"]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            sync(device)
            times[k].append(clock() - t0)
    return {k: (statistics.median(v), v) for k, v in times.items()}


def round_ratio(res, base, name):
    """Median over rounds of base_time / name_time: each round's candidates ran back to back, so a
    round's ratio sees the same machine load; more robust than a ratio of medians when shared."""
    return statistics.median(b / t for b, t in zip(res[base][1], res[name][1]))


def spread(times):
    """Relative spread (max - min) / median: the noise note of a measurement."""
    med = statistics.median(times)
    return (max(times) - min(times)) / med if med else 0.0


def machine(device="cpu") -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        from mmscale.precision import cpu_key

        model, isa = cpu_key().split("|", 1)  # the CPU model and the ISA flags that decide its speed
        name = (f"{model} ({platform.machine()}; {isa.replace('+', ', ')}), {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    return f"{name}, torch {torch.__version__}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(title, device, argv=None):
    cmd = "python " + " ".join(argv or sys.argv)
    clock = "process CPU time" if CLOCK["fn"] is time.process_time else "wall time"
    return f"### {title}\n\nMachine: {machine(device)}. Date: {now()}. Clock: {clock}. Command: `{cmd}`\n"


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


class Stopped(Exception):
    """SIGTERM arrived (e.g. from `timeout`): write what was measured so far, then stop."""


def stop_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)


def emit(text, out_path=None):
    print(text, flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(text + "\n")
