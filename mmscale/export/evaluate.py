"""`mmscale eval EXPORT --data DATASET_OR_TEXT_FILES`: mean loss, perplexity and tokens evaluated.

    mmscale eval exports/mixer --data data/stories            # a prepared dataset: its val split
    mmscale eval exports/mixer --data notes.txt more.txt      # plain text, documents split on <|endoftext|>

Text files are tokenized with the export's tokenizer and packed as `mmscale prepare` packs them
(each document's pieces followed by EOS, windows of n_ctx + 1 tokens: every position predicted),
the last window padded with ignored labels. The loss is the token-weighted mean over all windows.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmscale.config import DataConfig
from mmscale.data.loader import build_dataloader, check_fits_model, read_manifest, tokenizer_sha
from mmscale.errors import UserError
from mmscale.export.format import load_export_with_tokenizer
from mmscale.fsutil import file_sha256

DOC_SEPARATOR = "<|endoftext|>"
IGNORE = -100


def read_text_documents(path: str | Path) -> list[str]:
    """Documents of a .txt file (split on `<|endoftext|>` lines) or a .jsonl file (its "text" fields)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file '{path}' does not exist; pass a prepared dataset folder or text files")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data file '{path}' is not UTF-8 text; pass .txt or .jsonl files") from None
    if p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON; each line of a .jsonl file must be one object") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{n} has no string field \"text\"; give each line {{\"text\": ...}}")
            docs.append(row["text"])
        return docs
    docs, current = [], []
    for line in raw.split("\n"):
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip("\n"))
    return [d for d in docs if d.strip()]


def pack_windows(docs_ids: list[list[int]], window: int, max_windows: int | None = None):
    """Concatenate token lists and cut them into rows of `window` tokens; Long[N, window].

    The last partial row is padded with IGNORE (-100) so it is excluded from the loss.
    """
    flat = [t for ids in docs_ids for t in ids]
    if not flat:
        raise UserError("the evaluation data holds no tokens; pass non-empty text")
    n = math.ceil(len(flat) / window)
    if max_windows is not None:
        n = min(n, max_windows)
        flat = flat[:n * window]
    rows = torch.full((n * window,), IGNORE, dtype=torch.long)
    rows[:len(flat)] = torch.tensor(flat, dtype=torch.long)
    return rows.view(n, window)


def encode_documents(sp, docs: list[str]) -> list[list[int]]:
    """Each document's pieces followed by EOS: the packed layout of `mmscale prepare` (no BOS)."""
    eos = sp.eos_id()
    return [list(x) + ([eos] if eos >= 0 else []) for x in sp.encode(docs)]


def text_windows(files: list[str], sp, n_ctx: int, max_windows: int | None = None):
    """Windows Long[N, n_ctx + 1] of text files, packed as `mmscale prepare` packs documents."""
    docs = [d for f in files for d in read_text_documents(f)]
    if not docs:
        raise UserError(f"{', '.join(files)} hold no documents; pass non-empty text files")
    return pack_windows(encode_documents(sp, docs), n_ctx + 1, max_windows)


def iter_batches(data: list[str], sp, n_ctx: int, batch_size: int, split: str = "val",
                 max_batches: int | None = None):
    """Batches {"input_ids", "labels"} (the models' forward contract) from a dataset folder or text files.

    A prepared dataset is read with the data module's loader (one pass over `split`, in order);
    text files are packed here. Labels hold -100 where there is nothing to predict. Bad input is
    reported here, before the first batch is asked for.
    """
    if len(data) == 1 and Path(data[0]).is_dir():
        # read_manifest: a clear error for a folder that is not a dataset
        check_fits_model(read_manifest(data[0]), data[0], n_ctx, model_keys=False, settable=False)
        return dataset_batches(data[0], n_ctx, batch_size, split, max_batches)
    windows = text_windows(data, sp, n_ctx, None if max_batches is None else max_batches * batch_size)
    # padding of the last window: any valid id as input, its label is ignored
    return ({"input_ids": w[:, :n_ctx].clamp(min=0), "labels": w} for w in windows.split(batch_size))


def dataset_batches(path: str, n_ctx: int, batch_size: int, split: str, max_batches: int | None):
    loader = build_dataloader(DataConfig(train=path, shuffle=False), split, n_ctx=n_ctx,
                              micro_batch_size=batch_size, seed=0, endless=False)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            yield batch
    finally:
        loader.close()


def evaluate_loss(model, batches, progress: bool = True) -> dict:
    """Token-weighted mean cross-entropy of `model` over `batches` (see iter_batches)."""
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, file=sys.stderr, leave=False):
            labels = batch["labels"]
            count = int((labels[:, 1:] != IGNORE).sum())
            if count == 0:
                continue
            loss = model(batch["input_ids"], labels=labels)
            total_loss += float(loss) * count
            total_tokens += count
    if total_tokens == 0:
        raise UserError("no token to evaluate (every window is shorter than 2 tokens); pass more text")
    mean = total_loss / total_tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": total_tokens}


def check_json_target(path: str, overwrite: bool) -> None:
    """--json FILE: its folder exists, and an existing FILE is replaced only with --overwrite (the rule of
    every mmscale output)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"--json: folder '{target.parent}' does not exist; create it first", 2)
    if target.is_dir():
        raise UserError(f"--json: '{target}' is a folder; give a file name", 2)
    if target.exists() and not overwrite:
        raise UserError(f"--json: '{target}' already exists; pass --overwrite or another --json path", 2)


def check_data_tokenizer(data: list[str], export, meta: dict) -> None:
    """A prepared dataset must have been tokenized with the export's tokenizer (same sha256)."""
    if len(data) != 1 or not Path(data[0]).is_dir():
        return

    want = tokenizer_sha(read_manifest(data[0]))
    have = file_sha256(Path(export) / meta["tokenizer"])
    if want and want != have:
        raise UserError(f"dataset '{data[0]}' was tokenized with tokenizer sha256 {want[:16]}... but export "
                        f"'{export}' has tokenizer {have[:16]}...; evaluate on data prepared with the export's "
                        "tokenizer.model (or on text files)", 2)


# ---------------------------------------------------------------------------------------------
# `mmscale eval`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export", help="an export folder (mmscale convert)")
    parser.add_argument("--data", nargs="+", required=True, metavar="DATASET_OR_FILE",
                        help="a prepared dataset folder, or .txt/.jsonl files")
    parser.add_argument("--split", default="val", help="split of a prepared dataset (default val)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0 = all)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json:  # outputs are checked before the work, as every command does
        check_json_target(args.json, getattr(args, "overwrite", False))
    model, meta, sp = load_export_with_tokenizer(args.export)
    check_data_tokenizer(args.data, args.export, meta)
    batches = iter_batches(args.data, sp, model.config.n_ctx, args.batch_size, args.split,
                           args.max_batches if args.max_batches > 0 else None)
    result = evaluate_loss(model, batches)
    print(f"loss {result['loss']:.4f} nats/token   perplexity {result['perplexity']:.3f}   "
          f"tokens {result['tokens']:,}")
    if args.json:
        Path(args.json).write_text(json.dumps({"export": str(args.export), **result}, indent=2) + "\n")
    return 0
