"""The one training loop, for every engine and launcher.

    python -m mmscale.train --config configs/tiny.yaml train.max_steps=200
    torchrun --standalone --nproc_per_node 2 mmscale/train.py --config X engine.kind=fsdp
    deepspeed --num_gpus 2 mmscale/train.py --config X engine.kind=deepspeed engine.zero_stage=2
    srun python -m mmscale.train --config X ...            (ranks from SLURM_*)
    mmscale train --config X ...                          (single process)

mmscale/train.py is the entry point those commands name; it calls `main` here.

Exit statuses (mmscale/ARCHITECTURE.md): 0 done; 1 error; 2 bad config; 75 stopped by SIGTERM, SIGUSR2
or SIGINT after saving a checkpoint (requeue: the run resumes); 3 too many non-finite losses in a row.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

from mmscale.run import checkpoint as ckpt
from mmscale import distributed as dist_
from mmscale import engines  # used as engines.X: tests wrap engines.lr_at and engines.build_engine
from mmscale import precision
from mmscale.config import Config, load_config
from mmscale.data.loader import build_dataloader, check_dataset, tokenizer_sha
from mmscale.errors import UserError, exit_status
from mmscale.export.format import load_export_state
from mmscale.fsutil import atomic_write, file_sha256, pid_alive
from mmscale.models import build_model
from mmscale.plan import available_memory, resolve_auto_micro_batch
from mmscale.run import rundir
from mmscale.run.metrics import MetricsLogger, peak_mem_mib, trim_jsonl
from mmscale.run.mfu import Mfu
from mmscale.run.profiler import StepProfiler
from mmscale.run.samples import Sampler

EXIT_OK, EXIT_SIGNAL, EXIT_NONFINITE = 0, 75, 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM / SIGUSR2 / SIGINT; the loop finishes its step, saves and exits 75."""

    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum


def resolve_grad_accum(cfg: Config, world_size: int, nodes: int = 1) -> int:
    """Gradient accumulation steps for this world; refuses a layout the engine or the batch cannot use
    (the same check as `mmscale launch`: engines.check_world_layout)."""
    return engines.check_world_layout(cfg, world_size, nodes, exit_code=1)


def check_run_dir(run_dir: Path) -> None:
    probe = run_dir / f".write_test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".write_test.*"):  # left by a run killed in this very check
            pid = stale.name.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)
        probe.write_text("ok")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise UserError(f"no space left on device in run.dir '{run_dir}'; free space or choose another run.dir") from None
        raise UserError(f"run.dir '{run_dir}' is not writable ({e.strerror}); choose another run.dir") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_run_dir_possible(run_dir: Path) -> None:
    """Without creating anything: run.dir exists as a folder, or its nearest existing ancestor is a writable one."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        what = "is not a folder" if not p.is_dir() else "is not writable"
        raise UserError(f"run.dir '{run_dir}' is not writable ('{p}' {what}); choose another run.dir")


def precheck_data(cfg: Config) -> None:
    """Before the run dir and the model exist: the datasets fit the model (n_ctx, vocab: exit 2) and each other,
    and train.init_from's tokenizer is the data's (one line naming both sides)."""
    if not cfg.data.train:
        return  # default_data_factory says what to do
    train_m = check_dataset(cfg.data.train, cfg.model, cache_dir=cfg.data.cache_dir)
    have = tokenizer_sha(train_m)
    if cfg.data.val:
        val_m = check_dataset(cfg.data.val, cfg.model, cache_dir=cfg.data.cache_dir)
        if have and tokenizer_sha(val_m) and tokenizer_sha(val_m) != have:
            raise UserError(f"data.val '{cfg.data.val}' was tokenized with tokenizer sha256 {tokenizer_sha(val_m)[:16]}... "
                            f"but data.train '{cfg.data.train}' with {have[:16]}...; prepare both with one tokenizer", 2)
    if cfg.train.init_from and have:
        tok = Path(cfg.train.init_from) / "tokenizer.model"
        if tok.is_file() and file_sha256(tok) != have:
            raise UserError(f"train.init_from '{cfg.train.init_from}' has tokenizer sha256 {file_sha256(tok)[:16]}... but "
                            f"data.train '{cfg.data.train}' was tokenized with {have[:16]}...; prepare the data with "
                            "the export's tokenizer.model", 2)


def check_model_fits(cfg: Config, local_ranks: int) -> None:
    """Refuse, before allocating it, a model whose fp32 weights alone exceed this machine's available memory
    (every rank builds the full model on CPU first)."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(cfg.model).parameters())
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise UserError(f"the model cannot be built ({type(e).__name__}); lower model.n_ctx ({cfg.model.n_ctx}), "
                        "model.d_model or model.n_layers", 2) from None
    avail = available_memory()
    need = 4 * n * max(1, local_ranks)
    if avail and need > avail:
        raise UserError(f"the model has {n:,} parameters: {need / 2**30:.1f} GiB of fp32 weights on this machine "
                        f"({max(1, local_ranks)} rank(s)) before any gradient or optimizer state, but only "
                        f"{avail / 2**30:.1f} GiB of memory is available; lower model.n_ctx ({cfg.model.n_ctx}), "
                        "model.d_model or model.n_layers", 2)


