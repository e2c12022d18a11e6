"""Tokenize text into MDS shards: the `mmscale prepare` command.

    mmscale prepare --input stories.txt --tokenizer tok.model --n-ctx 256 --out data/stories
    mmscale prepare --input stories.txt --tokenizer gpt2/tokenizer.json --n-ctx 256 --out data/stories-gpt2

--tokenizer is a sentencepiece .model, a Hugging Face tokenizer.json, or a local folder that
AutoTokenizer loads (its tokenizer_config.json names EOS and pad; a bare tokenizer.json gets them
from well-known token names). Its hash, kind and special ids go into the manifest.

Inputs (each --input, by file extension):
  plain text  documents separated by a separator line (default `<|endoftext|>`); a file with no
              such line is split on blank lines instead
  .jsonl      one JSON object per line; the document is its --text-field
  .parquet    the --text-field column (needs pyarrow)
  hf:NAME[:CONFIG][@SPLIT]   a Hugging Face dataset by name (needs `datasets` and a network)
  a directory: every *.txt, *.jsonl and *.parquet file in it, sorted

Layouts:
  packed  documents joined, each followed by EOS, cut into windows of n_ctx + 1 tokens (the last
          partial window is dropped); pretraining. A sample is {"tokens": uint[n_ctx + 1]}.
  padded  one document per sample, EOS appended, truncated to n_ctx and padded (right or left) with
          the pad id; what the paper did and what retrieval needs.
          A sample is {"tokens": uint[n_ctx], "length": int32}.

The output directory holds `manifest.json`, `train/` and `val/` (MDS shards, zstd) and a copy of
the tokenizer. Documents go to val by a seeded draw (exactly round(F * documents), at least one
when F > 0). Everything is first checked (files exist, UTF-8, fields present) and then written
into a hidden sibling directory that is renamed into place at the end, so an interrupted prepare
never leaves a directory that looks complete.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import multiprocessing.pool as mpp
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from mmscale.cli.conventions import check_output_path  # never an input nor a folder holding one
from mmscale.data._streaming import import_streaming
from mmscale.data.sources import iter_text_documents, resolve_sources  # noqa: F401 (the former is re-exported)
from mmscale.data.sources import NotUTF8Error
from mmscale.data.tokenizer import DEFAULT_SEPARATOR
from mmscale.data.tokenizer import is_hf_tokenizer, load_tokenizer
from mmscale.data.tokenizer import load_tokenizer, special_ids
from mmscale.fsutil import file_sha256, usable_cpus
from mmscale.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DOCS_PER_TASK = 256  # documents per worker task: large enough to amortise pickling


# ---------------------------------------------------------------------------------------------
# tokenizing in worker processes

_worker_sp = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_sp
    # Ctrl-C reaches every process of the terminal's group: the parent alone stops the work (a worker killed by
    # it would print a traceback and could die holding the pool's queue lock, so that the pool never stops);
    # SIGTERM ends a worker silently (the parent's handler is inherited by fork: put the default back)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if is_hf_tokenizer(tokenizer_path):  # a Hugging Face tokenizer (tokenizer.json or a folder)
        _worker_sp = load_tokenizer(tokenizer_path)
        return
    _worker_sp = spm.SentencePieceProcessor(model_file=tokenizer_path)


def _encode_batch(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents; return (all token ids concatenated as uint32, per-document lengths)."""
    ids = _worker_sp.encode(docs, num_threads=1)  # the parallelism is the worker processes
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# writing samples

