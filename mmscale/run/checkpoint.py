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
     "engine": "single" | "ddp" | "deepspeed" | "fsdp", "precision": "bf16" | "fp32",
     "world_size": int, "micro_batch_size": int, "model_format": "torch" | "deepspeed" | "dcp",
     the engine's own keys (only the engine that writes them reads them; deepspeed: "zero_stage": int,
     "ds_bf16": bool),
     "model_files": [relative paths], "optimizer_files": [...], "rank_files": [...],
     "config": {the full resolved config, as config.yaml}, "model": {the ModelConfig fields},
     "files": {relative path: {"size": bytes, "xxh64": hex digest}} of every other file in the folder,
     "saved_at": ISO time}

Durability and damage: every file is fsynced (and hashed) before meta.json is written, meta.json before the
folder is renamed, the folder's parent before `latest` moves. `run.resume=auto` verifies sizes and digests of
the newest checkpoint and, when it is damaged, says so in one line and falls back to the newest intact one;
an explicit `run.resume=PATH` to a damaged one is a one-line error. Checkpoints without "files" (older
mmscale) are checked for presence only.

Cost, independent of the rank count (issue 24). Each file belongs to the rank that writes it (`writer`: its
rank_NNNNN.pt, its DCP shard `__R_*.distcp`, its DeepSpeed partition `*zero_pp_rank_R_*`; every other file,
e.g. model.pt, DCP's .metadata, DeepSpeed's mp_rank_00_model_states.pt, to rank 0). At save each rank hashes
and fsyncs only the files it wrote, on a few threads, and rank 0 gathers the digests into meta.json: a rank
reads back what it wrote, once. At resume each rank stats every file (sizes, no reads) and hashes only the
files it reads: its own files and the files of the whole checkpoint (`reads`; when the world size changed,
the per-rank files are dealt out over the ranks so that each is still hashed once); the ranks then agree
(one all-reduce) before loading, and `auto` falls back together. So a rank reads at save the bytes it
wrote, and at resume the bytes it loads, never N x the checkpoint.

Loading runs no code: rank files hold only tensors, numbers and strings and are read with
`torch.load(weights_only=True)`; DeepSpeed and DCP files are read under `safe_unpickling()`, which allows
only the classes those formats need (checkpoint_format.ALLOWED_GLOBALS). `latest` must name a step_XXXXXXXX
folder beside it.

Parameter names are those of the unwrapped model (no "module." or "_orig_mod." prefixes). The
learning rate is a pure function of the step, so no scheduler state is stored.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmscale import distributed, fsutil
from mmscale.checkpoint_format import (FORMAT, META, checkpoints_root, pickle_problem, read_meta, safe_unpickling,
                                       unsafe_payload_error)
from mmscale.engines import engine_class
from mmscale.errors import UserError

try:  # what old rank files' numpy arrays unpickle through
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

