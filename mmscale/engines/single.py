"""One process: the reference every other engine must match (bf16 through autocast, fp32 master weights)."""
from __future__ import annotations

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
        """The model as this engine runs it (DDP: its wrapper); `self.raw` stays the model itself."""
        return model

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
