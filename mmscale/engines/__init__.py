"""Engines: one small interface (base.Engine) over single-process, DDP, DeepSpeed ZeRO 0-3 and FSDP2.

`build_engine(cfg, model, info, device)` wraps an fp32 model built on CPU with the same seed on
every rank. The training loop only talks to the Engine interface.
"""
from __future__ import annotations

from mmscale.engines.base import Engine, lr_at


def build_engine(cfg, model, info, device) -> Engine:
    kind = cfg.engine.kind
    if kind == "single":
        from mmscale.engines.single import SingleEngine
        return SingleEngine(cfg, model, info, device)
    if kind == "ddp":
        from mmscale.engines.ddp import DDPEngine
        return DDPEngine(cfg, model, info, device)
    if kind == "deepspeed":
        from mmscale.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, model, info, device)
    if kind == "fsdp":
        from mmscale.engines.fsdp import FSDPEngine
        return FSDPEngine(cfg, model, info, device)
    raise ValueError(f"unknown engine.kind {kind!r}")


__all__ = ["Engine", "build_engine", "lr_at"]