class _PackedSplit:
    """Joins documents (each followed by EOS) and writes windows of n_ctx + 1 tokens."""

    def __init__(self, writer, n_ctx: int, eos: int, dtype):
        self.writer, self.window, self.eos, self.dtype = writer, n_ctx + 1, eos, dtype
        self.buffer = np.zeros(0, dtype=dtype)
        self.samples = self.tokens = self.documents = self.dropped_tokens = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        # insert an EOS after every document
        ends = np.cumsum(lengths)
        joined = np.insert(flat, ends, self.eos).astype(self.dtype, copy=False)
        self.documents += len(lengths)
        buf = np.concatenate([self.buffer, joined])
        n = len(buf) // self.window
        for row in buf[: n * self.window].reshape(n, self.window):
            self.writer.write({"tokens": row})
        self.buffer = buf[n * self.window:].copy()
        self.samples += n
        self.tokens += n * self.window

    def finish(self) -> None:
        self.dropped_tokens = len(self.buffer)


class _PaddedSplit:
    """One document per sample: EOS appended, truncated to n_ctx, padded with the pad id."""

    def __init__(self, writer, n_ctx: int, eos: int, pad: int, pad_side: str, dtype):
        self.writer, self.n_ctx, self.eos, self.pad, self.left, self.dtype = (
            writer, n_ctx, eos, pad, pad_side == "left", dtype)
        self.samples = self.tokens = self.documents = self.truncated = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        start = 0
        for n in lengths.tolist():
            doc = flat[start:start + n]
            start += n
            length = min(n + 1, self.n_ctx)
            self.truncated += int(n + 1 > self.n_ctx)
            row = np.full(self.n_ctx, self.pad, dtype=self.dtype)
            body = np.empty(length, dtype=self.dtype)
            body[: min(n, length)] = doc[:length]
            if n < length:
                body[n] = self.eos
            if self.left:
                row[self.n_ctx - length:] = body
            else:
                row[:length] = body
            self.writer.write({"tokens": row, "length": np.int32(length)})
            self.samples += 1
            self.tokens += length
            self.documents += 1

    def finish(self) -> None:
        pass


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    n_ctx: int
    out: str
    layout: str = "packed"
    pad: str = "right"
    val_fraction: float = 0.01
    text_field: str = "text"
    separator: str = DEFAULT_SEPARATOR
    errors: str = "strict"
    dtype: str = "auto"
    workers: int = 0  # tokenizer processes; 0 = one per CPU core, 1 = in this process
    seed: int = 0
    overwrite: bool = False
    shard_bytes: int = 1 << 26
    progress: bool = True
    doc_per_line: bool = False  # plain text: every non-blank line is a document


def _pick_dtype(requested: str, vocab_size: int) -> str:
    limits = {"uint16": 1 << 16, "uint32": 1 << 32}
    if requested == "auto":
        return "uint16" if vocab_size <= limits["uint16"] else "uint32"
    if requested not in limits:
        raise UserError(f"--dtype must be auto, uint16 or uint32, got {requested!r}")
    if vocab_size > limits[requested]:
        raise UserError(f"the tokenizer's vocab ({vocab_size}) does not fit --dtype {requested} "
                        f"(at most {limits[requested]} ids); pass --dtype uint32 or auto")
    return requested