# ----------------------------------------------------------------------------------------------
# model and data (the defaults; tests pass stand-ins with the same contracts)

def default_model_factory(cfg: Config):
    model = build_model(cfg.model)
    if cfg.train.init_from:
        # strict: every tensor present with its exact shape, architecture keys equal (one-line error otherwise)
        model.load_state_dict(load_export_state(cfg.train.init_from, cfg.model))
    return model


def default_data_factory(cfg: Config, info, micro_batch_size: int):
    """(train loader with state_dict/load_state_dict, a function giving a fresh val loader or None)."""
    if not cfg.data.train:
        raise UserError("data.train is empty; prepare a dataset with `mmscale prepare` and set data.train=DIR")
    manifest = check_dataset(cfg.data.train, cfg.model, cache_dir=cfg.data.cache_dir)
    if cfg.data.val:
        manifest = check_dataset(cfg.data.val, cfg.model, cache_dir=cfg.data.cache_dir)
    has_val = manifest.get("splits", {}).get("val", {}).get("samples", 0) > 0
    if cfg.train.eval_every and not has_val:
        if cfg.data.val:
            raise UserError(f"data.val '{cfg.data.val}' has no val samples; prepare it with --val-fraction > 0")
        if info.rank == 0:
            print(f"mmscale train: note: '{cfg.data.train}' has no val split, so no val_loss "
                  "(prepare with --val-fraction > 0 or set data.val)", file=sys.stderr)
    world = dict(n_ctx=cfg.model.n_ctx, micro_batch_size=micro_batch_size, seed=cfg.run.seed, rank=info.rank,
                 world_size=info.world_size, local_rank=info.local_rank,
                 local_world_size=info.local_world_size)
    train = build_dataloader(cfg.data, "train", **world)
    # held-out loss: data.val if set, else the val/ split of data.train (the loader picks)
    val_fn = (lambda: build_dataloader(cfg.data, "val", endless=False, **world)) if has_val else None
    return train, val_fn


