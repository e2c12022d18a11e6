"""The engine interface and what every engine shares: LR schedule, AdamW, activation checkpointing, compile.

A training step is `forward_backward(batch, last)` for each micro-batch, then either `step(lr)`
(clip + optimizer update, returns the gradient norm) or `skip_step()` when the loss was not finite.
The step code is written once, in Engine, around `self.wrapped` (the model as the engine runs it); an engine
overrides only its hooks: `sync_gradients(last)` (when gradients cross ranks), `backward(loss, last)`, `step`,
`skip_step`.
"""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mmscale import distributed
from mmscale.errors import UserError


def lr_at(step: int, train_cfg) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio * lr.

    A pure function of the step, so checkpoints need no scheduler state and every engine agrees.
    """
    t = train_cfg
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + 0.5 * (t.lr - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (ndim >= 2); no decay on norms and biases. Shared (tied) parameters once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train_cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    """torch's own AdamW with its fused kernel, on CUDA and on the CPU alike: one pass over each parameter
    instead of ~10 (on CUDA one launch for all of them). Deterministic, so resumes stay bit-exact.

    On the CPU it is also what keeps the masked mixer's step fast: the masked half of each T x T mixing
    matrix has exactly zero gradient, so half of its exp_avg_sq is exactly 0, and torch's element-wise
    sqrt (the per-parameter loop's) runs about 14x slower on zeros than on positive numbers (AVX-512,
    measured: benchmarks/RESULTS.md); the fused kernel does not slow down on them.
    """
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                             betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8, fused=True)


@contextlib.contextmanager
def config_hyperparameters(optimizer):
    """Around loading an optimizer state: this run's config decides the hyperparameters afterwards (torch's
    load_state_dict puts back the saved groups' values and kernel flags; DeepSpeed's ZeRO-3 universal load gives
    every group the first group's), and each parameter gets a float32 `step` tensor of its own on its device
    (what the fused kernel needs; DeepSpeed's universal load hands all groups one shared CPU tensor, which AdamW
    would advance once per group). The learning rate is set by the loop every step anyway."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    yield
    for group, hyper in zip(optimizer.param_groups, groups):
        group.update(hyper)
    for param, state in optimizer.state.items():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            device = param.device if torch.is_tensor(param) else step.device
            state["step"] = step.detach().to(device=device, dtype=torch.float32, copy=True)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward. Patches `forward` on the instance, so
    parameter names (and checkpoints) are unchanged; applied before compile and sharding."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """In-place torch.compile per block (names unchanged, unlike torch.compile(model))."""
    for block in model.blocks:
        block.compile()


def prepare_model(model: nn.Module, engine_cfg) -> nn.Module:
    """torchtitan's order: activation checkpointing, then compile; sharding comes after, per engine."""
    if engine_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if engine_cfg.compile:
        apply_compile(model)
    return model


