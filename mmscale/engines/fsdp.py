"""PyTorch FSDP2: `fully_shard` per block then the root; mmscale's precision policy; DCP checkpoints.

`engine.hsdp_replicas > 1` builds a 2-D (replicate, shard) mesh: weights sharded inside a group of
world / replicas ranks (a node) and replicated across groups (HSDP). Every parameter is sharded on dim 0; the
token-mixing weights [heads, k, T, T] as their [heads * k * T, T] rows (flatten_mixing_weights), so each rank
holds ~1/ranks of them for any rank count; checkpoints keep them [heads, k, T, T] (_mixing_as_4d).
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import ShardedTensorBase, ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mmscale import checkpoint_format as ckpt
from mmscale.engines.base import Engine, build_optimizer, config_hyperparameters, prepare_model
from mmscale.errors import UserError
from mmscale.models import TokenMixer


def build_mesh(world_size: int, replicas: int, device_type: str):
    """1-D (shard) or, for HSDP, 2-D (replicate, shard); FSDPEngine.check_layout has checked that replicas divide."""
    if replicas == 1:
        return init_device_mesh(device_type, (world_size,))
    return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def flatten_mixing_weights(model) -> dict[str, tuple]:
    """Each token-mixing weight [heads, k, T, T] becomes its [heads * k * T, T] row view (TokenMixer.flatten_weight_)
    before sharding; returns {parameter name: its 4-D shape}.

    FSDP2 shards every parameter on dim 0 (the only dim where torch allows uneven shards) and pads every rank's
    storage to the first chunk (torch's _fsdp_param.py, `_init_sharded_param`: `padded_sharded_size =
    chunks[0].size()`). On [heads, k, T, T] with one head that first chunk is the whole T x T matrix: each rank
    held all of it and the all-gather moved ranks x T x T whenever the rank count did not divide T. On the rows
    of the flat view each rank holds ceil(heads * k * T / ranks) rows (at most one padded row) for any rank
    count (benchmarks/bench_fsdp_shards.py). Checkpoints keep the 4-D layout (`_mixing_as_4d`).
    """
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, TokenMixer):
            shapes[_clean_fqn(f"{name}.weight")] = (m.heads, m.kernel_size, m.n_ctx, m.n_ctx)
            m.flatten_weight_()
    return shapes


def _clean_fqn(name: str) -> str:
    """A parameter name as torch's state-dict helpers write it (no activation-checkpoint / compile wrappers)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def _row_blocks(start: int, stop: int, T: int):
    """Rows [start, stop) of a [blocks * T, T] view as (block, first row, end row) pieces inside one T x T block."""
    r = start
    while r < stop:
        block, i = divmod(r, T)
        n = min(stop - r, T - i)
        yield block, i, i + n
        r += n


def _mixing_as_4d(t, shape: tuple):
    """A [heads * k * T, T] DTensor sharded on its rows, seen as the [heads, k, T, T] tensor that checkpoints hold.

    A ShardedTensor (what torch.distributed.checkpoint reads and writes piece by piece) whose local shards are
    views of this rank's rows, one per T x T block they touch: saving writes 4-D chunks, and loading (any saved
    placement, any rank count: DCP reads the overlaps) writes into this rank's rows in place.
    """
    H, k, T, _ = shape
    rows = H * k * T
    if not isinstance(t, DTensor) or t.dim() != 2 or tuple(t.shape) != (rows, T):
        return t
    mesh = t.device_mesh
    n, me = mesh.size(mesh.ndim - 1), mesh.get_local_rank(mesh.ndim - 1)
    local = t.to_local()
    sizes, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    pieces, mine = [], []
    for r in range(n):
        size, offset = Shard(0).local_shard_size_and_offset(rows, n, r)
        if r == me and (size, offset) != (sizes[0], offsets[0]):
            raise RuntimeError(f"FSDP2 placed rows {offsets[0]}+{sizes[0]} of a mixing weight on shard rank {me}, "
                               f"expected {offset}+{size}")
        for block, i0, i1 in _row_blocks(offset, offset + size, T):
            md = ShardMetadata([block // k, block % k, i0, 0], [1, 1, i1 - i0, T], f"rank:{r}/{local.device}")
            pieces.append(md)
            if r == me:
                lo = block * T + i0 - offset
                mine.append(LocalShard(local[lo:lo + i1 - i0].view(1, 1, i1 - i0, T), md))
    meta = ShardedTensorMetadata(pieces, torch.Size(shape), TensorProperties(dtype=local.dtype))
    # the base class's constructor: no process group or rank check (placements name shard-group ranks; HSDP's
    # replicas write the same chunks, which DCP keeps once)
    out = ShardedTensorBase._init_from_local_shards_and_global_metadata(mine, meta)
    out._process_group = mesh.get_group(mesh.ndim - 1)  # what ShardedTensor's ops (size()) pass along
    return out


def _model_sd_4d(sd: dict, shapes: dict) -> dict:
    return {k: _mixing_as_4d(v, shapes[k]) if k in shapes else v for k, v in sd.items()}


def _optim_sd_4d(sd: dict, shapes: dict) -> dict:
    """get_optimizer_state_dict's {"state": {fqn: {"exp_avg": ..., ...}}, "param_groups": ...} with the mixing
    weights' per-parameter tensors (same shape as the weight) seen in 4-D; "step" and the groups untouched."""
    state = {fqn: ({name: _mixing_as_4d(v, shapes[fqn]) for name, v in st.items()} if fqn in shapes else st)
             for fqn, st in sd.get("state", {}).items()}
    return {**sd, "state": state}


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
    """FSDP2 over `mesh`: each block (its norms in their own groups), then the root; the mixing weights are
    flattened first (flatten_mixing_weights) and their 4-D shapes kept in `model.mmscale_mixing_shapes`."""
    blocks_mp, root_mp = precision_policies(precision)
    model.mmscale_mixing_shapes = flatten_mixing_weights(model)
    for block in model.blocks:
        # norms keep fp32 weights (their own small FSDP groups): a norm computes in fp32 on the fp32
        # residual stream, and CPU autocast, unlike CUDA's, does not cast a bf16 norm weight up
        for norm in _norms(block):
            fully_shard(norm, mesh=mesh, mp_policy=root_mp)
        fully_shard(block, mesh=mesh, mp_policy=blocks_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return model


@contextlib.contextmanager
def _quiet_sharded_tensor():
    # DCP warns "we are deprecating ShardedTensor" each time it meets one; _mixing_as_4d's are deliberate
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        yield


def save_sharded(model, optimizer, step_dir: Path) -> None:
    """DCP checkpoints of the model (step_dir/model) and optimizer (step_dir/optimizer); the mixing weights and their
    optimizer state in the [heads, k, T, T] layout of every engine (and of checkpoints written before flattening)."""
    shapes = getattr(model, "mmscale_mixing_shapes", {})
    with _quiet_sharded_tensor():
        dcp.save(_model_sd_4d(get_model_state_dict(model), shapes), checkpoint_id=str(step_dir / "model"))
        dcp.save(_optim_sd_4d(get_optimizer_state_dict(model, optimizer), shapes),
                 checkpoint_id=str(step_dir / "optimizer"))


def load_sharded(model, optimizer, step_dir: Path) -> None:
    """save_sharded's inverse, from a checkpoint of any rank count: DCP reads the overlap of each saved chunk with
    this rank's rows (the 4-D views write into the state dicts' local shards in place)."""
    shapes = getattr(model, "mmscale_mixing_shapes", {})
    with _quiet_sharded_tensor():
        model_sd = get_model_state_dict(model)
        dcp.load(_model_sd_4d(model_sd, shapes), checkpoint_id=str(step_dir / "model"))
        set_model_state_dict(model, model_sd)
        optim_sd = get_optimizer_state_dict(model, optimizer)
        dcp.load(_optim_sd_4d(optim_sd, shapes), checkpoint_id=str(step_dir / "optimizer"))
    with config_hyperparameters(optimizer):
        set_optimizer_state_dict(model, optimizer, optim_sd)


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
        self.wrapped = shard_with_fsdp(model, mesh, cfg.engine.precision)  # sharded in place: also the module
        self.optimizer = build_optimizer(self.wrapped, cfg.train, device)

    @classmethod
    def read_state(cls, step_dir: Path, meta: dict, model_cfg):
        """Only the tensors the DCP metadata of model/ lists, one at a time (the peak stays at the output plus
        one tensor), without a process group; DCP's pickled metadata is read under safe_unpickling."""
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

    @contextlib.contextmanager
    def sync_gradients(self, last):
        # reduce-scatter gradients only on the last micro-batch of a step
        self.wrapped.set_requires_gradient_sync(last)
        yield

    def save(self, step_dir: Path):
        save_sharded(self.wrapped, self.optimizer, step_dir)
        return {"model_files": ["model"], "optimizer_files": ["optimizer"]}

    def load(self, step_dir: Path):
        load_sharded(self.wrapped, self.optimizer, step_dir)
