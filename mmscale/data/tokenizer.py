"""Sentencepiece tokenizers: lossless training, loading and hashing; the `mmscale tokenizer` command.

    mmscale tokenizer train --input stories.txt --vocab-size 4096 --out tok.model

Tokenizers trained here are lossless (`decode(encode(text)) == text` for any UTF-8 text): the
normaliser is the identity, whitespace is kept as it is, and characters outside the vocabulary
fall back to their UTF-8 bytes. Special ids are fixed (the Data contract in ARCHITECTURE.md):

    pad 0 <pad>    unk 1 <unk>    bos 2 <s>    eos 3 </s>

Any other sentencepiece `.model` file (for example a Llama or Mistral tokenizer) loads as well;
its special ids are whatever it defines.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import re
import tempfile
import time
from pathlib import Path

from mmscale.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# documents in plain-text training input are split on this line (as in `mmscale prepare`)
DEFAULT_SEPARATOR = "<|endoftext|>"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(path: str | os.PathLike):
    """Load a sentencepiece model; UserError when it is missing or not a sentencepiece model."""
    import sentencepiece as spm

    p = Path(path)
    if not p.is_file():
        raise UserError(f"tokenizer '{path}' does not exist; train one with `mmscale tokenizer train`")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(p))
    except Exception:  # sentencepiece raises OSError/RuntimeError with a C++ message
        raise UserError(f"tokenizer '{path}' is not a sentencepiece .model file; "
                        "pass a file written by `mmscale tokenizer train` or sentencepiece") from None
    return sp


def special_ids(sp) -> dict[str, int]:
    """pad/unk/bos/eos ids of a tokenizer (-1 where it has none)."""
    return {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}


def _iter_training_documents(paths: list[str], separator: str):
    """Yield documents from plain-text files (separator lines or blank lines between documents)."""
    from mmscale.data.sources import iter_text_documents

    for path in paths:
        yield from iter_text_documents(path, separator=separator, errors="strict")


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | os.PathLike, *,
                    model_type: str = "bpe", separator: str = DEFAULT_SEPARATOR,
                    max_sentence_length: int = 1 << 16, input_sentence_size: int = 2_000_000,
                    seed: int = 0) -> Path:
    """Train a lossless sentencepiece model on plain-text files and write it to `out` (a .model).

    Written to a temporary file next to `out` and renamed, so an interrupted run leaves no model.
    """
    import sentencepiece as spm

    out = Path(out)
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"--model-type must be bpe or unigram, got {model_type!r}")
    if vocab_size < 8:
        raise UserError(f"--vocab-size must be at least 8 (4 special ids + pieces), got {vocab_size}")
    if not inputs:
        raise UserError("no --input files given; pass one or more text files")
    for path in inputs:
        if not Path(path).is_file():
            raise UserError(f"input '{path}' does not exist; pass an existing text file")
    # sentencepiece trains on "sentences": give it the documents' lines, lazily (it samples at most
    # input_sentence_size of them). The newline itself is a user-defined piece, so it still encodes.
    lines = (line for doc in _iter_training_documents(inputs, separator) for line in doc.split("\n") if line)
    first = next(lines, None)
    if first is None:
        raise UserError(f"input {', '.join(map(repr, inputs))} holds no text; pass non-empty files")
    sentences = itertools.chain([first], lines)
    model = io.BytesIO()
    out.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)  # sentence sampling is the only randomness
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=sentences, model_writer=model,
            vocab_size=vocab_size, model_type=model_type,
            # lossless: no normalisation, whitespace as is, unknown characters as bytes
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            # newline is a real character of documents; keep it as its own piece
            user_defined_symbols=["\n"],
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if need:  # byte fallback alone takes 256 pieces; every character of the text needs one more
            raise UserError(f"--vocab-size {vocab_size} is too small for this input: its characters, the 256 "
                            f"byte pieces and the specials need at least {need.group(2)}; pass --vocab-size "
                            f">= {need.group(2)}") from None
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg)
        if most:
            raise UserError(f"--vocab-size {vocab_size} is too large for this input: it supports at most "
                            f"{most.group(1)} pieces; pass --vocab-size <= {most.group(1)} or more text") from None
        if "Vocabulary size is too high" in msg or "vocab_size" in msg:
            raise UserError(f"--vocab-size {vocab_size} is too large for this input ({msg}); "
                            "pass a smaller --vocab-size or more text") from None
        raise UserError(f"sentencepiece training failed: {msg}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# `mmscale tokenizer`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a lossless sentencepiece tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="plain-text files (documents separated by --separator lines or blank lines)")
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces, specials included")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--out", required=True, help="the .model file to write")
    t.add_argument("--separator", default=DEFAULT_SEPARATOR,
                   help=f"document separator line (default {DEFAULT_SEPARATOR!r})")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise UserError(f"'{out}' already exists; pass --overwrite to replace it or choose another --out")
        t0 = time.perf_counter()
        train_tokenizer(args.input, args.vocab_size, out, model_type=args.model_type,
                        separator=args.separator, seed=args.seed)
        sp = load_tokenizer(out)
        print(f"wrote {out}: {args.model_type}, {sp.get_piece_size()} pieces, "
              f"ids {special_ids(sp)}, sha256 {file_sha256(out)[:16]}, {time.perf_counter() - t0:.1f} s")
        return 0
    raise UserError(f"unknown action {args.action!r}; use `mmscale tokenizer train`")
