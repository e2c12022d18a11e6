"""Training metrics: metrics.jsonl, a progress bar with ETA, wandb, TensorBoard and the loss-curve PNG
(rank 0 only).

metrics.jsonl holds one JSON object per line, each with "step" and "time" (unix seconds): training rows
  {"loss", "lr", "grad_norm", "tokens_per_s" (global), "mfu_dense", "mfu_causal", "mfu" (= mfu_dense, the
   old name), "step_time" (s), "data_wait" (s), "peak_mem" (MiB: CUDA max allocated, or the process's peak
   RSS on CPU), "tokens", "skipped"},
evaluation rows {"val_loss"}, and event rows {"event": "start" | "resume" | "checkpoint" | "samples" |
"profile", ...} that `mmscale report` marks on the time axis.

MFU convention (run/mfu.py computes it): model FLOPs per token = `model.flops_per_token()`: matmul FLOPs
(2 per multiply-add) of forward + backward (= 3 x forward); activation recomputation not counted. "dense"
counts the full T x T token mixing / attention (what a dense kernel executes), "causal" only the live lower
triangle. MFU = tokens_per_s x FLOPs per token / (peak x ranks), the peak from `log.peak_flops` or, when that
is 0, from the GPU table in mmscale/peak_flops.py; null on CPU and on GPUs the table does not know.

`read_jsonl` is the one reader of these files (report, export, experiment read through it); `trim_jsonl` cuts
them back to a checkpoint's step on resume.
"""
from __future__ import annotations

import io
import json
import math
import os
import resource
import sys
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from mmscale.errors import UserError
from mmscale.fsutil import atomic_write


def peak_mem_mib(device) -> float:
    """Peak memory of this rank: CUDA's allocator peak on a GPU, the process's max RSS elsewhere (MiB)."""
    if device.type == "cuda":
        import torch  # lazy: this module is also the metrics.jsonl reader of `mmscale report`, which needs no torch
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _lines(path: Path):
    """(line, parsed JSON or None) for each line of a JSONL file; a line a crash left half-written parses to None."""
    for line in path.read_text(errors="replace").splitlines():
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            yield line, None


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The one reader of metrics.jsonl (and samples.jsonl): (rows: JSON objects with a numeric "step", number of
    other non-blank lines: a run still writing, or killed mid-line). A missing file has no rows."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    for line, row in _lines(path):
        if not line.strip():
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def trim_jsonl(path: Path, upto_step: int) -> None:
    """On resume, drop rows logged after `upto_step` (they are about to be logged again), and a line a crash
    left half-written."""
    if not path.is_file():
        return
    keep = [line for line, row in _lines(path) if isinstance(row, dict) and row.get("step", 0) <= upto_step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def plot_losses(metrics_path: Path, png_path: Path, ylabel: str = "cross-entropy (nats/token)") -> bool:
    """Loss (and val_loss) against step. Returns False when matplotlib is missing. A line a crash left
    half-written is skipped."""
    try:  # lazy: matplotlib is optional (the `plot` extra) and slow to import
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, val = [], []
    for row in read_jsonl(metrics_path)[0]:
        if "loss" in row and row["loss"] is not None:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(png_path, png.getvalue())
    return True


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        r = getattr(cfg, "retrieval", None)
        retrieval = bool(getattr(r, "pairs", "") or getattr(r, "collection", ""))
        self.ylabel = "InfoNCE loss (nats/query)" if retrieval else "cross-entropy (nats/token)"
        self.bar = None
        self.wandb = None
        self.tb = None
        # wandb keeps every step it was sent; steps up to here were sent before a restart and are not resent
        self.wandb_floor = 0
        self._wandb_last = 0
        if not enabled:
            return
        if cfg.log.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True)
        if cfg.log.wandb != "disabled":
            if cfg.log.project:
                self.write("note: log.project is deprecated; use log.wandb_project (the same meaning)")
            self.wandb = self._start_wandb(cfg, run_dir)
            seen = run_dir / "wandb" / "last_step"
            if seen.is_file():
                try:
                    self.wandb_floor = self._wandb_last = int(seen.read_text().strip() or 0)
                except ValueError:
                    pass
            if self.wandb_floor > start_step:
                self.write(f"wandb: steps {start_step + 1}..{self.wandb_floor} were logged before the restart; "
                           "they are written to metrics.jsonl again but not resent to wandb")
        if cfg.log.tensorboard:
            self.tb = self._start_tensorboard(run_dir, start_step)

    @staticmethod
    def _start_tensorboard(run_dir: Path, start_step: int):
        try:  # lazy: tensorboard is optional (log.tensorboard, the `tensorboard` extra)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("log.tensorboard=true needs the tensorboard package; "
                            "pip install tensorboard (tools/setup_env.sh installs it)") from None
        # purge_step: on resume, TensorBoard hides what an earlier start logged after the checkpoint
        return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None,
                             flush_secs=30)

    @staticmethod
    def _start_wandb(cfg, run_dir: Path):
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(var, str(wandb_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # lazy: slow to import, and only with log.wandb on; reads the WANDB_* variables set above

        # a resumed run appends to the same wandb run (its id is kept in run.dir)
        id_file = wandb_dir / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        lg = cfg.log
        return wandb.init(project=lg.project or lg.wandb_project, entity=lg.wandb_entity or None,
                          group=lg.wandb_group or None, tags=list(lg.wandb_tags) or None, dir=str(wandb_dir),
                          mode=lg.wandb, id=run_id, resume="allow", config=cfg.to_dict(),
                          name=Path(cfg.run.dir).name)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": row["step"], "time": round(time.time(), 3), **{k: v for k, v in row.items() if k != "step"}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if "event" in row:
            return
        scalars = {k: float(v) for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and v is not None and math.isfinite(float(v))}
        if self.wandb is not None and row["step"] > self.wandb_floor:
            self.wandb.log(scalars, step=row["step"])
            if row["step"] > self._wandb_last:
                self._wandb_last = row["step"]
                atomic_write(self.run_dir / "wandb" / "last_step", f"{self._wandb_last}\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])

    def event(self, step: int, kind: str, **info) -> None:
        """A marker on the time axis (start, resume, checkpoint, samples, profile) in metrics.jsonl."""
        self.log({"step": step, "event": kind, **info})

    def progress(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def plot(self) -> None:
        if self.enabled and self.path.is_file():
            plot_losses(self.path, self.png, self.ylabel)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
