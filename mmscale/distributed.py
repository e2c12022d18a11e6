"""Rank, local rank, world size and the rendezvous, from torchrun, the deepspeed launcher or SLURM;
starting and using the process group (every collective of the loop goes through here, on the engine's
device).

torchrun and the deepspeed launcher both export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under `srun` (one task per rank) only SLURM_* is set: the rendezvous is the first
node of SLURM_JOB_NODELIST (127.0.0.1 when that name does not resolve, e.g. emulated nodes) and a
port derived from the job id, so every task of a job agrees without talking first.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

# torch is imported inside the functions that need it (the only lazy imports here): `mmscale launch`, and the
# submitit job that supervises each rank's trainer on every node, use this module (DistInfo, free ports,
# rendezvous variables) and never load torch, which takes seconds and a few hundred MB


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | torchrun | slurm
    local_world_size: int = 1  # ranks on this node (mosaicml-streaming shares /dev/shm per node)

    @property
    def nodes(self) -> int:
        """Nodes of the job (ranks are spread evenly: world / ranks per node)."""
        return max(1, self.world_size // max(1, self.local_world_size))


def _first_slurm_node(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        host = out[0] if out else nodelist
    except (OSError, subprocess.SubprocessError):
        host = nodelist.split(",")[0].split("[")[0]  # "n[1-2]" -> "n": best effort without scontrol
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        return "127.0.0.1"


def detect(env: dict | None = None) -> DistInfo:
    """Read the launcher's environment (does not initialise anything)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        # the deepspeed launcher exports LOCAL_SIZE and no LOCAL_WORLD_SIZE, so a LOCAL_WORLD_SIZE it
        # inherited from the caller's environment would be stale: LOCAL_SIZE wins
        local_world = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
        return DistInfo(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                        world_size=world, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                        master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun",
                        local_world_size=local_world)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 15000 + job % 20000
        addr = env.get("MASTER_ADDR") or _first_slurm_node(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        world = int(env["SLURM_NTASKS"])
        # SLURM_NTASKS_PER_NODE is only set with --ntasks-per-node; SLURM_TASKS_PER_NODE reads like "2(x3),1"
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
        local_world = int(per_node) if per_node.isdigit() else max(1, world // int(env.get("SLURM_NNODES", 1) or 1))
        return DistInfo(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                        world_size=world, master_addr=addr, master_port=port, launcher="slurm",
                        local_world_size=local_world)
    return DistInfo()


def rendezvous_env(info: DistInfo) -> dict[str, str]:
    """The env:// rendezvous variables of `info` (RANK, LOCAL_RANK, WORLD_SIZE, ...): what this process exports
    in export_env, and what a launcher puts into a trainer child's environment."""
    return {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size),
            "LOCAL_WORLD_SIZE": str(info.local_world_size),
            "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port)}


def export_env(info: DistInfo) -> None:
    """Make the env:// rendezvous (torch and DeepSpeed) see what was detected (SLURM sets none of it). The process
    group is one user of the world environment (enter_world_env) until shutdown(): then a later run in the same
    process does not mistake our rendezvous for a launcher's."""
    if _world_env["group"]:
        _set_world_env(rendezvous_env(info))
    else:
        _world_env["group"] = True
        enter_world_env(rendezvous_env(info))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; for rendezvous and launchers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(info: DistInfo):
    """This rank's device, made current: cuda:LOCAL_RANK when CUDA is there, else the CPU.

    Called before the process group starts, so that NCCL binds each rank to its own GPU.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device) -> str:
    """The process-group backend: gloo on CPU; on CUDA NCCL for CUDA tensors *and* gloo for CPU ones.

    The loop's own collectives use the engine's device, but not everything handed to torch.distributed
    is on the GPU (object collectives pickle into CPU tensors, libraries reduce CPU counters); with
    plain "nccl" those fail with "No backend type associated with device type cpu".
    """
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(info: DistInfo, device, *, timeout_min: float = 60) -> None:
    """Start the torch process group on `device` (see backend_for); also for one process (DeepSpeed, FSDP need one).

    `device` comes from device_for (the GPU is set before the group starts, and the group is bound to it
    with device_id); `timeout_min` bounds how long a collective waits for the other ranks. Engines that need
    more (DeepSpeed adopts this group) do it in their Engine.start_process_group.
    """
    import torch.distributed as dist

    if info.launcher == "none":  # a one-process group: any free local port (others may run beside us)
        info = DistInfo(master_port=free_port())
    export_env(info)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=timeout_min),
                                **group_binding(device))


def group_binding(device) -> dict:
    """init_process_group's device binding: `device_id` on CUDA (NCCL starts eagerly, bound to this rank's GPU);
    nothing on the CPU (gloo takes no device_id: "must be an accelerator with an index"). The one place that
    decides it, so the CPU tests can take the CUDA path (tests/test_engines_matrix.py)."""
    return {"device_id": device} if device.type == "cuda" else {}


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


HOST_SYNC = "mmscale::host_sync"


def barrier(device=None) -> None:
    """All ranks meet; on CUDA the barrier runs on this rank's GPU (NCCL), else over gloo."""
    import torch.distributed as dist

    if is_initialized():
        if device is not None and device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def all_reduce_sum(values, device) -> list[float]:
    """Sum a few numbers over all ranks (float64 so counts and losses survive exactly); one host sync.

    `values` may mix Python numbers and 0-d tensors (on `device`, e.g. a loss not yet read back):
    they are stacked on `device`, the engine's device, so NCCL gets CUDA tensors and nothing syncs
    with the host before the single read-back at the end.
    """
    import torch
    import torch.distributed as dist

    parts = [v.to(device=device, dtype=torch.float64).reshape(()) if torch.is_tensor(v)
             else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values]
    t = torch.stack(parts)
    if is_initialized():
        dist.all_reduce(t)
    with torch.profiler.record_function(HOST_SYNC):  # the loop's one read-back per step (visible in traces)
        return t.tolist()


def ranks_flagging(flag: bool, device) -> int:
    """How many ranks pass flag=True (a barrier that also tells every rank whether one of them failed)."""
    import torch
    import torch.distributed as dist

    # not all_reduce_sum: that is the loop's one host sync per step (and profiled as such); this one runs
    # around checkpoint saves and loads only
    t = torch.tensor([float(bool(flag))], dtype=torch.float64, device=device)
    if is_initialized():
        dist.all_reduce(t)
    (count,) = t.tolist()
    return int(count)


def shutdown() -> None:
    """Destroy the torch process group (if one is up) and give the environment back as init found it."""
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    if _world_env["group"]:
        _world_env["group"] = False
        leave_world_env()


# The launcher variables this process sets for itself: the process group's rendezvous (export_env, until
# shutdown) and mosaicml-streaming's world, which it reads from the environment while a data loader lives
# (construction and iteration). Every user enters and leaves; each variable remembers what the caller had
# when it was first set, and the last user to leave gives all of it back, so a later launcher or library in
# the same process (lm-eval, submitit) does not inherit our RANK / WORLD_SIZE.
_world_env: dict = {"open": 0, "saved": {}, "group": False}


def enter_world_env(values: dict) -> None:
    """Set the variables `values` ({"RANK": 0, "WORLD_SIZE": 2, ...}) in the environment for one more user;
    pair every call with leave_world_env()."""
    _world_env["open"] += 1
    _set_world_env(values)


def _set_world_env(values: dict) -> None:
    for key, value in values.items():
        _world_env["saved"].setdefault(key, os.environ.get(key))  # what the caller had
        os.environ[key] = str(value)


def leave_world_env() -> None:
    """One user of enter_world_env is done; after the last, the environment is as the first one found it."""
    _world_env["open"] = max(0, _world_env["open"] - 1)
    if _world_env["open"]:
        return
    for key, old in _world_env["saved"].items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    _world_env["saved"] = {}