def _val_mask(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    n_val = int(round(fraction * n_docs))
    if fraction > 0:
        n_val = max(1, n_val)
    if n_val >= n_docs:
        raise UserError(f"--val-fraction {fraction} leaves no training documents out of {n_docs}; "
                        "pass a smaller --val-fraction or more text")
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def prepare(opts: PrepareOptions) -> dict:
    """Run the whole preparation; return the manifest. See the module docstring."""
    # ---- check everything before writing anything
    if opts.n_ctx < 2:
        raise UserError(f"--n-ctx must be at least 2 (a context predicts at least one token), got {opts.n_ctx}")
    if opts.layout not in ("packed", "padded"):
        raise UserError(f"--layout must be packed or padded, got {opts.layout!r}")
    if opts.pad not in ("left", "right"):
        raise UserError(f"--pad must be left or right, got {opts.pad!r}")
    if not 0 <= opts.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.errors not in ("strict", "replace"):
        raise UserError(f"--errors must be strict or replace, got {opts.errors!r}")
    out = Path(opts.out)
    check_output_path(out, "--out", overwrite=opts.overwrite, inputs=[*opts.inputs, opts.tokenizer])
    sp = load_tokenizer(opts.tokenizer)
    vocab_size = sp.get_piece_size()
    dtype = _pick_dtype(opts.dtype, vocab_size)
    ids = special_ids(sp)
    if ids["eos"] < 0:
        raise UserError(f"tokenizer '{opts.tokenizer}' has no EOS id; use a tokenizer with one "
                        "(`mmscale tokenizer train` makes eos = 3)")
    pad_id = ids["pad"] if ids["pad"] >= 0 else ids["eos"]
    sources = resolve_sources(opts.inputs)
    # the workers start now, before this process imports mosaicml-streaming (and its threads):
    # fork is safe at this point and starts in milliseconds (spawn would re-import for ~0.2 s);
    # their start-up also overlaps the checking pass below
    workers = opts.workers or usable_cpus()
    if workers == 1:  # no worker process to start: tokenize here
        _init_worker(str(opts.tokenizer))
        return _prepare_with(None, opts, out, sources, sp, vocab_size, dtype, ids, pad_id)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(str(opts.tokenizer),))
    try:
        manifest = _prepare_with(pool, opts, out, sources, sp, vocab_size, dtype, ids, pad_id)
    except BaseException:
        _kill_pool(pool)
        raise
    pool.terminate()
    pool.join()
    return manifest


def _kill_pool(pool) -> None:
    """Stop a pool at once after an error or an interrupt. Pool.terminate() first takes the task queue's lock,
    which a worker killed by a signal while reading a task never gives back (it then waits forever): stop the
    worker handler, kill the workers and drop the pool's finalizer (its threads are daemons and end with the
    process). Uses Pool internals (_worker_handler, _pool, _terminate) of CPython 3.8-3.13."""
    # first stop the pool's worker handler, which would otherwise start new workers in place of the killed ones
    # (orphans that keep the terminal's pipes open)
    handler = getattr(pool, "_worker_handler", None)
    if handler is not None:
        handler._state = mpp.TERMINATE
        try:
            pool._change_notifier.put(None)
        except (OSError, AttributeError, ValueError):
            pass
        handler.join(timeout=5)
    workers = list(getattr(pool, "_pool", []))
    for p in workers:
        try:
            p.kill()
        except (OSError, AttributeError, ValueError):
            pass
    for p in workers:
        try:
            p.join(timeout=5)
        except (OSError, AssertionError, ValueError):
            pass
    fin = getattr(pool, "_terminate", None)
    if fin is not None and hasattr(fin, "cancel"):
        fin.cancel()


