"""The streaming data loader the trainer uses: MDS shards -> batches of token tensors.

    loader = build_dataloader(cfg.data, "train", n_ctx=cfg.model.n_ctx,
                              micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed,
                              rank=rank, world_size=world_size, local_rank=local_rank,
                              local_world_size=local_world_size)
    for batch in loader:          # endless for "train": moves to the next epoch by itself
        loss = model(batch["input_ids"], batch["labels"])
    sd = loader.state_dict()      # put it into the checkpoint (plain ints and strings)
    loader.load_state_dict(sd)    # on resume, before iterating; exact mid-epoch, any world size
    loader.close()                # at shutdown: frees the dataset's /dev/shm segments and lock files

Batches are dicts:
  packed  {"input_ids": Long[B, n_ctx] = window[:, :-1], "labels": Long[B, n_ctx + 1] = window}
  padded  {"input_ids": Long[B, n_ctx] (pads = the pad id), "labels": Long[B, n_ctx] (pads = -100)}
which is what the models' `forward(input_ids, labels)` takes (see ARCHITECTURE.md).

Where the data comes from: `data.train` names a prepared dataset (the output of `mmscale prepare`);
split "train" reads its `train/` shards, split "val" the `val/` shards of `data.val` if set, else of
`data.train`. A dataset is read in place when it is a local directory and `data.cache_dir` is
empty (zstd shards are decompressed next to themselves, so the directory must be writable);
otherwise it is treated as a mosaicml-streaming remote (s3://, gs://, ... or a local path) and
copied into `data.cache_dir/<hash of the remote>/<hash of its manifest>/` (a dataset prepared again
at the same remote gets a fresh cache). Cloud remotes need streaming's client for the scheme
(boto3 for s3://, google-cloud-storage for gs://), which `tools/setup_env.sh` does not install.

Order: mosaicml-streaming shuffles with `shuffle_seed = seed` and `num_canonical_nodes =
data.num_canonical_nodes`; the global sample order then depends only on those (and, with several
canonical nodes, on the global batch size), not on the number of ranks: sample j of batch i on
rank r is global position i*W*B + j*W + r. So a run resumed onto another world size continues the same
sequence (tests/test_loader.py checks 1, 2 and 2 -> 1 ranks). Ranks get disjoint samples (an
uneven epoch end repeats a few samples on some ranks; the train loader drops the last incomplete
batch so every batch has B samples).

mosaicml-streaming reads the world from RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; this
module sets them from its arguments through mmscale.distributed.enter_world_env (and refuses values that
contradict ones already set), and the last loader to close gives the caller's environment back.

Many jobs and nodes on one dataset (issue 24). Streaming names its shared-memory segments and its two
lock files by a prefix (000000, 000001, ...) that is unique only among the datasets that share one
/dev/shm, i.e. one node (or one SLURM job with a private /dev/shm). So its lock files go to a folder on
that same /dev/shm (`lock_root()`: `/dev/shm/mmscale-streaming-locks-<uid>/`, the temp dir where there
is no /dev/shm), never into the dataset directory, where two nodes or jobs with the same prefix shared
them and the first to close deleted the other's (FileNotFoundError on `.streaming-locks/...`). Every
file streaming creates in a dataset or cache directory (a decompressed shard, a downloaded shard or
index) is written under a name of its own process and renamed into place (`_AtomicStream`), so any
number of readers on any number of nodes may decompress or download the same shard at once (streaming
itself writes all of them through one `<file>.tmp`); nothing is ever deleted there (`keep_zip`). A
dataset on a shared filesystem is therefore read in place: the first reader of each zstd shard
decompresses it next to itself once, and every later job reads it without writing. `close()` removes the
loader's lock files and frees its shared memory: call it on every rank at shutdown. Each loader also
writes `<prefix>.owner` (host and pid) beside its lock files; a later loader removes the lock files of
owners on this host whose process is gone (a killed run), and nothing else.

Damage: the manifest is checked for its keys and types, every shard of the split for presence and size
before streaming starts, shard digests (`prepare` writes xxh64) are checked by streaming when it
decompresses or downloads a shard, token ids are checked against the manifest's vocab size, and any error
while reading becomes one line naming the dataset (and the file where streaming names it).
`mmscale data verify DIR` checks everything, digests of raw and compressed shards included.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mmscale.data._streaming import import_streaming
from mmscale.data.prepare import MANIFEST
from mmscale.distributed import enter_world_env, leave_world_env
from mmscale.errors import UserError
from mmscale.fsutil import file_sha256, pid_alive
from mmscale.fsutil import digest

IGNORE_INDEX = -100
_LOCK_NAMES = ("barrier_filelock", "cache_filelock")
SHM_DIR = "/dev/shm"


def lock_root() -> Path:
    """Where streaming's lock files go: a folder on this node's /dev/shm, whose scope is exactly that of
    streaming's prefixes (jobs or nodes with private /dev/shm get private lock folders too); the temp dir
    where there is no writable /dev/shm (streaming's shared memory then lives elsewhere on this host)."""
    shm = Path(SHM_DIR)
    base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
    return base / f"mmscale-streaming-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _is_remote(path: str) -> bool:
    return "://" in path


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# manifests

def read_manifest(path: str, cache_dir: str = "") -> dict:
    """The manifest of a prepared dataset (local dir or remote); UserError when there is none.

    A remote manifest is fetched afresh into `cache_dir` every time (it names the cache of the
    shards, see `_shard_cache`)."""
    if _is_remote(path):
        if not cache_dir:
            raise UserError(f"dataset '{path}' is remote; set data.cache_dir to a local directory for its cache")
        import_streaming()
        from streaming.base.storage import CloudDownloader  # lazy: after import_streaming()'s shim

        local = Path(cache_dir) / _short_hash(path.rstrip("/")) / MANIFEST
        local.unlink(missing_ok=True)  # streaming's downloader keeps an existing file
        try:
            CloudDownloader.direct_download(f"{path.rstrip('/')}/{MANIFEST}", str(local), timeout=60)
        except Exception as e:
            raise UserError(f"could not fetch '{path.rstrip('/')}/{MANIFEST}' ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the remote path, "
                            "credentials and that its client library is installed") from None
        try:
            return validate_manifest(json.loads(local.read_text()), f"{path.rstrip('/')}/{MANIFEST}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"'{path.rstrip('/')}/{MANIFEST}' is not valid JSON; prepare the dataset again") from None
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise UserError(f"'{path}' is not a prepared dataset (no {MANIFEST}); make one with `mmscale prepare`")
    try:
        return validate_manifest(json.loads(mpath.read_text()), str(mpath))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{mpath}' is not valid JSON; prepare the dataset again") from None


# key -> (type, what it is); bool is not an int here
_MANIFEST_KEYS = {"n_ctx": (int, "an integer"), "vocab_size": (int, "an integer"), "layout": (str, "a string"),
                  "splits": (dict, "an object"), "tokenizer": (dict, "an object")}


def validate_manifest(m, where: str) -> dict:
    """The manifest itself, after checking the keys every reader relies on (one line naming the file)."""
    def bad(what: str):
        return UserError(f"'{where}' {what}; the manifest is damaged: prepare the dataset again")

    if not isinstance(m, dict):
        raise bad("is not a JSON object")
    for key, (typ, name) in _MANIFEST_KEYS.items():
        if key not in m:
            raise bad(f"has no \"{key}\"")
        if not isinstance(m[key], typ) or isinstance(m[key], bool):
            raise bad(f"has \"{key}\": {json.dumps(m[key])[:40]}, not {name}")
    if m["layout"] not in ("packed", "padded"):
        raise bad(f"has layout {m['layout']!r}, not packed or padded")
    if m["n_ctx"] < 2 or m["vocab_size"] < 2:
        raise bad(f"has n_ctx {m['n_ctx']} / vocab_size {m['vocab_size']} (each must be >= 2)")
    for split in ("train", "val"):
        info = m["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("samples"), int) or isinstance(
                info.get("samples"), bool) or info["samples"] < 0:
            raise bad(f"has no sample count for the {split} split")
    sha = m["tokenizer"].get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise bad("has a tokenizer sha256 that is not a string")
    return m


def tokenizer_sha(manifest: dict) -> str | None:
    sha = (manifest.get("tokenizer") or {}).get("sha256")
    return sha if isinstance(sha, str) else None


def check_fits_model(manifest: dict, path: str, n_ctx: int, vocab_size: int | None = None, *,
                     model_keys: bool = True, settable: bool = True, exit_code: int = 2) -> dict:
    """Refuse a dataset whose n_ctx (and vocab size, when `vocab_size` is given) is not the model's; returns
    the manifest. The one dataset-vs-model check of training (check_dataset), the loader and `mmscale eval`.

    `n_ctx` / `vocab_size` are the model config's numbers (data does not import the models). The message
    names them as config keys (`model.n_ctx`) when `model_keys`, else as "the model's n_ctx"; when
    `settable` its fix offers setting the key to the dataset's value, else only preparing the data again
    (a finished model: an export). Raises UserError with `exit_code`.
    """
    def name(key: str) -> str:
        return f"model.{key}" if model_keys else f"the model's {key}"

    have = manifest.get("n_ctx")
    if have != n_ctx:
        fix = (f"prepare it with --n-ctx {n_ctx} or set model.n_ctx={have}" if settable
               else f"prepare it again with --n-ctx {n_ctx}")
        raise UserError(f"dataset '{path}' was prepared with n_ctx {have} but {name('n_ctx')} is {n_ctx}; {fix}",
                        exit_code)
    have = manifest.get("vocab_size")
    if vocab_size is not None and have != vocab_size:
        fix = (f"set model.vocab_size={have} or prepare it with a {vocab_size}-piece tokenizer" if settable
               else f"prepare it with a {vocab_size}-piece tokenizer")
        raise UserError(f"dataset '{path}' has a tokenizer of vocab size {have} but {name('vocab_size')} is "
                        f"{vocab_size}; {fix}", exit_code)
    return manifest


def check_shards(local: str | os.PathLike, split: str) -> dict:
    """Every shard of `split` that index.json lists is present with its size (stat only, no read); returns
    the index. One line naming the file otherwise."""
    index_path = Path(local) / split / "index.json"
    if not index_path.is_file():
        raise UserError(f"'{index_path}' is missing; the dataset is damaged: prepare it again")
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
        if not isinstance(shards, list):
            raise TypeError
        for sh in shards:
            raw, zipped = sh["raw_data"], sh.get("zip_data")
            for part in [raw] + ([zipped] if zipped else []):
                if not isinstance(part["basename"], str) or not isinstance(part["bytes"], int):
                    raise TypeError
                if Path(part["basename"]).is_absolute() or ".." in Path(part["basename"]).parts:
                    raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError):
        raise UserError(f"'{index_path}' is not a valid shard index (MDS index.json); the dataset is damaged: "
                        "prepare it again") from None
    for sh in shards:
        raw, zipped = sh["raw_data"], sh.get("zip_data")
        raw_path = index_path.parent / raw["basename"]
        if raw_path.is_file():
            if raw_path.stat().st_size != raw["bytes"]:
                raise UserError(f"shard '{raw_path}' has {raw_path.stat().st_size} bytes, {raw['bytes']} expected; "
                                "it is damaged (truncated?): delete it if its .zstd is intact, else prepare again")
            continue
        if zipped is None:
            raise UserError(f"shard '{raw_path}' is missing; the dataset is damaged: prepare it again")
        zip_path = index_path.parent / zipped["basename"]
        if not zip_path.is_file():
            raise UserError(f"shard '{zip_path}' is missing; the dataset is damaged: prepare it again")
        if zip_path.stat().st_size != zipped["bytes"]:
            raise UserError(f"shard '{zip_path}' has {zip_path.stat().st_size} bytes, {zipped['bytes']} expected; "
                            "it is damaged (truncated?): prepare the dataset again")
        want = (zipped.get("hashes") or {}).get("xxh64")
        if want:  # about to be decompressed (once): check its digest here, where a failure can be named
            if digest(zip_path)[1] != want:
                raise UserError(f"shard '{zip_path}' does not match its xxh64 digest (bit rot or a bad copy); "
                                "the dataset is damaged: prepare it again")
    return index


def _hash_algo(index: dict | None) -> str | None:
    """xxh64 when `prepare` recorded it for every shard (older datasets carry no hashes)."""
    if not index:
        return None
    for sh in index.get("shards", []):
        for part in (sh.get("raw_data"), sh.get("zip_data")):
            if part and "xxh64" not in (part.get("hashes") or {}):
                return None
    return "xxh64"


def _needs_decompressing(index: dict | None, local: str, split: str) -> bool:
    """Whether some shard of the split exists only compressed (streaming will write its raw form)."""
    for sh in (index or {}).get("shards", []):
        if not (Path(local) / split / sh["raw_data"]["basename"]).is_file():
            return True
    return False


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried: permission bits do not stop root, a read-only mount
    does)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".mmscale-write-check-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _shard_cache(cache_dir: str, remote: str, manifest: dict) -> str:
    """Where the shards of `remote` are cached: one directory per remote and per preparation, so a
    dataset prepared again at the same remote never mixes with old cached shards."""
    version = _short_hash(json.dumps(manifest, sort_keys=True))
    return str(Path(cache_dir).resolve() / _short_hash(remote) / version)


