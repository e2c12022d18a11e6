"""Training metrics: metrics.jsonl, a progress bar with ETA, wandb, and the loss-curve PNG (rank 0 only).

metrics.jsonl holds one JSON object per line: training rows
  {"step", "loss", "lr", "grad_norm", "tokens_per_s" (global), "mfu", "step_time" (s), "data_wait" (s),
   "peak_mem" (MiB: CUDA max allocated, or the process's peak RSS on CPU), "tokens", "skipped"}
and evaluation rows {"step", "val_loss"}.

MFU convention: model FLOPs per token = `model.flops_per_token()["dense"]`: matmul FLOPs (2 per
multiply-add) of forward + backward (= 3 x forward), with the full dense T x T token mixing /
attention; activation recomputation not counted. MFU = tokens_per_s x that / (log.peak_flops x ranks).
Omitted (null) when log.peak_flops is 0.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import uuid
from pathlib import Path

import torch


def peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_flops_per_token(model) -> float:
    """Training (fwd + bwd) FLOPs per token (see the module docstring); 6 x parameters if the model cannot say."""
    fn = getattr(model, "flops_per_token", None)
    if fn is not None:
        flops = fn()
        return float(flops["dense"] if isinstance(flops, dict) else flops)
    return 6.0 * sum(p.numel() for p in model.parameters())


def plot_losses(metrics_path: Path, png_path: Path) -> bool:
    """Loss (and val_loss) against step. Returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
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
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(".tmp_" + png_path.name)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "loss_curve.png"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        if cfg.log.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True)
        if cfg.log.wandb != "disabled":
            self.wandb = self._start_wandb(cfg, run_dir)

    @staticmethod
    def _start_wandb(cfg, run_dir: Path):
        wandb_dir = run_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(var, str(wandb_dir))
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        # a resumed run appends to the same wandb run (its id is kept in run.dir)
        id_file = wandb_dir / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        return wandb.init(project=cfg.log.project, dir=str(wandb_dir), mode=cfg.log.wandb, id=run_id,
                          resume="allow", config=cfg.to_dict(), name=Path(cfg.run.dir).name)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

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
            plot_losses(self.path, self.png)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