VERSION = 1
LATEST = "latest"
TMP_PREFIX = ".tmp_"
STEP_RE = re.compile(r"^step_\d{8}$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _write_text_atomic(path: Path, text: str) -> None:
    fsutil.atomic_write(path, text, durable=True)


def list_complete(root: Path) -> list[Path]:
    """Complete step folders (with meta.json), oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / META).is_file()]
    return sorted(dirs, key=lambda p: p.name)


def find_latest(root: Path) -> Path | None:
    """The newest complete step folder. The folder's rename is the commit: `latest` names the same folder,
    or an older one when a save was cut off between the rename and the pointer's update."""
    complete = list_complete(root)
    if complete:
        return complete[-1]
    name = read_latest(root)
    return root / name if name is not None and (root / name / META).is_file() else None


def read_latest(root: Path) -> str | None:
    """The folder name in `latest`, or None when there is none or it does not name a step folder beside it
    (a pointer never leads outside its checkpoints/ folder)."""
    pointer = root / LATEST
    try:
        name = pointer.read_text(errors="replace").strip()
    except OSError:
        return None
    return name if STEP_RE.match(name) else None


_RANK_FILE = (re.compile(r"^rank_(\d+)\.pt$"), re.compile(r"^__(\d+)_\d+\.distcp$"),
              re.compile(r"(?:^|_)zero_pp_rank_(\d+)_"))


def file_rank(rel: str) -> int | None:
    """The rank a per-rank file belongs to (rank_NNNNN.pt, a DCP shard `__R_I.distcp`, a DeepSpeed ZeRO partition
    `*zero_pp_rank_R_*`), or None for a file of the whole checkpoint."""
    name = rel.rsplit("/", 1)[-1]
    for pattern in _RANK_FILE:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return None


def writer(rel: str, world_size: int) -> int:
    """The rank that wrote `rel` at save (rank 0 for the files of the whole checkpoint)."""
    r = file_rank(rel)
    return r if r is not None and 0 <= r < world_size else 0


def reads(rels, rank: int, world_size: int, saved_world_size: int | None) -> list[str]:
    """The files of a checkpoint (relative paths) that `rank` of `world_size` verifies at resume: the files of the
    whole checkpoint (every rank loads them) and its own per-rank files; written by another world size, the
    per-rank files dealt out over the ranks (each verified by one rank)."""
    rels = sorted(rels)
    own = [r for r in rels if file_rank(r) is not None]
    if saved_world_size == world_size:
        mine = {r for r in own if file_rank(r) == rank}
    else:
        mine = {r for i, r in enumerate(own) if i % world_size == rank}
    return [r for r in rels if file_rank(r) is None or r in mine]


def verify(step_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, digests: bool = True) -> str | None:
    """None when the checkpoint is intact, else what is wrong (one phrase): meta.json, then the size of every
    file it lists and the xxh64 digest of those this rank reads at resume (`reads`; every file for one rank;
    none with digests=False) (presence only for checkpoints written before digests)."""
    step_dir = Path(step_dir)
    try:
        meta = json.loads((step_dir / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{META} is missing or not valid JSON"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{META} is not an mmscale checkpoint's"
    files = meta.get("files")
    if files is None:  # older mmscale: presence only
        for rel in meta.get("model_files", []) + meta.get("optimizer_files", []) + meta.get("rank_files", []):
            if not (step_dir / str(rel)).exists():
                return f"'{rel}' is missing"
        return None
    if not isinstance(files, dict):
        return f"{META} has a bad file list"
    for rel, info in files.items():  # every rank: presence and sizes (stat only)
        p = step_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(info, dict):
            return f"{META} lists a bad path '{rel}'"
        if not p.is_file():
            return f"'{rel}' is missing"
        try:
            size = p.stat().st_size
        except OSError as e:
            return f"'{rel}' cannot be read ({e.strerror})"
        if size != info.get("size"):
            return f"'{rel}' has {size} bytes, {info.get('size')} were written"
    if not digests:
        return None
    saved = meta.get("world_size") if isinstance(meta.get("world_size"), int) else None
    mine = reads(files, rank, world_size, saved)
    try:
        got = fsutil.digest_files(step_dir, mine)
    except OSError as e:
        return f"a file cannot be read ({e.strerror}: {e.filename})"
    for rel in mine:
        if got[rel]["xxh64"] != files[rel].get("xxh64"):
            return f"'{rel}' does not match its checksum (bit rot or an overwrite)"
    return None


def verify_or_raise(step_dir: str | os.PathLike, digests: bool = True) -> None:
    problem = verify(step_dir, digests=digests)
    if problem:
        raise UserError(f"checkpoint '{step_dir}' is damaged or incomplete: {problem}; resume or convert from an "
                        "earlier step folder (run.resume=PATH)")


def resolve_resume(cfg: Any, announce: bool = True, digests: bool = True) -> Path | None:
    """The checkpoint to resume from per `run.resume`, or None for a fresh start.

    Refuses (UserError) a `never` start in a run dir that already holds checkpoints, so no
    checkpoint of an earlier run is ever overwritten or deleted. `auto` takes the newest intact
    checkpoint (a damaged newer one is named in one line on stderr when `announce`); an explicit
    path must be intact. digests=False checks presence and sizes only (several ranks: each verifies the
    digests of what it reads later, together, in Checkpointer.restore).
    """
    root = checkpoints_root(cfg.run.dir)
    mode = cfg.run.resume
    if mode == "never":
        if list_complete(root):
            raise UserError(f"run.dir '{cfg.run.dir}' already holds checkpoints and run.resume=never; "
                            "choose a new run.dir or set run.resume=auto to continue")
        return None
    if mode == "auto":
        return newest_intact(root, announce, digests)
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"run.resume: checkpoint '{mode}' does not exist; use auto, never or a step_XXXXXXXX folder")
    if not (path / META).is_file() and (path / LATEST).is_file():
        name = read_latest(path)  # a checkpoints/ folder: take its latest
        if name is None:
            raise UserError(f"run.resume: '{path / LATEST}' does not name a step_XXXXXXXX folder beside it; "
                            "point run.resume at a step folder")
        path = path / name
    if (path / META).is_file():
        verify_or_raise(path, digests=digests)
    return path


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoint `latest` names (else the newest complete one), then the older complete ones, newest first."""
    first = find_latest(root)
    if first is None:
        return []
    return [first] + [p for p in reversed(list_complete(root)) if p != first]


def newest_intact(root: Path, announce: bool = True, digests: bool = True) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, skipping damaged ones (each named in
    one line on stderr). UserError when every checkpoint is damaged."""
    candidates = resume_candidates(root)
    if not candidates:
        return None
    damaged = []
    for path in candidates:
        problem = verify(path, digests=digests)
        if problem is None:
            if damaged and announce:
                print(f"mmscale train: warning: checkpoint '{damaged[0][0]}' is damaged ({damaged[0][1]}); "
                      f"resuming from '{path}'" + (f" ({len(damaged)} damaged skipped)" if len(damaged) > 1 else ""),
                      file=sys.stderr, flush=True)
            return path
        damaged.append((path, problem))
    raise UserError(f"every checkpoint in '{root}' is damaged (newest: '{damaged[0][0]}': {damaged[0][1]}); "
                    "move them away to start afresh, or point run.resume at a folder you trust")


def check_compatible(meta: dict, cfg: Any, world_size: int, where: str) -> None:
    """Refuse to resume a checkpoint made for another model; the engine of this run decides the rest (family,
    precision, its own keys such as DeepSpeed's ZeRO stage and world size: Engine.check_resume)."""
    here = asdict(cfg.model)
    there = meta.get("model", {})
    diffs = [k for k in here if k in there and there[k] != here[k]]
    if diffs:
        k = diffs[0]
        raise UserError(f"{where} holds checkpoints of a different model (model.{k} is {there[k]!r} there, "
                        f"{here[k]!r} here); choose another run.dir or match the model config")
    engine_class(cfg.engine.kind).check_resume(meta, cfg, world_size, where)


def prepare_tmp_dir(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary folder for the checkpoint of `step` (removes a stale one)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def saved_files(tmp: Path) -> list[str]:
    """Every file of a checkpoint folder but meta.json (relative posix paths, sorted)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(tmp).as_posix()
            if rel != META:
                out.append(rel)
    return sorted(out)


def hash_own_files(tmp: Path, rank: int, world_size: int) -> dict:
    """Every rank, after all ranks wrote into `tmp`: digests of the files this rank wrote (`writer`), each fsynced
    by the rank that wrote it, on a few threads."""
    return fsutil.digest_files(tmp, [r for r in saved_files(tmp) if writer(r, world_size) == rank], sync=True)


def finalize(root: Path, tmp: Path, step: int, meta: dict, keep: int, digests: dict | None = None) -> Path:
    """Rank 0, after every rank has written its files into `tmp`: meta.json with the digests of every file
    (`digests`: those the ranks computed of their own files; any file they miss is hashed and fsynced here),
    rename, `latest`, retention."""
    digests = dict(digests or {})
    rels = saved_files(tmp)
    digests.update(fsutil.digest_files(tmp, [r for r in rels if r not in digests], sync=True))
    files = {rel: digests[rel] for rel in rels}
    for dirpath, _, _ in os.walk(tmp):
        fsutil.fsync_dir(dirpath)
    meta = {"format": FORMAT, "version": VERSION, **meta, "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_text_atomic(tmp / META, json.dumps(meta, indent=1, sort_keys=False) + "\n")
    final = root / step_dir_name(step)
    if final.exists():
        if verify(final) is None:
            # never overwrite a checkpoint: the same step saved twice (e.g. a resume at the last step)
            shutil.rmtree(tmp)
            if read_latest(root) != final.name and list_complete(root)[-1] == final:
                _write_text_atomic(root / LATEST, final.name + "\n")  # a save cut off before `latest` moved
            return final
        # a damaged checkpoint of this step (resume fell back past it): keep it aside, publish the new one
        os.replace(final, root / f".damaged_{final.name}.{int(time.time())}")
    os.replace(tmp, final)
    fsutil.fsync_dir(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    for old in list_complete(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for pattern in (f"{TMP_PREFIX}step_*", ".reshard_step_*"):  # left by a save or an elastic resume cut off
        for stale in root.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return final


class Checkpointer:
    """The whole checkpoint protocol of one run, for every rank: find what to resume, restore it, save.

    The engine writes and reads its own files (Engine.save / Engine.load); this class owns everything
    around them: the temporary folder, the per-rank RNG and data state, agreeing across ranks that every
    part was written, meta.json, the atomic rename, `latest`, retention and a full disk.
    """

    def __init__(self, cfg: Any, info: Any):
        self.cfg, self.info = cfg, info
        self.root = checkpoints_root(cfg.run.dir)

    def find(self) -> tuple[Path | None, dict | None]:
        """(the step folder to resume per run.resume, its meta) or (None, None); refuses an incompatible one.
        One rank verifies digests here; several ranks check sizes here, digests in restore (together)."""
        step_dir = resolve_resume(self.cfg, announce=self.info.rank == 0, digests=self.info.world_size == 1)
        if step_dir is None:
            return None, None
        meta = read_meta(step_dir)
        where = f"run.dir '{self.cfg.run.dir}'" if self.cfg.run.resume == "auto" else f"checkpoint '{step_dir}'"
        check_compatible(meta, self.cfg, self.info.world_size, where)
        return step_dir, meta

    def latest(self) -> Path | None:
        return find_latest(self.root)

    def agree_intact(self, engine, step_dir: Path, meta: dict) -> tuple[Path, dict]:
        """Several ranks: each verifies the digests of the files it reads (`reads`), and all agree (one all-reduce
        per checkpoint tried) on the first one intact for every rank: `step_dir` itself, or with run.resume=auto
        the next older intact one (named in one line by rank 0). Returns it and its meta."""

        if self.info.world_size == 1:
            return step_dir, meta  # (verified whole in find)
        auto = self.cfg.run.resume == "auto"
        candidates = [step_dir] + ([p for p in resume_candidates(self.root) if p.name < step_dir.name] if auto else [])
        damaged = []
        for path in candidates:
            problem = verify(path, self.info.rank, self.info.world_size)
            n_bad = distributed.ranks_flagging(problem is not None, engine.device)
            if n_bad == 0:
                if damaged and self.info.rank == 0:
                    print(f"mmscale train: warning: checkpoint '{damaged[0][0]}' is damaged (a file failed its "
                          f"check on {damaged[0][1]} rank(s)); resuming from '{path}'"
                          + (f" ({len(damaged)} damaged skipped)" if len(damaged) > 1 else ""),
                          file=sys.stderr, flush=True)
                return path, (meta if path == step_dir else read_meta(path))
            if not auto:
                raise UserError(f"checkpoint '{path}' is damaged or incomplete: "
                                f"{problem or f'a file another rank reads failed its check ({n_bad} rank(s))'}; "
                                "resume or convert from an earlier step folder (run.resume=PATH)")
            damaged.append((path, n_bad))
        raise UserError(f"every checkpoint in '{self.root}' is damaged (newest: '{damaged[0][0]}'); move them away to "
                        "start afresh, or point run.resume at a folder you trust")

    def restore(self, engine, step_dir: Path, meta: dict, loader) -> tuple[int, int]:
        """Load the engine's files, this rank's RNG and the loader's position; returns (step, tokens seen).
        With several ranks the digests of what each rank reads are checked first (agree_intact)."""
        step_dir, meta = self.agree_intact(engine, step_dir, meta)
        try:
            with safe_unpickling():  # DeepSpeed and DCP unpickle: only allow-listed classes
                engine.load(step_dir)
        except BaseException as e:  # DCP wraps rank failures in a BaseException (CheckpointException)
            if isinstance(e, pickle.UnpicklingError) or "Unsupported global" in str(e):
                raise unsafe_payload_error(step_dir, e) from None
            raise
        state = load_rank_state(step_dir, self.info.rank, self.info.world_size, meta)
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        if state["data"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["data"])
        return meta["step"], meta["tokens_seen"]

    def save(self, engine, step: int, tokens: int, loader) -> Path:
        """Every rank: write the checkpoint of `step`; returns its folder. A full disk is one line that says
        whether the previous checkpoint is intact; nothing complete is ever overwritten."""
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        try:
            return self._save(engine, tmp, step, tokens, loader)
        except (OSError, RuntimeError) as e:
            if not self._no_space(e):
                raise
            if self.info.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            need = self._bytes_needed(engine)
            free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
            last = self.latest()
            raise UserError(f"no space left on device writing checkpoint '{tmp}' (needs about {need:,} bytes, "
                            f"{free:,} free); free space or move run.dir; "
                            f"{f'the previous checkpoint {last} is intact' if last else 'no checkpoint was saved'}"
                            ) from None

    def _save(self, engine, tmp: Path, step: int, tokens: int, loader) -> Path:

        info, cfg = self.info, self.cfg
        if info.rank == 0:
            prepare_tmp_dir(self.root, step)
        distributed.barrier(engine.device)
        failure, files = None, {}
        try:
            files = engine.save(tmp)  # its file lists and its own meta keys
            save_rank_state(tmp, info.rank, loader.state_dict() if hasattr(loader, "state_dict") else None)
        except (OSError, RuntimeError) as e:
            failure = e
        self._agree_saved(failure, engine)  # (a barrier that also tells every rank whether a write failed)
        digests = {}
        try:  # each rank hashes and fsyncs what it wrote, in parallel with the others
            digests = hash_own_files(tmp, info.rank, info.world_size)
        except OSError as e:
            failure = e
        self._agree_saved(failure, engine)
        digests = _gather_to_rank0(digests, info)
        final = self.root / step_dir_name(step)
        if info.rank == 0:
            meta = {"step": step, "tokens_seen": tokens, "engine": engine.kind, "precision": cfg.engine.precision,
                    "world_size": info.world_size, "micro_batch_size": cfg.train.micro_batch_size,
                    "model_format": engine.model_format, **files,
                    "rank_files": [rank_file_name(r) for r in range(info.world_size)],
                    "config": cfg.to_dict(), "model": cfg.to_dict()["model"]}
            try:
                final = finalize(self.root, tmp, step, meta, cfg.checkpoint.keep, digests)
            except (OSError, RuntimeError) as e:
                failure = e
        self._agree_saved(failure, engine)
        return final

    def _agree_saved(self, failure, engine) -> None:
        """Every rank learns whether any rank failed to write its part: the failing rank raises its error (a full
        disk becomes one line in save), the others stop with one line too, rather than waiting in the next
        collective."""

        n_failed = distributed.ranks_flagging(failure is not None, engine.device)
        if failure is not None:
            raise failure
        if n_failed:
            last = self.latest()
            raise UserError(f"saving the checkpoint failed on {n_failed} other rank(s) (see rank 0's message); "
                            f"{f'the previous checkpoint {last} is intact' if last else 'no checkpoint was saved'}")

    def _no_space(self, e: BaseException) -> bool:
        if isinstance(e, OSError):
            return e.errno == errno.ENOSPC
        text = str(e)
        return "No space left" in text or ("write failed" in text and self.root.is_dir()
                                           and shutil.disk_usage(self.root).free < (1 << 26))

    def _bytes_needed(self, engine) -> int:
        """The size of the newest checkpoint, else weights + two AdamW moments in fp32."""
        last = self.latest()
        if last is not None:
            return sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
        try:
            return 12 * sum(p.numel() for p in engine.module().parameters())
        except Exception:
            return 0


def _gather_to_rank0(digests: dict, info: Any) -> dict:
    """Rank 0: the union of every rank's digests (small: one entry per file); other ranks: their own."""
    if info.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return digests
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, digests)
    merged = {}
    for part in parts:
        merged.update(part or {})
    return merged


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_to_plain(state: dict) -> dict:
    """RNG states as tensors, numbers and strings only (what torch.load(weights_only=True) reads)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"torch": state["torch"],
           "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                      "gauss": gauss},
           "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_plain(state: dict) -> dict:
    if isinstance(state.get("python"), tuple):  # an old rank file: already in Python/numpy form
        return state
    py, npy = state["python"], state["numpy"]
    out = {"torch": state["torch"],
           "python": (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]),
           "numpy": (npy["name"], np.asarray(npy["keys"].numpy(), dtype=np.uint32), npy["pos"],
                     npy["has_gauss"], npy["cached_gaussian"])}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def save_rank_state(step_dir: Path, rank: int, data_state: Any) -> None:
    torch.save({"format": "mmscale-rank", "version": 2, "rng": _rng_to_plain(rng_state()), "data": data_state},
               step_dir / rank_file_name(rank))


def _load_rank_file(path: Path) -> dict:
    """A rank file, read without running code: weights_only, plus numpy's array types for files written
    before version 2 (rank files then held numpy RNG state as arrays)."""
    allowed = [np.ndarray, np.dtype, type(np.dtype("uint32")), _np_reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"rank file '{path}' holds objects that are not plain data ({pickle_problem(e)}); "
                        "refused, it could run code: resume from a checkpoint you trust") from None
    except Exception as e:
        raise UserError(f"rank file '{path}' cannot be read ({type(e).__name__}); the checkpoint is damaged: "
                        "resume from an earlier step folder (run.resume=PATH)") from None
    if not isinstance(state, dict) or "data" not in state or "rng" not in state:
        raise UserError(f"rank file '{path}' is not an mmscale rank state; resume from an earlier step folder")
    return state


def load_rank_state(step_dir: Path, rank: int, world_size: int, meta: dict) -> dict:
    """This rank's RNG + data state. On another world size: rank 0's data state, no RNG."""
    if meta.get("world_size") == world_size:
        state = _load_rank_file(step_dir / rank_file_name(rank))
        return {"rng": _rng_from_plain(state["rng"]), "data": state["data"]}
    state = _load_rank_file(step_dir / rank_file_name(0))
    return {"rng": None, "data": state["data"]}
