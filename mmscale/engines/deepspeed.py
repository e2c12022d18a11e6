"""DeepSpeed ZeRO 0/1/2/3: the DeepSpeed config is generated from the mmscale config.

An optional raw DeepSpeed JSON (`engine.deepspeed_config`) is merged on top, for experts. The
optimizer is a client torch AdamW (DeepSpeed's fused/CPU Adam JIT-compiles and was not bit-exact
on resume); the learning rate is set by the loop every step, so DeepSpeed gets no scheduler.

`deepspeed` itself is imported inside the methods that use it: it takes seconds to import and is optional for
every other engine (the offline readers, e.g. `mmscale convert`, need only torch).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mmscale import distributed
from mmscale.checkpoint_format import checkpoints_root, load_file, read_meta, unsafe_payload_error
from mmscale.engines.base import (Engine, build_optimizer, config_hyperparameters, param_groups, prepare_model,
                                  set_lr)
from mmscale.errors import UserError
from mmscale.models import build_model

TAG = "ds"
ZERO_STAGES = (0, 1, 2, 3)  # what config.py accepts for engine.zero_stage


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
        **torch_autocast_section(e.precision),
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


def torch_autocast_section(precision: str) -> dict:
    """DeepSpeed's `torch_autocast` section for mmscale's precision policy (empty for fp32).

    DeepSpeed 0.19.8 enters `runtime/torch_autocast.py: autocast_if_enabled` in every `DeepSpeedEngine.forward`:
    when `torch.is_autocast_enabled()` (with no argument: CUDA's state) is true and this section is missing or
    disabled, it re-enters `torch.autocast(enabled=False)`, so the engine's outer bf16 autocast was switched off
    on CUDA and the model computed in fp32, silently. With the section enabled DeepSpeed enters
    `torch.autocast(<its device>, bfloat16)` itself, inside and outside an outer autocast alike.
    `lower_precision_safe_modules` lists the module classes whose parameters get a bf16 *communication* dtype
    (ZeRO reduces their gradients, and ZeRO-3 all-gathers their weights, in bf16); its default is nn.Linear and
    the convolutions. An empty list keeps every gradient reduction (and ZeRO-3 gather) in fp32, as the policy
    says: the flag decides what is communicated in bf16, never what computes in bf16 (autocast does that).
    """
    if precision != "bf16":
        return {}
    return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}


class DeepSpeedEngine(Engine):
    kind = "deepspeed"
    model_format = "deepspeed"
    always_needs_group = True
    same_precision_to_resume = True

    @classmethod
    def variants(cls):
        return [{"engine.zero_stage": stage} for stage in ZERO_STAGES]

    # --- process group and exit
    @classmethod
    def start_process_group(cls, info, device, timeout_min):
        import deepspeed as ds
        import deepspeed.ops

        distributed.init(info, device, timeout_min=timeout_min)
        # the shared-memory comm op JIT-compiles for ~30 s (needs g++) and gives identical results
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # DeepSpeed adopts the torch group started above (its backend string, device and timeout)
        ds.init_distributed(dist_backend=distributed.backend_for(device),
                            timeout=datetime.timedelta(minutes=timeout_min))

    @classmethod
    def stop_process_group(cls):
        if distributed.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
        distributed.shutdown()

    @classmethod
    def finish_process(cls, status):
        # very short DeepSpeed processes sometimes abort at interpreter exit; leave without teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    # --- which checkpoints it resumes, and reading them offline
    @classmethod
    def check_resume(cls, meta, cfg, world_size, where):
        super().check_resume(meta, cfg, world_size, where)
        if meta.get("zero_stage") != cfg.engine.zero_stage:
            raise UserError(f"{where} was written with engine.zero_stage={meta.get('zero_stage')}, this run uses "
                            f"{cfg.engine.zero_stage}; resume with the same ZeRO stage")
        # another world size is fine: load() reshards (see _load_resharded)

    @classmethod
    def describe(cls, meta):
        return {"zero_stage": meta.get("zero_stage")}

    @classmethod
    def read_state(cls, step_dir, meta, model_cfg):
        return read_zero_checkpoint(step_dir, meta, model_cfg)

    def __init__(self, cfg, model, info, device):
        super().__init__(cfg, model, info, device)
        import deepspeed

        model = prepare_model(model, cfg.engine)
        if cfg.engine.zero_stage == 3 and hasattr(model, "loss_through_head"):
            model.loss_through_head = True  # ZeRO-3 gathers lm_head's weight only inside its forward
        # (with optimizer offload the update runs on CPU partitions: fused AdamW there too)
        optimizer = build_optimizer(model, cfg.train, None if cfg.engine.offload_optimizer else device)
        self.ds_config = deepspeed_config(cfg, info.world_size)
        # self.wrapped is the DeepSpeedEngine: it runs the forward, the backward and the update
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                  config=self.ds_config)
        self.device = self.wrapped.device

    def backward(self, loss, last):
        self.wrapped.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.wrapped.step()  # a micro-step: DeepSpeed counts it, updates only at the boundary

    def step(self, lr):
        set_lr(self.optimizer, lr)
        self.wrapped.step()
        norm = self.wrapped.get_global_grad_norm()
        return norm if norm is not None else float("nan")  # read back only when the loop logs

    def skip_step(self):
        # DeepSpeed's overflow check skips an update whose gradients hold inf/NaN (ZeRO 1-3, and bf16);
        # it must still see step() to keep its micro-step count. Refuse to continue if it did update.
        self.wrapped.step()
        if self.wrapped.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update with non-finite gradients "
                               "(engine.zero_stage=0 in fp32 has no overflow check); use zero_stage >= 1")

    def save(self, step_dir: Path):
        self.wrapped.save_checkpoint(str(step_dir), tag=TAG, save_latest=False)
        # the file layout depends on the ZeRO stage and on DeepSpeed's own bf16 mode (bf16_zero_pp_rank_*
        # files, bf16 module states); mmscale >= 0.2 never enables that mode: read_state reads both keys
        return {"model_files": [TAG], "optimizer_files": [], "zero_stage": self.wrapped.zero_optimization_stage(),
                "ds_bf16": False}

    def load(self, step_dir: Path):
        meta = read_meta(step_dir)
        if meta.get("ds_bf16", meta.get("precision") == "bf16"):
            raise UserError(f"'{step_dir}' was written in DeepSpeed's bf16 mode by an older mmscale and cannot be "
                            "resumed; convert it (mmscale convert STEP_DIR OUT) and start from the export with "
                            "train.init_from=OUT")
        if meta.get("world_size") != self.info.world_size and meta.get("zero_stage", 0) >= 1:
            return self._load_resharded(step_dir, meta)
        # (ZeRO-0 keeps the whole optimizer state in the model-states file: any world size loads it)
        with config_hyperparameters(self._base_optimizer()):
            path, _ = self.wrapped.load_checkpoint(str(step_dir), tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in '{step_dir}/{TAG}'; it is damaged: "
                            "resume from an earlier step folder (run.resume=PATH)")

    def _base_optimizer(self):
        """The torch AdamW inside DeepSpeed's ZeRO wrapper (the wrapper itself at stage 0)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _load_resharded(self, step_dir: Path, meta: dict) -> None:
        """Resume a ZeRO 1-3 checkpoint written by another number of ranks (SLURM requeued the job onto other
        nodes): rank 0 turns it into DeepSpeed's universal checkpoint (one file per parameter for the fp32
        weights and each Adam moment) in a work folder of this run (checkpoints/.reshard_step_X); every rank
        loads its new partitions from there; rank 0 removes the folder, also when loading failed. The step
        folder itself is never modified. The other ranks wait for the conversion inside a collective, so it
        must finish within engine.dist_timeout_min; it needs about the checkpoint's size again on disk."""
        work = checkpoints_root(self.cfg.run.dir) / f".reshard_{step_dir.name}"
        failure = None
        if self.info.rank == 0:
            print(f"mmscale train: resharding '{step_dir}' from {meta.get('world_size')} to {self.info.world_size} "
                  "DeepSpeed ranks (universal checkpoint)", file=sys.stderr, flush=True)
            try:
                to_universal(step_dir / TAG, work / TAG)
            except UserError as e:
                failure = e
        if distributed.ranks_flagging(failure is not None, self.device):
            if self.info.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            if failure is not None:
                raise failure
            raise UserError(f"resharding '{step_dir}' failed on rank 0 (see its message)")
        path, failure = None, None
        self.wrapped._config.load_universal_checkpoint = True  # read per load_checkpoint call
        try:
            with config_hyperparameters(self._base_optimizer()):
                path, _ = self.wrapped.load_checkpoint(str(work), tag=TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        except Exception as e:  # agreed on below, so no rank waits for one that left
            failure = e
        finally:
            self.wrapped._config.load_universal_checkpoint = False
        n_failed = distributed.ranks_flagging(failure is not None or path is None, self.device)
        if self.info.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
        if failure is not None:
            raise failure
        if n_failed:
            raise UserError(f"DeepSpeed could not load the resharded checkpoint of '{step_dir}' on {n_failed} rank(s); "
                            f"resume it on {meta.get('world_size')} ranks, or convert it (mmscale convert) and start "
                            "from the export")

    def module(self):
        return self.wrapped.module

    def close(self):
        if hasattr(self.wrapped, "destroy"):  # frees DeepSpeed's hooks and buffers (newer versions)
            self.wrapped.destroy()


_CONVERTER = """\
import runpy, sys
from mmscale.checkpoint_format import safe_unpickling
sys.argv = ["ds_to_universal"] + sys.argv[1:]
with safe_unpickling():  # DeepSpeed's converter reads the checkpoint with plain torch.load: the allow-list applies
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
"""


def to_universal(ds_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint in `ds_dir`, written to `out_dir` (replaced), by
    its own converter in a child process (it starts a worker process and prints; neither belongs in a rank).
    The converter unpickles the checkpoint's files: it runs under checkpoint_format.safe_unpickling, like every other
    read of a checkpoint, so a file naming a class outside the allow-list is refused, never run."""
    shutil.rmtree(out_dir.parent, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _CONVERTER, "--input_folder", str(ds_dir), "--output_folder", str(out_dir),
           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")  # it only moves tensors between files
    repo = str(Path(__file__).resolve().parents[2])  # mmscale importable in the child however it was started
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "Unsupported global" in text or "UnpicklingError" in text:
            raise unsafe_payload_error(ds_dir, RuntimeError(text.strip().splitlines()[-1]))
        lines = [ln for ln in text.strip().splitlines() if ln.strip()] or ["?"]
        raise UserError(f"DeepSpeed's universal-checkpoint converter failed on '{ds_dir}' ({lines[-1][:200]}); "
                        "resume on the number of ranks that wrote it")


# ---------------------------------------------------------------------------------------------
# the offline reader (`mmscale convert`): next to save(), which writes these files

def _slice_virtual(parts: list, start: int, n: int, out=None):
    """Elements [start, start + n) of the concatenation of 1-D `parts`, copied into `out` (fp32, new
    when None) without materialising the concatenation."""
    out = torch.empty(n, dtype=torch.float32) if out is None else out
    offset, filled = 0, 0
    for part in parts:
        size = part.numel()
        lo, hi = max(start, offset), min(start + n, offset + size)
        if lo < hi:
            out[filled:filled + hi - lo].copy_(part[lo - offset:hi - offset])
            filled += hi - lo
        offset += size
        if offset >= start + n:
            break
    if filled != n:
        raise ValueError(f"wanted {n} elements at {start}, the partitions hold {filled}")
    return out


def _ds_files(ds_dir: Path, pattern: str) -> list[Path]:
    files = sorted(ds_dir.glob(pattern), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
    return files


def read_zero_checkpoint(step_dir: Path, meta: dict, model_cfg):
    """The fp32 weights of a checkpoint this engine wrote (ZeRO 0-3, any number of ranks), one tensor at a time.

    ZeRO 1-3 keep them flattened and partitioned in the *_optim_states.pt files next to Adam's moments; the
    files are memory-mapped and only the slices holding weights are copied, so optimizer states are never read
    into memory (DeepSpeed's zero_to_fp32 concatenates whole partitions and needs several times the model).
    fp32 ZeRO 0-2 runs read the module's own fp32 weights.
    """
    ds_dir = step_dir / TAG
    stage, world = int(meta.get("zero_stage", 0)), int(meta.get("world_size", 1))
    model_files = _ds_files(ds_dir, "*model_states.pt")
    if not model_files:
        raise UserError(f"'{ds_dir}' holds no DeepSpeed *_model_states.pt; the checkpoint is incomplete")
    states0 = load_file(model_files[0])
    param_shapes = [dict(g) for g in (states0.get("param_shapes") or [])]
    frozen_shapes = dict(states0.get("frozen_param_shapes") or {})
    shared = dict(states0.get("shared_params") or {})

    # DeepSpeed's bf16 mode (mmscale < 0.2 with engine.precision=bf16) keeps fp32 masters apart from the module
    ds_bf16 = meta.get("ds_bf16", meta.get("precision") == "bf16")
    if stage <= 2 and not ds_bf16:
        yield from ((k, v.float()) for k, v in states0["module"].items())
        return
    if stage == 0:
        yield from _ds_stage0_bf16(states0, model_cfg, ds_dir)
        return

    optim_files = _ds_files(ds_dir, "*optim_states.pt")
    if len(optim_files) != world:
        raise UserError(f"'{ds_dir}' holds {len(optim_files)} optimizer partition files but was written by "
                        f"{world} ranks; the checkpoint is incomplete: convert an earlier step folder")
    # memory-mapped: the Adam moments inside these files are never touched
    optim = [load_file(f)["optimizer_state_dict"] for f in optim_files]
    if stage in (1, 2):
        groups = [o["single_partition_of_fp32_groups"] for o in optim]
        paddings = optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(param_shapes):
            parts = [groups[r][g] for r in range(world)]
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)
                yield name, _slice_virtual(parts, offset, n).view(tuple(shape))
                offset += n + (paddings[g][i] if paddings else 0)
        for name in frozen_shapes:  # frozen parameters are stored whole in the module states
            yield name, states0["frozen_param_fragments"][name].float().clone()
    else:
        flats = [o["fp32_flat_groups"] for o in optim]
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                n = math.prod(shape)
                per_rank = math.ceil(n / world)
                full = torch.empty(n, dtype=torch.float32)
                for r in range(world):  # rank r holds elements [r * per_rank, (r + 1) * per_rank), padded at the end
                    take = min(per_rank, n - r * per_rank)
                    if take > 0:
                        _slice_virtual(flats[r], offset, take, full[r * per_rank:r * per_rank + take])
                yield name, full.view(tuple(shape))
                offset += per_rank
        if frozen_shapes:
            frags = [load_file(f)["frozen_param_fragments"] for f in model_files]
            for name, shape in frozen_shapes.items():
                n = math.prod(shape)
                yield name, torch.cat([f[name].reshape(-1).float() for f in frags])[:n].view(tuple(shape)).clone()
    for alias, source in shared.items():
        yield alias, ("shared", source)


def _ds_stage0_bf16(states0: dict, model_cfg, ds_dir: Path):
    """ZeRO-0 in bf16 keeps per-parameter fp32 copies in the order of the optimizer's param groups."""
    opt = states0.get("optimizer") or {}
    fp32_groups = opt.get("fp32_groups")
    if fp32_groups is None:
        # no master copies (fp32 run): the module's own weights are exact
        yield from ((k, v.float()) for k, v in states0["module"].items())
        return
    with torch.device("meta"):
        model = build_model(model_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    # the engine builds its optimizer with param_groups(model, ...): the same order here
    order = [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]
    flat = [t for g in fp32_groups for t in g]
    if len(flat) != len(order):
        raise UserError(f"'{ds_dir}': {len(flat)} fp32 master weights for {len(order)} parameters; "
                        "the checkpoint was written for another model")
    for name, t in zip(order, flat):
        yield name, t.float().clone()
