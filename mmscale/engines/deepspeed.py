"""DeepSpeed ZeRO 0/1/2/3: the DeepSpeed config is generated from the mmscale config.

An optional raw DeepSpeed JSON (`engine.deepspeed_config`) is merged on top, for experts. The
optimizer is a client torch AdamW (DeepSpeed's fused/CPU Adam JIT-compiles and was not bit-exact
on resume); the learning rate is set by the loop every step, so DeepSpeed gets no scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmscale.engines.base import Engine, build_optimizer, prepare_model, set_lr
from mmscale.errors import UserError

TAG = "ds"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg, world_size: int) -> dict:
    t, e = cfg.train, cfg.engine
    zero: dict = {"stage": e.zero_stage}
    if e.offload_optimizer:
        if e.zero_stage == 0:
            raise UserError("engine.offload_optimizer needs engine.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # mmscale's precision policy (ARCHITECTURE.md) rather than DeepSpeed's bf16 mode, which keeps
        # bf16 weights and accumulates gradients in bf16: the model stays fp32 (ZeRO partitions the fp32
        # weights, gradients and Adam moments: 16 bytes a parameter, as in bf16 mode), the engine runs the
        # forward under bf16 autocast, and gradients are reduced and accumulated in fp32
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep torch AdamW also with offload
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }
    if e.deepspeed_config:
        path = Path(e.deepspeed_config)
        if not path.is_file():
            raise UserError(f"engine.deepspeed_config '{path}' does not exist; pass a DeepSpeed JSON file or ''")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"engine.deepspeed_config '{path}' is not valid JSON ({err.msg}, line {err.lineno})") from None
        ds = _merge(ds, extra)
    return ds


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    model_format = "deepspeed"

    def __init__(self, cfg, model, info, device):
        super().__init__(cfg, model, info, device)
        import deepspeed

        model = prepare_model(model, cfg.engine)
        # with optimizer offload the update runs on CPU partitions: the CPU choice of AdamW
        optimizer = build_optimizer(model, cfg.train, None if cfg.engine.offload_optimizer else device)
        self.ds_config = deepspeed_config(cfg, info.world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.device = self.engine.device

    def forward_backward(self, batch, last):
        batch = self.to_device(batch)
        self.engine.train()
        with self.autocast():
            loss = self.engine(batch["input_ids"], labels=batch["labels"])
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # a micro-step: DeepSpeed counts it, updates only at the boundary
        return loss.detach().float()

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")  # read back only when the loop logs

    def skip_step(self):
        # DeepSpeed's overflow check skips an update whose gradients hold inf/NaN (ZeRO 1-3, and bf16);
        # it must still see step() to keep its micro-step count. Refuse to continue if it did update.
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update with non-finite gradients "
                               "(engine.zero_stage=0 in fp32 has no overflow check); use zero_stage >= 1")

    @torch.no_grad()
    def eval_loss(self, batch):
        batch = self.to_device(batch)
        self.engine.eval()
        with self.autocast():
            return self.engine(batch["input_ids"], labels=batch["labels"]).float()

    def save(self, step_dir: Path):
        self.engine.save_checkpoint(str(step_dir), tag=TAG, save_latest=False)
        # the file layout depends on DeepSpeed's own bf16 mode (bf16_zero_pp_rank_* files, bf16 module
        # states); mmscale >= 0.2 never enables it: `mmscale convert` reads this key
        return {"model_files": [TAG], "optimizer_files": [], "ds_bf16": False}

    def load(self, step_dir: Path):
        from mmscale.checkpoint import read_meta

        meta = read_meta(step_dir)
        if meta.get("ds_bf16", meta.get("precision") == "bf16"):
            raise UserError(f"'{step_dir}' was written in DeepSpeed's bf16 mode by an older mmscale and cannot be "
                            "resumed; convert it (mmscale convert STEP_DIR OUT) and start from the export with "
                            "train.init_from=OUT")
        path, _ = self.engine.load_checkpoint(str(step_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in '{step_dir}/{TAG}'; it is damaged: "
                            "resume from an earlier step folder (run.resume=PATH)")

    def module(self):
        return self.engine.module

    def close(self):
        if hasattr(self.engine, "destroy"):  # frees DeepSpeed's hooks and buffers (newer versions)
            self.engine.destroy()
