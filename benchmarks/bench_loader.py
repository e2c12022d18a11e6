"""The streaming loader's tokens/s per rank against the tokens/s a training step consumes, same machine.

    python benchmarks/bench_loader.py                          # builds a small dataset from the built-in corpus
    python benchmarks/bench_loader.py --data DIR --n-ctx 512   # a prepared dataset (mmscale prepare)

Loader: iterate `--batches` batches of build_dataloader (world size 1, i.e. one rank) after one warm-up
batch, and count tokens. Training: the mmscale mixer's step (fwd + bwd + AdamW) at the same n_ctx
and batch, with the model dims given. Target: the loader at least 20x faster than the step consumes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

import common
from common import add_clock_args, apply_clock_args, emit, header, table, time_fn  # noqa: I001

from mmscale.config import DataConfig, ModelConfig
from mmscale.models import build_model


def build_dataset(root: Path, n_ctx: int, stories: int, vocab: int) -> Path:
    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.synth import write_corpus
    from mmscale.data.tokenizer import train_tokenizer

    corpus = root / "corpus"
    write_corpus(corpus, stories, 0, overwrite=True)
    tok = train_tokenizer([str(corpus / "stories.txt")], vocab, corpus / "tokenizer.model")
    out = root / "data"
    prepare(PrepareOptions(inputs=[str(corpus / "stories.txt")], tokenizer=str(tok), n_ctx=n_ctx, out=str(out),
                           workers=1, progress=False, val_fraction=0.05))
    return out


def loader_tokens_per_s(data_dir, n_ctx, batch, batches, workers):
    from mmscale.data.loader import build_dataloader

    loader = build_dataloader(DataConfig(train=str(data_dir), num_workers=workers), "train", n_ctx=n_ctx,
                              micro_batch_size=batch, seed=0)
    try:
        it = iter(loader)
        next(it)  # start-up (shard index, shared memory) is not throughput
        clock = common.CLOCK["fn"]
        t0 = clock()
        tokens = 0
        for _ in range(batches):
            tokens += next(it)["input_ids"].numel()
        return tokens / (clock() - t0)
    finally:
        loader.close()


def train_tokens_per_s(n_ctx, batch, d, layers, vocab, repeats):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mixer", d_model=d, n_layers=layers, n_ctx=n_ctx, vocab_size=vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, n_ctx + 1))

    def step():
        model(ids[:, :-1], ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    med, _ = time_fn(step, "cpu", warmup=1, repeats=repeats)
    return batch * n_ctx / med


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="a prepared dataset dir (default: build one in a temp dir)")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers")
    p.add_argument("--stories", type=int, default=3000)
    p.add_argument("--tokenizer-vocab", type=int, default=1024, help="of the built dataset (a small corpus)")
    p.add_argument("--vocab", type=int, default=4096, help="of the model whose step is timed")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    add_clock_args(p)
    a = p.parse_args()
    apply_clock_args(a)
    tmp = Path(tempfile.mkdtemp(prefix="mmscale-bench-loader-"))
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)  # streaming's lock files go under the temp dir: keep them private
    try:
        data = Path(a.data) if a.data else build_dataset(tmp, a.n_ctx, a.stories, a.tokenizer_vocab)
        load = loader_tokens_per_s(data, a.n_ctx, a.batch, a.batches, a.workers)
        train = train_tokens_per_s(a.n_ctx, a.batch, a.d, a.layers, a.vocab, a.repeats)
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"n_ctx": a.n_ctx, "batch": a.batch, "workers": a.workers, "loader tokens/s (1 rank)": load,
             f"train step tokens/s (mixer d={a.d}, {a.layers} layers)": train, "loader / step": load / train}]
    emit(header("Streaming loader vs training step", "cpu") + "\n" + table(rows), a.out)


if __name__ == "__main__":
    main()
