"""Sentencepiece tokenizers: lossless training, loading and hashing; the `mmscale tokenizer` command.

    mmscale tokenizer train --input stories.txt --vocab-size 4096 --out tok.model

Tokenizers trained here are lossless (`decode(encode(text)) == text` for any UTF-8 text): the
normaliser is the identity, whitespace is kept as it is, and characters outside the vocabulary
fall back to their UTF-8 bytes. Special ids are fixed (the Data contract in ARCHITECTURE.md):

    pad 0 <pad>    unk 1 <unk>    bos 2 <s>    eos 3 </s>

Any other sentencepiece `.model` file (for example a Llama or Mistral tokenizer) loads as well;
its special ids are whatever it defines. Hugging Face tokenizers load too (`load_tokenizer` on a
`tokenizer.json` file, on any file holding that JSON, or on a local folder loadable by AutoTokenizer),
behind the same small interface (`HFTokenizer`); they need the `tokenizers` package.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import threading
import time
from pathlib import Path

import sentencepiece as spm

from mmscale.cli.conventions import check_output_path
from mmscale.data.sources import DEFAULT_SEPARATOR, iter_text_documents
from mmscale.errors import UserError
from mmscale.fsutil import atomic_write, file_sha256, usable_cpus

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def is_hf_tokenizer_file(path: str | os.PathLike) -> bool:
    """True for a file holding a Hugging Face tokenizer.json (whatever its name): it is a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


# tokens taken as EOS of a tokenizer.json that comes without a tokenizer_config.json naming one
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the part of sentencepiece's interface mmscale uses.

    `encode` adds no special tokens (as mmscale's sentencepiece use: documents are their pieces, EOS is
    appended by the caller); `decode` keeps special tokens out. Special ids come from the folder's
    tokenizer_config.json (or the one next to a tokenizer.json file), else from well-known token names.
    """

    def __init__(self, tokenizer, specials: dict | None = None, source: str = ""):
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0
        specials = dict(specials or {})
        found = {}
        for name, cands in (("eos", EOS_CANDIDATES), ("pad", PAD_CANDIDATES), ("unk", UNK_CANDIDATES),
                            ("bos", BOS_CANDIDATES)):
            tok = specials.get(name)
            if tok is None and name not in specials:
                tok = next((c for c in cands if c in vocab), None)
            found[name] = vocab.get(tok, -1) if tok is not None else -1
        self._ids = found

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "HFTokenizer":
        p = Path(path)
        try:
            from tokenizers import Tokenizer  # lazy: optional (HF tokenizers), slow import
        except ImportError:
            raise UserError(f"tokenizer '{path}' is a Hugging Face tokenizer; install `tokenizers` "
                            "(pip install -e .[ecosystem])") from None
        config_file = None
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                json_file, config_file = p / "tokenizer.json", p / "tokenizer_config.json"
            else:
                return cls._from_auto(p)
        else:
            json_file = p  # a tokenizer.json, or a dataset's / export's tokenizer.model holding its JSON
            config_file = p.parent / "tokenizer_config.json"
        try:
            tok = Tokenizer.from_file(str(json_file))
        except Exception as e:
            raise UserError(f"tokenizer '{json_file}' is not a valid Hugging Face tokenizer.json "
                            f"({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
        specials = {}
        if config_file is not None and config_file.is_file():
            try:
                conf = json.loads(config_file.read_text())
            except ValueError:
                raise UserError(f"'{config_file}' is not valid JSON; fix or remove it") from None
            for name in ("eos", "pad", "unk", "bos"):
                if f"{name}_token" in conf:
                    v = conf[f"{name}_token"]
                    specials[name] = v.get("content") if isinstance(v, dict) else v
        return cls(tok, specials, str(p))

    @classmethod
    def _from_auto(cls, folder: Path) -> "HFTokenizer":
        """A folder without tokenizer.json (e.g. vocab.json + merges.txt): AutoTokenizer converts it."""
        try:
            from transformers import AutoTokenizer  # lazy: optional (HF tokenizers), slow import
        except ImportError:
            raise UserError(f"tokenizer folder '{folder}' has no tokenizer.json; install transformers to convert it "
                            "(pip install -e .[ecosystem])") from None
        try:
            auto = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        except Exception as e:
            raise UserError(f"'{folder}' is not a tokenizer folder AutoTokenizer can load "
                            f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__}); pass a "
                            "sentencepiece .model, a tokenizer.json or a tokenizer folder") from None
        if not getattr(auto, "is_fast", False):
            raise UserError(f"'{folder}' holds a tokenizer with no fast (tokenizers) version; pass a tokenizer.json")
        specials = {name: getattr(auto, f"{name}_token") for name in ("eos", "pad", "unk", "bos")}
        return cls(auto.backend_tokenizer, specials, str(folder))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def special_tokens(self) -> dict:
        return {name: self.id_to_piece(i) for name, i in self._ids.items() if i >= 0}

    # -- the sentencepiece interface mmscale uses
    def encode(self, text, num_threads: int | None = None, **_):
        if isinstance(text, str):
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self.tokenizer.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int:
        i = self.tokenizer.token_to_id(piece)
        return -1 if i is None else i

    def get_piece_size(self) -> int:
        return self._size

    def vocab_size(self) -> int:
        return self._size

    def eos_id(self) -> int:
        return self._ids["eos"]

    def pad_id(self) -> int:
        return self._ids["pad"]

    def unk_id(self) -> int:
        return self._ids["unk"]

    def bos_id(self) -> int:
        return self._ids["bos"]


def is_hf_tokenizer(path: str | os.PathLike) -> bool:
    """A folder, or a file holding tokenizer.json's JSON (not a sentencepiece model)."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and is_hf_tokenizer_file(p))


