"""Issue G: hostile inputs and damaged files end in one clear line (or a documented fallback), and nothing
that existed before changes; pickled payloads in checkpoints never run; fsync/ENOSPC/lock hygiene.

The catalogue shares one tiny dataset, one trained run and its export (module fixture); every case works on
its own copy of what it damages and runs `mmscale.cli.main` in-process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmscale import checkpoint as ckpt
from mmscale.cli import main as cli
from tests._dist import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def clean_world_env():
    """The data loader writes RANK/WORLD_SIZE/... into the environment (streaming reads them there); a
    one-process DeepSpeed/FSDP run after it would take them for a launcher's and rendezvous on the default
    port. Each test starts and ends without them."""
    saved = {k: os.environ.pop(k) for k in _WORLD_ENV if k in os.environ}
    yield
    for k in _WORLD_ENV:
        os.environ.pop(k, None)
    os.environ.update(saved)

STEP1, STEP2 = ckpt.step_dir_name(1), ckpt.step_dir_name(2)


# ----------------------------------------------------------------------------------------------
# shared world: a dataset, a second dataset made with another tokenizer, a trained run, its export

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests._data_helpers import make_tiny_corpus, make_tiny_dataset

    base = tmp_path_factory.mktemp("reliability")
    data = make_tiny_dataset(base, n_ctx=16, vocab_size=512, stories=120)
    other = make_tiny_dataset(base, n_ctx=16, vocab_size=512, stories=120, seed=1, name="other")
    big_tok = make_tiny_corpus(120, 0, 1024)[1]
    run = base / "run"
    cfg = tiny_config(run, **{"model.vocab_size": 512, "data.train": str(data), "train.max_steps": 2,
                              "checkpoint.every": 1, "checkpoint.keep": 3, "train.eval_every": 2})
    cfg_path = base / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", "--config", str(cfg_path)]) == 0
    export = base / "export"
    assert cli(["convert", str(run), "--out", str(export)]) == 0
    return SimpleNamespace(base=base, data=data, other=other, run=run, cfg=cfg, cfg_path=cfg_path, export=export,
                           big_tok=big_tok)


def snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged(before: dict, after: dict) -> list[str]:
    """Files that changed or vanished; new files are allowed only as streaming's decompressed shards."""
    bad = [k for k, v in before.items() if after.get(k) != v]
    bad += [k for k in after if k not in before and not k.endswith(".mds")]
    return bad


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x55
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)  # edits in place
    path.write_text(json.dumps(obj))


def train_args(w, d: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(w.cfg_path), f"run.dir={d / 'newrun'}", *extra]


def raw_shards_removed(ds: Path) -> Path:
    """The dataset with streaming's decompressed copies removed, so the compressed shards are read again."""
    for p in ds.rglob("shard.*.mds"):
        p.unlink()
    return ds


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


def _resume(w, run: Path, target) -> list[str]:
    return ["train", "--config", str(w.cfg_path), f"run.dir={run}", f"run.resume={target}", "train.max_steps=3"]


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
    from mmscale.rundir import RunLock

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
    from mmscale.rundir import RunLock

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


# ----------------------------------------------------------------------------------------------
# documented fallbacks