def check_dataset(path: str, model_cfg, *, tokenizer: str | None = None, cache_dir: str = "") -> dict:
    """Refuse a dataset that does not fit the model; return its manifest.

    Checks n_ctx and vocab size against `model_cfg` (a ModelConfig) and, when `tokenizer` is given
    (a .model path or a sha256 hex digest), the tokenizer file hash. Raises UserError naming both
    values.
    """
    m = check_fits_model(read_manifest(path, cache_dir), path, model_cfg.n_ctx, model_cfg.vocab_size)
    if tokenizer:
        want = tokenizer if (len(tokenizer) == 64 and not os.path.exists(tokenizer)) else file_sha256(tokenizer)
        have = m.get("tokenizer", {}).get("sha256")
        if want != have:
            raise UserError(f"dataset '{path}' was tokenized with tokenizer sha256 {str(have)[:16]}... but the "
                            f"model's tokenizer is {want[:16]}...; prepare the dataset with the model's tokenizer", 2)
    return m


# ---------------------------------------------------------------------------------------------
# collate

def _collate(samples: list[dict], *, layout: str, n_ctx: int, left_pad: bool) -> dict[str, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    if layout == "packed":
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens}
    lengths = torch.tensor([int(s["length"]) for s in samples], dtype=torch.long)
    pos = torch.arange(n_ctx)
    real = pos[None, :] >= (n_ctx - lengths[:, None]) if left_pad else pos[None, :] < lengths[:, None]
    labels = tokens.masked_fill(~real, IGNORE_INDEX)
    return {"input_ids": tokens, "labels": labels}


