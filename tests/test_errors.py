"""Issue G: hostile inputs and damaged files end in one clear line (or a documented fallback), and nothing
that existed before changes (mmscale/errors.py's contract, through `mmscale.cli.main` in-process).

The catalogue shares one tiny dataset, one trained run and its export (the `world` fixture, tests/_hostile.py);
every case works on its own copy of what it damages. Checkpoint damage is tests/test_checkpoint_damage.py, the
run dir's lock and marker tests/test_rundir.py.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from mmscale.cli import main as cli
from tests._dist import tiny_config
# clean_world_env is an autouse fixture: imported, it applies to every test here
from tests._hostile import (STEP1, STEP2, clean_world_env, copy, edit_json, flip_byte, raw_shards_removed,
                              snapshot, train_args, truncate, unchanged, _resume, _wait_for)  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# the catalogue: name -> setup(w, d) returning (argv, what the one line must say, exit status or None)
# (exit None = any non-zero). Paths under d are the case's own; d is hashed before and after.

CASES = {}


def case(name, status=None, runtime=False):
    """`runtime`: found while training runs, after the run's own start-up lines (MFU note, ...): the error is
    then the one error line, and the last."""
    def register(fn):
        CASES[name] = (fn, status, runtime)
        return fn
    return register


# --- configuration and command line
@case("train.lr=inf", 2)
def _(w, d):
    return train_args(w, d, "train.lr=inf"), "train.lr must be a finite number"


@case("train.lr=nan", 2)
def _(w, d):
    return train_args(w, d, "train.lr=.nan"), "train.lr must be a finite number"


@case("unknown config key", 2)
def _(w, d):
    return train_args(w, d, "model.colour=3"), "model.colour"


@case("config file is not YAML", 2)
def _(w, d):
    (d / "c.yaml").write_text("model: [1, 2\n")
    return ["train", "--config", str(d / "c.yaml")], "not valid YAML"


@case("config file is a list", 2)
def _(w, d):
    (d / "c.yaml").write_text("- 1\n- 2\n")
    return ["train", "--config", str(d / "c.yaml")], "must hold a mapping"


@case("model.n_ctx far from the dataset's", 2)
def _(w, d):
    return train_args(w, d, "model.n_ctx=8192"), "prepared with n_ctx 16 but model.n_ctx is 8192"


@case("model.vocab_size differs from the dataset's", 2)
def _(w, d):
    return train_args(w, d, "model.vocab_size=1024"), "vocab size 512 but model.vocab_size is 1024"


@case("model.n_ctx too large to build", 2)
def _(w, d):
    return ["train", f"run.dir={d / 'newrun'}", "model.n_ctx=2000000", "model.d_model=32", "model.n_layers=2"], \
        "lower model.n_ctx"


@case("data.val made with another tokenizer", 2)
def _(w, d):
    return train_args(w, d, f"data.val={w.other}"), "prepare both with one tokenizer"


@case("train.init_from with another tokenizer than the data", 2)
def _(w, d):
    return train_args(w, d, f"data.train={w.other}", f"train.init_from={w.export}"), "export's tokenizer.model"


@case("generate --temperature nan", 2)
def _(w, d):
    return ["generate", str(w.export), "--temperature", "nan"], "--temperature must be a number >= 0"


@case("generate --temperature negative", 2)
def _(w, d):
    return ["generate", str(w.export), "--temperature", "-1"], "--temperature must be a number >= 0"


@case("generate --temperature tiny", 2)
def _(w, d):
    return ["generate", str(w.export), "--temperature", "1e-30"], "too small to sample with"


@case("eval --json into a missing folder", 2)
def _(w, d):
    return ["eval", str(w.export), "--data", str(w.data), "--json", str(d / "no" / "x.json")], "does not exist"


@case("eval --json onto an existing file", 2)
def _(w, d):
    (d / "x.json").write_text("{}\n")
    return ["eval", str(w.export), "--data", str(w.data), "--json", str(d / "x.json")], "already exists"


@case("model-info --json onto an existing file", 2)
def _(w, d):
    (d / "m.json").write_text("{}\n")
    return ["model-info", "--json", str(d / "m.json"), "model.d_model=64"], "already exists; pass --overwrite"


# --- datasets
def _dataset(w, d, name="ds"):
    return copy(w.data, d / name)


@case("manifest missing a key")
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m.pop("n_ctx"))
    return train_args(w, d, f"data.train={ds}"), 'has no "n_ctx"'


@case("manifest key of the wrong type")
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m.update(vocab_size="512"))
    return train_args(w, d, f"data.train={ds}"), '"vocab_size": "512", not an integer'


@case("manifest is not JSON")
def _(w, d):
    ds = _dataset(w, d)
    truncate(ds / "manifest.json")
    return train_args(w, d, f"data.train={ds}"), "is not valid JSON"


@case("manifest is a list")
def _(w, d):
    ds = _dataset(w, d)
    (ds / "manifest.json").write_text("[1, 2]")
    return train_args(w, d, f"data.train={ds}"), "is not a JSON object"


@case("manifest splits without sample counts")
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m.update(splits={"train": {}}))
    return ["eval", str(w.export), "--data", str(ds)], "no sample count for the train split"


@case("index.json corrupt")
def _(w, d):
    ds = _dataset(w, d)
    (ds / "train" / "index.json").write_text('{"shards": [{"raw_data": 5')
    return train_args(w, d, f"data.train={ds}"), "index.json' is not a valid shard index"


@case("shard deleted")
def _(w, d):
    ds = raw_shards_removed(_dataset(w, d))
    (ds / "train" / "shard.00000.mds.zstd").unlink()
    return train_args(w, d, f"data.train={ds}"), "shard.00000.mds.zstd' is missing"


@case("shard truncated")
def _(w, d):
    ds = raw_shards_removed(_dataset(w, d))
    truncate(ds / "train" / "shard.00000.mds.zstd")
    return train_args(w, d, f"data.train={ds}"), "shard.00000.mds.zstd' has"


@case("shard bit-flipped (training)")
def _(w, d):
    ds = raw_shards_removed(_dataset(w, d))
    flip_byte(ds / "train" / "shard.00000.mds.zstd")
    return train_args(w, d, f"data.train={ds}"), "shard.00000.mds.zstd"


@case("decompressed shard bit-flipped (verify)")
def _(w, d):
    ds = _dataset(w, d)
    if not (ds / "train" / "shard.00000.mds").is_file():
        (ds / "train" / "shard.00000.mds").write_bytes(b"")  # (never the case after the fixture's training)
    flip_byte(ds / "train" / "shard.00000.mds", 0.9)
    return ["data", "verify", str(ds)], "does not match its xxh64 digest"


@case("token ids outside the vocab (training)", runtime=True)
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m.update(vocab_size=64))
    return train_args(w, d, f"data.train={ds}", "model.vocab_size=64"), "holds token id"


@case("verify: shard truncated")
def _(w, d):
    ds = raw_shards_removed(_dataset(w, d))
    truncate(ds / "val" / "shard.00000.mds.zstd")
    return ["data", "verify", str(ds)], "val/shard.00000.mds.zstd' has"


@case("verify: compressed shard bit-flipped")
def _(w, d):
    ds = raw_shards_removed(_dataset(w, d))
    flip_byte(ds / "train" / "shard.00000.mds.zstd")
    return ["data", "verify", str(ds)], "does not match its xxh64 digest"


@case("verify: token ids outside the vocab")
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m.update(vocab_size=64))
    return ["data", "verify", str(ds)], "outside the vocab of 64"


@case("verify: tokenizer replaced")
def _(w, d):
    ds = _dataset(w, d)
    shutil.copyfile(w.other / "tokenizer.model", ds / "tokenizer.model")
    return ["data", "verify", str(ds)], "tokenizer.model' has sha256"


@case("verify: index lists other counts")
def _(w, d):
    ds = _dataset(w, d)
    edit_json(ds / "manifest.json", lambda m: m["splits"]["val"].update(samples=3))
    return ["data", "verify", str(ds)], "the manifest 3"


# --- prepare
@case("prepare --overwrite onto the folder holding its input", 2)
def _(w, d):
    (d / "in.txt").write_text("One story.\n\nAnother story.\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"),
            "--n-ctx", "16", "--out", str(d), "--overwrite", "--workers", "1", "--no-progress"], "overlaps the input"


@case("prepare one document without separators")
def _(w, d):
    (d / "in.txt").write_text("line one\nline two\nline three\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"),
            "--n-ctx", "16", "--out", str(d / "out"), "--workers", "1", "--no-progress"], "--one-doc-per-line"


@case("prepare with a garbage tokenizer")
def _(w, d):
    (d / "in.txt").write_text("a\n\nb\n")
    (d / "tok.model").write_bytes(os.urandom(200))
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(d / "tok.model"),
            "--n-ctx", "16", "--out", str(d / "out"), "--workers", "1", "--no-progress"], "not a sentencepiece"


# --- checkpoints
def _run_copy(w, d):
    return copy(w.run, d / "run")


@case("explicit resume: model.pt truncated")
def _(w, d):
    run = _run_copy(w, d)
    truncate(run / "checkpoints" / STEP2 / "model.pt")
    return _resume(w, run, run / "checkpoints" / STEP2), "is damaged or incomplete: 'model.pt' has"


@case("explicit resume: optimizer.pt bit-flipped")
def _(w, d):
    run = _run_copy(w, d)
    flip_byte(run / "checkpoints" / STEP2 / "optimizer.pt")
    return _resume(w, run, run / "checkpoints" / STEP2), "'optimizer.pt' does not match its checksum"


@case("explicit resume: rank file deleted")
def _(w, d):
    run = _run_copy(w, d)
    (run / "checkpoints" / STEP2 / "rank_00000.pt").unlink()
    return _resume(w, run, run / "checkpoints" / STEP2), "'rank_00000.pt' is missing"


@case("explicit resume: meta.json garbled")
def _(w, d):
    run = _run_copy(w, d)
    (run / "checkpoints" / STEP2 / "meta.json").write_text('{"format": "mmscale-checkpoint", "step": ')
    return _resume(w, run, run / "checkpoints" / STEP2), "not valid JSON"


@case("resume: `latest` points outside its folder")
def _(w, d):
    run = _run_copy(w, d)
    (run / "checkpoints" / "latest").write_text("../../../etc\n")
    return _resume(w, run, run / "checkpoints"), "does not name a step_XXXXXXXX folder"


@case("auto resume: every checkpoint damaged")
def _(w, d):
    run = _run_copy(w, d)
    for step in (STEP1, STEP2):
        flip_byte(run / "checkpoints" / step / "model.pt")
    return _resume(w, run, "auto"), "every checkpoint in"


@case("convert RUN RUN --overwrite", 2)
def _(w, d):
    run = _run_copy(w, d)
    return ["convert", str(run), "--out", str(run), "--overwrite"], "overlaps the input"


@case("convert RUN RUN/checkpoints --overwrite", 2)
def _(w, d):
    run = _run_copy(w, d)
    return ["convert", str(run), "--out", str(run / "checkpoints"), "--overwrite"], "overlaps the input"


@case("convert --tokenizer garbage")
def _(w, d):
    (d / "tok.model").write_bytes(b"\x00garbage" * 20)
    return ["convert", str(w.run), "--out", str(d / "x"), "--tokenizer", str(d / "tok.model")], "not a sentencepiece"


@case("convert --tokenizer another tokenizer")
def _(w, d):
    return ["convert", str(w.run), "--out", str(d / "x"), "--tokenizer", str(w.other / "tokenizer.model")], \
        "is not the tokenizer the run's data"


@case("convert a bit-flipped checkpoint")
def _(w, d):
    run = _run_copy(w, d)
    flip_byte(run / "checkpoints" / STEP2 / "model.pt")
    return ["convert", str(run / "checkpoints" / STEP2), "--out", str(d / "x")], "is damaged"


@case("export-hf EXPORT EXPORT --overwrite", 2)
def _(w, d):
    ex = copy(w.export, d / "export")
    return ["export-hf", str(ex), "--out", str(ex), "--overwrite", "--no-verify"], "overlaps the input"


@case("tokenizer train --out onto its input --overwrite", 2)
def _(w, d):
    (d / "t.txt").write_text("some text\n\nmore text\n")
    return ["tokenizer", "train", "--data", str(d / "t.txt"), "--vocab-size", "300", "--out", str(d / "t.txt"),
            "--overwrite"], "overlaps the input"


# --- exports
def _export_copy(w, d):
    return copy(w.export, d / "export")


@case("export tokenizer path leads outside")
def _(w, d):
    ex = _export_copy(w, d)
    edit_json(ex / "config.json", lambda m: m.update(tokenizer="../../tokenizer.model"))
    return ["generate", str(ex), "--prompt", "Once"], "not a file inside the export"


@case("export config.json garbled")
def _(w, d):
    ex = _export_copy(w, d)
    truncate(ex / "config.json")
    return ["eval", str(ex), "--data", str(w.data)], "is not valid JSON"


@case("export without weights")
def _(w, d):
    ex = _export_copy(w, d)
    (ex / "model.safetensors").unlink()
    return ["generate", str(ex)], "has no model.safetensors"


@case("export tokenizer larger than the model's vocab")
def _(w, d):
    ex = _export_copy(w, d)
    shutil.copyfile(w.big_tok, ex / "tokenizer.model")
    return ["generate", str(ex), "--prompt", "Once"], "1024 pieces but the model's vocab_size is 512"


@case("representation: export tokenizer larger than the model's vocab")
def _(w, d):
    ex = _export_copy(w, d)
    shutil.copyfile(w.big_tok, ex / "tokenizer.model")
    return ["representation", str(ex), "--data", str(w.data)], "1024 pieces but the model's vocab_size is 512"


@case("retrieval eval: export tokenizer larger than the model's vocab")
def _(w, d):
    ex = _export_copy(w, d)
    shutil.copyfile(w.big_tok, ex / "tokenizer.model")
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    return ["retrieval", "eval", str(ex), "--pairs", str(d / "p.jsonl"), "--json", str(d / "r.json"),
            "--candidates", "2", "--no-baseline"], "1024 pieces but the model's vocab_size is 512"


@case("eval on data made with another tokenizer", 2)
def _(w, d):
    return ["eval", str(w.export), "--data", str(w.other)], "evaluate on data prepared with the export's"


# --- retrieval pairs
@case("pairs file binary")
def _(w, d):
    (d / "p.jsonl").write_bytes(bytes(range(256)) * 4)
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--json", str(d / "r.json")], \
        "is not UTF-8 text"


@case("pairs file with NUL bytes")
def _(w, d):
    (d / "p.jsonl").write_bytes(b'{"query": "a", "passage": "b"}\n\x00\x00\x00\n')
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--json", str(d / "r.json")], \
        "NUL bytes"


@case("pairs file Latin-1")
def _(w, d):
    (d / "p.jsonl").write_bytes('{"query": "café", "passage": "b"}\n'.encode("latin-1"))
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--json", str(d / "r.json")], \
        "p.jsonl:1 is not UTF-8 text"


# ----------------------------------------------------------------------------------------------
# issue G2: the classes a second hostile probe found (each with several instances)

_HELD_LOCKS: list = []  # run-dir locks a case holds while the command runs (released after each case)


def _spec(d: Path, text: str) -> Path:
    (d / "spec.yaml").write_text(text)
    return d / "spec.yaml"


_BOMB = "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9 if p else ['x'] * 9)}]\n"
                for p, c in zip([""] + list("abcdefgh"), "abcdefghi"))


# --- the run dir: one run at a time (a lock), and only a run dir of ours
@case("train into a run dir another live run holds")
def _(w, d):
    from mmscale.run.rundir import RunLock

    run = _run_copy(w, d)
    _HELD_LOCKS.append(RunLock(run).acquire())  # a live holder: its flock is held (another open file)
    return _resume(w, run, "auto"), "is in use by another run (host "


@case("train into a run dir locked from another host")
def _(w, d):
    run = _run_copy(w, d)
    (run / ".mmscale-lock").write_text(json.dumps({"host": "node-on-the-other-side", "pid": 4242, "job": "991",
                                                   "started": "2026-12-05T01:00:00Z"}) + "\n")
    return _resume(w, run, "auto"), "locked by a run on another host (host node-on-the-other-side pid 4242"


@case("train into a new run dir another live run holds")
def _(w, d):
    from mmscale.run.rundir import RunLock

    (d / "held").mkdir()
    _HELD_LOCKS.append(RunLock(d / "held").acquire())
    return ["train", "--config", str(w.cfg_path), f"run.dir={d / 'held'}"], "is in use by another run (host "


@case("run.dir holds the user's own config.yaml and metrics.jsonl", 2)
def _(w, d):
    mine = d / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("model:\n  d_model: 32\nnotes: my own experiment\n")
    (mine / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    return ["train", "--config", str(w.cfg_path), f"run.dir={mine}"], "is not an mmscale run"


@case("run.dir is a folder of the user's files", 2)
def _(w, d):
    (d / "photos").mkdir()
    (d / "photos" / "a.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(64))
    return ["train", "--config", str(w.cfg_path), f"run.dir={d / 'photos'}"], "is not an mmscale run"


@case("run.dir holds a checkpoints/ folder that is not ours", 2)
def _(w, d):
    (d / "other" / "checkpoints" / "epoch_3").mkdir(parents=True)
    (d / "other" / "checkpoints" / "epoch_3" / "model.bin").write_bytes(b"\0" * 32)
    return ["train", "--config", str(w.cfg_path), f"run.dir={d / 'other'}"], "is not an mmscale run"


# --- bounded YAML input
@case("config: alias bomb under run.dir", 2)
def _(w, d):
    (d / "c.yaml").write_text(_BOMB + "run:\n  dir: *i\n")
    return ["train", "--config", str(d / "c.yaml")], "aliases (*name) expand to more than"


@case("config: alias bomb in an override", 2)
def _(w, d):
    return train_args(w, d, "log.tags=[&a [x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,"
                            "*b], &e [*c,*c,*c,*c,*c,*c,*c,*c], &f [*e,*e,*e,*e,*e,*e,*e,*e], [*f,*f,*f,*f,*f,*f]]"), \
        "aliases (*name) expand to more than"


@case("config: an alias inside its own anchor", 2)
def _(w, d):
    (d / "c.yaml").write_text("run: &r\n  dir: x\n  self: *r\n")
    return ["train", "--config", str(d / "c.yaml")], "used inside its own anchor"


@case("config: 5 MiB file", 2)
def _(w, d):
    (d / "c.yaml").write_text("model:\n  d_model: 32\n" + "# padding\n" * (5 << 17))
    return ["train", "--config", str(d / "c.yaml")], "over the 4 MiB limit"


@case("config: a duplicate key", 2)
def _(w, d):
    (d / "c.yaml").write_text("model:\n  d_model: 32\ntrain:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.001\n")
    return ["train", "--config", str(d / "c.yaml"), f"run.dir={d / 'newrun'}"], \
        "has the key 'lr' twice (lines 4 and 6)"


@case("config: a duplicate section", 2)
def _(w, d):
    (d / "c.yaml").write_text("run:\n  seed: 1\nmodel:\n  d_model: 32\nrun:\n  seed: 2\n")
    return ["config", "show", "--config", str(d / "c.yaml")], "has the key 'run' twice (lines 1 and 5)"


@case("config: not UTF-8", 2)
def _(w, d):
    (d / "c.yaml").write_bytes("run:\n  dir: caf\u00e9\n".encode("latin-1"))
    return ["model-info", "--config", str(d / "c.yaml")], "is not UTF-8 text (line 2)"


@case("experiment spec: alias bomb under axes.seeds", 2)
def _(w, d):
    return ["experiment", "run", str(_spec(d, _BOMB + "axes:\n  seeds: *i\n")), "--out", str(d / "exp")], \
        "aliases (*name) expand to more than"


@case("experiment spec: a duplicate key", 2)
def _(w, d):
    spec = _spec(d, "name: x\ndata:\n  text: synth\naxes:\n  seeds: [0]\n  n_ctx: [16]\n  seeds: [1, 2]\n")
    return ["experiment", "run", str(spec), "--out", str(d / "exp")], "has the key 'seeds' twice (lines 5 and 7)"


@case("experiment spec: 5 MiB", 2)
def _(w, d):
    return ["experiment", "run", str(_spec(d, "name: x\n" + "#\n" * (5 << 19))), "--out", str(d / "exp")], \
        "over the 4 MiB limit"


# --- non-UTF-8 input, wherever text comes in
@case("generate: a Latin-1 prompt", 2)
def _(w, d):
    return ["generate", str(w.export), "--prompt", b"caf\xe9 au lait".decode("utf-8", "surrogateescape")], \
        "is not UTF-8 text"


@case("prepare: a Latin-1 --separator", 2)
def _(w, d):
    (d / "in.txt").write_text("a\n\nb\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"), "--n-ctx", "16",
            "--out", str(d / "out"), "--separator", b"\xa7\xa7".decode("utf-8", "surrogateescape")], "is not UTF-8"


@case("train: a Latin-1 override value", 2)
def _(w, d):
    return train_args(w, d, "log.wandb_project=" + b"caf\xe9".decode("utf-8", "surrogateescape")), "is not UTF-8"


@case("tokenizer train on Latin-1 text names no option it lacks")
def _(w, d):
    (d / "t.txt").write_bytes("Un caf\u00e9.\n\nDeux caf\u00e9s.\n".encode("latin-1"))
    return ["tokenizer", "train", "--data", str(d / "t.txt"), "--vocab-size", "300", "--out", str(d / "t.model")], \
        "is not valid UTF-8 at byte offset 6; fix the file (save it as UTF-8)"


@case("export config.json not UTF-8")
def _(w, d):
    ex = _export_copy(w, d)
    (ex / "config.json").write_bytes((ex / "config.json").read_bytes().replace(b'"mixer"', b'"mix\xe9r"'))
    return ["generate", str(ex), "--prompt", "Once"], "config.json"


@case("manifest.json not UTF-8")
def _(w, d):
    ds = _dataset(w, d)
    (ds / "manifest.json").write_bytes(b"\xff\xfe" + (ds / "manifest.json").read_bytes())
    return ["data", "verify", str(ds)], "manifest.json"


@case("checkpoint meta.json not UTF-8")
def _(w, d):
    run = _run_copy(w, d)
    meta = run / "checkpoints" / STEP2 / "meta.json"
    meta.write_bytes(meta.read_bytes().replace(b'"format"', b'"f\xf6rmat"', 1))
    return ["convert", str(run / "checkpoints" / STEP2), "--out", str(d / "x")], "meta.json"


# --- --overwrite onto an existing file where a folder is written (or the reverse)
def _a_file(d: Path, name: str = "taken") -> Path:
    (d / name).write_text("my notes\n")
    return d / name


@case("convert --out an existing file --overwrite", 2)
def _(w, d):
    return ["convert", str(w.run), "--out", str(_a_file(d)), "--overwrite"], "is an existing file, not a folder"


@case("export-hf --out an existing file --overwrite", 2)
def _(w, d):
    return ["export-hf", str(w.export), "--out", str(_a_file(d)), "--overwrite", "--no-verify"], \
        "is an existing file, not a folder"


@case("prepare --out an existing file --overwrite", 2)
def _(w, d):
    (d / "in.txt").write_text("One story.\n\nAnother story.\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"), "--n-ctx", "16",
            "--out", str(_a_file(d)), "--overwrite", "--workers", "1", "--no-progress"], "is an existing file"


@case("retrieval import --out an existing file --overwrite", 2)
def _(w, d):
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    return ["retrieval", "import", "--format", "pairs", "--pairs", str(d / "p.jsonl"), "--out", str(_a_file(d)),
            "--overwrite"], "is an existing file, not a folder"


@case("data synth --out an existing file --overwrite")
def _(w, d):
    return ["data", "synth", "--stories", "10", "--out", str(_a_file(d)), "--overwrite"], "is a file"


@case("tokenizer train --out an existing folder --overwrite", 2)
def _(w, d):
    (d / "t.txt").write_text("some text\n\nmore text\n")
    (d / "folder").mkdir()
    (d / "folder" / "keep.txt").write_text("keep\n")
    return ["tokenizer", "train", "--data", str(d / "t.txt"), "--vocab-size", "300", "--out", str(d / "folder"),
            "--overwrite"], "is an existing folder"


@case("eval --json onto a folder --overwrite", 2)
def _(w, d):
    (d / "r.json").mkdir()
    return ["eval", str(w.export), "--data", str(w.data), "--json", str(d / "r.json"), "--overwrite"], "folder"


@case("retrieval eval --json onto a folder --overwrite", 2)
def _(w, d):
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    (d / "r.json").mkdir()
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--json", str(d / "r.json"),
            "--overwrite"], "is an existing folder"


@case("retrieval eval --json into a missing folder", 2)
def _(w, d):
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--json", str(d / "no" / "r.json")], \
        "does not exist; create it first"


@case("representation --json onto a folder", 2)
def _(w, d):
    (d / "r.json").mkdir()
    return ["representation", str(w.export), "--data", str(w.data), "--json", str(d / "r.json")], "is an existing folder"


@case("representation --json onto a FIFO", 2)
def _(w, d):
    os.mkfifo(d / "r.json")
    return ["representation", str(w.export), "--data", str(w.data), "--json", str(d / "r.json")], "is a special file"


# --- a SMART collection that is not UTF-8 is refused, not silently altered
def _smart(d: Path, docs: bytes, queries: bytes = b".I 1\n.W\nwhat about coffee\n", qrels: bytes = b"1 1 0 0.0\n"):
    for name, data in (("docs.all", docs), ("q.qry", queries), ("rel.rel", qrels)):
        (d / name).write_bytes(data)
    return ["retrieval", "import", "--format", "smart", "--docs", str(d / "docs.all"), "--queries",
            str(d / "q.qry"), "--qrels", str(d / "rel.rel"), "--out", str(d / "coll")]


@case("SMART documents in Latin-1")
def _(w, d):
    return _smart(d, ".I 1\n.T\nCaf\u00e9 society\n.W\nabout caf\u00e9s\n".encode("latin-1")), \
        "documents file '" + str(d / "docs.all") + "' is not UTF-8 text (line 3"


@case("SMART queries in Latin-1")
def _(w, d):
    return _smart(d, b".I 1\n.W\ncoffee\n", ".I 1\n.W\nwhat about caf\u00e9\n".encode("latin-1")), \
        "queries file"


@case("SMART qrels not UTF-8")
def _(w, d):
    return _smart(d, b".I 1\n.W\ncoffee\n", qrels=b"1 1 0 0.0\n\xff\xfe\n"), "qrels file"


@case("SMART documents binary")
def _(w, d):
    return _smart(d, b".I 1\n.W\n\x00\x00\x00\n"), "holds NUL bytes"


# --- special files in a dataset: data verify refuses them (and never blocks on a FIFO)
@case("verify: a FIFO among the shards")
def _(w, d):
    ds = _dataset(w, d)
    os.mkfifo(ds / "train" / "shard.00099.mds")
    return ["data", "verify", str(ds)], "is a FIFO"


@case("verify: a raw shard that is a link to /dev/zero")
def _(w, d):
    ds = _dataset(w, d)
    raw = ds / "train" / "shard.00000.mds"
    raw.unlink(missing_ok=True)
    raw.symlink_to("/dev/zero")
    return ["data", "verify", str(ds)], "is a character device (through a link)"


@case("verify: tokenizer.model is a FIFO")
def _(w, d):
    ds = _dataset(w, d)
    (ds / "tokenizer.model").unlink()
    os.mkfifo(ds / "tokenizer.model")
    return ["data", "verify", str(ds)], "tokenizer.model' is a FIFO"


@case("verify: a broken link in the dataset")
def _(w, d):
    ds = _dataset(w, d)
    (ds / "val" / "extra.mds").symlink_to(d / "nowhere")
    return ["data", "verify", str(ds)], "is a broken link"


# --- counts and sizes <= 0
@case("generate --num-samples 0", 2)
def _(w, d):
    return ["generate", str(w.export), "--num-samples", "0"], "--num-samples must be >= 1"


@case("generate --num-samples -3", 2)
def _(w, d):
    return ["generate", str(w.export), "--num-samples", "-3"], "--num-samples must be >= 1"


@case("eval --batch-size 0", 2)
def _(w, d):
    return ["eval", str(w.export), "--data", str(w.data), "--batch-size", "0"], "--batch-size must be >= 1"


@case("representation --samples 0", 2)
def _(w, d):
    return ["representation", str(w.export), "--data", str(w.data), "--samples", "0"], "--samples must be >= 1"


@case("data synth --stories 0", 2)
def _(w, d):
    return ["data", "synth", "--stories", "0", "--out", str(d / "s")], "--stories must be >= 1"


@case("prepare --shard-bytes -1", 2)
def _(w, d):
    (d / "in.txt").write_text("a\n\nb\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"), "--n-ctx", "16",
            "--out", str(d / "out"), "--shard-bytes", "-1"], "--shard-bytes must be >= 1"


@case("prepare --workers -2", 2)
def _(w, d):
    (d / "in.txt").write_text("a\n\nb\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"), "--n-ctx", "16",
            "--out", str(d / "out"), "--workers", "-2"], "--workers must be >= 0"


@case("retrieval eval --batch-size 0", 2)
def _(w, d):
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    return ["retrieval", "eval", str(w.export), "--pairs", str(d / "p.jsonl"), "--batch-size", "0"], \
        "--batch-size must be >= 1"


@case("representation --lr -1", 2)
def _(w, d):
    return ["representation", str(w.export), "--data", str(w.data), "--lr", "-1"], "--lr must be a number > 0"


@case("representation --lr 0", 2)
def _(w, d):
    return ["representation", str(w.export), "--data", str(w.data), "--lr", "0"], "--lr must be a number > 0"


@case("prepare --val-fraction nan", 2)
def _(w, d):
    (d / "in.txt").write_text("a\n\nb\n")
    return ["prepare", "--data", str(d / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"), "--n-ctx", "16",
            "--out", str(d / "out"), "--val-fraction", "nan"], "--val-fraction must be a number >= 0"


@case("retrieval import --test-fraction -0.5", 2)
def _(w, d):
    (d / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n" for i in range(4)))
    return ["retrieval", "import", "--format", "pairs", "--pairs", str(d / "p.jsonl"), "--out", str(d / "c"),
            "--test-fraction", "-0.5"], "--test-fraction must be a number >= 0"


# --- an output that holds its input is refused with and without --overwrite
@case("prepare --out the folder holding its input (no --overwrite)", 2)
def _(w, d):
    (d / "sub").mkdir()
    (d / "sub" / "in.txt").write_text("One story.\n\nAnother story.\n")
    return ["prepare", "--data", str(d / "sub" / "in.txt"), "--tokenizer", str(w.data / "tokenizer.model"),
            "--n-ctx", "16", "--out", str(d / "sub"), "--workers", "1", "--no-progress"], "overlaps the input"


@case("convert RUN --out RUN/checkpoints (no --overwrite)", 2)
def _(w, d):
    run = _run_copy(w, d)
    return ["convert", str(run), "--out", str(run / "checkpoints")], "overlaps the input"


@case("export-hf EXPORT --out EXPORT (no --overwrite)", 2)
def _(w, d):
    ex = _export_copy(w, d)
    return ["export-hf", str(ex), "--out", str(ex), "--no-verify"], "overlaps the input"


@case("tokenizer train --out its input (no --overwrite)", 2)
def _(w, d):
    (d / "t.txt").write_text("some text\n\nmore text\n")
    return ["tokenizer", "train", "--data", str(d / "t.txt"), "--vocab-size", "300", "--out", str(d / "t.txt")], \
        "overlaps the input"


def test_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(world, tmp_path, capsys, name):
    fn, status, runtime = CASES[name]
    d = tmp_path / "case"
    d.mkdir()
    try:
        _check_case(world, d, capsys, fn, status, runtime)
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()


def _check_case(world, d, capsys, fn, status, runtime):
    argv, message = fn(world, d)
    before = snapshot(d, world.data, world.other, world.run, world.export)
    capsys.readouterr()
    rc = cli(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if runtime:
        assert sum("error" in ln for ln in lines) == 1, err
        lines = lines[-1:]
    assert rc != 0 and (status is None or rc == status), (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert lines[0].startswith("mmscale "), lines[0]
    after = snapshot(d, world.data, world.other, world.run, world.export)
    if runtime:  # the run itself started: its own new run dir is output, not input
        after = {k: v for k, v in after.items() if str(d / "newrun") not in k}
    assert unchanged(before, after) == []
    assert runtime or not (d / "newrun").exists(), "a refused run leaves no run dir"


def test_exports_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(["convert", str(world.run), "--out", str(tmp_path / "ex")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "ex").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ex").iterdir()} == {0o644}


def test_stale_lock_files_of_a_killed_run_are_cleaned(world, tmp_path):
    import subprocess
    import sys

    from mmscale.config import DataConfig
    from mmscale.data.loader import build_dataloader, lock_root

    ds = copy(world.data, tmp_path / "ds")
    code = ("import os, sys\nsys.path.insert(0, sys.argv[2])\n"
            "from mmscale.config import DataConfig\nfrom mmscale.data.loader import build_dataloader\n"
            "b = build_dataloader(DataConfig(train=sys.argv[1]), 'train', n_ctx=16, micro_batch_size=2, seed=0)\n"
            "next(iter(b))\nos._exit(0)  # killed: no close()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    killed = subprocess.Popen([sys.executable, "-c", code, str(ds), str(Path(__file__).resolve().parents[1])], env=env)
    assert killed.wait(timeout=120) == 0
    locks = lock_root()  # this node's /dev/shm (issue 24), shared by every loader here: look only at the killed one's
    owners = [p for p in locks.glob("*.owner") if json.loads(p.read_text()).get("pid") == killed.pid]
    assert len(owners) == 1, sorted(p.name for p in locks.iterdir())
    prefix = owners[0].name[:-len(".owner")]
    assert any(p.name.startswith(prefix + "_") and p.name.endswith("_filelock") for p in locks.iterdir())
    # a lock of a live owner (this process) is never touched
    (locks / "999998_cache_filelock").write_text("")
    (locks / "999998.owner").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))
    loader = build_dataloader(DataConfig(train=str(ds)), "train", n_ctx=16, micro_batch_size=2, seed=0)
    loader.close()
    left = {p.name for p in locks.iterdir()}
    assert {"999998.owner", "999998_cache_filelock"} <= left and not [n for n in left if n.startswith(prefix + "_")]
    for name in ("999998.owner", "999998_cache_filelock"):
        (locks / name).unlink()


def test_generate_keeps_the_space_after_the_prompt(world, capsys):
    from mmscale.data.tokenizer import load_tokenizer
    from mmscale.export.generate import continuation_text

    sp = load_tokenizer(world.export / "tokenizer.model")
    prompt = "Once upon a time"
    ids = [sp.eos_id()] + sp.encode(prompt)
    new = sp.encode(prompt + " there was")[len(ids) - 1:]
    assert sp.decode(new) == "there was"  # decoded alone, the leading space is lost
    assert prompt + continuation_text(sp, ids, new) == "Once upon a time there was"
    capsys.readouterr()
    assert cli(["generate", str(world.export), "--prompt", prompt, "--max-new-tokens", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()[0]
    full = sp.decode(sp.encode(out))
    assert out.startswith(prompt) and full == out


def test_eval_json_rule_and_card_step(world, tmp_path, capsys):
    target = tmp_path / "r.json"
    assert cli(["eval", str(world.export), "--data", str(world.data), "--json", str(target)]) == 0
    first = target.read_text()
    assert cli(["eval", str(world.export), "--data", str(world.data), "--json", str(target), "--overwrite"]) == 0
    assert json.loads(target.read_text())["loss"] == json.loads(first)["loss"]
    card = (world.export / "README.md").read_text()
    assert "validation loss (nats/token): " in card and "(at step 2)" in card
    assert json.loads((world.export / "config.json").read_text())["val_loss_step"] == 2


def test_plot_is_redrawn_on_a_signal_and_retrieval_label(tmp_path):
    from mmscale.run.metrics import MetricsLogger
    from tests._dist import train_runs

    cfg = tiny_config(tmp_path / "r", **{"train.max_steps": 4})
    assert train_runs({"runs": [{"config": cfg, "kill_self_at": {"step": 2, "ranks": [0]}}]}) == [75]
    assert (tmp_path / "r" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    from mmscale.config import config_from_dict
    c = config_from_dict(tiny_config(tmp_path / "q"))
    assert MetricsLogger(c, tmp_path, False, 0, 1).ylabel == "cross-entropy (nats/token)"
    c.retrieval.pairs = "p.jsonl"
    assert "InfoNCE" in MetricsLogger(c, tmp_path, False, 0, 1).ylabel


def test_prepare_one_document_per_line(world, tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"Tom saw a red ball number {i} in the park.\n" for i in range(200)))
    assert cli(["prepare", "--data", str(text), "--tokenizer", str(world.data / "tokenizer.model"), "--n-ctx", "16",
                "--out", str(tmp_path / "o"), "--one-doc-per-line", "--workers", "1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["documents"] == 200


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_prepare_interrupted_while_its_pool_runs_ends_fast_with_one_line(world, tmp_path, sig):
    """Ctrl-C reaches the whole process group (parent and workers); SIGTERM too under SLURM's scancel."""
    import signal
    import subprocess
    import sys
    import time

    from tests._dist import REPO

    text = tmp_path / "big.txt"
    story = "Tom saw a red ball in the park and ran to get it before the rain came.\n\n"
    text.write_text(story * 400_000)  # ~29 MB: the pool tokenizes for a while
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "mmscale.cli", "prepare", "--data", str(text), "--tokenizer",
                              str(world.data / "tokenizer.model"), "--n-ctx", "16", "--out", str(out), "--workers",
                              "2", "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        _wait_for(lambda: any(p.name.startswith(".out.partial") for p in tmp_path.iterdir()), 120,
                  "prepare started writing", child)
        time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(child.pid, getattr(signal, sig))
        _, err = child.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert child.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert lines == [f"mmscale prepare: interrupted by {sig}; stopped, partial output removed"], err[-3000:]
    assert took < 10, took
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]  # no output, no partial folder