def _prepare_with(pool, opts, out, sources, sp, vocab_size, dtype, ids, pad_id) -> dict:
    counts = []
    for src in sources:  # first pass: validates encoding and fields, counts documents
        n = sum(1 for _ in src.documents(opts))
        if n == 0:
            raise UserError(f"input '{src.spec}' holds no documents; pass a file with text in it")
        counts.append(n)
    n_docs = sum(counts)
    if n_docs == 1 and opts.val_fraction > 0 and not opts.doc_per_line and sources[0].kind == "text":
        raise UserError(f"'{sources[0].spec}' is one document (no '{opts.separator.strip()}' separator lines and no "
                        f"blank lines), so --val-fraction {opts.val_fraction} leaves nothing to train on; pass "
                        "--one-doc-per-line to make each line a document, or --separator LINE")
    is_val = _val_mask(n_docs, opts.val_fraction, opts.seed)

    # ---- write into a hidden sibling directory, rename at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = _write(pool, opts, sources, counts, is_val, tmp, sp, vocab_size, dtype, ids, pad_id)
        if out.exists():  # --overwrite: move the old one aside only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(pool, opts, sources, counts, is_val, tmp: Path, sp, vocab_size, dtype, ids, pad_id) -> dict:
    writers, splits = _open_splits(opts, tmp, dtype, ids, pad_id)
    t0 = time.perf_counter()
    total_tokens = _tokenize_into(pool, opts, sources, is_val, splits, t0)
    for s in splits.values():
        s.finish()
    for w in writers.values():
        w.finish()
    elapsed = time.perf_counter() - t0
    n_ctx = opts.n_ctx
    if splits["train"].samples == 0:
        raise UserError(f"the input makes no training sample of n_ctx + 1 = {n_ctx + 1} tokens "
                        f"({total_tokens} tokens in all); pass more text or a smaller --n-ctx")
    if opts.val_fraction > 0 and splits["val"].samples == 0:
        raise UserError(f"the validation documents make no sample of n_ctx + 1 = {n_ctx + 1} tokens; "
                        "pass a larger --val-fraction, more text or a smaller --n-ctx")
    tok_kind = _copy_tokenizer(opts, sp, tmp)
    manifest = {
        "format": "mmscale-mds",
        "version": FORMAT_VERSION,
        "layout": opts.layout,
        "pad_side": opts.pad if opts.layout == "padded" else None,
        "n_ctx": n_ctx,
        "sample_tokens": n_ctx + 1 if opts.layout == "packed" else n_ctx,
        "dtype": dtype,
        "shard_hash": "xxh64",
        "tokenizer": {"file": "tokenizer.model", "sha256": file_sha256(tmp / "tokenizer.model"),
                      **({"kind": tok_kind, "source": str(opts.tokenizer)} if tok_kind != "sentencepiece" else {}),
                      "vocab_size": vocab_size, **{f"{k}_id": v for k, v in ids.items()},
                      "pad_value": pad_id},
        "vocab_size": vocab_size,
        "splits": {
            name: {"samples": s.samples, "documents": s.documents, "tokens": s.tokens,
                   **({"dropped_tokens": s.dropped_tokens} if opts.layout == "packed"
                      else {"truncated_documents": s.truncated})}
            for name, s in splits.items()
        },
        "documents": len(is_val),
        "source_tokens": total_tokens,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "sources": [{"path": s.spec, "kind": s.kind, "documents": n, "sha256": s.fingerprint()}
                    for s, n in zip(sources, counts)],
        "text_field": opts.text_field,
        "separator": opts.separator,
        "errors": opts.errors,
        "tokenize_seconds": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _open_splits(opts, tmp: Path, dtype, ids, pad_id) -> tuple[dict, dict]:
    """An MDS writer per split (train, val) and the packed or padded splitter feeding it."""
    MDSWriter = import_streaming().MDSWriter
    n_ctx = opts.n_ctx
    if opts.layout == "packed":
        columns = {"tokens": f"ndarray:{dtype}:{n_ctx + 1}"}
    else:
        columns = {"tokens": f"ndarray:{dtype}:{n_ctx}", "length": "int32"}
    # xxh64 digests of every shard (raw and compressed): streaming checks them when it decompresses or
    # downloads a shard, `mmscale data verify` checks them all
    writers = {s: MDSWriter(out=str(tmp / s), columns=columns, compression="zstd", hashes=["xxh64"],
                            size_limit=opts.shard_bytes, progress_bar=False) for s in ("train", "val")}
    if opts.layout == "packed":
        splits = {s: _PackedSplit(w, n_ctx, ids["eos"], dtype) for s, w in writers.items()}
    else:
        splits = {s: _PaddedSplit(w, n_ctx, ids["eos"], pad_id, opts.pad, dtype) for s, w in writers.items()}
    return writers, splits


def _tokenize_into(pool, opts, sources, is_val, splits: dict, t0: float) -> int:
    """Tokenize every document (in the pool, or here) into its split; return the number of tokens."""
    total_tokens = 0

    def all_batches():
        for src in sources:
            yield from _batched(src.documents(opts), DOCS_PER_TASK)

    bar = tqdm(total=len(is_val), unit="doc", desc="tokenizing", disable=not opts.progress,
               file=sys.stderr, dynamic_ncols=True)
    doc_index = 0
    encoded = map(_encode_batch, all_batches()) if pool is None else pool.imap(_encode_batch, all_batches())
    for flat, lengths in encoded:
        total_tokens += int(lengths.sum())
        val = is_val[doc_index:doc_index + len(lengths)]
        doc_index += len(lengths)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for split, sel in (("train", ~val), ("val", val)):
            if sel.any():
                part = np.concatenate([flat[a:b] for a, b in zip(starts[sel], ends[sel])]) \
                    if not sel.all() else flat
                splits[split].add(part, lengths[sel])
        bar.update(len(lengths))
        bar.set_postfix_str(f"{total_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s",
                            refresh=False)
    bar.close()
    return total_tokens


def _copy_tokenizer(opts, sp, tmp: Path) -> str:
    """Copy the tokenizer into the dataset; return its kind (sentencepiece or huggingface).

    It goes along as tokenizer.model (where every mmscale reader looks): a sentencepiece model, or a
    Hugging Face tokenizer.json (copied as it is, or written from a folder) with the special tokens
    chosen here in tokenizer_config.json beside it.
    """
    if not hasattr(sp, "to_json"):
        shutil.copyfile(opts.tokenizer, tmp / "tokenizer.model")
        return "sentencepiece"
    src = Path(opts.tokenizer)
    if src.is_file():
        shutil.copyfile(src, tmp / "tokenizer.model")
    else:
        (tmp / "tokenizer.model").write_text(sp.to_json())
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         **{f"{k}_token": v for k, v in sp.special_tokens().items()}}, indent=2) + "\n")
    return "huggingface"


