"""`mmscale data verify DIR`: check a prepared dataset completely, without training on it.

- manifest.json: valid JSON with the keys and types every reader relies on;
- tokenizer.model: present, and its sha256 the one the manifest records;
- each split's index.json: a valid MDS index whose sample count is the manifest's;
- each shard: present with its recorded size; xxh64 digests of the compressed and the raw file (when
  `prepare` recorded them: datasets made before carry none); the raw data parses as MDS samples of the
  manifest's n_ctx;
- every token id in [0, vocab_size).

The first problem ends the check with one line naming the file (exit status 1).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import xxhash

from mmscale.data._streaming import import_streaming
from mmscale.data.loader import check_shards, read_manifest
from mmscale.errors import UserError
from mmscale.fsutil import file_sha256


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"'{path}' {what}; the dataset is damaged: prepare it again")


def _digest(data: bytes) -> str:
    return xxhash.xxh64(data).hexdigest()


def _tokens_of_shard(raw: bytes, shard: dict, path: Path, manifest: dict) -> np.ndarray:
    """All token ids of one raw MDS shard as a [samples, sample_tokens] array."""
    names, encodings, sizes = shard["column_names"], shard["column_encodings"], shard["column_sizes"]
    if "tokens" not in names or any(s is None for s in sizes):
        raise _damaged(path, "does not hold mmscale's fixed-size columns")
    enc = encodings[names.index("tokens")].split(":")
    if len(enc) != 3 or enc[0] != "ndarray":
        raise _damaged(path, f"has a tokens column of encoding {encodings[names.index('tokens')]!r}")
    dtype = np.dtype(enc[1])
    want_tokens = manifest["n_ctx"] + 1 if manifest["layout"] == "packed" else manifest["n_ctx"]
    if int(enc[2]) != want_tokens:
        raise _damaged(path, f"holds samples of {enc[2]} tokens, the manifest's n_ctx needs {want_tokens}")
    sample_bytes = sum(sizes)
    start = sum(sizes[:names.index("tokens")])
    n = shard["samples"]
    if len(raw) < 4 + 4 * (n + 1):
        raise _damaged(path, "is shorter than its sample table")
    count = int(np.frombuffer(raw, np.uint32, 1, 0)[0])
    offsets = np.frombuffer(raw, np.uint32, n + 1, 4).astype(np.int64)
    if count != n or offsets[-1] != len(raw) or np.any(np.diff(offsets) != sample_bytes):
        raise _damaged(path, "has a corrupt sample table")
    body = np.frombuffer(raw, np.uint8, offsets[-1] - offsets[0], offsets[0]).reshape(n, sample_bytes)
    return body[:, start:start + want_tokens * dtype.itemsize].copy().view(dtype)


def _kind(mode: int) -> str | None:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "a special file"


def check_regular_files(root: Path) -> None:
    """Every entry of a dataset folder is a regular file or a folder (links are followed): a FIFO, device or
    socket (or a link to one, or a broken link) is refused, naming it, without opening it."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            try:
                st = os.stat(p)
            except OSError:
                raise UserError(f"'{p}' is a broken link; the dataset must hold only regular files: remove it or "
                                "prepare the dataset again") from None
            what = _kind(st.st_mode)
            if what is not None:
                link = " (through a link)" if p.is_symlink() else ""
                raise UserError(f"'{p}' is {what}{link}, not a data file; the dataset must hold only regular files: "
                                "remove it or prepare the dataset again")


def verify_dataset(path: str | Path) -> dict:
    """Check everything (see the module docstring); returns a summary, raises UserError at the first problem."""

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"dataset '{root}' is not a directory; pass a folder made by `mmscale prepare`")
    check_regular_files(root)  # before anything is opened: a FIFO would block the check, /dev/zero never ends
    manifest = read_manifest(str(root))
    tok_name = str(manifest["tokenizer"].get("file") or "tokenizer.model")
    if Path(tok_name).name != tok_name or tok_name in (".", ".."):
        raise _damaged(root / "manifest.json", "names a tokenizer outside the dataset folder")
    tok = root / tok_name
    if not tok.is_file():
        raise _damaged(tok, "is missing")
    want_sha = manifest["tokenizer"].get("sha256")
    if want_sha and file_sha256(tok) != want_sha:
        raise _damaged(tok, f"has sha256 {file_sha256(tok)[:16]}..., the manifest records {want_sha[:16]}...")
    import_streaming()
    from streaming.base.compression import decompress  # lazy: after import_streaming()'s shim

    vocab = manifest["vocab_size"]
    summary = {"dataset": str(root), "vocab_size": vocab, "hashed": True, "splits": {}}
    for split in ("train", "val"):
        samples = manifest["splits"][split]["samples"]
        if samples == 0 and not (root / split / "index.json").is_file():
            summary["splits"][split] = {"samples": 0, "shards": 0, "max_token": None}
            continue
        index = check_shards(root, split)
        total, max_token = 0, -1
        for shard in index["shards"]:
            raw_info, zip_info = shard["raw_data"], shard.get("zip_data")
            raw_path = root / split / raw_info["basename"]
            if raw_path.is_file():
                raw = raw_path.read_bytes()
                if zip_info and (root / split / zip_info["basename"]).is_file():
                    zp = root / split / zip_info["basename"]
                    zdata = zp.read_bytes()
                    if "xxh64" in (zip_info.get("hashes") or {}) and _digest(zdata) != zip_info["hashes"]["xxh64"]:
                        raise _damaged(zp, "does not match its xxh64 digest")
            else:
                zp = root / split / zip_info["basename"]
                zdata = zp.read_bytes()
                if "xxh64" in (zip_info.get("hashes") or {}) and _digest(zdata) != zip_info["hashes"]["xxh64"]:
                    raise _damaged(zp, "does not match its xxh64 digest")
                try:
                    raw = decompress(shard["compression"], zdata)
                except Exception as e:
                    raise _damaged(zp, f"does not decompress ({type(e).__name__})") from None
                raw_path = zp
            if "xxh64" in (raw_info.get("hashes") or {}):
                if _digest(raw) != raw_info["hashes"]["xxh64"]:
                    raise _damaged(raw_path, "does not match its xxh64 digest (raw data)")
            else:
                summary["hashed"] = False
            if len(raw) != raw_info["bytes"]:
                raise _damaged(raw_path, f"holds {len(raw)} bytes of samples, {raw_info['bytes']} expected")
            tokens = _tokens_of_shard(raw, shard, raw_path, manifest)
            if tokens.size:
                hi = int(tokens.max())
                if hi >= vocab:
                    raise _damaged(raw_path, f"holds token id {hi}, outside the vocab of {vocab}")
                max_token = max(max_token, hi)
            total += shard["samples"]
        if total != samples:
            raise _damaged(root / split / "index.json", f"lists {total} samples, the manifest {samples}")
        summary["splits"][split] = {"samples": total, "shards": len(index["shards"]), "max_token": max_token}
    return summary


def format_summary(s: dict) -> str:
    parts = [f"{name} {v['samples']} samples in {v['shards']} shards" for name, v in s["splits"].items()]
    note = "" if s["hashed"] else " (no shard digests: prepared by an older mmscale; sizes and token ids checked)"
    return f"ok: {s['dataset']}: {', '.join(parts)}; token ids < vocab {s['vocab_size']}{note}"


def run_verify(path: str, as_json: bool = False) -> int:
    s = verify_dataset(path)
    print(json.dumps(s, indent=2) if as_json else format_summary(s))
    return 0
