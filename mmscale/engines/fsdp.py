"""PyTorch FSDP2: `fully_shard` per block then the root; bf16 compute with fp32 reduction; DCP checkpoints.

`engine.hsdp_replicas > 1` builds a 2-D (replicate, shard) mesh: weights sharded inside a group of
world / replicas ranks (a node) and replicated across groups (HSDP).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mmscale.engines.base import Engine, build_optimizer, prepare_model
from mmscale.errors import UserError


def build_mesh(world_size: int, replicas: int, device_type: str):
    if replicas == 1:
        return init_device_mesh(device_type, (world_size,))
    if world_size % replicas:
        raise UserError(f"engine.hsdp_replicas ({replicas}) must divide the number of ranks ({world_size})")
    return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def shard_on_largest_dim(param):
    """FSDP2 shards dim 0 by default; a mixing weight shaped [1, 1, T, T] would then sit whole on rank 0."""
    return Shard(max(range(param.dim()), key=lambda d: param.shape[d])) if param.dim() else None


def shard_with_fsdp(model, mesh, precision: str):
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, shard_placement_fn=shard_on_largest_dim)
    fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=shard_on_largest_dim)
    return model


class FSDPEngine(Engine):
    kind = "fsdp"
    model_format = "dcp"

    def __init__(self, cfg, model, info, device):
        super().__init__(cfg, model, info, device)
        mesh = build_mesh(info.world_size, cfg.engine.hsdp_replicas, device.type)
        model = prepare_model(model.to(device), cfg.engine)
        self.model = shard_with_fsdp(model, mesh, cfg.engine.precision)
        self.optimizer = build_optimizer(self.model, cfg.train)

    def forward_backward(self, batch, last):
        batch = self.to_device(batch)
        self.model.train()
        # reduce-scatter gradients only on the last micro-batch of a step
        self.model.set_requires_gradient_sync(last)
        loss = self.model(batch["input_ids"], labels=batch["labels"])
        (loss / self.grad_accum).backward()
        return loss.detach().float()

    def step(self, lr):
        return self._optimizer_step(self.model.parameters(), lr)

    def skip_step(self):
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, batch):
        batch = self.to_device(batch)
        self.model.eval()
        return self.model(batch["input_ids"], labels=batch["labels"]).float()

    def save(self, step_dir: Path):
        dcp.save(get_model_state_dict(self.model), checkpoint_id=str(step_dir / "model"))
        dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=str(step_dir / "optimizer"))
        return {"model_files": ["model"], "optimizer_files": ["optimizer"]}

    def load(self, step_dir: Path):
        model_sd = get_model_state_dict(self.model)
        dcp.load(model_sd, checkpoint_id=str(step_dir / "model"))
        set_model_state_dict(self.model, model_sd)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(optim_sd, checkpoint_id=str(step_dir / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd)

    def module(self):
        return self.model