def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_a_torn_metrics_line(world, tmp_path, capsys):
    run = copy(world.run, tmp_path / "run")
    flip_byte(run / "checkpoints" / STEP2 / "rank_00000.pt", 0.9)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 4.')  # a kill during the append
    damaged = snapshot(run / "checkpoints" / STEP2)
    capsys.readouterr()
    rc = cli(["train", "--config", str(world.cfg_path), f"run.dir={run}", "train.max_steps=3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    warn = [ln for ln in err.splitlines() if "is damaged" in ln]
    assert len(warn) == 1 and f"resuming from '{run / 'checkpoints' / STEP1}'" in warn[0], err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    # step 2 was trained again and published; the damaged folder is kept aside, not deleted
    assert ckpt.verify(run / "checkpoints" / STEP2) is None
    aside = list((run / "checkpoints").glob(f".damaged_{STEP2}.*"))
    assert len(aside) == 1 and snapshot(aside[0]) == {k.replace(str(run / "checkpoints" / STEP2), str(aside[0])): v
                                                      for k, v in damaged.items()}
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.step_dir_name(3)


def test_latest_pointer_outside_is_ignored_by_auto(world, tmp_path):
    run = copy(world.run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("../../x\n")
    assert ckpt.find_latest(run / "checkpoints") == run / "checkpoints" / STEP2


# ----------------------------------------------------------------------------------------------
# pickled payloads never run

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('ran')",))


def _plant_torch(path: Path, marker: Path) -> None:
    import torch
    torch.save({"x": _Payload(marker)}, path)


def _plant_pickle(path: Path, marker: Path) -> None:
    import pickle
    path.write_bytes(pickle.dumps(_Payload(marker)))


def _reseal(step_dir: Path) -> None:
    """What an attacker who can write files can also do: make meta.json's digests match again."""
    from mmscale.fsutil import digest

    def fix(meta):
        for rel in meta["files"]:
            size, xxh = digest(step_dir / rel)
            meta["files"][rel] = {"size": size, "xxh64": xxh}
    edit_json(step_dir / "meta.json", fix)


@pytest.mark.parametrize("target", ["rank_00000.pt", "model.pt", "optimizer.pt"])
def test_payload_in_a_single_engine_checkpoint_never_runs(world, tmp_path, capsys, target):
    run = copy(world.run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    _plant_torch(run / "checkpoints" / STEP2 / target, marker)
    _reseal(run / "checkpoints" / STEP2)
    capsys.readouterr()
    rc = cli(_resume(world, run, run / "checkpoints" / STEP2))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert not marker.exists()
    assert "Unsupported global" in err[0] or "not plain data" in err[0] or "allow-list" in err[0] \
        or "cannot be read" in err[0], err[0]
    rc = cli(["convert", str(run / "checkpoints" / STEP2), "--out", str(tmp_path / "x")])
    assert not marker.exists()
    if target == "model.pt":
        assert rc != 0


@pytest.fixture(scope="module")
def sharded_checkpoints(tmp_path_factory):
    """One-process DeepSpeed ZeRO-1 and FSDP2 checkpoints (synthetic data)."""
    from tests._dist import train_runs

    base = tmp_path_factory.mktemp("sharded")
    for k in _WORLD_ENV:  # (module fixtures run before the autouse one)
        os.environ.pop(k, None)
    runs = [{"config": tiny_config(base / k, **{"engine.kind": kind, "engine.zero_stage": 1, "train.max_steps": 1})}
            for k, kind in (("z1", "deepspeed"), ("fsdp", "fsdp"))]
    assert train_runs({"runs": runs}) == [0, 0]
    return base


@pytest.mark.parametrize("kind,target", [("z1", "ds/mp_rank_00_model_states.pt"),
                                         ("z1", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                         ("fsdp", "model/.metadata"), ("fsdp", "optimizer/.metadata")])
def test_payload_in_deepspeed_and_dcp_files_never_runs(sharded_checkpoints, tmp_path, kind, target):
    from mmscale.errors import UserError
    from mmscale.export.convert import _model_config, load_checkpoint_state
    from tests._dist import train_runs

    run = copy(sharded_checkpoints / kind, tmp_path / kind)
    step = run / "checkpoints" / STEP1
    marker = tmp_path / "PWNED"
    (_plant_pickle if target.endswith(".metadata") else _plant_torch)(step / target, marker)
    _reseal(step)
    cfg = json.loads((step / "meta.json").read_text())["config"]
    cfg["train"]["max_steps"], cfg["run"]["dir"] = 2, str(run)
    status = train_runs({"runs": [{"config": cfg}]})[0]
    assert not marker.exists()
    assert isinstance(status, str) and "allow-list" in status and "\n" not in status, status
    if target.startswith(("ds/mp_rank", "model/")):  # what convert reads
        meta = json.loads((step / "meta.json").read_text())
        with pytest.raises(UserError, match="allow-list"):  # convert's reader of every engine's checkpoints
            load_checkpoint_state(step, meta, _model_config(meta, step))
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# full disk, durability, permissions, locks, output checks, generate's spacing, card, plot label

def test_full_disk_during_checkpoint_save(world, tmp_path, capsys, monkeypatch):
    import torch

    run = copy(world.run, tmp_path / "run")
    before = snapshot(run / "checkpoints" / STEP2)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    rc = cli(["train", "--config", str(world.cfg_path), f"run.dir={run}", "train.max_steps=3"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 1 and len(err) == 1, err
    assert "no space left on device writing checkpoint" in err[0] and ".tmp_step_00000003" in err[0]
    assert "needs about" in err[0] and f"previous checkpoint {run / 'checkpoints' / STEP2} is intact" in err[0]
    assert not list((run / "checkpoints").glob(".tmp_*")) and not list(run.glob(".write_test.*"))
    assert snapshot(run / "checkpoints" / STEP2) == before
    assert (run / "checkpoints" / "latest").read_text().strip() == STEP2


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import mmscale.fsutil as fsutil

    events = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    root = tmp_path / "checkpoints"
    tmp = ckpt.prepare_tmp_dir(root, 4)
    (tmp / "model.pt").write_bytes(b"m" * 100)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x").write_bytes(b"x")
    ckpt.finalize(root, tmp, 4, {"step": 4, "model_files": ["model.pt"], "rank_files": []}, keep=2)
    names = [e[1] if e[0] == "fsync" else f"replace->{Path(e[2]).name}" for e in events]
    i_step = names.index(f"replace->{ckpt.step_dir_name(4)}")
    i_latest = names.index("replace->latest")
    synced_before = {Path(n).name for n in names[:i_step] if not n.startswith("replace")}
    assert {"model.pt", "x", "sub", tmp.name} <= synced_before, names
    assert any(n.startswith(".tmp_meta.json") for n in synced_before), names  # meta.json, before its rename
    assert names.index("replace->meta.json") < i_step
    assert root.name in {Path(n).name for n in names[i_step:i_latest] if not n.startswith("replace")}
    assert any(Path(n).name.startswith(".tmp_latest") for n in names[i_step:i_latest])
    assert fsutil.digest(root / ckpt.step_dir_name(4) / "model.pt")[0] == 100


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
    from mmscale.metrics import MetricsLogger
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


# ----------------------------------------------------------------------------------------------
# kill -9 at random points, 10 times in one run: the losses equal an uninterrupted run's, bit for bit

FAULT_STEPS, FAULT_EVERY = 40, 3


def _fault_process(cfg: dict, kill: dict, nproc: int, tmp: Path) -> tuple[int, str]:
    import subprocess
    import sys

    from tests._dist import REPO, _free_port

    script = [str(REPO / "tests" / "_faults.py"), json.dumps(cfg), json.dumps(kill)]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
           "TMPDIR": str(tmp)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        _, err = child.communicate()
        raise AssertionError(f"fault run hung: {err[-3000:]}")
    return child.returncode, err


def _kill_ten_times(tmp_path, overrides: dict, nproc: int, seed: int) -> list:
    import random

    from tests._dist import read_losses

    rng = random.Random(seed)
    base = {"train.max_steps": FAULT_STEPS, "checkpoint.every": FAULT_EVERY, "checkpoint.keep": 2, "log.every": 1,
            **overrides}
    ref = tiny_config(tmp_path / "reference", **base)
    rc, err = _fault_process(ref, {}, nproc, tmp_path)
    assert rc == 0, err[-3000:]
    cfg = tiny_config(tmp_path / "faulty", **base)
    kills = []
    while len(kills) < 10:
        done = ckpt.find_latest(tmp_path / "faulty" / "checkpoints")
        at = json.loads((done / "meta.json").read_text())["step"] if done else 0
        assert at < FAULT_STEPS
        kind = rng.choice(["step", "metrics", "rank_file", "digest", "latest"])
        kill = {"kind": kind, "n": rng.randint(1, 3 if kind == "digest" else 4) if kind in ("step", "metrics", "digest")
                else 1, "rank": rng.randrange(nproc) if kind in ("step", "rank_file") else 0}
        rc, err = _fault_process(cfg, kill, nproc, tmp_path)
        assert rc != 0, f"the planned kill {kill} did not happen (resumed at step {at}): {err[-2000:]}"
        assert rc == -9 if nproc == 1 else rc != 0, (rc, err[-3000:])  # killed, not an error of its own
        kills.append((at, kill))
    rc, err = _fault_process(cfg, {}, nproc, tmp_path)
    assert rc == 0, err[-3000:]
    got, want = read_losses(tmp_path / "faulty"), read_losses(tmp_path / "reference")
    assert sorted(got) == list(range(1, FAULT_STEPS + 1)), (sorted(got), kills)
    assert got == want, kills  # every step's loss, bit for bit
    root = tmp_path / "faulty" / "checkpoints"
    assert not list(root.glob(".tmp_*")) and ckpt.verify(root / ckpt.step_dir_name(FAULT_STEPS)) is None
    assert (root / "latest").read_text().strip() == ckpt.step_dir_name(FAULT_STEPS)
    return kills


def test_ten_kills_in_one_run_single_engine_resume_bit_for_bit(tmp_path):
    kills = _kill_ten_times(tmp_path, {"engine.kind": "single"}, 1, seed=12)
    assert len({k["kind"] for _, k in kills}) >= 4, kills  # the seed covers most kinds of kill


@pytest.mark.slow
@pytest.mark.distributed
def test_ten_kills_in_one_run_fsdp_two_ranks_resume_bit_for_bit(tmp_path):
    _kill_ten_times(tmp_path, {"engine.kind": "fsdp"}, 2, seed=7)


@pytest.mark.distributed
def test_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """DDP on 2 ranks, rank 0's disk full at the step-4 checkpoint: both ranks stop (no hang in the next
    collective), each with one line, and the step-2 checkpoint stays the latest."""
    from tests._dist import run_distributed

    cfg = tiny_config(tmp_path / "r", **{"engine.kind": "ddp", "train.max_steps": 6, "checkpoint.every": 2})
    statuses = run_distributed("tests._faults:enospc_runs", {"runs": [{"config": cfg}]}, timeout=240)
    rank0, rank1 = statuses[0][0], statuses[1][0]
    assert isinstance(rank0, str) and "no space left on device" in rank0 and "\n" not in rank0, rank0
    assert isinstance(rank1, str) and "failed on 1 other rank" in rank1, rank1
    root = tmp_path / "r" / "checkpoints"
    assert [p.name for p in ckpt.list_complete(root)] == [STEP2] and not list(root.glob(".tmp_*"))
    assert (root / "latest").read_text().strip() == STEP2


# ----------------------------------------------------------------------------------------------
# issue G2: the run dir's lock and marker, interrupts, outputs (behaviour the one-line catalogue cannot show)

def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_process_is_taken_over_with_one_line(world, tmp_path, capsys):
    import socket

    from mmscale.rundir import LOCK, MARKER

    run = copy(world.run, tmp_path / "run")
    pid = _dead_pid()
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "job": None,
                                        "started": "2026-12-05T01:00:00Z"}) + "\n")
    capsys.readouterr()
    rc = cli(["train", "--config", str(world.cfg_path), f"run.dir={run}", "train.max_steps=3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if "taking over the lock" in ln]
    assert len(notes) == 1 and f"pid {pid}" in notes[0] and "no longer runs" in notes[0], err
    assert not (run / LOCK).exists() and (run / MARKER).is_file()  # released at the end


def test_a_run_dir_of_an_older_mmscale_is_still_a_run(world, tmp_path, capsys):
    from mmscale.rundir import MARKER, check_owned, is_run

    run = copy(world.run, tmp_path / "run")
    (run / MARKER).unlink()  # written before the marker existed: checkpoints/ + meta of ours
    assert is_run(run)
    assert cli(["train", "--config", str(world.cfg_path), f"run.dir={run}", "train.max_steps=3"]) == 0
    assert (run / MARKER).is_file()
    # one that crashed before its first checkpoint: config.yaml as mmscale writes it, and metrics.jsonl
    early = tmp_path / "early"
    early.mkdir()
    shutil.copyfile(world.run / "config.yaml", early / "config.yaml")
    (early / "metrics.jsonl").write_text("")
    check_owned(early)
    # a hand-written config is not mmscale's dump
    (early / "config.yaml").write_text("model:\n  d_model: 32\n")
    with pytest.raises(Exception, match="is not an mmscale run"):
        check_owned(early)


def _train_child(cfg_path: Path, run: Path, *extra: str):
    import subprocess
    import sys

    from tests._dist import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in _WORLD_ENV:
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "mmscale.cli", "train", "--config", str(cfg_path),
                             f"run.dir={run}", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(cond, timeout: float, what: str, child=None) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"{what}: the child ended first ({child.returncode}): {child.stderr.read()[-2000:]}")
        assert time.monotonic() < end, what
        time.sleep(0.1)


def test_two_trains_on_one_run_dir_the_second_is_refused_and_sigterm_releases(world, tmp_path, capsys):
    import signal

    from mmscale.rundir import LOCK

    run = tmp_path / "run"
    child = _train_child(world.cfg_path, run, "train.max_steps=100000", "checkpoint.every=0", "train.eval_every=0")
    try:
        _wait_for(lambda: (run / LOCK).is_file() and str(child.pid) in (run / LOCK).read_text()
                  and (run / "metrics.jsonl").is_file(), 120, "the first run took the lock", child)
        before = snapshot(run / "config.yaml")
        capsys.readouterr()
        rc = cli(["train", "--config", str(world.cfg_path), f"run.dir={run}", "train.lr=0.5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and f"pid {child.pid}" in err[0] and "in use by another run" in err[0], err
        assert snapshot(run / "config.yaml") == before  # the second run changed nothing
        os.killpg(child.pid, signal.SIGTERM)  # the first one stops cleanly (checkpoint, 75) and gives the lock back
        _, cerr = child.communicate(timeout=60)
        assert child.returncode == 75, cerr[-2000:]
        assert not (run / LOCK).exists()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()


@pytest.mark.distributed
def test_a_locked_run_dir_stops_every_rank_without_waiting(tmp_path):
    """DDP on 2 ranks into a run dir another process holds: rank 0 is refused, rank 1 learns it at the group's
    first collective (no deadlock), each with one line."""
    from mmscale.rundir import RunLock
    from tests._dist import run_distributed

    (tmp_path / "r").mkdir()
    held = RunLock(tmp_path / "r").acquire()
    try:
        cfg = tiny_config(tmp_path / "r", **{"engine.kind": "ddp", "train.max_steps": 2})
        statuses = run_distributed("tests._dist:train_runs", {"runs": [{"config": cfg}]}, timeout=180)
    finally:
        held.release()
    rank0, rank1 = statuses[0][0], statuses[1][0]
    assert isinstance(rank0, str) and "in use by another run" in rank0 and "\n" not in rank0, rank0
    assert isinstance(rank1, str) and "rank 0 could not lock run.dir" in rank1, rank1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


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
