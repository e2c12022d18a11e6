"""A run directory belongs to one run: an ownership check (our marker) and an exclusive lock.

- `check_owned(run_dir)`: a folder that does not exist or is empty is free; one holding `.mmscale-run` (our marker),
  or written by an older mmscale (a `checkpoints/` with a checkpoint of ours, or a `config.yaml` that is a full
  mmscale config dump) is a run; any other non-empty folder is refused in one line, before anything is written.
- `write_marker(run_dir)`: rank 0 writes the marker once the run starts (resumes of old runs get one too).
- `RunLock(run_dir).acquire()`: `.mmscale-lock` in the run dir, held for the whole run by one process (rank 0).
  The file holds host, pid, SLURM job id and start time and is flock()ed while the run lives, so the kernel
  releases it when the holder dies, even by SIGKILL. What the next run finds:
    * flock refused: a live run holds it -> one line naming host, pid and job, nothing changed;
    * a record with no flock held, from this host (or from an earlier attempt of this SLURM job): the holder
      died -> taken over with one printed line;
    * a record from another host where the filesystem does not give locks across hosts (flock unsupported, or
      the record's process cannot be checked): refused, naming the holder and how to clear the lock (delete the
      file once that run is gone).
  `release()` removes the file (then unlocks); it runs on normal exit, on errors and on SIGINT/SIGTERM (the CLI
  turns both into an exception, so `finally` blocks run).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mmscale.config import load_yaml_file
from mmscale.errors import UserError
from mmscale.fsutil import atomic_write, pid_alive

MARKER = ".mmscale-run"
LOCK = ".mmscale-lock"
# names mmscale itself may leave in a run dir before its first run starts (lock, write probe, launch's job folder)
_OURS_BEFORE_START = {MARKER, LOCK, "submitit", "slurm-logs"}  # (slurm/pretrain.sh links its log first)
_CONFIG_SECTIONS = {"model", "data", "train", "engine", "checkpoint", "run", "log"}


# ----------------------------------------------------------------------------------------------
# ownership

def _is_legacy_run(run_dir: Path) -> bool:
    """A run dir written by an mmscale that had no marker: a checkpoint of ours or config.yaml as mmscale dumps it."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        if (root / "latest").is_file():
            return True
        for meta in root.glob("step_*/meta.json"):
            try:
                if json.loads(meta.read_text(errors="replace")[:1 << 20]).get("format") == "mmscale-checkpoint":
                    return True
            except (OSError, ValueError, AttributeError):
                continue
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            data = load_yaml_file(cfg)
        except UserError:
            return False
        # mmscale writes every section with every key (Config.to_yaml); a hand-written config names a few
        return (isinstance(data, dict) and _CONFIG_SECTIONS <= set(data)
                and all(isinstance(data[s], dict) for s in _CONFIG_SECTIONS)
                and {"dir", "seed", "resume"} <= set(data["run"]) and {"kind", "n_ctx", "d_model"} <= set(data["model"]))
    return False


def is_run(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file() or _is_legacy_run(run_dir)


def check_owned(run_dir: str | os.PathLike) -> None:
    """Refuse a non-empty run.dir that is not an mmscale run (read-only: safe on every rank)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return  # does not exist yet (check_run_dir_possible refuses a file there)
    try:
        entries = [p.name for p in run_dir.iterdir()]
    except OSError as e:
        raise UserError(f"run.dir '{run_dir}' cannot be listed ({e.strerror}); choose another run.dir") from None
    foreign = [n for n in entries if n not in _OURS_BEFORE_START and not n.startswith(".write_test.")]
    if not foreign or is_run(run_dir):
        return
    shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
    raise UserError(f"run.dir '{run_dir}' is not empty ({shown}) and is not an mmscale run (no {MARKER}, "
                    "checkpoints or config.yaml of ours); choose a new or empty run.dir", 2)


def write_marker(run_dir: str | os.PathLike) -> None:
    p = Path(run_dir) / MARKER
    if p.is_file():
        return
    atomic_write(p, json.dumps({"format": "mmscale-run", "version": 1,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


# ----------------------------------------------------------------------------------------------
# the lock

def _job_id() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def describe(rec: dict) -> str:
    job = f", SLURM job {rec['job']}" if rec.get("job") else ""
    since = f", since {rec['started']}" if rec.get("started") else ""
    return f"host {rec.get('host', '?')} pid {rec.get('pid', '?')}{job}{since}"


class RunLock:
    """The run dir's exclusive lock (see the module docstring). One per run, taken by rank 0."""

    def __init__(self, run_dir: str | os.PathLike, prog: str = "mmscale train"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.prog = prog
        self.fd: int | None = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _refuse(self, rec: dict, why: str) -> UserError:
        return UserError(f"run.dir '{self.run_dir}' is in use by another run ({describe(rec)}){why}; wait for it to "
                         "end or choose another run.dir", 1)

    def acquire(self) -> "RunLock":
        for _ in range(20):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            flock_ok = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    rec = self._read(fd)
                    os.close(fd)
                    raise self._refuse(rec, "") from None
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise UserError(f"cannot lock run.dir '{self.run_dir}' ({e.strerror}); choose another run.dir") from None
                flock_ok = False  # a filesystem without flock: the record alone says who holds it
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (removed) it between our open and flock: open the new one
                os.close(fd)
                continue
            rec = self._read(fd)
            if rec:
                try:
                    self._judge(rec, flock_ok)
                except UserError:
                    os.close(fd)
                    raise
            self._write(fd)
            self.fd = fd
            return self
        raise UserError(f"cannot lock run.dir '{self.run_dir}': its lock file keeps changing; another run is "
                        "starting there: choose another run.dir")

    def _judge(self, rec: dict, flock_ok: bool) -> None:
        """A record left in the file. Take it over (one line) when its holder is gone; else refuse."""
        host, me = rec.get("host"), self.record
        pid = rec.get("pid") if isinstance(rec.get("pid"), int) else None
        same_job = bool(me["job"]) and rec.get("job") == me["job"]
        if host == me["host"]:
            if pid == os.getpid():
                return  # (this very process: a leftover of an earlier in-process run)
            if not flock_ok and pid is not None and pid_alive(pid) and not same_job:
                raise self._refuse(rec, "")
            what = "no longer runs" if pid is None or not pid_alive(pid) else "holds no lock on it"
        elif same_job:
            what = "was an earlier attempt of this SLURM job"
        elif flock_ok and os.environ.get("MMSCALE_TRUST_FLOCK") == "1":
            what = "holds no lock on it (MMSCALE_TRUST_FLOCK=1: this filesystem's locks reach every host)"
        else:
            raise UserError(f"run.dir '{self.run_dir}' is locked by a run on another host ({describe(rec)}), which "
                            f"cannot be checked from {me['host']}; if that run has ended, delete "
                            f"'{self.path}' and run again", 1)
        print(f"{self.prog}: note: taking over the lock of run.dir '{self.run_dir}' left by {describe(rec)}, "
              f"which {what}", file=sys.stderr)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 1 << 16)
        except OSError:
            return {}
        if not raw.strip():
            return {}
        try:
            rec = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            return {"host": "?", "pid": None}
        return rec if isinstance(rec, dict) else {"host": "?", "pid": None}

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(self.record) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # while still holding the flock: a waiter then retries on a new file
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
