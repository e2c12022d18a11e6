"""Against a real SLURM cluster on this machine (tools/slurm_local.sh: munge, slurmctld, emulated nodes
n1 and n2): sbatch slurm/pretrain.sh on 1 node x 2 tasks and 2 nodes x 1 task, preemption with
`scontrol requeue` and an exact resume, and `mmscale launch` through submitit.

The cluster is started once for this module and stopped by its finalizer, also when a test fails.
It needs root (to install the Debian packages and start munge); elsewhere the tests skip and say
why. MMSCALE_REQUIRE_SLURM=1 turns that skip into a failure (CI machines are root).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _free_port_block(n: int = 3) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def _skip_or_fail(reason: str):
    if os.environ.get("MMSCALE_REQUIRE_SLURM") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class Cluster:
    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    def run(self, *cmd, timeout=60, env=None, check=True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO,
                             env=env or self.env)
        if check and out.returncode != 0:
            raise AssertionError(f"{cmd} -> {out.returncode}: {out.stderr}")
        return out

    def job_env(self, tmp: Path) -> dict:
        """What a job sees: this cluster, our interpreter, its own TMPDIR (streaming lock files)."""
        jt = tmp / "job-tmp"
        jt.mkdir(parents=True, exist_ok=True)
        return dict(self.env, TMPDIR=str(jt), MMSCALE_PYTHON=PY, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")

    def sbatch(self, args: list[str], env: dict) -> str:
        return self.run("sbatch", "--parsable", *args, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _skip_or_fail("the local SLURM cluster needs root (apt-get install, munged); CI runs as root")
    if not Path("/tmp").is_dir():
        _skip_or_fail("/tmp is missing")
    # not under pytest's basetemp: munged insists that every user can traverse to its socket
    root = Path(tempfile.mkdtemp(prefix="mmscale-slurm-", dir="/tmp"))
    root.chmod(0o755)
    # 4 CPUs per emulated node: three 2-node jobs (a reference and two preempted runs) fit side by side
    env = dict(os.environ, SLURM_LOCAL_PORT=str(_free_port_block(3)), SLURM_CONF=str(root / "slurm.conf"),
               SLURM_LOCAL_CPUS="4")
    try:
        up = subprocess.run(["bash", str(REPO / "tools/slurm_local.sh"), "up", str(root)], env=env,
                            capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            _skip_or_fail(f"the local SLURM cluster did not start: {up.stderr.strip().splitlines()[-1:]}")
        yield Cluster(root, env)
    finally:
        started = [int(p.read_text()) for p in (root / "run").glob("*.pid") if p.read_text().strip().isdigit()]
        subprocess.run(["bash", str(REPO / "tools/slurm_local.sh"), "down", str(root)], env=env,
                       capture_output=True, text=True, timeout=180)
        shutil.rmtree(root, ignore_errors=True)
        alive = [pid for pid in started if Path(f"/proc/{pid}").exists()
                 and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[:1]]
        assert not alive, f"tools/slurm_local.sh down left daemons running: {alive}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests._data_helpers import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("slurm-data"), n_ctx=32, vocab_size=512)


def _train_overrides(run_dir: Path, data: Path, engine: str, steps: int, every: int = 0) -> list[str]:
    return [f"run.dir={run_dir}", f"data.train={data}", "model.n_ctx=32", "model.vocab_size=512",
            f"engine.kind={engine}", f"train.max_steps={steps}", "train.eval_every=0", "train.warmup_steps=2",
            f"checkpoint.every={every}", "log.every=1", "log.progress=false", "log.wandb=disabled"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]


def _sbatch_args(tmp: Path, nodes: int, tasks: int, name: str) -> list[str]:
    return [f"--nodes={nodes}", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", f"--job-name={name}", f"--output={tmp}/%x-%j.out"]


def _own_shm_dirs(job_id: str) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"mmscale-{job_id}-*")]


# ----------------------------------------------------------------------------------------------

def test_cluster_runs_one_task_on_each_emulated_node(cluster, tmp_path):
    env = cluster.job_env(tmp_path)
    out = tmp_path / "hello.out"
    jid = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}", "--wrap",
                          "srun bash -c 'echo task=$SLURM_PROCID node=$SLURMD_NODENAME ntasks=$SLURM_NTASKS'"], env)
    info = cluster.wait(jid, 60)
    assert info["JobState"] == "COMPLETED", info
    lines = sorted(ln for ln in out.read_text().splitlines() if ln.startswith("task="))
    assert lines == ["task=0 node=n1 ntasks=2", "task=1 node=n2 ntasks=2"]


def test_pretrain_sh_runs_on_one_node_x2_and_two_nodes_x1(cluster, dataset, tmp_path):
    env = cluster.job_env(tmp_path)
    # the engine comes from the config: DeepSpeed ZeRO-2 on one node, FSDP2 across the two
    layouts = {"1x2": (1, 2, "deepspeed"), "2x1": (2, 1, "fsdp")}
    jobs = {}
    for name, (nodes, tasks, engine) in layouts.items():  # both at once: they fit side by side
        run_dir = tmp_path / name
        jid = cluster.sbatch(_sbatch_args(tmp_path, nodes, tasks, name)
                             + ["slurm/pretrain.sh", "configs/tiny.yaml",
                                *_train_overrides(run_dir, dataset, engine, 30, every=20), "engine.zero_stage=2",
                                "engine.precision=fp32"], env)
        jobs[name] = (jid, run_dir)
    # chained after the DeepSpeed run: its checkpoint -> an export (verified) -> evaluation on val
    export = tmp_path / "export"
    convert = cluster.sbatch([f"--dependency=afterok:{jobs['1x2'][0]}", "--cpus-per-task=1",
                              f"--output={tmp_path}/convert-%j.out", "slurm/convert.sh", str(jobs["1x2"][1]),
                              str(export), str(dataset)], env)
    for name, (jid, run_dir) in jobs.items():
        info = cluster.wait(jid, 240)
        log = (tmp_path / f"{name}-{jid}.out").read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        nodes, tasks, engine = layouts[name]
        assert f"{nodes * tasks} tasks ({nodes} nodes x {tasks})" in log
        if nodes == 2:
            assert info["NodeList"] == "n[1-2]"
        losses = _losses(run_dir)
        assert [s for s, _ in losses] == list(range(1, 31))
        first, last = sum(l for _, l in losses[:5]) / 5, sum(l for _, l in losses[-5:]) / 5
        assert last < first - 0.5, (name, losses)  # a falling loss, not noise
        ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        assert ckpts[-1] == "step_00000030", ckpts
        assert (run_dir / "checkpoints" / "latest").exists()
        assert _own_shm_dirs(jid) == []  # the per-node /dev/shm went with the job
    # the same 2 ranks over the same data in fp32: the layouts and engines agree up to reduction order
    a, b = (_losses(run_dir) for _, run_dir in jobs.values())
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-3, (a, b)
    info = cluster.wait(convert, 180)
    log = (tmp_path / f"convert-{convert}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "verify: max |logit difference|" in log and "-> OK" in log
    result = json.loads((export / "eval.json").read_text())
    assert (export / "model.safetensors").is_file() and result["tokens"] > 0
    assert result["loss"] < a[0][1] - 0.5  # the trained weights, not the initial ones


def _wait_for_steps(cluster: Cluster, job_id: str, run_dir: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= steps:
            return
        assert cluster.job(job_id).get("JobState") not in TERMINAL, "finished before it could be preempted"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach step {steps} in {timeout} s")


def test_preempted_jobs_requeue_and_end_with_the_uninterrupted_losses(cluster, dataset, tmp_path):
    """Preemption (`scontrol requeue`: SIGTERM, SLURM requeues) and the time-limit signal (USR2 to the
    tasks, as --signal=USR2@120 sends it: pretrain.sh requeues) against a run nobody interrupted."""
    env = cluster.job_env(tmp_path)
    steps = 120
    runs = {name: tmp_path / name for name in ("reference", "requeued", "usr2")}
    jobs = {name: cluster.sbatch(_sbatch_args(tmp_path, 2, 1, name) + ["slurm/pretrain.sh", "configs/tiny.yaml"]
                                 + _train_overrides(run_dir, dataset, "ddp", steps), env)
            for name, run_dir in runs.items()}
    # preempt once the runs are well under way but far from done
    _wait_for_steps(cluster, jobs["requeued"], runs["requeued"], 10)
    cluster.run("scontrol", "requeue", jobs["requeued"])
    _wait_for_steps(cluster, jobs["usr2"], runs["usr2"], 10)
    cluster.run("scancel", "--signal=USR2", jobs["usr2"])  # to the job steps' tasks, not the batch shell
    ref_info = cluster.wait(jobs["reference"], 240)
    assert ref_info["JobState"] == "COMPLETED", ref_info
    reference = _losses(runs["reference"])
    assert [s for s, _ in reference] == list(range(1, steps + 1))
    for name in ("requeued", "usr2"):
        info = cluster.wait(jobs[name], 240)
        log = (tmp_path / f"{name}-{jobs[name]}.out").read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        assert info["Restarts"] == "1", info
        assert "start 0 " in log and "start 1 " in log and "resumed from" in log
        stopped = [int(m) for m in re.findall(r"stopped by a signal at step (\d+)", log)]
        assert len(stopped) == 1 and 10 <= stopped[0] < steps, stopped
        if name == "usr2":  # nobody else requeues it: the script did, after the trainer's exit 75
            assert "requeueing job" in log
        # bit-exact: the same losses at every step as the run nobody interrupted
        assert _losses(runs[name]) == reference, name
        assert _own_shm_dirs(jobs[name]) == []


def test_concurrent_jobs_train_from_one_dataset_directory(cluster, dataset, tmp_path):
    """Issue 24: two 2-node jobs (each node with its own /dev/shm, so every loader gets streaming's prefix
    000000) start together on one dataset directory whose shards are compressed only, so both also decompress
    the same shards at once; both train and evaluate to the end with the same losses, and the dataset holds
    nothing of streaming's afterwards but the raw shards (no lock folder, no temporary file).
    MMSCALE_SLURM_SHARED_DATA_ROUNDS=20 repeats it (README: the stress record)."""
    rounds = int(os.environ.get("MMSCALE_SLURM_SHARED_DATA_ROUNDS", "1"))
    env = cluster.job_env(tmp_path)
    steps = 20
    for r in range(rounds):
        data = tmp_path / f"data-{r}"
        shutil.copytree(dataset, data, ignore=lambda d, names: [n for n in names if n.endswith(".mds")])
        zipped = sorted(p.relative_to(data) for p in data.rglob("*"))
        jobs = {}
        for name in ("a", "b"):
            run_dir = tmp_path / f"{name}-{r}"
            jobs[name] = (cluster.sbatch(_sbatch_args(tmp_path, 2, 1, f"{name}{r}")
                                         + ["slurm/pretrain.sh", "configs/tiny.yaml",
                                            *_train_overrides(run_dir, data, "ddp", steps), "train.eval_every=10"],
                                         env), run_dir)
        for name, (jid, run_dir) in jobs.items():
            info = cluster.wait(jid, 300)
            log = (tmp_path / f"{name}{r}-{jid}.out").read_text()
            assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"round {r + 1}: {log[-3000:]}"
            assert [s for s, _ in _losses(run_dir)] == list(range(1, steps + 1))
            assert _own_shm_dirs(jid) == []
        a, b = (_losses(run_dir) for _, run_dir in jobs.values())
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-5, (a, b)
        added = sorted(set(p.relative_to(data) for p in data.rglob("*")) - set(zipped))
        assert added and all(p.suffix == ".mds" for p in added), added
        for _, run_dir in jobs.values():
            shutil.rmtree(run_dir)
        shutil.rmtree(data)
        print(f"round {r + 1}/{rounds}: both jobs completed", flush=True)


def test_bad_input_to_sbatch_and_launch(cluster, tmp_path):
    env = cluster.job_env(tmp_path)
    out = cluster.run("sbatch", "--partition=nope", "--gpus-per-node=0", "slurm/pretrain.sh", "configs/tiny.yaml",
                      env=env, check=False)
    assert out.returncode != 0 and "partition" in out.stderr.lower()
    out = cluster.run(PY, "-m", "mmscale.cli", "launch", "--config", "configs/tiny.yaml", "--partition", "nope",
                      env=env, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "partition 'nope' does not exist; available: debug" in out.stderr
    # a request no node can hold is refused at submission (SLURM itself would leave it PENDING forever)
    for extra, fragment in [(["--cpus-per-task", "8"], "the largest node of the default partition has 4"),
                            (["--gpus-per-node", "2"], "have at most 0"),
                            (["--mem-gb", "64", "--no-gpus"], "--mem-gb=64 per node")]:
        out = cluster.run(PY, "-m", "mmscale.cli", "launch", "--config", "configs/tiny.yaml", "engine.kind=ddp",
                          f"run.dir={tmp_path}/never", *extra, env=env, check=False)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and fragment in out.stderr, (extra, out.stderr)
    assert not (tmp_path / "never").exists()
    # --dry-run renders the same script with or without SLURM on PATH (tests/test_launch.py runs it without)
    dry = [PY, "-m", "mmscale.cli", "launch", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}/never",
           "engine.kind=ddp",
           "--nodes", "2", "--gpus-per-node", "2", "--partition", "debug", "--dry-run"]
    bare = dict(env, PATH=os.pathsep.join(d for d in env["PATH"].split(os.pathsep)
                                          if d and not os.path.exists(os.path.join(d, "srun"))))
    with_slurm, without = cluster.run(*dry, env=env).stdout, cluster.run(*dry, env=bare).stdout
    assert with_slurm == without and "#SBATCH --nodes=2" in with_slurm
    assert cluster.run("squeue", "-h", "-o", "%i", env=env).stdout.strip() == ""  # nothing was queued
    # inside an allocation whose layout does not fit the config's batch: one line, exit 2, no training
    jid = cluster.sbatch(_sbatch_args(tmp_path, 1, 2, "badbatch")
                         + ["slurm/pretrain.sh", "configs/tiny.yaml", "engine.kind=ddp",
                            "train.global_batch_size=24", f"run.dir={tmp_path}/never"], env)
    info = cluster.wait(jid, 60)
    log = (tmp_path / f"badbatch-{jid}.out").read_text()
    assert info["ExitCode"] == "2:0", log
    assert "pretrain.sh: error: train.global_batch_size=24 is not a multiple" in log
    assert not (tmp_path / "never").exists()
    jid = cluster.sbatch(_sbatch_args(tmp_path, 1, 1, "noconfig") + ["slurm/pretrain.sh", "missing.yaml"], env)
    info = cluster.wait(jid, 60)
    assert info["ExitCode"] == "2:0" and "config file 'missing.yaml' does not exist" in \
        (tmp_path / f"noconfig-{jid}.out").read_text()


def _launch_cmd(run_dir: Path, dataset: Path, steps: int, *extra: str) -> list[str]:
    return [PY, "-m", "mmscale.cli", "launch", "--config", "configs/tiny.yaml",
            *_train_overrides(run_dir, dataset, "ddp", steps), "--cluster", "slurm", "--nodes", "2",
            "--gpus-per-node", "1", "--no-gpus", "--time", "10", *extra]


def _submitit_logs(run_dir: Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted((run_dir / "submitit").glob("*_log.*")))


def test_mmscale_launch_through_submitit_on_the_cluster_with_requeue(cluster, dataset, tmp_path):
    """One job waited on to its result; a second one preempted with USR2 (what SLURM sends at the time
    limit): submitit's checkpoint hook waits for the trainer's checkpoint and requeues it."""
    env = cluster.job_env(tmp_path)
    steps = 80
    ref_dir, pre_dir = tmp_path / "launched", tmp_path / "launched-preempted"
    waiting = subprocess.Popen(_launch_cmd(ref_dir, dataset, steps, "--wait"), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = cluster.run(*_launch_cmd(pre_dir, dataset, steps), env=env, timeout=120)
        pre = re.search(r"^job (\d+) ", out.stdout, re.M).group(1)
        _wait_for_steps(cluster, pre, pre_dir, 10)
        cluster.run("scancel", "--signal=USR2", pre)
        stdout, stderr = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, stdout + stderr + _submitit_logs(ref_dir)
    ref = re.search(r"^job (\d+) ", stdout, re.M).group(1)
    assert f"job {ref} done: 2 task(s) finished" in stdout
    assert f"stdout: {ref_dir / 'submitit'}/{ref}_0_log.out" in stdout  # the log paths
    reference = _losses(ref_dir)
    assert [s for s, _ in reference] == list(range(1, steps + 1)) and reference[-1][1] < reference[0][1] - 0.5
    assert (ref_dir / "checkpoints" / "step_00000080").is_dir()

    info = cluster.wait(pre, 240)
    logs = _submitit_logs(pre_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)
    assert f"Requeued job {pre}" in logs and "resumed from" in logs
    assert (pre_dir / "submitit" / f"{pre}_0_result.pkl").exists()
    assert _losses(pre_dir) == reference  # exact resume through submitit too
    assert _own_shm_dirs(ref) == [] and _own_shm_dirs(pre) == []