def load_tokenizer(path: str | os.PathLike):
    """Load a sentencepiece model (or a Hugging Face tokenizer: see HFTokenizer); UserError when it is missing
    or neither."""
    p = Path(path)
    if p.is_dir() or (p.is_file() and is_hf_tokenizer_file(p)):
        return HFTokenizer.from_path(p)
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
    for path in paths:
        yield from iter_text_documents(path, separator=separator, errors="strict")


def _interruptible(fn, **kwargs):
    """fn(**kwargs) in a daemon thread while this (main) thread waits: sentencepiece's C++ training runs for
    minutes on large inputs without returning to Python, so a Ctrl-C or SIGTERM would wait for it; here the
    signal's exception is raised at once in the main thread (the process then ends, and the thread with it)."""
    result: dict = {}

    def target():
        try:
            fn(**kwargs)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    t = threading.Thread(target=target, name="sentencepiece-train", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in result:
        raise result["error"]


def train_tokenizer(inputs: list[str], vocab_size: int, out: str | os.PathLike, *,
                    model_type: str = "bpe", separator: str = DEFAULT_SEPARATOR,
                    max_sentence_length: int = 1 << 16, input_sentence_size: int = 2_000_000,
                    seed: int = 0) -> Path:
    """Train a lossless sentencepiece model on plain-text files and write it to `out` (a .model).

    Written to a temporary file next to `out` and renamed, so an interrupted run leaves no model.
    """
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
        _interruptible(spm.SentencePieceTrainer.Train,
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
            shuffle_input_sentence=True, num_threads=usable_cpus(),
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
    atomic_write(out, model.getvalue())
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
        check_output_path(out, "--out", kind="file", overwrite=args.overwrite, inputs=args.input)
        t0 = time.perf_counter()
        train_tokenizer(args.input, args.vocab_size, out, model_type=args.model_type,
                        separator=args.separator, seed=args.seed)
        sp = load_tokenizer(out)
        print(f"wrote {out}: {args.model_type}, {sp.get_piece_size()} pieces, "
              f"ids {special_ids(sp)}, sha256 {file_sha256(out)[:16]}, {time.perf_counter() - t0:.1f} s")
        return 0
    raise UserError(f"unknown action {args.action!r}; use `mmscale tokenizer train`")