def test_retrieval_eval_without_json_writes_nothing(world, tmp_path, monkeypatch, capsys):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"query": f"q{i}", "passage": f"p{i}"}) + "\n"
                                              for i in range(4)))
    monkeypatch.chdir(tmp_path)
    assert cli(["retrieval", "eval", str(world.export), "--pairs", "p.jsonl", "--candidates", "2",
                "--no-baseline", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out or True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_an_output_inside_its_source_is_one_answer_with_or_without_overwrite(world, tmp_path, capsys):
    run = copy(world.run, tmp_path / "run")
    assert cli(["convert", str(run), "--out", str(run / "export")]) == 0
    assert cli(["convert", str(run), "--out", str(run / "export"), "--overwrite"]) == 0
    ex = run / "export"
    assert cli(["export-hf", str(ex), "--out", str(ex / "hf"), "--no-verify"]) == 0
    assert cli(["export-hf", str(ex), "--out", str(ex / "hf"), "--no-verify", "--overwrite"]) == 0


def test_a_failed_experiment_reruns_with_fixed_data_and_resume(tmp_path, capsys):
    from tests.test_experiment import tiny_spec

    spec = tiny_spec(retrieval=None, representation={"enabled": False})
    spec["data"] = {"text": "bad.txt", "vocab_size": 300}
    spec["base"]["model.vocab_size"] = 300
    (tmp_path / "bad.txt").write_bytes("".join(f"Un caf\u00e9 {i}.\n\n" for i in range(50)).encode("latin-1"))
    (tmp_path / "good.txt").write_text("".join(f"A cafe {i}.\n\n" for i in range(50)))
    sp = tmp_path / "spec.yaml"
    sp.write_text(yaml.safe_dump(spec))
    args = ["experiment", "run", str(sp), "--out", str(tmp_path / "exp")]
    capsys.readouterr()
    assert cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid UTF-8" in err[0] and "--errors" not in err[0], err
    spec["data"]["text"] = "good.txt"  # fixed data (another file: the spec changed), too small for 300 pieces
    sp.write_text(yaml.safe_dump(spec))
    assert cli(args + ["--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the spec" not in err[0], err  # not blocked by the failed attempt
    assert "data.vocab_size" in err[0] and "--vocab-size" not in err[0], err  # the spec's key, not a flag
