"""Damaged and hostile checkpoints (mmscale/run/checkpoint.py, mmscale/checkpoint_format.py): resume falls back past a
damaged one, pickled payloads never run, a full disk or a kill -9 at any point loses nothing (issue G).
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from mmscale.run import checkpoint as ckpt
from mmscale.cli import main as cli
from tests._dist import tiny_config
# clean_world_env is an autouse fixture: imported, it applies to every test here
from tests._hostile import (_WORLD_ENV, STEP1, STEP2, clean_world_env, copy, edit_json, flip_byte, snapshot,
                              _resume)  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


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
