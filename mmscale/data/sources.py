"""Reading documents for `mmscale prepare` and `mmscale tokenizer train`.

Plain text (separator lines, or blank lines when there are none), JSONL (a text field), Parquet (a
text column) and Hugging Face datasets by name (`hf:NAME[:CONFIG][@SPLIT]`). Every reader streams
its input and reports bad input as a one-line UserError naming the file and where (byte offset of
a non-UTF-8 byte, line of a JSONL record).
"""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmscale.errors import UserError
from mmscale.fsutil import file_sha256

# documents in plain-text input are split on this line (`mmscale prepare`, `mmscale tokenizer train`)
DEFAULT_SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md")


class NotUTF8Error(UserError):
    """A text input with a non-UTF-8 byte. The message names no option: only the command that has one (prepare's
    --errors replace) adds it, so a caller without it (tokenizer train, experiment) never hints at one."""


def _decode(raw: bytes, path: str, offset: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise NotUTF8Error(f"'{path}' is not valid UTF-8 at byte offset {offset + e.start}; "
                           "fix the file (save it as UTF-8)") from None


def _lines(path: str, errors: str) -> Iterator[str]:
    """Lines of a file without their newline, decoded one at a time (constant memory); a bad byte
    is reported with its offset in the file."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:  # "\n" is never inside a multi-byte UTF-8 sequence: splitting first is safe
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            yield line[:-1] if line.endswith("\n") else line


def _has_separator_line(path: str, sep_line: str) -> bool:
    sep_bytes = sep_line.encode()
    with open(path, "rb") as f:
        return any(sep_bytes in raw and raw.decode("utf-8", "replace").strip() == sep_line for raw in f)


def iter_text_documents(path: str, *, separator: str = DEFAULT_SEPARATOR, errors: str = "strict",
                        per_line: bool = False) -> Iterator[str]:
    """Documents of a plain-text file: split on separator lines, or on blank lines if there are none;
    with `per_line` every non-blank line is a document.

    A document keeps its inner newlines; the newlines around a separator line are not part of it.
    """
    sep_line = separator.strip()
    doc: list[str] = []
    if per_line:
        yield from (line for line in _lines(path, errors) if line.strip())
    elif sep_line and _has_separator_line(path, sep_line):
        for line in itertools.chain(_lines(path, errors), [sep_line]):
            if line.strip() == sep_line:
                text_of_doc = "\n".join(doc).strip("\n")
                if text_of_doc.strip():  # nothing but whitespace between two separators: no document
                    yield text_of_doc
                doc = []
            else:
                doc.append(line)
    else:
        for line in itertools.chain(_lines(path, errors), [""]):
            if line.strip():
                doc.append(line)
            elif doc:
                yield "\n".join(doc)
                doc = []


def iter_jsonl_documents(path: str, *, field: str, errors: str = "strict") -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"'{path}' line {lineno} is not valid JSON ({e.msg}); fix that line") from None
            if not isinstance(obj, dict) or field not in obj:
                raise UserError(f"'{path}' line {lineno} has no field '{field}'; "
                                "pass --text-field with the name of the text field")
            value = obj[field]
            if not isinstance(value, str):
                raise UserError(f"'{path}' line {lineno}: field '{field}' is {type(value).__name__}, "
                                "not a string; pass --text-field naming a text field")
            yield value


def iter_parquet_documents(path: str, *, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # lazy: optional (Parquet / hf: inputs only) and slow to import
    except ImportError:
        raise UserError("reading Parquet needs pyarrow; install it with `pip install pyarrow`") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"'{path}' is not a readable Parquet file ({type(e).__name__}); check the file") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"'{path}' has no column '{field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "pass --text-field with the text column")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def iter_hf_documents(spec: str, *, field: str) -> Iterator[str]:
    """`hf:NAME[:CONFIG][@SPLIT]` -> the text column of a Hugging Face dataset."""
    try:
        import datasets  # lazy: optional (Parquet / hf: inputs only) and slow to import
    except ImportError:
        raise UserError(f"input '{spec}' is a Hugging Face dataset and needs the `datasets` library; install "
                        "it with `pip install datasets` (or pass local files)") from None
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    # huggingface_hub logs every failed retry to stderr; the one-line error below says what went wrong
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:
        raise UserError(f"could not load Hugging Face dataset '{name}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the name and the network") from None
    finally:
        hub_log.setLevel(level)
    if field not in ds.column_names:
        raise UserError(f"dataset '{name}' has no column '{field}' (columns: {', '.join(ds.column_names)}); "
                        "pass --text-field")
    for value in ds[field] if len(ds) < 100_000 else (row[field] for row in ds):
        if value is not None:
            yield value


@dataclass
class Source:
    """One input: a file (or a Hugging Face dataset) and how to read it."""

    spec: str
    kind: str  # text | jsonl | parquet | hf

    def documents(self, opts) -> Iterator[str]:
        """`opts`: anything with .separator, .errors and .text_field (PrepareOptions, argparse args)."""
        if self.kind == "text":
            return iter_text_documents(self.spec, separator=opts.separator, errors=opts.errors,
                                       per_line=getattr(opts, "doc_per_line", False))
        if self.kind == "jsonl":
            return iter_jsonl_documents(self.spec, field=opts.text_field, errors=opts.errors)
        if self.kind == "parquet":
            return iter_parquet_documents(self.spec, field=opts.text_field)
        return iter_hf_documents(self.spec, field=opts.text_field)

    def fingerprint(self) -> str:
        return self.spec if self.kind == "hf" else file_sha256(self.spec)


def resolve_sources(inputs: list[str]) -> list[Source]:
    if not inputs:
        raise UserError("no --input given; pass text, JSONL or Parquet files")
    sources = []
    for spec in inputs:
        if spec.startswith("hf:"):
            sources.append(Source(spec, "hf"))
            continue
        p = Path(spec)
        if p.is_dir():
            files = sorted(q for q in p.iterdir()
                           if q.is_file() and (q.suffix in TEXT_SUFFIXES + (".jsonl", ".parquet")))
            if not files:
                raise UserError(f"directory '{spec}' holds no .txt, .jsonl or .parquet files; pass files")
            sources.extend(resolve_sources([str(q) for q in files]))
            continue
        if not p.is_file():
            raise UserError(f"input '{spec}' does not exist; pass an existing file")
        if p.stat().st_size == 0:
            raise UserError(f"input '{spec}' is empty; pass a file with text in it")
        kind = "jsonl" if p.suffix in (".jsonl", ".ndjson") else "parquet" if p.suffix == ".parquet" else "text"
        sources.append(Source(str(p), kind))
    return sources