# ---------------------------------------------------------------------------------------------
# the world, as mosaicml-streaming reads it

def _check_world_env(rank: int, world_size: int, local_rank: int | None, local_world_size: int | None) -> dict:
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    local_rank = rank if local_rank is None else local_rank
    local_world_size = world_size if local_world_size is None else local_world_size
    if world_size % local_world_size:
        raise UserError(f"world size {world_size} is not a multiple of the ranks per node ({local_world_size})")
    want = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world_size}
    for key, value in want.items():
        have = os.environ.get(key)
        if have is not None and have != "" and int(have) != value:
            raise UserError(f"environment {key}={have} contradicts the {key.lower()} {value} passed to "
                            "build_dataloader; pass the launcher's values")
    return want


# ---------------------------------------------------------------------------------------------
# the loader

class StreamingLoader:
    """Batches of one split; endless for training. See the module docstring."""

    def __init__(self, dataset, loader, *, split: str, endless: bool, micro_batch_size: int,
                 world_size: int, lock_dir: Path, local_rank: int, manifest: dict):
        self.dataset, self.loader = dataset, loader
        self.split, self.endless = split, endless
        self.micro_batch_size, self.world_size = micro_batch_size, world_size
        self.manifest = manifest
        self._lock_dir, self._local_rank = lock_dir, local_rank
        self.epoch = 0
        self.sample_in_epoch = 0  # samples of this epoch consumed by all ranks together
        self._closed = False

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.micro_batch_size * self.world_size
        while True:
            # streaming moves to a new epoch at every iter() of its dataset, even when the last one
            # was left half-way; keep its counter on ours and continue mid-epoch where we are
            self.dataset.next_epoch = self.epoch
            if self.sample_in_epoch:
                self.dataset.load_state_dict({
                    "epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                    "num_canonical_nodes": int(self.dataset.num_canonical_nodes),
                    "shuffle_seed": int(self.dataset.shuffle_seed), "initial_physical_nodes": None,
                })
            got = 0
            for batch in self._batches():
                got += 1
                self.sample_in_epoch += step
                yield batch
            event = getattr(self.dataset, "_event", None)
            if event is not None and event.is_set():  # streaming's reader thread failed and it stopped quietly
                root = getattr(self, "root", "?")
                raise UserError(f"streaming stopped reading the {self.split} split of dataset '{root}' (a shard could "
                                f"not be fetched, verified or decompressed); check it with "
                                f"`mmscale data verify {root}` and prepare it again")
            self.epoch += 1
            self.sample_in_epoch = 0
            if not self.endless:
                return
            if got == 0:
                raise UserError(
                    f"the {self.split} split yielded no batch: it has {self.dataset.epoch_size} samples for batches "
                    f"of {self.micro_batch_size} on each of {self.world_size} ranks (use more data or a smaller "
                    f"batch), or its shards could not be read (check `mmscale data verify "
                    f"{getattr(self, 'root', 'DIR')}`)")

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """streaming's batches, with every read error as one line naming the dataset, and token ids checked
        against the manifest's vocab."""
        root = getattr(self, "root", "?")
        vocab = int(self.manifest.get("vocab_size", 0))
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:
                text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                raise UserError(f"reading the {self.split} split of dataset '{root}' failed ({type(e).__name__}: "
                                f"{(text[-1] if text else '')[:200]}); the dataset is damaged: check it with "
                                f"`mmscale data verify {root}` and prepare it again") from None
            ids = batch["input_ids"]
            if vocab and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
                raise UserError(f"dataset '{root}' ({self.split}) holds token id {bad} but its vocab size is {vocab}; "
                                f"it is damaged or was not made by this tokenizer: check it with "
                                f"`mmscale data verify {root}`")
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from; the same on every rank (plain ints, JSON-safe)."""
        return {
            "epoch": self.epoch,
            "sample_in_epoch": self.sample_in_epoch,
            "num_canonical_nodes": int(self.dataset.num_canonical_nodes),
            "shuffle_seed": int(self.dataset.shuffle_seed),
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from any world size); call before iterating."""
        try:
            epoch, sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
            ncn, seed = int(state["num_canonical_nodes"]), int(state["shuffle_seed"])
        except (KeyError, TypeError, ValueError):
            raise UserError("the data-loader state in the checkpoint is incomplete; it was not written by "
                            "mmscale's loader") from None
        if ncn != self.dataset.num_canonical_nodes:
            raise UserError(f"the checkpoint's data order used data.num_canonical_nodes={ncn} but this run has "
                            f"{self.dataset.num_canonical_nodes}; set data.num_canonical_nodes={ncn} to resume")
        if seed != self.dataset.shuffle_seed:
            raise UserError(f"the checkpoint's data order used seed {seed} but this run has "
                            f"{self.dataset.shuffle_seed}; set run.seed={seed} to resume")
        self.epoch, self.sample_in_epoch = epoch, sample_in_epoch  # __iter__ hands them to streaming

    def close(self) -> None:
        """Free the dataset's shared memory and lock files (call once, at shutdown, on every rank)."""
        if self._closed:
            return
        self._closed = True
        it = getattr(self.dataset, "_iterator", None)
        if it is not None:
            it.exit()
        loader_it = getattr(self.loader, "_iterator", None)
        if loader_it is not None and hasattr(loader_it, "_shutdown_workers"):
            loader_it._shutdown_workers()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.barrier()  # nobody may still be using the segments we free
        _free_shared_memory(self.dataset)
        if self._local_rank == 0:
            prefix = getattr(self.dataset, "_shm_prefix_int", None)
            for name in _LOCK_NAMES:
                if prefix is not None:
                    (self._lock_dir / f"{prefix:06}_{name}").unlink(missing_ok=True)
            if prefix is not None:
                (self._lock_dir / f"{prefix:06}.owner").unlink(missing_ok=True)
            # (the lock folder itself stays: it is shared by every loader on this /dev/shm, and removing it
            # while another loader creates its lock there was the race of issue 24)
        if distributed:
            # the next dataset's ranks must all see the freed prefix, or they pick different ones
            torch.distributed.barrier()
        leave_world_env()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_shared_memory(dataset) -> None:
    """Free a StreamingDataset's /dev/shm segments now, the way streaming would at exit.

    Each process unlinks the segments it created and closes those it attached to, through
    streaming's own SharedMemory objects; their exit hooks are removed, because by exit time the
    same names may belong to another dataset (prefixes are reused machine-wide) and unlinking by
    name then would destroy someone else's segment.
    """
    holders = [getattr(dataset, "_locals_shm", None), getattr(dataset, "_resume_shm", None)]
    barrier = getattr(dataset, "_shared_barrier", None)
    holders.append(getattr(getattr(barrier, "_arr", None), "shm", None))
    for attr in ("_next_epoch", "_cache_usage"):
        holders.append(getattr(getattr(getattr(dataset, attr, None), "arr", None), "shm", None))
    for attr in ("_shard_states", "_shard_access_times"):
        holders.append(getattr(getattr(dataset, attr, None), "shm", None))
    for shm in holders:
        if shm is None or not hasattr(shm, "cleanup"):
            continue
        atexit.unregister(shm.cleanup)
        for raw in shm.created_shms + shm.opened_shms:
            try:
                raw.close()
            except BufferError:  # a numpy view still points into it; the mapping goes at exit
                pass
        for raw in shm.created_shms:
            try:
                raw.unlink()  # also unregisters it from this process's resource tracker
            except FileNotFoundError:
                pass
        shm.created_shms, shm.opened_shms = [], []


