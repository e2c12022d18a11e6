"""The run dir (mmscale/run/rundir.py): one run at a time (rank 0's lock, taken over from a dead owner), and only
a folder that is an mmscale run (its marker; run dirs of older versions recognised) (issue G2).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mmscale.cli import main as cli
from tests._dist import tiny_config
# clean_world_env is an autouse fixture: imported, it applies to every test here
from tests._hostile import _WORLD_ENV, clean_world_env, copy, snapshot, _wait_for  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


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

    from mmscale.run.rundir import LOCK, MARKER

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
    from mmscale.run.rundir import MARKER, check_owned, is_run

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


def test_two_trains_on_one_run_dir_the_second_is_refused_and_sigterm_releases(world, tmp_path, capsys):
    import signal

    from mmscale.run.rundir import LOCK

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
    from mmscale.run.rundir import RunLock
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
