"""Run a function on 2 ranks (torchrun or the deepspeed launcher, gloo on CPU) and collect each rank's result.

    results = run_distributed("tests._dist:train_runs", {"runs": [...]}, nproc=2)   # list, one per rank

The target is "module:function"; it gets the JSON payload and returns something JSON-able. Also
here: a deterministic token source with the data-loader contract (exact global order, resumable),
so the engine tests need no prepared dataset, and tiny configs of the real model.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


from mmscale.distributed import free_port as _free_port  # noqa: E402  (tests import it from here)

_LAUNCHER_STORE = []


def fresh_rendezvous(run_index: int) -> None:
    """Before the run_index-th train() in one torchrun worker: a new rendezvous on a port that is free now.

    Re-using torchrun's own store across process groups hangs, so each run's group is hosted by rank 0
    on its own port. Rank 0 asks the OS for a free one and publishes it in the launcher's store (kept
    alive by torchrun); guessing "launcher port + i" collides with whatever else holds that port.
    """
    if not ("RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ):
        return
    import datetime

    from torch.distributed import TCPStore

    if not _LAUNCHER_STORE:
        _LAUNCHER_STORE.append((os.environ["MASTER_PORT"], TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=120))))
    launcher_port, store = _LAUNCHER_STORE[0]
    key = f"mmscale_tests/{launcher_port}/run_{run_index}/port"
    if int(os.environ["RANK"]) == 0:
        store.set(key, str(_free_port()))
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    os.environ["MASTER_PORT"] = store.get(key).decode()


def run_distributed(target: str, payload: dict, nproc: int = 2, launcher: str = "torchrun", timeout: float = 300,
                    env: dict | None = None, expect_ok: bool = True) -> list:
    """Start `nproc` ranks running `target(payload)`; returns their results in rank order."""
    with tempfile.TemporaryDirectory(prefix="mmscale_dist_") as out:
        port = _free_port()
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(port)]
        elif launcher == "deepspeed":
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                   "--master_port", str(port)]
        else:
            raise ValueError(launcher)
        cmd += [str(REPO / "tests" / "_dist.py"), target, json.dumps(payload), out]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
                    "TMPDIR": out, **(env or {})}
        # own process group: on a timeout the launcher *and* its ranks are killed (no orphans holding
        # ports and streaming's /dev/shm segments for the tests that follow)
        child = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            raise RuntimeError(f"distributed run timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
        proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
        results = []
        for r in range(nproc):
            f = Path(out) / f"rank_{r}.json"
            results.append(json.loads(f.read_text()) if f.is_file() else None)
        if expect_ok and (proc.returncode != 0 or any(r is None for r in results)):
            raise RuntimeError(f"distributed run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        return results


# ----------------------------------------------------------------------------------------------
# stand-ins with the model and data contracts of mmscale/ARCHITECTURE.md

def tiny_model(cfg):
    from mmscale.models import build_model
    return build_model(cfg.model)


def with_nan_at_steps(model_factory, steps):
    """A model factory whose model turns its embeddings to NaN during the given optimizer steps (1-based,
    counted from a fresh start by the training-mode forwards: grad_accum of them a step): a fault to test
    non-finite-loss handling, given to train() like any other factory."""
    steps = {int(s) for s in steps}

    def build(cfg):
        model = model_factory(cfg)
        forwards = [0]

        def hook(module, args, output):
            if not module.training:  # evaluation and samples are not steps
                return output
            step = forwards[0] // cfg.train.grad_accum + 1
            forwards[0] += 1
            return output * float("nan") if step in steps else output

        model.embed.register_forward_hook(hook)
        return model
    return build


class SyntheticTokens:
    """Deterministic random windows; the global order is fixed, rank r of w takes its slice of each
    global micro-batch, so one rank with a w-times larger micro-batch sees exactly the same samples.
    state_dict / load_state_dict resume exactly."""

    def __init__(self, seed, rank, world, micro_batch, n_ctx, vocab, split="train"):
        self.seed, self.rank, self.world, self.mb = seed + (0 if split == "train" else 10_000), rank, world, micro_batch
        self.n_ctx, self.vocab = n_ctx, vocab
        self.batches = 0

    def _sample(self, index):
        import torch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        # a learnable stream: mostly "next = previous + 1", some noise
        start = torch.randint(self.vocab, (1,), generator=g)
        steps = torch.where(torch.rand(self.n_ctx, generator=g) < 0.8, 1,
                            torch.randint(self.vocab, (self.n_ctx,), generator=g))
        return torch.cat([start, start + steps.cumsum(0)]) % self.vocab

    def __iter__(self):
        import torch
        while True:
            base = (self.batches * self.world + self.rank) * self.mb
            window = torch.stack([self._sample(base + i) for i in range(self.mb)])
            self.batches += 1
            yield {"input_ids": window[:, :-1].contiguous(), "labels": window}

    def state_dict(self):
        return {"batches": self.batches, "world": self.world}

    def load_state_dict(self, state):
        self.batches = state["batches"] * state["world"] // self.world


def synthetic_data(cfg, info, micro_batch):
    args = (cfg.run.seed, info.rank, info.world_size, micro_batch, cfg.model.n_ctx, cfg.model.vocab_size)
    return SyntheticTokens(*args), (lambda: iter(SyntheticTokens(*args, split="val")))


def tiny_config(run_dir, **overrides) -> dict:
    """A dict config of a tiny run; `overrides` use dotted keys (engine.kind=...)."""
    tree = {"model": {"d_model": 32, "n_layers": 2, "n_ctx": 16, "vocab_size": 64, "heads": 1},
            "train": {"max_steps": 6, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0,
                      "eval_batches": 2},
            "engine": {"kind": "single", "precision": "fp32"},
            "checkpoint": {"every": 0, "keep": 2},
            "run": {"dir": str(run_dir), "seed": 7},
            "log": {"wandb": "disabled", "progress": False}}
    for key, value in overrides.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


def read_losses(run_dir) -> dict:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ----------------------------------------------------------------------------------------------
# worker targets

def train_runs(payload: dict) -> list:
    """Each run: {"config": dict, "env": {...}, "nan_steps": [...], "kill_self_at": {...}}; returns the exit
    statuses. Runs one after the other in the same processes (each train() starts and ends its own process
    group)."""
    from mmscale.config import config_from_dict
    from mmscale.errors import UserError
    from mmscale.run.train import train

    import mmscale.engines
    original_lr_at = mmscale.engines.lr_at
    statuses = []
    for i, run in enumerate(payload["runs"]):
        fresh_rendezvous(i)
        mmscale.engines.lr_at = original_lr_at
        os.environ.update(run.get("env", {}))
        model_factory = with_nan_at_steps(tiny_model, run["nan_steps"]) if run.get("nan_steps") else tiny_model
        if run.get("kill_self_at"):
            _signal_self_at(run["kill_self_at"])
        try:
            statuses.append(train(config_from_dict(run["config"]), model_factory=model_factory,
                                  data_factory=synthetic_data))
        except UserError as e:
            statuses.append(f"UserError: {e}")
    return statuses


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "all_to_all_single", "reduce", "gather", "scatter")


def train_runs_recording_collectives(payload: dict) -> dict:
    """train_runs, recording the device of every tensor handed to a torch.distributed collective and the
    device of each engine the loop built: {"statuses": [...], "tensor_devices": [...], "engine_devices": [...]}."""
    import torch
    import torch.distributed as dist

    import mmscale.engines

    seen, engines = set(), set()

    def wrap(fn):
        def recorder(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(t, torch.Tensor):
                        seen.add(str(t.device))
            return fn(*args, **kwargs)
        return recorder

    for name in _COLLECTIVES:
        setattr(dist, name, wrap(getattr(dist, name)))
    build = mmscale.engines.build_engine

    def build_and_record(cfg, model, info, device):
        engine = build(cfg, model, info, device)
        engines.add(str(engine.device))
        return engine

    mmscale.engines.build_engine = build_and_record
    statuses = train_runs(payload)
    return {"statuses": statuses, "tensor_devices": sorted(seen), "engine_devices": sorted(engines)}


def _signal_self_at(spec: dict) -> None:
    """Send this rank a signal once it starts step `spec['step']` (tests SIGTERM handling)."""
    import signal

    import mmscale.engines.base as base
    rank = int(os.environ.get("RANK", 0))
    if rank not in spec.get("ranks", [0]):
        return
    orig = base.lr_at
    sent = {"done": False}

    def lr_at_and_signal(step, train_cfg):
        if step + 1 == spec["step"] and not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), getattr(signal, spec.get("signal", "SIGTERM")))
        return orig(step, train_cfg)
    import mmscale.engines
    mmscale.engines.lr_at = lr_at_and_signal


def _worker_main() -> None:
    target, payload, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    rank = int(os.environ.get("RANK", 0))
    module, fn = target.split(":")
    result = getattr(importlib.import_module(module), fn)(payload)
    (out / f".rank_{rank}.json").write_text(json.dumps(result))
    os.replace(out / f".rank_{rank}.json", out / f"rank_{rank}.json")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (DeepSpeed sometimes aborts there)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker_main()