def clean_stale_locks(lock_dir: Path) -> list[str]:
    """Remove the lock files of loaders on this host whose process is gone (from their `.owner` file); returns
    the prefixes cleaned. Locks without an owner file, or owned on another host, are left alone."""
    cleaned = []
    if not lock_dir.is_dir():
        return cleaned
    host = socket.gethostname()
    for owner in lock_dir.glob("*.owner"):
        try:
            info = json.loads(owner.read_text())
            pid, their_host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if their_host != host or pid_alive(pid):
            continue
        prefix = owner.name[:-len(".owner")]
        for name in _LOCK_NAMES:
            (lock_dir / f"{prefix}_{name}").unlink(missing_ok=True)
        owner.unlink(missing_ok=True)
        cleaned.append(prefix)
    return cleaned


def _private_name(path: str) -> str:
    """A sibling name of `path` that no other process, thread or host uses at the same time."""
    return f"{path}.mmscale-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


_ATOMIC_STREAM = None


def _atomic_stream_class(streaming):
    """streaming's Stream, writing every file it creates under a private name and renaming it into place.

    streaming decompresses a shard through `<raw>.tmp` and downloads through `<file>.tmp` (then renames):
    two processes doing the same shard at once (two nodes on one dataset, two jobs on one cache) truncate
    and rename each other's temporary file, and one of them reads a partial shard or fails with
    FileNotFoundError. Here each process writes its own temporary file and `os.replace`s it over the
    final name: a complete file either way, whoever finishes last."""
    global _ATOMIC_STREAM
    if _ATOMIC_STREAM is None:
        class _AtomicStream(streaming.Stream):
            def _decompress_shard_part(self, zip_info, zip_filename, raw_filename, compression):
                mine = _private_name(raw_filename)
                try:
                    super()._decompress_shard_part(zip_info, zip_filename, mine, compression)
                    os.replace(mine, raw_filename)
                finally:
                    for left in (mine, mine + ".tmp"):
                        with _suppress_missing():
                            os.unlink(left)

            def _download_file(self, from_basename, to_basename=None):
                final = os.path.join(self.local, self.split, to_basename or from_basename)
                mine = _private_name(final)
                try:
                    got = super()._download_file(from_basename, os.path.relpath(mine, os.path.join(
                        self.local, self.split)))
                    os.replace(got, final)
                finally:
                    for left in (mine, mine + ".tmp"):
                        with _suppress_missing():
                            os.unlink(left)
                return final

        _ATOMIC_STREAM = _AtomicStream
    return _ATOMIC_STREAM


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, typ, *rest):
        return typ is not None and issubclass(typ, FileNotFoundError)


