"""`mmscale launch`: submit training to SLURM (or run it locally) through submitit, with requeue.

    mmscale launch --config configs/tiny.yaml run.dir=runs/x --nodes 2 --gpus-per-node 8 --partition gpu
    mmscale launch --config configs/tiny.yaml --cluster local --gpus-per-node 2 --no-gpus --wait

One submitit task per GPU. Each task runs the trainer as a child process with the distributed
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) taken from
submitit's JobEnvironment. Preemption and time limits: SLURM signals the tasks (USR2, `--signal`),
the trainer checkpoints into run.dir and exits 75; on rank 0 submitit calls `TrainJob.checkpoint`,
which waits for that checkpoint and hands back a fresh TrainJob, and submitit requeues the job. The
requeued trainer resumes from run.dir by itself. The submitit job folder is `run.dir/submitit`.

The same module holds what `slurm/pretrain.sh` needs (`python -m mmscale.launch sbatch-plan ...`):
the layout check (nodes x tasks against the config's batch and engine), so both ways fail the same.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable
from submitit.slurm.slurm import SlurmExecutor

from mmscale.config import Config, load_config
from mmscale.distributed import DistInfo, free_port, rendezvous_env
from mmscale.errors import UserError, exit_status
from mmscale.fsutil import usable_cpus

EXIT_REQUEUE = 75  # the trainer's "stopped by a signal after saving a checkpoint" (ARCHITECTURE.md)
PREEMPT_SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: time to write a checkpoint


# ----------------------------------------------------------------------------------------------
# checks shared by `mmscale launch` and slurm/pretrain.sh

def check_layout(cfg: Config, nodes: int, tasks_per_node: int) -> None:
    """Raise UserError (exit 2) when nodes x tasks per node cannot run this config: the trainer's own check
    (engines.check_world_layout), made before anything is submitted."""
    # lazy: engines imports torch, which nothing else here needs (the submitit job that supervises each rank's
    # `mmscale train` child imports this module on every node and stays without torch's few hundred MB)
    from mmscale.engines import check_world_layout

    world = nodes * tasks_per_node
    check_world_layout(cfg, world, nodes, f"{nodes} node(s) x {tasks_per_node} task(s) = {world} ranks", exit_code=2)


def rendezvous_host(hostname: str) -> str:
    """The first node's name if it resolves, else 127.0.0.1 (emulated nodes share this machine)."""
    try:
        socket.gethostbyname(hostname)
        return hostname
    except OSError:
        return "127.0.0.1"


def rendezvous_port(job_id: str) -> int:
    """Every task derives the same port from the job id without talking first (as distributed.py)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 15000 + int(digits) % 20000


def private_shm_prefix(node_dir: str) -> list[str]:
    """A command prefix that gives every task of one node the same /dev/shm (`node_dir`), apart from other nodes.

    Emulated nodes share this machine's /dev/shm and mosaicml-streaming names its segments by
    local rank, so ranks of two "nodes" collide. Tasks of one node must still share (streaming
    coordinates local ranks through it), so each node gets a directory of the real /dev/shm
    bind-mounted over /dev/shm in a private mount namespace; removing it afterwards also removes
    segments a killed trainer left. Needs root (or CAP_SYS_ADMIN); on a real cluster nodes have their
    own /dev/shm and this is not needed ([] when unavailable).
    """
    if os.environ.get("MMSCALE_PRIVATE_SHM", "auto") == "0" or not shutil.which("unshare"):
        return []
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return []
    script = (f'mkdir -p {node_dir} && mount --bind {node_dir} /dev/shm && exec "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "mmscale-task"]


def train_command(config_path: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmscale.cli", "train", "--config", config_path, *overrides]


# ----------------------------------------------------------------------------------------------
# the submitit job

def wait_child(child: subprocess.Popen, timeout: float | None = None) -> int | None:
    """Reap `child` by polling; its exit status, or None after `timeout` seconds.

    Not Popen.wait: submitit calls `checkpoint` from a signal handler that interrupts the main
    thread inside this very wait, and Popen.wait holds a lock there that a nested Popen.wait would
    wait on forever (the trainer would be reaped only after the timeout).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while child.returncode is None:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by an outer frame already
            break
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
    return child.returncode


