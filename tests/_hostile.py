"""What the hostile-input tests share (test_errors.py, test_checkpoint_damage.py, test_rundir.py): the session
fixture `world` (one tiny dataset, a second one made with another tokenizer, a trained run and its export;
conftest.py registers it, so the files build it once), and helpers that damage copies of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmscale.run import checkpoint as ckpt
from mmscale.cli import main as cli
from tests._dist import tiny_config

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

@pytest.fixture(scope="session")
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


def _resume(w, run: Path, target) -> list[str]:
    return ["train", "--config", str(w.cfg_path), f"run.dir={run}", f"run.resume={target}", "train.max_steps=3"]


def _wait_for(cond, timeout: float, what: str, child=None) -> None:
    import time

    end = time.monotonic() + timeout
    while not cond():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"{what}: the child ended first ({child.returncode}): {child.stderr.read()[-2000:]}")
        assert time.monotonic() < end, what
        time.sleep(0.1)