def _fetch_index(stream, split: str) -> None:
    """Put the remote's `<split>/index.json` into the cache before streaming looks for it (its own fetch goes
    through one shared `index.json.tmp`, which two nodes or jobs on one cache would race on)."""
    path = Path(stream.local) / split / "index.json"
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stream._download_file("index.json")


def _split_location(data_cfg, split: str) -> tuple[str, str]:
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val', got {split!r}")
    root = data_cfg.train if split == "train" or not data_cfg.val else data_cfg.val
    if not root:
        raise UserError("data.train is empty; set it to a dataset made by `mmscale prepare`")
    return root, split


def build_dataloader(data_cfg, split: str, *, n_ctx: int, micro_batch_size: int, seed: int,
                     rank: int = 0, world_size: int = 1, local_rank: int | None = None,
                     local_world_size: int | None = None, endless: bool | None = None) -> StreamingLoader:
    """A loader over one split of a prepared dataset (see the module docstring).

    `data_cfg` is a DataConfig; `split` "train" (endless unless `endless=False`) or "val" (one
    pass); `rank` / `world_size` are global, `local_rank` / `local_world_size` those of the node
    (default: a single node).
    """
    if micro_batch_size < 1:
        raise UserError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    root, split = _split_location(data_cfg, split)
    manifest = check_fits_model(read_manifest(root, data_cfg.cache_dir), root, n_ctx, model_keys=False, exit_code=1)
    if manifest["splits"][split]["samples"] == 0:
        raise UserError(f"dataset '{root}' has no {split} samples; prepare it with --val-fraction > 0")
    index = None
    if not _is_remote(root):
        index = check_shards(root, split)  # deleted or truncated shards, a corrupt index: one line
    world_env = _check_world_env(rank, world_size, local_rank, local_world_size)
    local_rank = rank if local_rank is None else local_rank

    streaming = import_streaming()
    remote, local = _stream_location(data_cfg, root, split, manifest, index)
    validate = _hash_algo(index) if index is not None else ("xxh64" if manifest.get("shard_hash") == "xxh64" else None)
    stream = _atomic_stream_class(streaming)(remote=remote, local=local, split=split, validate_hash=validate,
                                             keep_zip=True, download_retry=2, download_timeout=60)
    # streaming's lock files go to this node's /dev/shm (see the module docstring), not next to the data
    lock_dir = lock_root()
    _prepare_node(stream, lock_dir, local_rank, remote, local, root, split)
    dataset = _open_dataset(streaming, stream, data_cfg, root, split, seed, micro_batch_size, world_env, lock_dir)
    prefix = getattr(dataset, "_shm_prefix_int", None)
    if local_rank == 0 and prefix is not None:
        try:
            (lock_dir / f"{prefix:06}.owner").write_text(json.dumps({"pid": os.getpid(),
                                                                     "host": socket.gethostname()}))
        except OSError:
            pass
    layout = manifest["layout"]
    collate = partial(_collate, layout=layout, n_ctx=n_ctx, left_pad=manifest.get("pad_side") == "left")
    is_train = split == "train"
    loader = streaming.StreamingDataLoader(
        dataset, batch_size=micro_batch_size, collate_fn=collate, num_workers=data_cfg.num_workers,
        # pinned host memory on CUDA: the engines' non_blocking copies then overlap with compute
        drop_last=is_train, persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
    out = StreamingLoader(dataset, loader, split=split, endless=is_train if endless is None else endless,
                          micro_batch_size=micro_batch_size, world_size=world_size, lock_dir=lock_dir,
                          local_rank=local_rank, manifest=manifest)
    out.root = root
    return out


def _stream_location(data_cfg, root: str, split: str, manifest: dict, index) -> tuple[str | None, str]:
    """(remote, local) of streaming's Stream: a remote dataset (or any with data.cache_dir) is read through a
    local shard cache; a local one in place, which needs a writable folder when its shards are compressed."""
    if data_cfg.cache_dir or _is_remote(root):
        if not data_cfg.cache_dir:
            raise UserError(f"dataset '{root}' is remote; set data.cache_dir to a local directory for its cache")
        remote = root.rstrip("/") if _is_remote(root) else str(Path(root).resolve())
        return remote, _shard_cache(data_cfg.cache_dir, remote, manifest)
    local = str(Path(root).resolve())
    if _needs_decompressing(index, local, split) and not _writable(Path(local) / split):
        raise UserError(f"dataset directory '{local}' is not writable and its {split} shards are compressed "
                        "(streaming decompresses them next to themselves once); set data.cache_dir to a "
                        "writable node-local directory to read it as a remote")
    return None, local


def _prepare_node(stream, lock_dir: Path, local_rank: int, remote, local: str, root: str, split: str) -> None:
    """The node's lock folder (local rank 0 removes the stale locks of dead owners) and, for a remote dataset,
    its index fetched once per node."""
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        if local_rank == 0:
            clean_stale_locks(lock_dir)
        if remote is not None and local_rank == 0:
            _fetch_index(stream, split)
    except OSError as e:
        raise UserError(f"cannot prepare '{lock_dir}' or the cache '{local}' ({e.strerror or type(e).__name__}); "
                        "set data.cache_dir to a writable directory") from None
    except Exception as e:
        text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise UserError(f"cannot fetch the {split} index of dataset '{root}' ({type(e).__name__}: "
                        f"{(text[-1] if text else '')[:200]}); check the remote path and its client library"
                        ) from None


def _open_dataset(streaming, stream, data_cfg, root: str, split: str, seed: int, micro_batch_size: int,
                  world_env, lock_dir: Path):
    """streaming's StreamingDataset over the one stream, with its lock files in `lock_dir` and the world in the
    environment (where streaming reads it); a failure is one line naming the dataset."""
    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(lock_dir)  # streaming puts its lock files in gettempdir()
    enter_world_env(world_env)  # left as the caller had it when the last loader closes
    try:
        dataset = streaming.StreamingDataset(
            streams=[stream], shuffle=data_cfg.shuffle if split == "train" else False,
            shuffle_seed=seed, num_canonical_nodes=data_cfg.num_canonical_nodes,
            shuffle_block_size=data_cfg.shuffle_block_size, batch_size=micro_batch_size,
            predownload=max(8 * micro_batch_size, 64), keep_zip=True,
        )
    except UserError:
        leave_world_env()
        raise
    except Exception as e:
        leave_world_env()
        text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise UserError(f"cannot open the {split} split of dataset '{root}' ({type(e).__name__}: "
                        f"{(text[-1] if text else '')[:200]}); check it with `mmscale data verify {root}` "
                        "and prepare it again") from None
    finally:
        tempfile.tempdir = saved_tempdir
    return dataset