class ChildTask(Checkpointable):
    """A submitit task that runs a trainer as a child process (`self._child`): the child is not pickled,
    and on preemption it is asked to checkpoint (USR2) and waited for before the task is requeued."""

    _child: subprocess.Popen | None = None

    def __getstate__(self):  # the child process is not part of what submitit pickles
        return {k: v for k, v in self.__dict__.items() if k != "_child"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._child = None

    def stop_child(self, timeout: float) -> bool:
        """USR2 to a running child, then wait up to `timeout` s; False if it is still running then."""
        child = self._child
        if child is None or child.returncode is not None:
            return True
        # SLURM signals every process of the step, so the trainer usually has USR2 already;
        # it only sets a flag while it trains, so a second one does no harm
        try:
            child.send_signal(signal.SIGUSR2)
        except ProcessLookupError:
            pass
        return wait_child(child, timeout=timeout) is not None


class TrainJob(ChildTask):
    """One task of a training job (submitit callable; checkpointable so the job is requeued)."""

    def __init__(self, config_path: str, overrides: list[str], cwd: str, run_dir: str, master_port: int = 0):
        self.config_path = config_path
        self.overrides = list(overrides)
        self.cwd = cwd
        self.run_dir = run_dir
        # 0: derive it from the job id (all nodes agree); local jobs get a port that was free at submission
        self.master_port = master_port
        self._child = None

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        job_id = str(env.job_id).split("_")[0]
        child_env = {**os.environ, **rendezvous_env(DistInfo(
            rank=env.global_rank, local_rank=env.local_rank, world_size=env.num_tasks,
            local_world_size=max(1, env.num_tasks // env.num_nodes), master_addr=rendezvous_host(env.hostnames[0]),
            master_port=self.master_port or rendezvous_port(job_id)))}
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            child_env.setdefault("OMP_NUM_THREADS", cpus)
        elif env.cluster != "slurm":  # local ranks share this machine's cores (SLURM binds each task's own)
            child_env.setdefault("OMP_NUM_THREADS", str(usable_cpus(env.num_tasks // env.num_nodes)))
        node_shm = f"/dev/shm/mmscale-{job_id}-node{env.node}"
        prefix = private_shm_prefix(node_shm) if env.cluster == "slurm" else []
        cmd = prefix + train_command(self.config_path, self.overrides)
        print(f"[mmscale launch] rank {env.global_rank}/{env.num_tasks} on {env.hostname}: "
              f"{shlex.join(cmd)}", file=sys.stderr, flush=True)
        self._child = subprocess.Popen(cmd, env=child_env, cwd=self.cwd)
        rc = wait_child(self._child)
        if prefix and env.local_rank == 0:
            # the trainer's last barrier is behind every rank of this node: nothing opens segments now
            shutil.rmtree(node_shm, ignore_errors=True)
        if rc == EXIT_REQUEUE:
            if env.cluster == "slurm":
                # the checkpoint is saved and SLURM (scontrol requeue) or rank 0's submitit handler
                # requeues the job: leave without a result so that nothing reads this start as done
                print(f"[mmscale launch] rank {env.global_rank}: trainer checkpointed and stopped; "
                      "waiting for the requeue", file=sys.stderr, flush=True)
                sys.stderr.flush()
                os._exit(EXIT_REQUEUE)
            raise RuntimeError(f"the trainer stopped after a signal (exit {rc}); its checkpoint is in "
                               f"{self.run_dir}: launch again to resume")
        if rc != 0:
            raise RuntimeError(f"the trainer exited with status {rc} on rank {env.global_rank}; see the log above")
        return {"rank": env.global_rank, "world_size": env.num_tasks, "run_dir": self.run_dir,
                "returncode": rc}

    def checkpoint(self, *args, **kwargs):
        """submitit's preemption hook (rank 0, in its USR2 handler): let the trainer save, then requeue."""
        if not self.stop_child(timeout=PREEMPT_SIGNAL_DELAY_S - 10):
            print("[mmscale launch] the trainer did not stop in time; requeueing anyway "
                  "(it resumes from its last checkpoint)", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config_path, self.overrides, self.cwd, self.run_dir, self.master_port))


# ----------------------------------------------------------------------------------------------
# `mmscale launch`

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.dir=runs/x engine.kind=fsdp")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node = tasks per node")
    p.add_argument("--no-gpus", action="store_true",
                   help="run --gpus-per-node tasks per node without requesting GPUs (CPU clusters)")
    p.add_argument("--cpus-per-task", type=int, default=0,
                   help="CPU cores per task (default: data.num_workers + 1)")
    p.add_argument("--mem-gb", type=float, default=0,
                   help="memory per node in GB (default 0: the partition's default)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                   help="slurm (sbatch), local (processes on this machine) or debug (in this process)")
    p.add_argument("--name", default="mmscale", help="job name")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish and print its result")


def _check_partition(partition: str) -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"cannot reach the SLURM controller (sinfo: {out.stderr.strip()[:200]}); "
                        "check SLURM_CONF or use --cluster local")
    names = sorted(set(out.stdout.split()))
    if partition not in names:
        raise UserError(f"partition '{partition}' does not exist; available: {', '.join(names) or 'none'}", 2)


def last_error_line(text: str) -> str:
    """'RuntimeError: ...' from a traceback text (what the task raised), else its first line."""
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", ln.strip())]
    return errors[-1] if errors else (text.strip().splitlines() or ["unknown error"])[0]


def _has_accounting(job_id: str) -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-j", str(job_id)], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _render_only_slurm_executor(folder: Path):
    """submitit's SlurmExecutor without its "is srun on PATH" check: it only renders the sbatch script.

    `--dry-run` is for machines without SLURM (a laptop, a login node without srun), where submitit's
    own constructor refuses ("Could not detect srun"); nothing is ever submitted through this one.
    """
    class RenderOnly(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

        def _make_submission_command(self, submission_file_path):  # never submits
            raise RuntimeError("a dry-run executor cannot submit")

    return RenderOnly(folder=folder)


def _executor(args, cfg: Config, folder: Path, render_only: bool = False):
    cpus = args.cpus_per_task or cfg.data.num_workers + 1
    params = dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, cpus_per_task=cpus,
                  timeout_min=args.time, name=args.name)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.cluster == "slurm":
        slurm = dict(signal_delay_s=PREEMPT_SIGNAL_DELAY_S)
        if not args.no_gpus:
            slurm["gpus_per_node"] = args.gpus_per_node
        if args.partition:
            slurm["partition"] = args.partition
        if render_only:
            ex = _render_only_slurm_executor(folder)
            # the generic names (timeout_min, tasks_per_node, ...) as AutoExecutor translates them
            ex.update_parameters(**ex._convert_parameters(params), **slurm)
            return ex
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(**params, **{f"slurm_{k}": v for k, v in slurm.items()})
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    if not args.no_gpus:
        params["gpus_per_node"] = args.gpus_per_node
    ex.update_parameters(**params)
    return ex


def _sbatch_text(executor) -> str:
    """The sbatch script submitit would write (for --dry-run), without submitting anything."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------------------------
# what the partition's nodes can hold (SLURM keeps an impossible job PENDING forever, silently)

def _gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field: 'gpu:8', 'gpu:a100:4(S:0-1)', 'gpu:2,shard:8', '(null)' -> 8, 4, 2, 0."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2:
            try:
                total += int(parts[-1])
            except ValueError:
                total += 1 if len(parts) == 2 else 0
    return total


def partition_nodes(sinfo_text: str, partition: str) -> list[dict]:
    """Nodes of `partition` ('' = the default, marked '*') from `sinfo -h -N -o '%P|%N|%c|%m|%G'` lines."""
    nodes: dict[str, dict] = {}
    for line in sinfo_text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, name, cpus, mem, gres = fields
        is_default = part.endswith("*")
        part = part.rstrip("*")
        if (partition and part != partition) or (not partition and not is_default):
            continue
        try:
            nodes[name] = {"name": name, "cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+")),
                           "gpus": _gres_gpus(gres)}
        except ValueError:
            continue
    return list(nodes.values())


def check_fits_partition(nodes: list[dict], partition: str, n_nodes: int, tasks_per_node: int,
                         cpus_per_task: int, gpus_per_node: int, mem_gb: float) -> None:
    """Raise UserError when fewer than `n_nodes` nodes of the partition can each hold one node's share."""
    where = f"partition '{partition}'" if partition else "the default partition"
    if not nodes:
        raise UserError(f"{where} has no nodes (sinfo); pass --partition with one that has", 2)
    cpus = cpus_per_task * tasks_per_node
    mem_mb = int(mem_gb * 1024)
    fit = [n for n in nodes if n["cpus"] >= cpus and n["gpus"] >= gpus_per_node and n["mem_mb"] >= mem_mb]
    if len(fit) >= n_nodes:
        return
    best = lambda k: max(n[k] for n in nodes)  # noqa: E731
    if not any(n["cpus"] >= cpus for n in nodes):
        raise UserError(f"the job asks {cpus} CPUs per node ({tasks_per_node} task(s) x --cpus-per-task="
                        f"{cpus_per_task}) but the largest node of {where} has {best('cpus')}; lower "
                        f"--cpus-per-task to {max(1, best('cpus') // tasks_per_node)} or fewer", 2)
    if not any(n["gpus"] >= gpus_per_node for n in nodes):
        raise UserError(f"the job asks {gpus_per_node} GPU(s) per node but the nodes of {where} have at most "
                        f"{best('gpus')}; lower --gpus-per-node, pass --no-gpus on a CPU partition, or pick "
                        "another --partition", 2)
    if not any(n["mem_mb"] >= mem_mb for n in nodes):
        raise UserError(f"the job asks --mem-gb={mem_gb:g} per node but the largest node of {where} has "
                        f"{best('mem_mb') / 1024:.1f} GB; lower --mem-gb", 2)
    raise UserError(f"the job needs {n_nodes} node(s) with {cpus} CPUs, {gpus_per_node} GPU(s) and "
                    f"{mem_gb:g} GB each but only {len(fit)} node(s) of {where} have that; lower --nodes "
                    "or the per-node request", 2)


def _check_capacity(args, cpus_per_task: int) -> None:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot run sinfo ({e}); check that the SLURM client is installed, or use --cluster local")
    if out.returncode != 0:
        raise UserError(f"cannot reach the SLURM controller (sinfo: {out.stderr.strip()[:200]}); "
                        "check SLURM_CONF or use --cluster local")
    gpus = 0 if args.no_gpus else args.gpus_per_node
    check_fits_partition(partition_nodes(out.stdout, args.partition), args.partition, args.nodes,
                         args.gpus_per_node, cpus_per_task, gpus, args.mem_gb)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_layout(cfg, args.nodes, args.gpus_per_node)
    if args.cluster == "debug" and args.nodes * args.gpus_per_node > 1:
        raise UserError("--cluster debug runs one task in this process; use --cluster local for several", 2)
    if args.cluster == "local" and args.nodes > 1:
        raise UserError(f"--cluster local runs on this machine only; use --nodes 1 (got {args.nodes}) "
                        "or --cluster slurm", 2)
    if args.mem_gb < 0:
        raise UserError(f"--mem-gb must be 0 (the partition's default) or positive, got {args.mem_gb:g}", 2)
    if args.time < 1:
        raise UserError(f"--time must be at least 1 minute, got {args.time}", 2)
    if args.cluster == "slurm" and not args.dry_run:
        if not shutil.which("sbatch"):
            raise UserError("--cluster slurm needs sbatch on PATH; use --cluster local to run on this machine")
        if args.partition:
            _check_partition(args.partition)
        _check_capacity(args, args.cpus_per_task or cfg.data.num_workers + 1)
    overrides = list(args.overrides)
    if args.cpus_per_task and cfg.data.num_workers > args.cpus_per_task - 1:
        # data-loader workers share the task's cores with the trainer itself
        overrides.append(f"data.num_workers={args.cpus_per_task - 1}")
        print(f"data.num_workers {cfg.data.num_workers} -> {args.cpus_per_task - 1} "
              f"(--cpus-per-task={args.cpus_per_task})", file=sys.stderr)
    run_dir = Path(cfg.run.dir).resolve()
    job = TrainJob(str(Path(args.config).resolve()), overrides, os.getcwd(), str(run_dir),
                   free_port() if args.cluster == "local" else 0)
    folder = run_dir / "submitit"
    if args.dry_run:
        if args.cluster != "slurm":
            print(shlex.join(train_command(job.config_path, job.overrides)))
            return 0
        print(_sbatch_text(_executor(args, cfg, folder, render_only=True)))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    ex = _executor(args, cfg, folder)
    try:
        sub = ex.submit(job)
    except Exception as e:  # sbatch refused it (no controller, bad account, limits, ...)
        lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
        raise UserError(f"the {args.cluster} job was not submitted: {lines[-1][:300]}") from None
    print(f"job {sub.job_id} ({args.cluster}, {args.nodes} node(s) x {args.gpus_per_node} task(s)); run dir {run_dir}")
    print(f"  stdout: {sub.paths.stdout}")
    print(f"  stderr: {sub.paths.stderr}")
    if not args.wait:
        return 0
    if args.cluster == "slurm" and not _has_accounting(sub.job_id):
        # without slurmdbd every poll warns; the result files submitit reads are enough to wait on
        logging.getLogger("submitit").setLevel(logging.ERROR)
        print("  (no SLURM accounting: job states are read from submitit's result files)")
    try:
        results = sub.results()
    except Exception as e:  # submitit re-raises the task's failure with its traceback in the message
        raise UserError(f"job {sub.job_id} failed: {last_error_line(str(e))}; see {sub.paths.stderr}") from None
    print(f"job {sub.job_id} done: {len(results)} task(s) finished; checkpoints in {run_dir / 'checkpoints'}")
    return 0


# ----------------------------------------------------------------------------------------------
# helper for slurm/pretrain.sh: validate inside the allocation and print shell assignments

def _tasks_per_node_from_env(env) -> int:
    # SLURM_TASKS_PER_NODE looks like "2" or "2(x3)" or "2,1"; our layouts are homogeneous
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    return int(raw.split(",")[0].split("(")[0])


def _gpus_per_node_from_env(env) -> int:
    # SLURM_GPUS_PER_NODE looks like "8" or "a100:8"; SLURM_GPUS_ON_NODE is the count itself
    raw = env.get("SLURM_GPUS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE") or "0"
    try:
        return int(raw.rsplit(":", 1)[-1].split("(")[0])
    except ValueError:
        return 0


def sbatch_plan(argv: list[str]) -> int:
    """`python -m mmscale.launch sbatch-plan CONFIG [overrides]`: prints VAR=value lines for bash."""
    return exit_status("pretrain.sh", _sbatch_plan, argv)


def _sbatch_plan(argv: list[str]) -> int:
    env = os.environ
    if not argv:
        raise UserError("usage: sbatch slurm/pretrain.sh CONFIG [section.key=value ...]", 2)
    config_path, overrides = argv[0], list(argv[1:])
    cfg = load_config(config_path, overrides)
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    tasks_per_node = _tasks_per_node_from_env(env)
    check_layout(cfg, nodes, tasks_per_node)
    gpus = _gpus_per_node_from_env(env)
    if gpus and gpus != tasks_per_node:
        raise UserError(f"the job has {gpus} GPU(s) per node but {tasks_per_node} task(s) per node; one task "
                        f"per GPU: submit with --ntasks-per-node={gpus} (or --gpus-per-node={tasks_per_node})", 2)
    extra = []
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or 0)
    # data-loader workers share the task's cores with the trainer itself
    if cpus and cfg.data.num_workers > cpus - 1:
        extra.append(f"data.num_workers={cpus - 1}")
        print(f"pretrain.sh: data.num_workers {cfg.data.num_workers} -> {cpus - 1} "
              f"(--cpus-per-task={cpus})", file=sys.stderr)
    print(f"RUN_DIR={shlex.quote(str(Path(cfg.run.dir).resolve()))}")
    print(f"CONFIG={shlex.quote(str(Path(config_path).resolve()))}")
    print(f"EXTRA_OVERRIDES=({' '.join(shlex.quote(x) for x in extra)})")
    print(f"TASKS_PER_NODE={tasks_per_node}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sbatch-plan":
        sys.exit(sbatch_plan(sys.argv[2:]))
    from mmscale.cli import main

    sys.exit(main(["launch", *sys.argv[1:]]))