def endless(loader):
    """Batches forever: a new epoch when one ends (the loader's state tracks the epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training dataset yields no batches; it is smaller than one batch per rank")


def configure_cuda(cfg: Config) -> None:
    """Fast choices on CUDA only (CPU keeps its deterministic defaults, so resumes stay bit-exact there)."""
    # one API, the new one: torch.compile restores the matmul setting through fp32_precision, and torch
    # raises when code then reads a flag set through the legacy allow_tf32 (see triton_mixing._precision)
    prec = "tf32" if cfg.engine.tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = prec
        torch.backends.cudnn.conv.fp32_precision = prec
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
        torch.backends.cudnn.allow_tf32 = cfg.engine.tf32


# ----------------------------------------------------------------------------------------------

def evaluate(engine, val_fn, eval_batches: int) -> float | None:
    if val_fn is None:
        return None
    total, count = 0.0, 0
    loader = val_fn()
    for i, batch in enumerate(loader):
        if i >= eval_batches:
            break
        loss = engine.eval_loss(batch).double()  # stays on the device: one read-back at the end
        total = loss if count == 0 else total + loss
        count += 1
    if hasattr(loader, "close"):
        loader.close()  # frees the val dataset's shared memory (collective: every rank gets here)
    total, count = dist_.all_reduce_sum([total, count], engine.device)
    return total / count if count else None


@dataclasses.dataclass
class TrainState:
    """Where the run is: the next step to run is `step` + 1; what the loop carries from step to step."""
    step: int = 0
    tokens: int = 0
    bad_in_row: int = 0
    status: int = EXIT_OK


@dataclasses.dataclass
class StepResult:
    loss: float           # the global mean loss (nan when skipped)
    skipped_ranks: int    # ranks whose loss was not finite (the step was skipped on all)
    stop_requested: bool  # a stop signal reached some rank
    tokens: int           # global tokens of the step
    grad_norm: object     # None when skipped; else a float or a 0-d tensor, read only when logged
    lr: float
    data_wait: float
    seconds: float


def train_step(engine, batches, step: int, train_cfg, stop: StopFlag, world_size: int) -> StepResult:
    """One optimizer step (0-based `step`): train_cfg.grad_accum micro-batches, then one all-reduce (one host sync)
    that agrees on the loss, a non-finite loss on any rank (then the step is skipped everywhere) and a stop
    request."""
    grad_accum = train_cfg.grad_accum
    t0 = time.perf_counter()
    data_wait, loss_local, n_tokens = 0.0, None, 0
    for micro in range(grad_accum):
        tw = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - tw
        n_tokens += batch["input_ids"].numel()
        # float64 on the device, no host sync per micro-batch (the same sums as Python floats)
        part = engine.forward_backward(batch, last=micro == grad_accum - 1).double() / grad_accum
        loss_local = part if loss_local is None else loss_local + part
    finite = torch.isfinite(loss_local)
    loss_sum, n_bad, n_stop, n_tokens = dist_.all_reduce_sum(
        [torch.where(finite, loss_local, 0.0), (~finite).double(), float(stop.signum != 0), n_tokens], engine.device)
    lr = engines.lr_at(step, train_cfg)
    if n_bad:
        engine.skip_step()
        grad_norm, loss = None, float("nan")
    else:
        grad_norm, loss = engine.step(lr), loss_sum / world_size
    return StepResult(loss, int(n_bad), bool(n_stop), int(n_tokens), grad_norm, lr, data_wait,
                      time.perf_counter() - t0)


def _lock_and_find(cfg: Config, info, run_dir: Path, created: bool, needs_group: bool):
    """The run dir's lock and the checkpoint to resume: (lock, lock_error, checkpointer, resume_dir, meta).

    Rank 0 holds the lock for the whole run; with a process group every rank learns later whether rank 0 got it
    (lock_error), so a refusal never leaves the other ranks waiting. Anything raised here releases the lock and
    removes a run dir this call's run created, still empty.
    """
    lock, lock_error = (rundir.RunLock(run_dir), None) if info.rank == 0 else (None, None)
    try:
        if lock is not None:
            try:
                lock.acquire()
            except UserError as e:
                lock, lock_error = None, e
                if not needs_group:
                    raise
        checkpointer = ckpt.Checkpointer(cfg, info)
        resume_dir, meta = checkpointer.find() if lock_error is None else (None, None)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and info.rank == 0:
            _remove_if_empty(run_dir)
        raise
    return lock, lock_error, checkpointer, resume_dir, meta


def train(cfg: Config, *, model_factory=None, data_factory=None) -> int:
    """Run (or resume) training per `cfg`; returns the exit status. Every rank calls this.

    The factories (model_factory(cfg) -> model, data_factory(cfg, info, micro_batch_size) -> (train loader,
    val loader function or None)) default to the real model and the prepared dataset; tests pass stand-ins,
    faults included, with the same contracts. `cfg` is not modified: the run uses a copy with the resolved
    gradient accumulation.
    """
    info = dist_.detect()
    engine_cls = engines.engine_class(cfg.engine.kind)
    grad_accum = resolve_grad_accum(cfg, info.world_size, info.nodes)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=grad_accum))
    run_dir = Path(cfg.run.dir)
    check_run_dir_possible(run_dir)
    if data_factory is None:
        precheck_data(cfg)  # before the run dir and the model: a mismatch leaves nothing behind
    if model_factory is None:
        check_model_fits(cfg, info.local_world_size or 1)
    rundir.check_owned(run_dir)  # every rank (read-only): a folder that is not an mmscale run is refused
    created = not run_dir.exists()
    check_run_dir(run_dir)  # every rank: a rank-0-only error would leave the others waiting in init

    # engine.precision auto -> bf16 | fp32 by the device (and the checkpoint resumed): once, before everything
    # that reads it (the resume check, the engine, config.yaml; the start event and its line say why)
    cfg = precision.resolve_for_run(cfg, dist_.device_for(info), engine_cls.same_precision_to_resume)[0]
    needs_group = engine_cls.needs_process_group(info.world_size)
    lock, lock_error, checkpointer, resume_dir, meta = _lock_and_find(cfg, info, run_dir, created, needs_group)

    device = dist_.device_for(info)  # before the group: NCCL binds each rank to its own GPU
    if device.type == "cuda":
        configure_cuda(cfg)
    if needs_group:
        engine_cls.start_process_group(info, device, cfg.engine.dist_timeout_min)

    loader, clean = None, False
    # the loop installs its stop handlers; afterwards the caller's come back (the CLI's, which turn a later Ctrl-C
    # into one line; an in-process caller such as `experiment run` goes on after this run)
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        if needs_group and dist_.ranks_flagging(lock_error is not None, device):
            raise lock_error or UserError(f"rank 0 could not lock run.dir '{run_dir}' (its line says who holds it)")
        torch.manual_seed(cfg.run.seed)  # same seed -> same initial weights on every engine and rank
        model = (model_factory or default_model_factory)(cfg)
        notes = []
        if cfg.train.micro_batch_size == "auto":  # the largest that fits (mmscale.plan), recorded in config.yaml
            cfg, note = _auto_micro_batch(cfg, model, info, device, meta)
            notes.append(note)
        loader, val_fn = (data_factory or default_data_factory)(cfg, info, cfg.train.micro_batch_size)
        status = _run(cfg, info, model, loader, val_fn, device, checkpointer, resume_dir, meta, notes)
        clean = True
        return status
    except UserError:
        clean = True  # raised on every rank alike (config, data, checkpoint): tidy up as usual
        if lock is not None:
            lock.release()
        if created and info.rank == 0:
            _remove_if_empty(run_dir)
        raise
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, previous[s] if previous[s] is not None else signal.SIG_DFL)
        if lock is not None:
            lock.release()
        if clean:  # after a crash the other ranks may be gone: no collectives, just exit
            if hasattr(loader, "close"):
                loader.close()
            dist_.barrier(device)
            if needs_group:
                engine_cls.stop_process_group()


def _auto_micro_batch(cfg, model, info, device, meta):
    """train.micro_batch_size auto: a resumed run keeps its checkpoint's micro-batch; a new one probes."""
    per_rank = cfg.train.global_batch_size // info.world_size
    mb = int((meta or {}).get("micro_batch_size") or 0)
    if mb and per_rank % mb == 0:
        t = dataclasses.replace(cfg.train, micro_batch_size=mb, grad_accum=per_rank // mb)
        return dataclasses.replace(cfg, train=t), f"train.micro_batch_size auto: {mb}, the resumed checkpoint's"
    return resolve_auto_micro_batch(cfg, model, info, device)


def _remove_if_empty(run_dir: Path) -> None:
    """A run that failed before writing anything leaves no empty run dir behind."""
    try:
        run_dir.rmdir()
    except OSError:
        pass


def _run(cfg, info, model, loader, val_fn, device, checkpointer, resume_dir, meta, notes=()) -> int:
    run_dir = Path(cfg.run.dir)
    engine = engines.build_engine(cfg, model, info, device)
    state = TrainState()
    if resume_dir is not None:
        state.step, state.tokens = checkpointer.restore(engine, resume_dir, meta, loader)
    start_step = state.step
    if info.rank == 0:
        rundir.write_marker(run_dir)
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        trim_jsonl(run_dir / "metrics.jsonl", start_step)  # rows after the checkpoint are about to be logged again
    logger = MetricsLogger(cfg, run_dir, info.rank == 0, start_step, cfg.train.max_steps)
    if resume_dir is not None:
        logger.write(f"resumed from {resume_dir} (step {start_step}, {state.tokens} tokens)")
    for note in notes:  # train.micro_batch_size auto: what was chosen, also as a metrics.jsonl event row
        logger.write(note)
        logger.event(start_step, "micro_batch_size_auto", micro_batch_size=cfg.train.micro_batch_size,
                     grad_accum=cfg.train.grad_accum, message=note)
    mfu = Mfu(model, device, cfg.engine.precision, cfg.log.peak_flops, info.world_size)
    if info.rank == 0:
        trim_jsonl(run_dir / "samples.jsonl", start_step)
        _log_start(cfg, info, logger, device, mfu, start_step, resume_dir)
    sampler = Sampler(cfg, info.rank, engine, model, device, logger)
    profiler = StepProfiler(cfg, info.rank, device, logger, start_step)

    stop = StopFlag()
    stop.install()
    batches = endless(loader)
    try:
        while state.step < cfg.train.max_steps:
            r = train_step(engine, batches, state.step, cfg.train, stop, info.world_size)
            state.step += 1
            state.tokens += r.tokens
            state.bad_in_row = state.bad_in_row + 1 if r.skipped_ranks else 0
            if not _after_step(cfg, state, r, engine, loader, val_fn, checkpointer, logger, mfu, sampler, profiler):
                break
        # a final held-out loss when the last step was not an eval step
        ran_to_end = state.status == EXIT_OK and start_step < cfg.train.max_steps
        if ran_to_end and cfg.train.eval_every and cfg.train.max_steps % cfg.train.eval_every:
            val = evaluate(engine, val_fn, cfg.train.eval_batches)
            if val is not None:
                logger.log({"step": cfg.train.max_steps, "val_loss": val})
                logger.write(f"final val_loss {val:.4f}")
        logger.plot()  # also when stopped: the curve shows every step logged so far
    finally:
        profiler.close()
        logger.close()
    engine.close()
    return state.status


def _log_start(cfg, info, logger, device, mfu: Mfu, start_step: int, resume_dir) -> None:
    """Rank 0: the start (or resume) event row of metrics.jsonl, with the device, the precision and why, and the
    MFU peak; a line for the precision's reason and for an unknown peak."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    logger.event(start_step, "resume" if resume_dir is not None else "start",
                 device=name, world_size=info.world_size, engine=cfg.engine.kind,
                 precision=cfg.engine.precision, **precision.recorded(cfg.engine.precision),
                 peak_flops=mfu.peak, peak_source=mfu.peak_note,
                 flops_per_token_dense=mfu.flops["dense"], flops_per_token_causal=mfu.flops["causal"],
                 threads=torch.get_num_threads(), load_avg=round(os.getloadavg()[0], 2),
                 **({"from": str(resume_dir)} if resume_dir is not None else {}))
    if precision.recorded(cfg.engine.precision):
        logger.write(precision.recorded(cfg.engine.precision)["precision_reason"])
    if mfu.peak is None:
        logger.write(f"MFU: {mfu.peak_note}")


def _after_step(cfg, state: TrainState, r: StepResult, engine, loader, val_fn, checkpointer, logger, mfu: Mfu,
                sampler: Sampler, profiler: StepProfiler) -> bool:
    """Log, evaluate, checkpoint and decide whether to go on after the step `state.step` (1-based) ran."""
    done, at_end = state.step, state.step == cfg.train.max_steps
    if done % cfg.log.every == 0 or at_end or r.skipped_ranks:
        tps = r.tokens / r.seconds
        # a loader may add columns (retrieval: in-batch accuracy, alignment, uniformity) and a warning line
        extra, note = loader.log_metrics(done) if hasattr(loader, "log_metrics") else ({}, None)
        logger.log({"step": done, "loss": None if r.skipped_ranks else r.loss, "lr": r.lr,
                    "grad_norm": None if r.grad_norm is None else float(r.grad_norm),  # a sync, on log steps only
                    "tokens_per_s": tps, **mfu.columns(tps), "step_time": r.seconds, "data_wait": r.data_wait,
                    "peak_mem": peak_mem_mib(engine.device), "tokens": state.tokens, "skipped": bool(r.skipped_ranks),
                    **extra})
        if note:
            logger.write(note)
    logger.progress(done, None if r.skipped_ranks else r.loss)
    if state.bad_in_row:
        logger.write(f"step {done}: non-finite loss on {r.skipped_ranks} rank(s); step skipped "
                     f"({state.bad_in_row} in a row, limit train.max_bad_steps={cfg.train.max_bad_steps})")
    if state.bad_in_row > cfg.train.max_bad_steps:
        last = checkpointer.latest()
        logger.write(f"stopping: {state.bad_in_row} non-finite losses in a row; the last good checkpoint is "
                     f"{last if last else '(none saved yet)'}; lower train.lr or check the data")
        state.status = EXIT_NONFINITE
        return False
    if cfg.train.eval_every and done % cfg.train.eval_every == 0:
        val = evaluate(engine, val_fn, cfg.train.eval_batches)
        if val is not None:
            logger.log({"step": done, "val_loss": val})
            logger.write(f"step {done}: val_loss {val:.4f}")
        logger.plot()
    sampler.after_step(done, at_end)  # every rank: generation runs the forward everywhere
    profiler.after_step(done, at_end)
    if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or at_end or r.stop_requested:
        path = checkpointer.save(engine, done, state.tokens, loader)
        logger.write(f"checkpoint: {path}")
        logger.event(done, "checkpoint", path=str(path))
    if r.stop_requested and not at_end:
        logger.write(f"stopped by a signal at step {done} after saving a checkpoint; "
                     f"rerun the same command to resume (exit status {EXIT_SIGNAL})")
        state.status = EXIT_SIGNAL
        return False
    return True


# ----------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 engine.kind=fsdp")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    return engines.engine_class(cfg.engine.kind).finish_process(train(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale.train", description="pre-train a model with any engine")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status("mmscale train", run, args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
