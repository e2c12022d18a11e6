"""Fast fixtures for tests that need a prepared dataset (training, SLURM, export, retrieval tests).

    from tests._data_helpers import make_tiny_dataset
    data_dir = make_tiny_dataset(tmp_path, n_ctx=32, vocab_size=512)
    cfg = load_config(None, [f"data.train={data_dir}", "model.n_ctx=32", "model.vocab_size=512"])

The built-in story corpus -> a BPE tokenizer -> `mmscale prepare`, in a few seconds. The
tokenizer and corpus of a (stories, seed, vocab_size) are cached for the test session, so a
second call only prepares the shards.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

_CACHE: dict[tuple, Path] = {}
_CACHE_ROOT: Path | None = None


def _cache_dir() -> Path:
    global _CACHE_ROOT
    if _CACHE_ROOT is None:
        _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="mmscale-test-corpus-"))
        import atexit

        atexit.register(shutil.rmtree, _CACHE_ROOT, True)
    return _CACHE_ROOT


def make_tiny_corpus(stories: int = 400, seed: int = 0, vocab_size: int = 512) -> tuple[Path, Path]:
    """(stories.txt, tokenizer.model) of the built-in corpus, cached for the session."""
    from mmscale.data.synth import write_corpus
    from mmscale.data.tokenizer import train_tokenizer

    key = (stories, seed, vocab_size)
    if key not in _CACHE:
        d = _cache_dir() / f"s{stories}-seed{seed}-v{vocab_size}"
        write_corpus(d, stories, seed, overwrite=True)
        train_tokenizer([str(d / "stories.txt")], vocab_size, d / "tokenizer.model")
        _CACHE[key] = d
    d = _CACHE[key]
    return d / "stories.txt", d / "tokenizer.model"


def make_tiny_dataset(tmp_path, n_ctx: int = 32, vocab_size: int = 512, stories: int = 400,
                      layout: str = "packed", *, seed: int = 0, val_fraction: float = 0.1,
                      pad: str = "right", name: str = "data", workers: int = 1) -> Path:
    """A prepared dataset dir under `tmp_path` (manifest.json, train/, val/, tokenizer.model).

    vocab_size is the tokenizer's (set model.vocab_size to it); with 400 stories and n_ctx 32 there
    are ~1,000 packed train samples.
    """
    from mmscale.data.prepare import PrepareOptions, prepare

    text, tok = make_tiny_corpus(stories, seed, vocab_size)
    out = Path(tmp_path) / name
    prepare(PrepareOptions(inputs=[str(text)], tokenizer=str(tok), n_ctx=n_ctx, out=str(out),
                           layout=layout, pad=pad, val_fraction=val_fraction, workers=workers,
                           seed=seed, progress=False, shard_bytes=1 << 16))
    return out
