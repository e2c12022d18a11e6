"""Small filesystem rules every writer follows: durable renames, file digests, outputs that never
remove an input, and permissions from the umask.

- `fsync_file(path)` / `fsync_dir(path)`: flush a file's data (or a folder's entries) to the disk, so a
  rename that follows cannot publish truncated files after a power loss.
- `atomic_write(path, data, durable=False)`: the one atomic write (temporary sibling, rename; `durable` fsyncs).
- `file_sha256(path)`: sha256 of a file (tokenizers, manifests).
- `digest(path)`: (size, xxh64 hex) of a file, read in 4 MiB blocks; `digest_files(root, rels)` many at once,
  on a few threads (file reads and xxhash run outside the GIL). `bytes_hashed()` counts what this process
  hashed (the checkpoint tests compare it with what each rank wrote and read).
- `check_output(out, inputs, flag)`: refuse an output that would remove (with --overwrite) or write into
  one of the command's inputs: a path that equals, contains or lies inside an input.
- `umask_mode(dir=True)`: the mode a plain `mkdir` / `open` would give, for folders made by `mkdtemp`
  (always 0700) that become a published output.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from mmscale.errors import UserError

BLOCK = 1 << 22


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not sync folders; the files themselves are synced
        pass
    finally:
        os.close(fd)


_HASHED = [0]  # bytes digest() read in this process
_HASHED_LOCK = threading.Lock()


def bytes_hashed() -> int:
    """Bytes `digest` has read in this process so far."""
    return _HASHED[0]


def digest(path: str | os.PathLike, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, xxh64 hex digest) of a file; `sync` also fsyncs it (one pass over the data)."""
    h = xxhash.xxh64()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
            size += len(block)
        if sync:
            os.fsync(f.fileno())
    with _HASHED_LOCK:
        _HASHED[0] += size
    return size, h.hexdigest()


def digest_files(root: str | os.PathLike, rels, sync: bool = False, threads: int = 4) -> dict:
    """{rel: {"size": bytes, "xxh64": hex}} of the files `root/rel`, hashed on up to `threads` threads (one file
    each); `sync` also fsyncs every file. The first OSError is raised."""
    rels = list(rels)
    if not rels:
        return {}

    def one(rel):
        return rel, digest(Path(root) / rel, sync=sync)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rels)))) as pool:
        return {rel: {"size": size, "xxh64": xxh} for rel, (size, xxh) in pool.map(one, rels)}


def usable_cpus(share: int = 1) -> int:
    """The cores this process may run on (its affinity mask: a SLURM step's or a container's share, not the
    machine's count), divided evenly among `share` processes that run at once; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, share))


def atomic_write(path: str | os.PathLike, data: str | bytes, durable: bool = False) -> None:
    """The one atomic write: `data` (text or bytes) goes to a temporary sibling that is renamed over `path`, so a
    reader sees the old file or the new one, never a torn one. `durable` also fsyncs the file before the rename
    and the folder after it (what survives a power loss: checkpoints' meta and `latest`)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # renaming over /dev/null or a FIFO would replace the node itself
        raise UserError(f"'{path}' is {'a folder' if path.is_dir() else 'a special file (device, FIFO or socket)'}, "
                        "not a file; give a file path to write to")
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}.{threading.get_ident()}")  # unique per writer
    try:
        with (open(tmp, "wb") if isinstance(data, bytes) else open(tmp, "w", encoding="utf-8")) as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (tokenizer identity, export and dataset manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolved_path(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.realpath(p)))


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when a equals b, contains b or lies inside b (after resolving links)."""
    ra, rb = resolved_path(a), resolved_path(b)
    return ra == rb or ra in rb.parents or rb in ra.parents


def check_output(out: str | os.PathLike, inputs, flag: str = "--out") -> None:
    """Refuse an output that equals, contains or lies inside one of `inputs` (local paths; others ignored)."""
    for inp in inputs:
        if not inp or "://" in str(inp) or str(inp).startswith("hf:"):
            continue
        if overlaps(out, inp):
            raise UserError(f"{flag} '{out}' overlaps the input '{inp}' (the same path, inside it or around it); "
                            f"writing or --overwrite there could destroy the input: choose another {flag}", 2)


def umask_mode(directory: bool = True) -> int:
    """The permission bits a new folder (0777) or file (0666) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask_tree(root: str | os.PathLike) -> None:
    """chmod a folder made by mkdtemp (0700) and what is in it to what the umask gives plain files."""
    root = Path(root)
    dmode, fmode = umask_mode(True), umask_mode(False)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, dmode)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, fmode)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (the liveness test of every lock file's owner: the run dir's
    lock, the streaming loader's lock owners, the launcher's). A process of another user, or a pid beyond the
    kernel's range, counts as alive: a lock is never taken over on a guess."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