class Engine:
    """What the training loop sees: one class per engine, owning everything engine-specific.

    Class-level (no instance needed; `engines.engine_class(kind)` gives the class):
      check_layout        whether this engine can run on a world of ranks (one-line UserError)
      needs_process_group / start_process_group / stop_process_group
      check_resume        whether it resumes a checkpoint's meta (family, precision, engine-specific keys)
      read_state          the offline reader: the full fp32 model state from a step folder, no process group
      finish_process      the exit policy of a process that ran this engine
    Instance: forward_backward / step / skip_step / eval_loss (training), save / load (its checkpoint files,
    next to read_state), module(), autocast(), close().
    `self.wrapped` is the model as the engine runs it (the model itself, a DistributedDataParallel wrapper, the
    FSDP2-sharded model, a DeepSpeedEngine): forward_backward and eval_loss call it, and `self.optimizer` updates
    it. Engines override the hooks where they differ: sync_gradients (DDP's no_sync, FSDP's gradient sync
    switch), backward (DeepSpeed's engine.backward and micro-step), step and skip_step (DeepSpeed's own).
    `model_format` names the checkpoint layout (run/checkpoint.py); engines sharing it resume each other.
    """

    kind = "base"
    model_format = "torch"
    max_ranks: int | None = None        # single: 1
    always_needs_group = False          # DeepSpeed and FSDP need a process group even on one rank
    same_precision_to_resume = False    # sharded engines store precision-dependent layouts

    # --- world layout and process group
    @classmethod
    def check_layout(cls, cfg, world_size: int, layout: str, exit_code: int = 2) -> None:
        """Refuse (UserError) a world this engine cannot run on; `layout` (may be "") describes it for the message."""
        if cls.max_ranks is not None and world_size > cls.max_ranks:
            where = f" ({layout})" if layout else ""
            raise UserError(f"engine.kind={cls.kind} cannot run on {world_size} ranks{where}; "
                            "use engine.kind=ddp, fsdp or deepspeed, or one rank", exit_code)

    @classmethod
    def variants(cls) -> list[dict]:
        """The engine's own configurations worth testing apart, as dotted overrides (DeepSpeed: one per ZeRO
        stage); the generated test matrix (tests/test_engines_matrix.py) crosses them with the config's choices."""
        return [{}]

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        return world_size > 1 or cls.always_needs_group

    @classmethod
    def start_process_group(cls, info, device, timeout_min: float) -> None:
        distributed.init(info, device, timeout_min=timeout_min)

    @classmethod
    def stop_process_group(cls) -> None:
        distributed.shutdown()

    @classmethod
    def finish_process(cls, status: int) -> int:
        """What the command does with the process after a run: return the status (the interpreter exits as usual)."""
        return status

    # --- checkpoints without an instance
    @classmethod
    def check_resume(cls, meta: dict, cfg, world_size: int, where: str) -> None:
        """Refuse (one-line UserError naming the fix) a checkpoint this engine cannot resume here."""
        if meta.get("engine") != cls.kind and meta.get("model_format") != cls.model_format:
            raise UserError(f"{where} was written by engine.kind={meta.get('engine')}, this run uses "
                            f"engine.kind={cls.kind}; resume with the same engine, or convert it "
                            "with `mmscale convert` and start from the export (train.init_from)")
        if cls.same_precision_to_resume and meta.get("precision") != cfg.engine.precision:
            raise UserError(f"{where} was written with engine.precision={meta.get('precision')}, this run uses "
                            f"{cfg.engine.precision}; resume with the same precision")

    @classmethod
    def read_state(cls, step_dir: Path, meta: dict, model_cfg):
        """Yield (name, fp32 tensor) for every model tensor of a step folder this engine wrote, one at a time,
        without a process group or GPU (`mmscale convert`). ("shared", source) marks an alias."""
        raise NotImplementedError

    @classmethod
    def describe(cls, meta: dict) -> dict:
        """The engine-specific facts of a checkpoint's meta worth carrying into an export's provenance."""
        return {}

    def __init__(self, cfg, model: nn.Module, info, device: torch.device):
        self.cfg = cfg
        self.info = info
        self.device = device
        self.grad_accum = cfg.train.grad_accum
        self.wrapped: nn.Module | None = None  # set by the engine: the model as it runs it
        self.optimizer = None                   # set by the engine

    # --- training: the one step code; the hooks below are what engines override
    def forward_backward(self, batch: dict, last: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its mean loss (detached, fp32, unscaled)."""
        batch = self.to_device(batch)
        self.wrapped.train()
        with self.sync_gradients(last):
            with self.autocast():
                loss = self.wrapped(batch["input_ids"], labels=batch["labels"])
            self.backward(loss, last)
        return loss.detach().float()

    def sync_gradients(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients cross ranks only when `last` (the
        last micro-batch of a step); one process has nothing to synchronize."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate this micro-batch's gradients, scaled so the step's gradient is the mean over micro-batches."""
        (loss / self.grad_accum).backward()

    def step(self, lr: float):
        """Clip, update with learning rate `lr`, clear gradients; returns the global gradient norm (a float or
        a 0-d tensor not yet read back: the loop reads it only when it logs)."""
        set_lr(self.optimizer, lr)
        norm = grad_norm_or_clip(self.module().parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients without updating (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The mean loss of one batch in eval mode (fp32), no gradients."""
        batch = self.to_device(batch)
        self.wrapped.eval()
        with self.autocast():
            return self.wrapped(batch["input_ids"], labels=batch["labels"]).float()

    # --- checkpoints: write/read engine files into/from a step folder; every rank calls these
    def save(self, step_dir: Path) -> dict:
        """Returns {"model_files": [...], "optimizer_files": [...]} relative to step_dir, plus the engine's own
        meta keys (only the engine that reads them back writes them)."""
        raise NotImplementedError

    def load(self, step_dir: Path) -> None:
        raise NotImplementedError

    def module(self) -> nn.Module:
        """The underlying model (for generation on rank 0; may be sharded under ZeRO-3 / FSDP): `self.wrapped` where
        the engine runs the model itself (FSDP2 shards it in place)."""
        return self.wrapped

    def autocast(self):
        """mmscale's one precision policy (ARCHITECTURE.md): fp32 master weights, bf16 compute under
        autocast (norms and the loss in fp32), fp32 residual stream, fp32 gradient reduction and
        accumulation. fp32 precision: no autocast."""
        if self.cfg.engine.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        pass


def grad_norm_or_clip(params, max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0 = no clipping) and return the total norm before clipping, as a 0-d tensor on the
    parameters' device: reading it is a host sync, which the loop does only on the steps it logs."""
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach()
