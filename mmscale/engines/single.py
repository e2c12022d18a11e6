"""One process: the reference every other engine must match (bf16 through autocast, fp32 master weights)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mmscale.checkpoint_format import load_file
from mmscale.engines.base import Engine, build_optimizer, config_hyperparameters, prepare_model
from mmscale.errors import UserError


class SingleEngine(Engine):
    kind = "single"
    model_format = "torch"
    max_ranks = 1

    @classmethod
    def read_state(cls, step_dir: Path, meta: dict, model_cfg):
        """model.pt (the full fp32 state dict), memory-mapped."""
        sd = load_file(step_dir / "model.pt")
        if not isinstance(sd, dict):
            raise UserError(f"'{step_dir / 'model.pt'}' does not hold a state dict; the checkpoint is damaged")
        for k, v in sd.items():
            yield k, v.float() if v.is_floating_point() else v

    def __init__(self, cfg, model, info, device):
        super().__init__(cfg, model, info, device)
        self.raw = prepare_model(model.to(device), cfg.engine)
        self.wrapped = self.wrap(self.raw)
        self.optimizer = build_optimizer(self.raw, cfg.train, device)

    def wrap(self, model):
        return model

    def no_sync(self, last: bool):
        return contextlib.nullcontext()

    def forward_backward(self, batch, last):
        batch = self.to_device(batch)
        self.wrapped.train()
        with self.no_sync(last):
            with self.autocast():
                loss = self.wrapped(batch["input_ids"], labels=batch["labels"])
            (loss / self.grad_accum).backward()
        return loss.detach().float()

    def step(self, lr):
        return self._optimizer_step(self.raw.parameters(), lr)

    def skip_step(self):
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, batch):
        batch = self.to_device(batch)
        self.wrapped.eval()
        with self.autocast():
            loss = self.wrapped(batch["input_ids"], labels=batch["labels"])
        return loss.float()

    def save(self, step_dir: Path):
        if self.info.rank == 0:
            torch.save(self.raw.state_dict(), step_dir / "model.pt")
            torch.save(self.optimizer.state_dict(), step_dir / "optimizer.pt")
        return {"model_files": ["model.pt"], "optimizer_files": ["optimizer.pt"]}

    def load(self, step_dir: Path):
        self.raw.load_state_dict(torch.load(step_dir / "model.pt", map_location=self.device, weights_only=True))
        with config_hyperparameters(self.optimizer):
            self.optimizer.load_state_dict(torch.load(step_dir / "optimizer.pt", map_location=self.device,
                                                      weights_only=True))

    def module(self):
        return self.raw
