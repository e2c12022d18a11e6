"""PyTorch FSDP2: `fully_shard` per block then the root; mmscale's precision policy; DCP checkpoints.

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

from mmscale.engines.base import Engine, build_optimizer, config_hyperparameters, prepare_model
from mmscale.errors import UserError


def build_mesh(world_size: int, replicas: int, device_type: str):
    """1-D (shard) or, for HSDP, 2-D (replicate, shard); FSDPEngine.check_layout has checked that replicas divide."""
    if replicas == 1:
        return init_device_mesh(device_type, (world_size,))
    return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def placement_fn(shard_size: int):
    """Where FSDP2 shards each parameter, for `shard_size` ranks per shard group.

    Every parameter on dim 0 (FSDP2's default; uneven sizes allowed there), except the token-mixing
    weights [heads, k, T, T]: with one head dim 0 has size 1 and the whole T x T matrix would sit on
    rank 0, so they shard on their rows (dim 2) when T divides evenly — torch allows uneven shards on
    dim 0 only (NotImplementedError otherwise) — and fall back to dim 0 when it does not, so any rank
    count runs.
    """
    def place(param):
        if param.dim() == 4 and param.shape[2] == param.shape[3] and param.shape[2] % shard_size == 0:
            return Shard(2)
        return Shard(0)
    return place


def uneven_mixing_note(model, shard_size: int) -> str | None:
    """One line when a token-mixing weight [heads, k, T, T] cannot be split evenly over `shard_size` ranks (T not
    a multiple, fewer heads than ranks), else None.

    FSDP2 then shards it on dim 0 and pads every rank's storage to the first chunk (torch's _fsdp_param.py,
    `_init_sharded_param`: `padded_sharded_size = chunks[0].size()`): with one head each rank holds a whole
    T x T matrix per layer and the all-gather moves shard_size x T x T (benchmarks/bench_fsdp_shards.py measures
    it: 3 ranks, T 512 hold 1.00 of the weights each, 2 and 4 ranks 0.50 and 0.25)."""
    for name, p in model.named_parameters():
        if p.dim() == 4 and p.shape[2] == p.shape[3] and shard_size > 1 and p.shape[2] % shard_size:
            chunk = -(-p.shape[0] // shard_size)
            held = chunk / p.shape[0]
            if held > 1.5 / shard_size:
                return (f"FSDP: n_ctx {p.shape[2]} is not a multiple of the {shard_size} ranks of a shard group, so "
                        f"each rank holds {held:.0%} of every token-mixing weight ({name}: {tuple(p.shape)}) instead "
                        f"of 1/{shard_size}; use a rank count (or engine.hsdp_replicas) whose shard group divides "
                        "n_ctx")
    return None


def precision_policies(precision: str):
    """(blocks' policy, root's policy): mmscale's one mixed-precision policy (ARCHITECTURE.md) under FSDP2.

    fp32 master weights (the sharded parameters); the blocks all-gather bf16 copies of their matrices (what
    autocast would cast them to anyway, at half the traffic; norms stay fp32) and keep their fp32 residual
    inputs (no input cast); the
    root (embedding, head, final norm) stays fp32, so the residual stream starts fp32 as in the single
    engine; gradients are reduced and accumulated in fp32. The engine runs the forward under autocast.
    """
    if precision != "bf16":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    return blocks, root


def _norms(block) -> list:
    return [m for m in block.modules() if isinstance(m, torch.nn.LayerNorm) or type(m).__name__ == "RMSNorm"]


def shard_with_fsdp(model, mesh, precision: str):
    blocks_mp, root_mp = precision_policies(precision)
    place = placement_fn(mesh.size(mesh.ndim - 1))
    note = uneven_mixing_note(model, mesh.size(mesh.ndim - 1))
    if note and mesh.get_rank() == 0:
        import sys

        print(f"mmscale train: warning: {note}", file=sys.stderr, flush=True)
    for block in model.blocks:
        # norms keep fp32 weights (their own small FSDP groups): a norm computes in fp32 on the fp32
        # residual stream, and CPU autocast, unlike CUDA's, does not cast a bf16 norm weight up
        for norm in _norms(block):
            fully_shard(norm, mesh=mesh, mp_policy=root_mp, shard_placement_fn=place)
        fully_shard(block, mesh=mesh, mp_policy=blocks_mp, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, shard_placement_fn=place)
    return model


class FSDPEngine(Engine):
    kind = "fsdp"
    model_format = "dcp"
    always_needs_group = True
    same_precision_to_resume = True

    @classmethod
    def check_layout(cls, cfg, world_size, layout, exit_code=2):
        super().check_layout(cfg, world_size, layout, exit_code)
        if world_size % cfg.engine.hsdp_replicas:
            raise UserError(f"engine.hsdp_replicas={cfg.engine.hsdp_replicas} does not divide "
                            f"{layout or f'{world_size} ranks'}; "
                            "pick a replica count that divides the number of ranks", exit_code)

    def __init__(self, cfg, model, info, device):
        super().__init__(cfg, model, info, device)
        mesh = build_mesh(info.world_size, cfg.engine.hsdp_replicas, device.type)
        model = prepare_model(model.to(device), cfg.engine)
        self.model = shard_with_fsdp(model, mesh, cfg.engine.precision)
        self.optimizer = build_optimizer(self.model, cfg.train, device)

    @classmethod
    def read_state(cls, step_dir: Path, meta: dict, model_cfg):
        """Only the tensors the DCP metadata of model/ lists, one at a time (the peak stays at the output plus
        one tensor), without a process group; DCP's pickled metadata is read under safe_unpickling."""
        import pickle

        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from mmscale import checkpoint_format as ckpt

        path = step_dir / "model"
        reader = dcp.FileSystemReader(str(path))
        try:
            with ckpt.safe_unpickling():  # DCP pickles its metadata: only its own classes are allowed
                md = reader.read_metadata().state_dict_metadata
        except pickle.UnpicklingError as e:
            raise ckpt.unsafe_payload_error(path / ".metadata", e) from None
        except Exception as e:
            raise UserError(f"cannot read the DCP metadata in '{path}' ({type(e).__name__}); the checkpoint is "
                            "damaged or incomplete: convert an earlier step folder") from None
        for name in [k for k, v in md.items() if isinstance(v, TensorStorageMetadata)]:
            t = md[name]
            buf = {name: torch.empty(tuple(t.size), dtype=t.properties.dtype)}
            try:
                with ckpt.safe_unpickling():
                    dcp.load(buf, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                if isinstance(e, pickle.UnpicklingError) or "Unsupported global" in str(e):
                    raise ckpt.unsafe_payload_error(path, e) from None
                raise UserError(f"cannot read '{name}' from '{path}' ({type(e).__name__}); the checkpoint is "
                                "damaged or incomplete: convert an earlier step folder") from None
            v = buf[name]
            yield name, v.float() if v.is_floating_point() else v

    def forward_backward(self, batch, last):
        batch = self.to_device(batch)
        self.model.train()
        # reduce-scatter gradients only on the last micro-batch of a step
        self.model.set_requires_gradient_sync(last)
        with self.autocast():
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
        with self.autocast():
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
        with config_hyperparameters(self.optimizer):
            set_optimizer_state_dict(self.model, self.optimizer, optim_sd)

    def module(self):
        return self.model
