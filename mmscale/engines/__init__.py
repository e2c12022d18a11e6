"""Engines: one interface (base.Engine) over single-process, DDP, DeepSpeed ZeRO 0-3 and FSDP2.

Everything engine-specific lives in the engine's class: its world-layout rule, its process group,
which checkpoints it resumes, the files it saves and loads and the offline reader for them, its exit
policy. Code outside this package asks the class (`engine_class(cfg.engine.kind)`, or
`engine_for_checkpoint(meta)` for a saved step) and never compares engine names.

`build_engine(cfg, model, info, device)` wraps an fp32 model built on CPU with the same seed on
every rank. The training loop only talks to the Engine interface.
"""
from __future__ import annotations

import importlib

from mmscale.engines.base import Engine, lr_at
from mmscale.errors import UserError

# kind -> (module, class); modules are imported on first use (DeepSpeed's is imported by its engine only)
_REGISTRY = {
    "single": ("mmscale.engines.single", "SingleEngine"),
    "ddp": ("mmscale.engines.ddp", "DDPEngine"),
    "deepspeed": ("mmscale.engines.deepspeed", "DeepSpeedEngine"),
    "fsdp": ("mmscale.engines.fsdp", "FSDPEngine"),
}
KINDS = tuple(_REGISTRY)


def engine_class(kind: str) -> type[Engine]:
    if kind not in _REGISTRY:
        raise UserError(f"unknown engine.kind {kind!r}; use one of {', '.join(KINDS)}", 2)
    module, name = _REGISTRY[kind]
    return getattr(importlib.import_module(module), name)


def engine_for_checkpoint(meta: dict, where) -> type[Engine]:
    """The class of the engine that wrote a checkpoint (from its meta.json)."""
    kind = meta.get("engine")
    if kind not in _REGISTRY:
        raise UserError(f"checkpoint '{where}' was written by engine {kind!r}, which this mmscale does not know "
                        f"({', '.join(KINDS)}); convert it with the mmscale that wrote it")
    return engine_class(kind)


def build_engine(cfg, model, info, device) -> Engine:
    return engine_class(cfg.engine.kind)(cfg, model, info, device)


def check_world_layout(cfg, world_size: int, nodes: int = 1, layout: str | None = None, exit_code: int = 2) -> int:
    """The one check of a world layout, for `train` and `launch` alike; returns the gradient accumulation steps.

    Ranks and nodes >= 1, the engine can run on `world_size` ranks (single: one; FSDP: hsdp_replicas divides),
    train.global_batch_size divides into micro_batch_size x ranks, and data.num_canonical_nodes and the node
    count divide one another (mosaicml-streaming). `layout` describes the world in the messages.
    """
    if nodes < 1 or world_size < 1:
        raise UserError(f"need at least 1 node and 1 task per node, got {layout or f'{nodes} node(s)'}", exit_code)
    engine_class(cfg.engine.kind).check_layout(cfg, world_size, layout or "", exit_code)
    layout = layout or f"{world_size} rank(s)"
    t = cfg.train
    grad_accum = t.grad_accum
    if t.global_batch_size:
        # micro_batch_size auto: probed at start (mmscale.plan); here the global batch need only split over the ranks
        per_step = (1 if t.micro_batch_size == "auto" else t.micro_batch_size) * world_size
        if t.global_batch_size % per_step:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of {per_step}: not "
                            f"divisible by micro_batch_size x ranks ({t.micro_batch_size} x {world_size}) in {layout}; "
                            "change the node or task counts, or set train.global_batch_size to a multiple of "
                            f"{per_step}", exit_code)
        grad_accum = t.global_batch_size // per_step
    ncn = cfg.data.num_canonical_nodes
    if ncn % nodes and nodes % ncn:
        raise UserError(f"data.num_canonical_nodes={ncn} and {nodes} nodes: one must divide the other "
                        "(mosaicml-streaming); change the node count or data.num_canonical_nodes", exit_code)
    return grad_accum


__all__ = ["Engine", "KINDS", "build_engine", "check_world_layout", "engine_class", "engine_for_checkpoint", "lr_at"]
