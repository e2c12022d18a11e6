"""`mmscale launch` and the checks shared with slurm/pretrain.sh (no SLURM cluster needed here;
tests/test_slurm.py runs the same code against a real one)."""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmscale import distributed
from mmscale.config import load_config
from mmscale.errors import UserError
from mmscale.fsutil import usable_cpus
from mmscale.launch import (EXIT_REQUEUE, TrainJob, check_layout, rendezvous_host, rendezvous_port,
                            sbatch_plan)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _cli(*args, env=None, cwd=REPO, timeout=120):
    return subprocess.run([PY, "-m", "mmscale.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# layout checks

@pytest.mark.parametrize("nodes,tasks,overrides,fragment", [
    (1, 2, ["engine.kind=single"], "engine.kind=single"),
    (2, 2, ["engine.kind=fsdp", "train.micro_batch_size=8", "train.global_batch_size=48"],
     "train.global_batch_size=48"),
    (1, 4, ["engine.kind=fsdp", "engine.hsdp_replicas=3"], "engine.hsdp_replicas=3"),
    (3, 1, ["engine.kind=ddp", "data.num_canonical_nodes=2"], "data.num_canonical_nodes=2"),
    (0, 1, [], "at least 1 node"),
])
def test_check_layout_rejects_mismatch(nodes, tasks, overrides, fragment):
    cfg = load_config(None, overrides)
    with pytest.raises(UserError) as e:
        check_layout(cfg, nodes, tasks)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and e.value.exit_code == 2


def test_check_layout_accepts_exactly_the_divisible_batches():
    # hand count: micro 4 -> a global batch of 24 fits world sizes whose 4*world divides 24: 1, 2, 3, 6
    ok = set()
    for world in range(1, 9):
        cfg = load_config(None, ["engine.kind=ddp", "train.micro_batch_size=4", "train.global_batch_size=24"])
        try:
            check_layout(cfg, 1, world)
            ok.add(world)
        except UserError:
            pass
    assert ok == {1, 2, 3, 6}
    # canonical nodes 4: 1, 2, 4, 8 nodes divide or are divided; 3, 5, 6, 7 are not
    good = []
    for nodes in range(1, 9):
        try:
            check_layout(load_config(None, ["engine.kind=ddp", "data.num_canonical_nodes=4"]), nodes, 1)
            good.append(nodes)
        except UserError:
            pass
    assert good == [1, 2, 4, 8]


def test_rendezvous_matches_distributed_detect():
    assert rendezvous_host("localhost") == "localhost"
    assert rendezvous_host("n1.does-not-resolve.invalid") == "127.0.0.1"
    for job in ["7", "123456", "98765"]:
        info = distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": job,
                                   "MASTER_ADDR": "127.0.0.1"})
        assert rendezvous_port(job) == info.master_port
    assert rendezvous_port("4242_3") == rendezvous_port("42423")  # array ids: digits only, same on all tasks


# ----------------------------------------------------------------------------------------------
# slurm/pretrain.sh pieces that need no cluster

