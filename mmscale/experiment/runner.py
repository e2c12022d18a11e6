"""Executing runs: one run in this process (train or resume, then its measures), several at a time as child
processes (`mmscale experiment run-one`), or a SLURM job array through submitit with launch.py's child-task
machinery (preemption: the trainer checkpoints, the task is requeued)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from mmscale.config import load_config
from mmscale.errors import UserError
from mmscale.experiment.measure import evaluate_run, measured, run_state
from mmscale.experiment.plan import Experiment, Run
from mmscale.fsutil import usable_cpus
from mmscale.launch import EXIT_REQUEUE, ChildTask, last_error_line, private_shm_prefix, wait_child
from mmscale.run.train import train


def train_run(cfg_path: Path) -> int:
    return train(load_config(cfg_path))


def execute_run(exp: Experiment, run: Run, *, evaluate: bool, progress: bool = False) -> str:
    """Train (or resume) one run, then measure it (main runs). Returns what was done."""
    cfg_path = exp.config_path(run)
    if not cfg_path.is_file():
        exp.write_config(run)
    state, step = run_state(run.dir(exp.exp), run.steps)
    did = "skipped (finished)"
    if state != "finished":
        status = train_run(cfg_path)
        if status != 0:
            raise UserError(f"run {run.name} stopped with exit status {status} (75: interrupted after saving a "
                            f"checkpoint); rerun `mmscale experiment run SPEC --out {exp.exp} --resume` to continue",
                            status)
        did = "resumed" if state == "partial" else "trained"
    if evaluate:
        if not measured(exp, run):
            evaluate_run(exp, run, progress)
            did += ", measured"
    return did


# ----------------------------------------------------------------------------------------------
# launchers

def child_command(exp_dir: Path, phase: str, name: str) -> list[str]:
    return [sys.executable, "-m", "mmscale.cli", "experiment", "run-one", str(exp_dir), phase, name]


def run_local(exp: Experiment, runs: list[Run], evaluate: bool, jobs: int, log) -> None:
    if jobs <= 1:
        for i, run in enumerate(runs):
            t0 = time.time()
            did = execute_run(exp, run, evaluate=evaluate)
            log(f"[{i + 1}/{len(runs)}] {run.phase}/{run.name}: {did} ({time.time() - t0:.0f} s)")
        return
    pending, active, failed = list(runs), {}, []
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # jobs x torch's default (every core) would oversubscribe the CPU
        env["OMP_NUM_THREADS"] = str(usable_cpus(jobs))
        log(f"{jobs} runs at a time: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each (set it to override)")
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                run.dir(exp.exp).parent.mkdir(parents=True, exist_ok=True)
                logf = open(run.dir(exp.exp).parent / f"{run.name}.log", "a")
                active[run.name] = (subprocess.Popen(child_command(exp.exp, run.phase, run.name), stdout=logf,
                                                     stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env), logf, run)
            time.sleep(0.5)
            for name, (proc, logf, run) in list(active.items()):
                if proc.poll() is not None:
                    logf.close()
                    del active[name]
                    log(f"{run.phase}/{run.name}: exit {proc.returncode}")
                    if proc.returncode != 0:
                        failed.append(run.name)
    except BaseException:  # interrupted: the running trainers checkpoint and stop (75), never left orphaned
        for proc, _, _ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, logf, _ in active.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logf.close()
        raise
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their .log files under "
                        f"{exp.exp / 'runs'} and rerun with --resume")


class RunJob(ChildTask):
    """One run of an experiment as a submitit task: `mmscale experiment run-one` in a child process (its own
    /dev/shm on emulated nodes); on preemption the trainer checkpoints and the task is requeued."""

    def __init__(self, exp_dir: str, phase: str, name: str, cwd: str):
        self.exp_dir, self.phase, self.name, self.cwd = exp_dir, phase, name, cwd
        self._child = None

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        node_shm = f"/dev/shm/mmscale-exp-{str(env.job_id).replace('_', '-')}"
        prefix = private_shm_prefix(node_shm) if env.cluster == "slurm" else []
        child_env = dict(os.environ)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            child_env.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        self._child = subprocess.Popen(prefix + child_command(Path(self.exp_dir), self.phase, self.name),
                                       cwd=self.cwd, env=child_env)
        rc = wait_child(self._child)
        if prefix:
            shutil.rmtree(node_shm, ignore_errors=True)
        if rc == EXIT_REQUEUE and env.cluster == "slurm":
            sys.stderr.flush()
            os._exit(EXIT_REQUEUE)
        if rc != 0:
            raise RuntimeError(f"run {self.phase}/{self.name} exited with status {rc}")
        return {"run": self.name, "returncode": rc}

    def checkpoint(self, *args, **kwargs):
        self.stop_child(timeout=100)
        return submitit.helpers.DelayedSubmission(RunJob(self.exp_dir, self.phase, self.name, self.cwd))


def run_slurm(exp: Experiment, runs: list[Run], log) -> None:
    if not shutil.which("sbatch"):
        raise UserError("--launcher slurm needs sbatch on PATH; use --launcher local on this machine")
    sl = exp.spec.launcher["slurm"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        res = dict(sl)
        res.pop("arms", None)
        res.update((sl.get("arms") or {}).get(run.arm, {}))
        res.update(exp.spec.arm_resources.get(run.arm, {}))
        groups.setdefault(json.dumps(res, sort_keys=True), []).append(run)
    logging.getLogger("submitit").setLevel(logging.ERROR)  # no accounting on small clusters: quiet polls
    all_jobs = []
    for gi, (key, group) in enumerate(groups.items()):
        res = json.loads(key)
        folder = exp.exp / "submitit" / f"{group[0].phase}-{gi}"
        folder.mkdir(parents=True, exist_ok=True)
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = dict(nodes=1, tasks_per_node=1, cpus_per_task=int(res.get("cpus_per_task", 1)),
                      timeout_min=int(res.get("time_min", 60)), name=f"{exp.spec.name}-{group[0].phase}",
                      slurm_signal_delay_s=120, slurm_array_parallelism=int(res.get("array_parallelism", 64)))
        if res.get("gpus_per_node"):
            params["slurm_gpus_per_node"] = int(res["gpus_per_node"])
        if res.get("partition"):
            params["slurm_partition"] = res["partition"]
        if res.get("mem_gb"):
            params["mem_gb"] = float(res["mem_gb"])
        ex.update_parameters(**params)
        jobs_ = [RunJob(str(exp.exp), r.phase, r.name, os.getcwd()) for r in group]
        try:
            with ex.batch():
                handles = [ex.submit(j) for j in jobs_]
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
            raise UserError(f"the SLURM array was not submitted: {lines[-1][:300]}") from None
        log(f"submitted array {handles[0].job_id.split('_')[0]} ({len(handles)} runs, {res or 'default resources'})")
        all_jobs += list(zip(group, handles))
    failed = []
    for run, h in all_jobs:
        try:
            h.results()
            log(f"{run.phase}/{run.name}: done (job {h.job_id})")
        except Exception as e:
            failed.append(f"{run.name} (job {h.job_id}: {last_error_line(str(e))})")
    if failed:
        raise UserError(f"{len(failed)} SLURM run(s) failed: {'; '.join(failed)[:500]}; logs under "
                        f"{exp.exp / 'submitit'}; rerun with --resume")
