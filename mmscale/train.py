"""The one training loop, for every engine and launcher.

    python -m mmscale.train --config configs/tiny.yaml train.max_steps=200
    torchrun --standalone --nproc_per_node 2 mmscale/train.py --config X engine.kind=fsdp
    deepspeed --num_gpus 2 mmscale/train.py --config X engine.kind=deepspeed engine.zero_stage=2
    srun python -m mmscale.train --config X ...            (ranks from SLURM_*)
    mmscale train --config X ...                          (single process)

Exit statuses (mmscale/ARCHITECTURE.md): 0 done; 1 error; 2 bad config; 75 stopped by SIGTERM, SIGUSR2
or SIGINT after saving a checkpoint (requeue: the run resumes); 3 too many non-finite losses in a row.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed mmscale/train.py` / `torchrun mmscale/train.py` run it as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mmscale import checkpoint as ckpt
from mmscale import distributed as dist_
from mmscale.config import Config, load_config
from mmscale.errors import UserError

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


def resolve_grad_accum(cfg: Config, world_size: int) -> int:
    t = cfg.train
    if cfg.engine.kind == "single" and world_size > 1:
        raise UserError(f"engine.kind=single cannot run on {world_size} ranks; use engine.kind=ddp, fsdp or deepspeed")
    if t.global_batch_size == 0:
        return t.grad_accum
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size ({t.global_batch_size}) is not divisible by micro_batch_size x ranks "
                        f"({t.micro_batch_size} x {world_size}); pick a multiple of {per_step}")
    return t.global_batch_size // per_step


def check_run_dir(run_dir: Path) -> None:
    probe = run_dir / f".write_test.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".write_test.*"):  # left by a run killed in this very check
            pid = stale.name.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def precheck_data(cfg: Config) -> None:
    """Before the run dir and the model exist: the datasets fit the model (n_ctx, vocab: exit 2) and each other,
    and train.init_from's tokenizer is the data's (one line naming both sides)."""
    from mmscale.data.loader import check_dataset, tokenizer_sha

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
        from mmscale.data.tokenizer import file_sha256

        tok = Path(cfg.train.init_from) / "tokenizer.model"
        if tok.is_file() and file_sha256(tok) != have:
            raise UserError(f"train.init_from '{cfg.train.init_from}' has tokenizer sha256 {file_sha256(tok)[:16]}... but "
                            f"data.train '{cfg.data.train}' was tokenized with {have[:16]}...; prepare the data with "
                            "the export's tokenizer.model", 2)


def check_model_fits(cfg: Config, local_ranks: int) -> None:
    """Refuse, before allocating it, a model whose fp32 weights alone exceed this machine's available memory
    (every rank builds the full model on CPU first)."""
    from mmscale.models import build_model

    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(cfg.model).parameters())
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise UserError(f"the model cannot be built ({type(e).__name__}); lower model.n_ctx ({cfg.model.n_ctx}), "
                        "model.d_model or model.n_layers", 2) from None
    avail = _available_memory()
    need = 4 * n * max(1, local_ranks)
    if avail and need > avail:
        raise UserError(f"the model has {n:,} parameters: {need / 2**30:.1f} GiB of fp32 weights on this machine "
                        f"({max(1, local_ranks)} rank(s)) before any gradient or optimizer state, but only "
                        f"{avail / 2**30:.1f} GiB of memory is available; lower model.n_ctx ({cfg.model.n_ctx}), "
                        "model.d_model or model.n_layers", 2)


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----------------------------------------------------------------------------------------------
# model and data (the defaults; tests pass stand-ins with the same contracts)

def default_model_factory(cfg: Config):
    from mmscale.models import build_model

    model = build_model(cfg.model)
    if cfg.train.init_from:
        from mmscale.export.format import load_export_state

        # strict: every tensor present with its exact shape, architecture keys equal (one-line error otherwise)
        model.load_state_dict(load_export_state(cfg.train.init_from, cfg.model))
    return model


def default_data_factory(cfg: Config, info, micro_batch_size: int):
    """(train loader with state_dict/load_state_dict, a function giving a fresh val loader or None)."""
    from mmscale.data.loader import build_dataloader, check_dataset

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
    torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
    torch.backends.cudnn.allow_tf32 = cfg.engine.tf32


def install_nan_fault(model, steps: set[int], current: dict) -> None:
    """Tests only (MMSCALE_FAULT_NAN_STEPS=3,4): poison the embeddings at those steps (1-based)."""
    def hook(module, args, output):
        return output * float("nan") if current["step"] in steps else output
    model.embed.register_forward_hook(hook)


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


def save_checkpoint(cfg, engine, info, root: Path, step: int, tokens: int, loader, micro_batch_size: int) -> Path:
    tmp = root / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
    try:
        return _save_checkpoint(cfg, engine, info, root, tmp, step, tokens, loader, micro_batch_size)
    except (OSError, RuntimeError) as e:
        if not _no_space(e, root):
            raise
        if info.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        need = _checkpoint_bytes(root, engine)
        free = shutil.disk_usage(root).free if root.is_dir() else 0
        last = ckpt.find_latest(root)
        raise UserError(f"no space left on device writing checkpoint '{tmp}' (needs about {need:,} bytes, "
                        f"{free:,} free); free space or move run.dir; "
                        f"{f'the previous checkpoint {last} is intact' if last else 'no checkpoint was saved'}"
                        ) from None


def _no_space(e: BaseException, root: Path) -> bool:
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = str(e)
    return "No space left" in text or ("write failed" in text and root.is_dir()
                                       and shutil.disk_usage(root).free < (1 << 26))


def _checkpoint_bytes(root: Path, engine) -> int:
    """The size of the newest checkpoint, else weights + two AdamW moments in fp32."""
    last = ckpt.find_latest(root)
    if last is not None:
        return sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    try:
        return 12 * sum(p.numel() for p in engine.module().parameters())
    except Exception:
        return 0


def _save_checkpoint(cfg, engine, info, root: Path, tmp: Path, step: int, tokens: int, loader,
                     micro_batch_size: int) -> Path:
    if info.rank == 0:
        ckpt.prepare_tmp_dir(root, step)
    dist_.barrier(engine.device)
    failure, files = None, {}
    try:
        files = engine.save(tmp)
        data_state = loader.state_dict() if hasattr(loader, "state_dict") else None
        ckpt.save_rank_state(tmp, info.rank, data_state)
    except (OSError, RuntimeError) as e:
        failure = e
    _agree_saved(failure, engine, root)  # (a barrier that also tells every rank whether a write failed)
    final = root / ckpt.step_dir_name(step)
    if info.rank == 0:
        meta = {"step": step, "tokens_seen": tokens, "engine": engine.kind, "zero_stage": cfg.engine.zero_stage,
                "precision": cfg.engine.precision, "world_size": info.world_size,
                "micro_batch_size": micro_batch_size, "model_format": engine.model_format, **files,
                "rank_files": [ckpt.rank_file_name(r) for r in range(info.world_size)],
                "config": cfg.to_dict(), "model": cfg.to_dict()["model"]}
        try:
            final = ckpt.finalize(root, tmp, step, meta, cfg.checkpoint.keep)
        except (OSError, RuntimeError) as e:
            failure = e
    _agree_saved(failure, engine, root)
    return final


def _agree_saved(failure, engine, root: Path) -> None:
    """Every rank learns whether any rank failed to write its part of the checkpoint: the failing rank raises its
    error (a full disk becomes one line in save_checkpoint), the others stop with one line too, rather than waiting
    in the next collective."""
    # not dist_.all_reduce_sum: that is the loop's one host sync per step (and profiled as such)
    flag = torch.tensor([float(failure is not None)], dtype=torch.float64, device=engine.device)
    if dist_.is_initialized():
        torch.distributed.all_reduce(flag)
    (n_failed,) = flag.tolist()
    if failure is not None:
        raise failure
    if n_failed:
        last = ckpt.find_latest(root)
        raise UserError(f"saving the checkpoint failed on {int(n_failed)} other rank(s) (see rank 0's message); "
                        f"{f'the previous checkpoint {last} is intact' if last else 'no checkpoint was saved'}")


def train(cfg: Config, *, model_factory=None, data_factory=None) -> int:
    """Run (or resume) training per `cfg`; returns the exit status. Every rank calls this."""
    info = dist_.detect()
    grad_accum = resolve_grad_accum(cfg, info.world_size)
    cfg.train.grad_accum = grad_accum
    run_dir = Path(cfg.run.dir)
    check_run_dir_possible(run_dir)
    if data_factory is None:
        precheck_data(cfg)  # before the run dir and the model: a mismatch leaves nothing behind
    if model_factory is None:
        check_model_fits(cfg, info.local_world_size or 1)
    created = not run_dir.exists()
    check_run_dir(run_dir)  # every rank: a rank-0-only error would leave the others waiting in init

    try:
        resume_dir = ckpt.resolve_resume(cfg, announce=info.rank == 0)
        meta = None
        if resume_dir is not None:
            meta = ckpt.read_meta(resume_dir)
            where = f"run.dir '{run_dir}'" if cfg.run.resume == "auto" else f"checkpoint '{resume_dir}'"
            ckpt.check_compatible(meta, cfg, info.world_size, where)
    except UserError:
        if created and info.rank == 0:
            _remove_if_empty(run_dir)
        raise

    needs_group = info.world_size > 1 or cfg.engine.kind in ("deepspeed", "fsdp")
    device = dist_.device_for(info)  # before the group: NCCL binds each rank to its own GPU
    if device.type == "cuda":
        configure_cuda(cfg)
    if needs_group:
        dist_.init(info, device, deepspeed=cfg.engine.kind == "deepspeed", timeout_min=cfg.engine.dist_timeout_min)

    loader, clean = None, False
    try:
        torch.manual_seed(cfg.run.seed)  # same seed -> same initial weights on every engine and rank
        model = (model_factory or default_model_factory)(cfg)
        fault_steps = {int(s) for s in os.environ.get("MMSCALE_FAULT_NAN_STEPS", "").split(",") if s}
        current = {"step": 0}
        if fault_steps:
            install_nan_fault(model, fault_steps, current)
        loader, val_fn = (data_factory or default_data_factory)(cfg, info, cfg.train.micro_batch_size)
        status = _run(cfg, info, model, loader, val_fn, device, resume_dir, meta, current)
        clean = True
        return status
    except UserError:
        clean = True  # raised on every rank alike (config, data, checkpoint): tidy up as usual
        if created and info.rank == 0:
            _remove_if_empty(run_dir)
        raise
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        if clean:  # after a crash the other ranks may be gone: no collectives, just exit
            if hasattr(loader, "close"):
                loader.close()
            dist_.barrier(device)
            if needs_group:
                dist_.shutdown(deepspeed=cfg.engine.kind == "deepspeed")


def _remove_if_empty(run_dir: Path) -> None:
    """A run that failed before writing anything leaves no empty run dir behind."""
    try:
        run_dir.rmdir()
    except OSError:
        pass


def _run(cfg, info, model, loader, val_fn, device, resume_dir, meta, current) -> int:
    from mmscale.engines import build_engine, lr_at
    from mmscale.metrics import MetricsLogger, peak_mem_mib

    run_dir = Path(cfg.run.dir)
    root = ckpt.checkpoints_root(run_dir)
    grad_accum = cfg.train.grad_accum
    engine = build_engine(cfg, model, info, device)

    start_step, tokens = 0, 0
    if resume_dir is not None:
        try:
            with ckpt.safe_unpickling():  # DeepSpeed and DCP unpickle: only allow-listed classes
                engine.load(resume_dir)
        except BaseException as e:  # DCP wraps rank failures in a BaseException (CheckpointException)
            if isinstance(e, pickle.UnpicklingError) or "Unsupported global" in str(e):
                raise ckpt.unsafe_payload_error(resume_dir, e) from None
            raise
        state = ckpt.load_rank_state(resume_dir, info.rank, info.world_size, meta)
        if state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        if state["data"] is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["data"])
        start_step, tokens = meta["step"], meta["tokens_seen"]

    if info.rank == 0:
        (run_dir / ".tmp_config.yaml").write_text(cfg.to_yaml())
        os.replace(run_dir / ".tmp_config.yaml", run_dir / "config.yaml")
        _trim_metrics(run_dir / "metrics.jsonl", start_step)
    logger = MetricsLogger(cfg, run_dir, info.rank == 0, start_step, cfg.train.max_steps)
    if resume_dir is not None:
        logger.write(f"resumed from {resume_dir} (step {start_step}, {tokens} tokens)")
    from mmscale.watch import RunWatch  # MFU vs the device's peak, samples, profiler (mmscale/watch.py)
    watch = RunWatch(cfg, info, engine, model, device, logger, start_step, resume_dir)

    stop = StopFlag()
    stop.install()
    batches = endless(loader)
    bad_in_row, status = 0, EXIT_OK
    try:
        for step in range(start_step, cfg.train.max_steps):
            current["step"] = step + 1
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
            # one all-reduce (one host sync) agrees on the loss, a non-finite loss anywhere, a stop request
            finite = torch.isfinite(loss_local)
            loss_sum, n_bad, n_stop, n_tokens = dist_.all_reduce_sum(
                [torch.where(finite, loss_local, 0.0), (~finite).double(), float(stop.signum != 0), n_tokens],
                engine.device)
            lr = lr_at(step, cfg.train)
            if n_bad:
                engine.skip_step()
                bad_in_row += 1
                grad_norm, loss = None, float("nan")
            else:
                grad_norm = engine.step(lr)
                bad_in_row = 0
                loss = loss_sum / info.world_size
            done = step + 1
            tokens += int(n_tokens)
            step_time = time.perf_counter() - t0
            if done % cfg.log.every == 0 or done == cfg.train.max_steps or n_bad:
                tps = n_tokens / step_time
                row = {"step": done, "loss": loss if not n_bad else None, "lr": lr,
                       "grad_norm": None if grad_norm is None else float(grad_norm),  # a sync, on log steps only
                       "tokens_per_s": tps, **watch.mfu(tps), "step_time": step_time, "data_wait": data_wait,
                       "peak_mem": peak_mem_mib(device), "tokens": tokens, "skipped": bool(n_bad)}
                logger.log(row)
            logger.progress(done, None if n_bad else loss)
            if bad_in_row:
                logger.write(f"step {done}: non-finite loss on {int(n_bad)} rank(s); step skipped "
                             f"({bad_in_row} in a row, limit train.max_bad_steps={cfg.train.max_bad_steps})")
            if bad_in_row > cfg.train.max_bad_steps:
                last = ckpt.find_latest(root)
                logger.write(f"stopping: {bad_in_row} non-finite losses in a row; the last good checkpoint is "
                             f"{last if last else '(none saved yet)'}; lower train.lr or check the data")
                status = EXIT_NONFINITE
                break
            if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                val = evaluate(engine, val_fn, cfg.train.eval_batches)
                if val is not None:
                    logger.log({"step": done, "val_loss": val})
                    logger.write(f"step {done}: val_loss {val:.4f}")
                logger.plot()
            at_end = done == cfg.train.max_steps
            watch.after_step(done, at_end)
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or at_end or n_stop:
                path = save_checkpoint(cfg, engine, info, root, done, tokens, loader, cfg.train.micro_batch_size)
                logger.write(f"checkpoint: {path}")
                logger.event(done, "checkpoint", path=str(path))
            if n_stop and not at_end:
                logger.write(f"stopped by a signal at step {done} after saving a checkpoint; "
                             f"rerun the same command to resume (exit status {EXIT_SIGNAL})")
                status = EXIT_SIGNAL
                break
        # a final held-out loss when the last step was not an eval step
        ran_to_end = status == EXIT_OK and start_step < cfg.train.max_steps
        if ran_to_end and cfg.train.eval_every and cfg.train.max_steps % cfg.train.eval_every:
            val = evaluate(engine, val_fn, cfg.train.eval_batches)
            if val is not None:
                logger.log({"step": cfg.train.max_steps, "val_loss": val})
                logger.write(f"final val_loss {val:.4f}")
        if status in (EXIT_OK, EXIT_SIGNAL, EXIT_NONFINITE):
            logger.plot()  # also when stopped: the curve shows every step logged so far
    finally:
        watch.close()
        logger.close()
    engine.close()
    return status




def _trim_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they are about to be logged again), and a line a
    crash left half-written."""
    from mmscale.watch import trim_jsonl
    trim_jsonl(path, upto_step)


# ----------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 engine.kind=fsdp")
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    status = train(cfg)
    if cfg.engine.kind == "deepspeed":
        # very short DeepSpeed processes sometimes abort at interpreter exit; leave without teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmscale.train", description="pre-train a model with any engine")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"mmscale train: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