# ---------------------------------------------------------------------------------------------
# `mmscale prepare`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text / .jsonl / .parquet files, directories of them, or hf:NAME[:CONFIG][@SPLIT]")
    parser.add_argument("--tokenizer", required=True,
                        help="a sentencepiece .model, a Hugging Face tokenizer.json, or a local tokenizer folder "
                             "(AutoTokenizer)")
    parser.add_argument("--n-ctx", type=int, required=True, help="context length of the model")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--layout", choices=["packed", "padded"], default="packed")
    parser.add_argument("--pad", choices=["left", "right"], default="right", help="padded layout: pad side")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--separator", default=DEFAULT_SEPARATOR, help="plain text: document separator line")
    parser.add_argument("--one-doc-per-line", dest="doc_per_line", action="store_true",
                        help="plain text: every non-blank line is a document (for files without separators)")
    parser.add_argument("--errors", choices=["strict", "replace"], default="strict",
                        help="non-UTF-8 bytes: stop with the file and offset (strict) or replace them")
    parser.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                        help="token dtype in the shards (auto: uint16 when the vocab fits)")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = one per core, 1 = no extra process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--shard-bytes", type=int, default=1 << 26, help="uncompressed bytes per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    opts = PrepareOptions(inputs=args.input, tokenizer=args.tokenizer, n_ctx=args.n_ctx, out=args.out,
                          layout=args.layout, pad=args.pad, val_fraction=args.val_fraction,
                          text_field=args.text_field, separator=args.separator, errors=args.errors,
                          dtype=args.dtype, workers=args.workers, seed=args.seed, overwrite=args.overwrite,
                          shard_bytes=args.shard_bytes, progress=not args.no_progress,
                          doc_per_line=getattr(args, "doc_per_line", False))
    try:
        m = prepare(opts)
    except NotUTF8Error as e:  # the one command with a way around it
        raise UserError(f"{e} or pass --errors replace") from None
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"wrote {opts.out}: {m['layout']}, n_ctx {m['n_ctx']}, {m['documents']} documents, "
          f"{m['source_tokens']} tokens -> train {tr['samples']} samples, val {va['samples']} samples "
          f"({m['source_tokens'] / max(m['tokenize_seconds'], 1e-9) / 1e6:.2f}M tokens/s)")
    return 0
