"""DistributedDataParallel: replicated weights and optimizer, gradients all-reduced (gloo or nccl)."""
from __future__ import annotations

import contextlib

from torch.nn.parallel import DistributedDataParallel

from mmscale.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    kind = "ddp"
    model_format = "torch"  # the single engine's files: each resumes the other's checkpoints
    max_ranks = None
    # one rank too (a laptop, a 1-GPU node): a one-process group, so the run is the N-rank code path
    # (DistributedDataParallel needs a group; without one it fails at wrap)
    always_needs_group = True

    def wrap(self, model):
        ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's weights at construction; the same seed already makes them equal
        return DistributedDataParallel(model, device_ids=ids)

    def sync_gradients(self, last):
        # accumulate locally; all-reduce only on the last micro-batch of the step
        return contextlib.nullcontext() if last else self.wrapped.no_sync()
