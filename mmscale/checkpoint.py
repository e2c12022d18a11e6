"""Run-directory checkpoints: atomic step folders, a `latest` pointer, retention, resume checks.

Layout (format "mmscale-checkpoint", version 1; every path below is relative to `run.dir`):

    config.yaml                    the fully resolved config of the run (written at start)
    metrics.jsonl, loss_curve.png, wandb/, train.log
    checkpoints/
      latest                       one line, e.g. "step_00000300": the newest complete checkpoint.
                                   Written last (temporary file, then rename), after the step folder.
      step_00000300/               one folder per saved step (8 digits), renamed from .tmp_step_00000300
        meta.json                  written last inside the folder (see below)
        rank_00000.pt ...          per rank: {"rng": {torch, cuda, python, numpy}, "data": loader state_dict}
        -- engine files, by meta["model_format"] --
        "torch"     (single, ddp): model.pt      full fp32 state dict of the model (plain parameter names)
                                   optimizer.pt  torch.optim.AdamW state_dict
        "deepspeed" (deepspeed):   ds/           DeepSpeed `save_checkpoint(step_dir, tag="ds")`:
                                                 mp_rank_00_model_states.pt, *_optim_states.pt;
                                   full fp32 weights without a process group:
                                   deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                                       step_dir, tag="ds")
        "dcp"       (fsdp):        model/        torch.distributed.checkpoint of the model state dict
                                                 (plain parameter names, full unsharded values);
                                                 without a process group:
                                                 torch.distributed.checkpoint.format_utils.dcp_to_torch_save(
                                                     step_dir / "model", "model.pt")
                                   optimizer/    DCP of the optimizer state (get_optimizer_state_dict)
      .tmp_step_XXXXXXXX/          a save in progress or interrupted; never read, removed by the next save

meta.json:
    {"format": "mmscale-checkpoint", "version": 1, "step": int, "tokens_seen": int,
     "engine": "single" | "ddp" | "deepspeed" | "fsdp", "zero_stage": int, "precision": "bf16" | "fp32",
     "world_size": int, "model_format": "torch" | "deepspeed" | "dcp",
     "model_files": [relative paths], "optimizer_files": [...], "rank_files": [...],
     "config": {the full resolved config, as config.yaml}, "model": {the ModelConfig fields},
     "saved_at": ISO time}

Parameter names are those of the unwrapped model (no "module." or "_orig_mod." prefixes). The
learning rate is a pure function of the step, so no scheduler state is stored.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mmscale.errors import UserError

FORMAT = "mmscale-checkpoint"
VERSION = 1
META = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp_"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_complete(root: Path) -> list[Path]:
    """Complete step folders (with meta.json), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file()]
    return sorted(dirs, key=lambda p: p.name)


def find_latest(root: Path) -> Path | None:
    """The checkpoint named by `latest`, or else the newest complete step folder."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META).is_file():
            return candidate
    complete = list_complete(root)
    return complete[-1] if complete else None


def read_meta(step_dir: str | os.PathLike) -> dict:
    """meta.json of a checkpoint folder, after checking that every file it lists exists."""
    step_dir = Path(step_dir)
    meta_path = step_dir / META
    if not meta_path.is_file():
        raise UserError(f"checkpoint '{step_dir}' has no {META} (incomplete or not an mmscale checkpoint); "
                        "point run.resume at a complete step_XXXXXXXX folder")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"checkpoint '{step_dir}/{META}' is not valid JSON; resume from another checkpoint") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"'{step_dir}' is not an mmscale checkpoint (format {meta.get('format')!r})")
    for rel in meta.get("model_files", []) + meta.get("optimizer_files", []) + meta.get("rank_files", []):
        if not (step_dir / rel).exists():
            raise UserError(f"checkpoint '{step_dir}' is missing '{rel}'; it is damaged: "
                            "resume from an earlier step folder (run.resume=PATH)")
    return meta


def resolve_resume(cfg: Any) -> Path | None:
    """The checkpoint to resume from per `run.resume`, or None for a fresh start.

    Refuses (UserError) a `never` start in a run dir that already holds checkpoints, so no
    checkpoint of an earlier run is ever overwritten or deleted.
    """
    root = checkpoints_root(cfg.run.dir)
    mode = cfg.run.resume
    if mode == "never":
        if list_complete(root):
            raise UserError(f"run.dir '{cfg.run.dir}' already holds checkpoints and run.resume=never; "
                            "choose a new run.dir or set run.resume=auto to continue")
        return None
    if mode == "auto":
        return find_latest(root)
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"run.resume: checkpoint '{mode}' does not exist; use auto, never or a step_XXXXXXXX folder")
    if not (path / META).is_file() and (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()  # a checkpoints/ folder: take its latest
    return path


def check_compatible(meta: dict, cfg: Any, world_size: int, where: str) -> None:
    """Refuse to resume a checkpoint made for another model, engine or (where it matters) world size."""
    from dataclasses import asdict

    here = asdict(cfg.model)
    there = meta.get("model", {})
    diffs = [k for k in here if k in there and there[k] != here[k]]
    if diffs:
        k = diffs[0]
        raise UserError(f"{where} holds checkpoints of a different model (model.{k} is {there[k]!r} there, "
                        f"{here[k]!r} here); choose another run.dir or match the model config")
    if meta.get("engine") != cfg.engine.kind:
        same_family = {meta.get("engine"), cfg.engine.kind} <= {"single", "ddp"}
        if not same_family:
            raise UserError(f"{where} was written by engine.kind={meta.get('engine')}, this run uses "
                            f"engine.kind={cfg.engine.kind}; resume with the same engine, or convert it "
                            "with `mmscale convert` and start from the export (train.init_from)")
    if cfg.engine.kind == "deepspeed":
        if meta.get("zero_stage") != cfg.engine.zero_stage:
            raise UserError(f"{where} was written with engine.zero_stage={meta.get('zero_stage')}, this run uses "
                            f"{cfg.engine.zero_stage}; resume with the same ZeRO stage")
        if meta.get("world_size") != world_size:
            raise UserError(f"{where} was written by {meta.get('world_size')} DeepSpeed ranks, this run has "
                            f"{world_size}; resume with the same number of ranks")
    if meta.get("precision") != cfg.engine.precision and cfg.engine.kind in ("deepspeed", "fsdp"):
        raise UserError(f"{where} was written with engine.precision={meta.get('precision')}, this run uses "
                        f"{cfg.engine.precision}; resume with the same precision")


def prepare_tmp_dir(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary folder for the checkpoint of `step` (removes a stale one)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finalize(root: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written its files into `tmp`: meta.json, rename, `latest`, retention."""
    meta = {"format": FORMAT, "version": VERSION, **meta,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_text_atomic(tmp / META, json.dumps(meta, indent=1, sort_keys=False) + "\n")
    final = root / step_dir_name(step)
    if final.exists():
        # never overwrite a checkpoint: the same step saved twice (e.g. a resume at the last step)
        shutil.rmtree(tmp)
        return final
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    for old in list_complete(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}step_*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(step_dir: Path, rank: int, data_state: Any) -> None:
    import torch

    torch.save({"rng": rng_state(), "data": data_state}, step_dir / rank_file_name(rank))


def load_rank_state(step_dir: Path, rank: int, world_size: int, meta: dict) -> dict:
    """This rank's RNG + data state. On another world size: rank 0's data state, no RNG."""
    import torch

    if meta.get("world_size") == world_size:
        return torch.load(step_dir / rank_file_name(rank), weights_only=False)
    state = torch.load(step_dir / rank_file_name(0), weights_only=False)
    return {"rng": None, "data": state["data"]}
