"""Rank, local rank, world size and the rendezvous, from torchrun, the deepspeed launcher or SLURM.

torchrun and the deepspeed launcher both export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. Under `srun` (one task per rank) only SLURM_* is set: the rendezvous is the first
node of SLURM_JOB_NODELIST (127.0.0.1 when that name does not resolve, e.g. emulated nodes) and a
port derived from the job id, so every task of a job agrees without talking first.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


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
    def is_main(self) -> bool:
        return self.rank == 0


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


_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_exported: dict[str, str | None] = {}  # what export_env replaced, restored by shutdown()


def export_env(info: DistInfo) -> None:
    """Make the env:// rendezvous (torch and DeepSpeed) see what was detected (SLURM sets none of it)."""
    values = {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size),
              "LOCAL_WORLD_SIZE": str(info.local_world_size),
              "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port)}
    for key in _ENV_KEYS:
        _exported.setdefault(key, os.environ.get(key))
    os.environ.update(values)


def _restore_env() -> None:
    # a later run in the same process must not mistake our one-process rendezvous for a launcher's
    for key, old in _exported.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    _exported.clear()


def device_for(info: DistInfo):
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(info: DistInfo, *, deepspeed: bool = False) -> None:
    """Start the process group (gloo on CPU, nccl on CUDA); also for one process (DeepSpeed, FSDP need one)."""
    import torch
    import torch.distributed as dist

    if info.launcher == "none":  # a one-process group: any free local port (others may run beside us)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            info = DistInfo(master_port=s.getsockname()[1])
    export_env(info)
    if deepspeed:
        import deepspeed as ds
        import deepspeed.ops

        # the shared-memory comm op JIT-compiles for ~30 s (needs g++) and gives identical results
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        return
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    import torch.distributed as dist

    if is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum a few floats over all ranks (float64 so counts and losses survive exactly)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shutdown(deepspeed: bool = False) -> None:
    if not is_initialized():
        _restore_env()
        return
    if deepspeed:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    else:
        import torch.distributed as dist

        dist.destroy_process_group()
    _restore_env()
