"""The data of an experiment: prepared datasets per n_ctx (made from text when the spec gives text), the other
source's held-out text, the retrieval collection; each made once under EXP/data and reused on --resume."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mmscale.data.loader import read_manifest
from mmscale.data.prepare import PrepareOptions, prepare
from mmscale.data.synth import write_corpus
from mmscale.data.tokenizer import train_tokenizer
from mmscale.errors import UserError
from mmscale.experiment.spec import Spec, need
from mmscale.retrieval.importer import import_collection


def resolve(spec: Spec, p: str) -> str:
    if p in ("synth",) or "://" in p:
        return p
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (spec.base_dir / q).resolve() if (spec.base_dir / q).exists() else q.resolve())


def prepare_data(spec: Spec, exp: Path, n_ctx_values: list[int], progress: bool = False) -> dict:
    """Prepared datasets for every n_ctx (keyed by n_ctx), the other source, the retrieval collection."""
    out = {"train": {}, "other": {}, "retrieval": None, "tokenizer": None}
    data_dir = exp / "data"
    if spec.data.train:
        _use_prepared_datasets(spec, n_ctx_values, out)
    else:
        try:
            _prepare_from_text(spec, data_dir, n_ctx_values, progress, out)
        except UserError as e:  # tokenizer train's / prepare's hints name their flags: name the spec keys
            raise UserError(spec_keys_for_flags(str(e)), e.exit_code) from None
    if spec.retrieval.enabled:
        out["retrieval"] = _retrieval_collection(spec, data_dir)
    return out


def _use_prepared_datasets(spec: Spec, n_ctx_values: list[int], out: dict) -> None:
    d = spec.data
    train = resolve(spec, d.train)
    need(Path(train).is_dir(), f"spec key 'data.train': '{train}' is not a prepared dataset folder")
    m = read_manifest(train)
    for nc in n_ctx_values:
        need(nc is None or m.get("n_ctx") == nc,
             f"spec key 'axes.n_ctx': {nc} differs from data.train's n_ctx {m.get('n_ctx')}; give data.text "
             "so the experiment prepares each n_ctx, or one n_ctx")
        out["train"][nc] = train
    out["tokenizer"] = str(Path(train) / "tokenizer.model")
    if d.other:
        other = resolve(spec, d.other)
        need(Path(other).is_dir(), f"spec key 'data.other': '{other}' is not a prepared dataset folder")
        for nc in n_ctx_values:
            out["other"][nc] = other


def _synth_corpus(spec: Spec, data_dir: Path) -> Path:
    """The built-in corpus (stories.txt, pairs.jsonl) under data_dir/synth, written once."""
    corpus = data_dir / "synth"
    if not (corpus / "pairs.jsonl").is_file():
        write_corpus(corpus, int(spec.data.get("synth_stories", 3000)), 0, overwrite=True)
    return corpus


FLAG_TO_SPEC = {"--vocab-size": "data.vocab_size", "--val-fraction": "data.val_fraction", "--n-ctx": "axes.n_ctx"}


def spec_keys_for_flags(msg: str) -> str:
    """A data error worded for `mmscale prepare` / `tokenizer train`, reworded for a spec: flags with a spec key
    become that key; a hint at an option the experiment does not have is dropped."""
    for flag, key in FLAG_TO_SPEC.items():
        msg = msg.replace(f"pass {flag}", f"set the spec's {key} to").replace(flag, f"the spec's {key}")
    return re.sub(r"[;,]?\s*(or )?(pass |use )?--[a-z][a-z-]*[^;]*", "", msg)


def _prepare_from_text(spec: Spec, data_dir: Path, n_ctx_values: list[int], progress: bool, out: dict) -> None:
    d = spec.data
    text = d.text
    data_dir.mkdir(parents=True, exist_ok=True)
    if text == "synth":
        text = str(_synth_corpus(spec, data_dir) / "stories.txt")
    else:
        text = resolve(spec, text)
        need(Path(text).exists(), f"spec key 'data.text': '{text}' does not exist; give a text file or 'synth'")
    tok = data_dir / "tokenizer.model"
    if not tok.is_file():
        train_tokenizer([text] if Path(text).is_file() else [str(p) for p in sorted(Path(text).glob("*.txt"))],
                        int(d.get("vocab_size", 1024)), tok)
    out["tokenizer"] = str(tok)
    other_text = d.other_text
    if other_text == "synth":
        other_text = str(_synth_corpus(spec, data_dir) / "stories.txt")
    elif other_text:
        other_text = resolve(spec, other_text)
        need(Path(other_text).exists(), f"spec key 'data.other_text': '{other_text}' does not exist")
    for nc in n_ctx_values:
        need(nc is not None, "spec key 'axes.n_ctx' is needed with data.text (the windows to prepare)")
        target = data_dir / f"train-{nc}"
        if not (target / "manifest.json").is_file():
            prepare(PrepareOptions(inputs=[text], tokenizer=str(tok), n_ctx=nc, out=str(target),
                                   val_fraction=float(d.get("val_fraction", 0.05)), workers=1,
                                   progress=progress, overwrite=target.exists()))
        out["train"][nc] = str(target)
        if other_text:
            target = data_dir / f"other-{nc}"
            if not (target / "manifest.json").is_file():
                prepare(PrepareOptions(inputs=[other_text], tokenizer=str(tok), n_ctx=nc, out=str(target),
                                       val_fraction=0.5, workers=1, progress=progress, overwrite=target.exists()))
            out["other"][nc] = str(target)
    if d.other:
        for nc in n_ctx_values:
            out["other"][nc] = resolve(spec, d.other)


def _retrieval_collection(spec: Spec, data_dir: Path) -> str:
    d = spec.data
    r = d.retrieval
    if r == "synth":
        r = str(_synth_corpus(spec, data_dir) / "pairs.jsonl")
    else:
        r = resolve(spec, r)
        need(Path(r).exists(), f"spec key 'data.retrieval': '{r}' does not exist; give a BEIR folder, a pairs "
                               "JSONL or 'synth'")
    if Path(r).is_file():  # a pairs JSONL: held-out queries, as `retrieval import --test-fraction` writes
        coll = data_dir / "retrieval"
        if not (coll / "corpus.jsonl").is_file():
            import_collection(argparse.Namespace(
                format="pairs", pairs=r, out=str(coll), split="test", seed=0, overwrite=True,
                test_fraction=float(d.get("retrieval_test_fraction", 0.2))))
        r = str(coll)
    return r
