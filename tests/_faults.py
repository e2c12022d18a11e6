"""A training process that SIGKILLs itself at a chosen point (tests/test_checkpoint_damage.py's fault test).

    python tests/_faults.py CONFIG_JSON KILL_JSON            (one process)
    torchrun ... tests/_faults.py CONFIG_JSON KILL_JSON      (sharded engines)

KILL_JSON: {"kind": K, "n": N, "rank": R} or {} for no kill. On rank R, the N-th (1-based, counted in this
process) occurrence of:
  step          an optimizer step: killed after forward/backward, before the update
  metrics       a training row of metrics.jsonl: half the line is written, then the kill
  rank_file     a checkpoint's rank file: half of it is written (the engine's files are complete), then the kill
  digest        checkpoint finalize: killed while hashing/fsyncing the files (no meta.json yet)
  latest        checkpoint finalize: killed after the folder's rename, before `latest` moves
Model and data are the stand-ins of tests/_dist.py (tiny real model, deterministic synthetic tokens).
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kill: dict) -> None:
    if not kill or int(os.environ.get("RANK", 0)) != kill.get("rank", 0):
        return
    kind, n = kill["kind"], int(kill["n"])
    seen = {"count": 0}

    def hit() -> bool:
        seen["count"] += 1
        return seen["count"] == n

    if kind == "step":
        import mmscale.engines
        original = mmscale.engines.lr_at

        def lr_at(step, train_cfg):
            if hit():
                _die()
            return original(step, train_cfg)
        mmscale.engines.lr_at = lr_at
    elif kind == "metrics":
        from mmscale.run.metrics import MetricsLogger
        original_log = MetricsLogger.log

        def log(self, row):
            if self.enabled and "loss" in row and hit():
                line = json.dumps({"step": row["step"], **row}) + "\n"
                with self.path.open("a") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                _die()
            return original_log(self, row)
        MetricsLogger.log = log
    elif kind == "rank_file":
        import torch

        from mmscale.run import checkpoint as ckpt
        original_save = ckpt.save_rank_state

        def save_rank_state(step_dir, rank, data_state):
            if hit():
                buf = io.BytesIO()
                torch.save({"partial": torch.zeros(1000)}, buf)
                (Path(step_dir) / ckpt.rank_file_name(rank)).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
                _die()
            return original_save(step_dir, rank, data_state)
        ckpt.save_rank_state = save_rank_state
    elif kind == "digest":
        from mmscale import fsutil
        original_digest = fsutil.digest

        def digest(path, sync=False):
            if sync and hit():
                _die()
            return original_digest(path, sync)
        fsutil.digest = digest
    elif kind == "latest":
        from mmscale.run import checkpoint as ckpt
        original_write = ckpt._write_text_atomic

        def write(path, text):
            if Path(path).name == ckpt.LATEST and hit():
                _die()
            return original_write(path, text)
        ckpt._write_text_atomic = write
    else:
        raise ValueError(kind)


def main() -> int:
    from mmscale.config import config_from_dict
    from mmscale.run.train import train
    from tests._dist import synthetic_data, tiny_model

    cfg, kill = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    install(kill)
    return train(config_from_dict(cfg), model_factory=tiny_model, data_factory=synthetic_data)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def enospc_runs(payload: dict) -> list:
    """tests._dist.train_runs with rank 0's optimizer.pt write failing with ENOSPC (a full disk on one rank)."""
    import errno

    import torch

    from tests._dist import train_runs

    if int(os.environ.get("RANK", 0)) == 0:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.pt") and "step_00000004" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    return train_runs(payload)