def test_pretrain_sh_outside_allocation_says_how_to_submit(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(REPO / "slurm/pretrain.sh"), "configs/tiny.yaml"], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "sbatch slurm/pretrain.sh CONFIG" in out.stderr
    out = subprocess.run(["bash", str(REPO / "slurm/convert.sh"), str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "sbatch slurm/convert.sh RUN_DIR" in out.stderr


def test_convert_sh_refuses_bad_runs_before_doing_anything(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(REPO))  # as inside an allocation
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    cases = [([str(tmp_path / "nope")], "has no checkpoints/ folder"),
             ([str(tmp_path / "run"), str(tmp_path / "taken")], "already exists"),
             ([str(tmp_path / "run"), str(tmp_path / "new"), str(tmp_path / "missing-data")], "does not exist")]
    for args, fragment in cases:
        out = subprocess.run(["bash", str(REPO / "slurm/convert.sh"), *args], capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=30)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and fragment in out.stderr, out.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x" and not (tmp_path / "new").exists()


def _plan(args, env_extra, capsys):
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(keep)
        os.environ.update(env_extra)
        code = sbatch_plan(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return code, capsys.readouterr()


def test_sbatch_plan_checks_allocation_and_caps_workers(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  kind: ddp\ndata:\n  num_workers: 6\ntrain:\n  micro_batch_size: 4\n")
    code, out = _plan([str(cfg), f"run.dir={tmp_path}/run", "train.global_batch_size=16"],
                      {"SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_CPUS_PER_TASK": "3"},
                      capsys)
    assert code == 0, out.err
    lines = dict(ln.split("=", 1) for ln in out.out.splitlines())
    assert lines["RUN_DIR"] == str(tmp_path / "run")
    assert lines["TASKS_PER_NODE"] == "2"
    assert lines["EXTRA_OVERRIDES"] == "(data.num_workers=2)"  # 3 cores: the trainer + 2 workers
    # 2 x 2 ranks x micro 4 = 16 per step: a global batch of 24 does not fit
    code, out = _plan([str(cfg), "train.global_batch_size=24"],
                      {"SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)"}, capsys)
    assert code == 2 and out.out == ""
    assert out.err.startswith("pretrain.sh: error: train.global_batch_size=24") and out.err.count("\n") == 1
    code, out = _plan([str(tmp_path / "missing.yaml")], {"SLURM_JOB_NUM_NODES": "1"}, capsys)
    assert code == 2 and "does not exist" in out.err
    # one task per GPU: 4 GPUs per node with 2 tasks per node is refused, 2 with 2 is fine
    code, out = _plan([str(cfg)], {"SLURM_JOB_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "2",
                                   "SLURM_GPUS_PER_NODE": "a100:4"}, capsys)
    assert code == 2 and "--ntasks-per-node=4" in out.err and out.err.count("\n") == 1
    code, out = _plan([str(cfg)], {"SLURM_JOB_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "2",
                                   "SLURM_GPUS_ON_NODE": "2"}, capsys)
    assert code == 0, out.err


# ----------------------------------------------------------------------------------------------
# `mmscale launch` command line

def test_launch_bad_input_one_line_each(tmp_path):
    cases = [
        (["--config", str(tmp_path / "nope.yaml"), "--dry-run"], "does not exist"),
        (["--config", "configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "2", "--dry-run"],
         "engine.kind=single"),
        (["--config", "configs/tiny.yaml", "engine.kind=ddp", "train.global_batch_size=20", "--nodes", "1",
          "--gpus-per-node", "3", "--dry-run"], "train.global_batch_size=20"),
        (["--config", "configs/tiny.yaml", "engine.kind=ddp", "--gpus-per-node", "2", "--cluster", "debug"],
         "--cluster debug runs one task"),
        (["--config", "configs/tiny.yaml", "engine.kind=ddp", "--nodes", "2", "--cluster", "local"],
         "--cluster local runs on this machine only"),
    ]
    for args, fragment in cases:
        out = _cli("launch", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith("mmscale launch: error:") and fragment in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "nope.yaml").exists()


def _env_without_slurm() -> dict:
    """This environment with every PATH entry that holds a SLURM client removed: a laptop or a bare login node."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, b)) for b in ("srun", "sbatch", "sinfo"))]
    return dict(os.environ, PATH=os.pathsep.join(dirs))


def test_launch_dry_run_prints_the_sbatch_script(tmp_path):
    run_dir = tmp_path / "run"
    env = _env_without_slurm()
    out = _cli("launch", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", "engine.kind=fsdp",
               "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "90", "--mem-gb", "200",
               "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120", "#SBATCH --mem=200GB",
                 f"#SBATCH --output={run_dir}/submitit/%j_0_log.out"]:
        assert line in script.splitlines(), (line, script)
    assert "srun" in script and "submitit.core._submit" in script
    assert not run_dir.exists()  # a dry run writes nothing
    cpu = _cli("launch", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", "engine.kind=ddp",
               "--gpus-per-node", "2", "--no-gpus", "--cpus-per-task", "3", "--dry-run", env=env)
    assert cpu.returncode == 0 and "--gpus-per-node" not in cpu.stdout and "--ntasks-per-node=2" in cpu.stdout
    assert "#SBATCH --cpus-per-task=3" in cpu.stdout.splitlines()
    # a real submission without SLURM is one line that names the fix, and writes nothing
    real = _cli("launch", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", env=env)
    assert real.returncode != 0 and real.stderr.count("\n") == 1 and "--cluster local" in real.stderr, real.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("gres,gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4),
                                       ("gpu:2,shard:8", 2), ("gpu:a100:2,gpu:v100:1", 3)])
def test_gres_gpu_count(gres, gpus):
    from mmscale.launch import _gres_gpus
    assert _gres_gpus(gres) == gpus


def test_partition_capacity_check():
    from mmscale.launch import check_fits_partition, partition_nodes

    sinfo = "\n".join(["cpu*|c1|4|8000|(null)", "cpu*|c2|16+|64000|(null)", "gpu|g1|64|512000|gpu:h100:8(S:0-1)",
                       "gpu|g2|64|512000|gpu:h100:4", "debug|c1|4|8000|(null)", "garbage line"])
    default = partition_nodes(sinfo, "")
    assert sorted(n["name"] for n in default) == ["c1", "c2"] and default[1]["cpus"] == 16
    gpu = partition_nodes(sinfo, "gpu")
    assert [n["gpus"] for n in gpu] == [8, 4]
    check_fits_partition(default, "", 1, 2, 8, 0, 0)      # c2 holds 2 x 8 CPUs
    check_fits_partition(gpu, "gpu", 2, 4, 16, 4, 400)  # both hold 4 GPUs, 64 CPUs, 400 GB
    cases = [(default, "", 1, 2, 9, 0, 0, "asks 18 CPUs per node", "--cpus-per-task to 8"),
             (default, "", 1, 1, 1, 1, 0, "1 GPU(s) per node", "--no-gpus"),
             (gpu, "gpu", 1, 8, 1, 8, 1000, "--mem-gb=1000", "largest node of partition 'gpu' has 500.0 GB"),
             (gpu, "gpu", 2, 8, 1, 8, 0, "only 1 node(s) of partition 'gpu'", "lower --nodes"),
             (partition_nodes(sinfo, "nope"), "nope", 1, 1, 1, 0, 0, "has no nodes", "--partition")]
    for nodes, part, n, tasks, cpt, g, mem, frag1, frag2 in cases:
        with pytest.raises(UserError) as e:
            check_fits_partition(nodes, part, n, tasks, cpt, g, mem)
        msg = str(e.value)
        assert frag1 in msg and frag2 in msg and "\n" not in msg and e.value.exit_code == 2, msg


# ----------------------------------------------------------------------------------------------
# the checkpoint hook submitit calls on preemption

_FAKE_TRAINER = """
import pathlib, signal, sys, time
signal.signal(signal.SIGUSR2, lambda *a: sys.exit(75))
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(60)
"""


def test_preemption_in_a_running_task_reaps_the_trainer_and_returns_a_fresh_job(tmp_path, monkeypatch):
    """As on a preempted node: TrainJob.__call__ waits for the trainer when USR2 arrives; submitit's
    handler calls checkpoint(), which must forward the signal, reap the trainer (a nested Popen.wait
    would block on the outer one's lock until its timeout) and hand back a fresh job."""
    import threading

    import submitit

    from mmscale import launch

    ready = tmp_path / "ready"
    monkeypatch.setattr(launch, "train_command", lambda *a: [PY, "-c", _FAKE_TRAINER, str(ready)])
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                 "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    job = TrainJob(str(tmp_path / "c.yaml"), ["a.b=1"], str(tmp_path), str(tmp_path / "run"))
    got = {}

    def preempt():  # SLURM's USR2 reaches the submitit process once the trainer runs
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    old = signal.signal(signal.SIGUSR2, lambda *a: got.setdefault("delayed", job.checkpoint()))
    try:
        threading.Thread(target=preempt, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped after a signal"):  # local: no requeue, says so
            job()
        assert time.monotonic() - t0 < 20
    finally:
        signal.signal(signal.SIGUSR2, old)
        if job._child is not None and job._child.poll() is None:
            job._child.kill()
    assert job._child.returncode == EXIT_REQUEUE  # the forwarded USR2 made it save and exit 75
    delayed = got["delayed"]
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    fresh = delayed.function
    assert isinstance(fresh, TrainJob) and fresh is not job and fresh._child is None
    assert (fresh.config_path, fresh.overrides, fresh.cwd, fresh.run_dir) == \
           (job.config_path, job.overrides, job.cwd, job.run_dir)
    # what submitit writes to disk for the requeued start must pickle (no process handles)
    clone = pickle.loads(pickle.dumps(job))
    assert clone._child is None and clone.overrides == ["a.b=1"]


# ----------------------------------------------------------------------------------------------
# the real trainer through submitit's local executor (the SLURM executor: tests/test_slurm.py)

@pytest.mark.slow
@pytest.mark.distributed
def test_launch_local_executor_trains_two_ranks(tmp_path):
    from tests._data_helpers import make_tiny_dataset

    data = make_tiny_dataset(tmp_path, n_ctx=32, vocab_size=512)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # launch splits the cores itself
    out = _cli("launch", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"data.train={data}",
               "model.n_ctx=32", "engine.kind=ddp", "train.max_steps=20", "train.eval_every=0",
               "checkpoint.every=0", "log.every=1", "log.progress=false", "--cluster", "local",
               "--gpus-per-node", "2", "--no-gpus", "--wait", env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr + "".join(
        p.read_text()[-2000:] for p in (run_dir / "submitit").glob("*.err"))
    assert "done: 2 task(s) finished" in out.stdout and str(run_dir / "submitit") in out.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert (run_dir / "checkpoints" / "step_00000020").is_dir()
    start = next(r for r in rows if r.get("event") == "start")  # two local ranks: half the cores each
    assert start["threads"] == usable_cpus(2) and start["load_avg"] >= 0


@pytest.mark.slow
def test_launch_wait_reports_a_failed_job_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    out = _cli("launch", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", "data.train=",
               "--cluster", "local", "--gpus-per-node", "1", "--no-gpus", "--wait", timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("mmscale launch: error: job ") and "failed" in last
    assert re.search(r"RuntimeError: the trainer exited with status [1-9]", last) and str(run_dir / "submitit") in last
