"""A generated matrix: engine x precision x world size x features, with CUDA's behaviour made visible on the CPU.

Nothing here is a hand-kept list. The factors come from the code:
  engine     engines.KINDS (the registry) x each class's variants() (DeepSpeed: one per ZeRO stage)
  precision  the Literal choices of EngineConfig.precision (an `auto` choice resolves to one of them first)
  world      1, 2 and 3 ranks; a world the engine refuses by design (Engine.check_layout) is a refusal cell
  features   activation checkpointing, grad_accum 2, torch.compile (where this CPU build can compile),
             elastic 2 -> 1 (world-2 cells only); every cell also writes samples, evaluates, saves at step 2
             and is resumed from that checkpoint
The rows are every engine x precision x world cell the engine supports, with the features chosen greedily
so that every pair of factor values that can occur together occurs in some row (pairwise coverage), then
extra rows if any pair is left. All cells of one world size run one after the other in one launch.

Each cell checks: the loss falls, val_loss is logged, samples are written, the run resumed from step 2
continues the uninterrupted one bit for bit (losses, val_loss and the samples at step 4: README, "run.resume"),
an elastic 2 -> 1 resume continues within 1e-5 (fp32) / 5e-4 (bf16), and the refusal cells fail at start-up
with one line naming the problem.

CUDA semantics on CPU (installed in every worker, see `install_cuda_emulation`):
  (a) `torch.is_autocast_enabled()` with no argument reads CUDA's autocast state on a GPU machine, where the
      engine's autocast *is* CUDA's; here it reads the CPU's. That is what DeepSpeed's autocast_if_enabled
      sees on a GPU (before the fix it then turned the engine's bf16 autocast off). A forward hook on one
      nn.Linear per block records the dtype of its output: bf16 under every engine with engine.precision=bf16
      (training, evaluation and samples), fp32 in fp32.
  (b) `distributed.group_binding` returns {"device_id": device} as on CUDA, so every engine that starts a
      process group takes the CUDA start path, also on one rank; gloo refuses a CPU device_id, so the
      recorder checks it was passed (the engine's device) and starts gloo without it.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest

from tests._dist import REPO, run_distributed, tiny_config

WORLDS = (1, 2, 3)
STEPS, SAVE_AT = 4, 2
ELASTIC_TOL = {"fp32": 1e-5, "bf16": 5e-4}


# ----------------------------------------------------------------------------------------------
# the factors, from the code

def engine_variants() -> list[tuple[str, dict]]:
    """(name, overrides) of every engine configuration: the registry x each class's variants()."""
    from mmscale.engines import KINDS, engine_class

    out = []
    for kind in KINDS:
        for v in engine_class(kind).variants():
            suffix = "".join(f"{k.split('.')[-1].replace('zero_stage', 'zero')}{val}" for k, val in v.items())
            out.append((kind + (f"-{suffix}" if suffix else ""), {"engine.kind": kind, **v}))
    return out


def precisions() -> list[str]:
    from mmscale.config import EngineConfig

    choices = typing.get_args(typing.get_type_hints(EngineConfig)["precision"])
    return [p for p in choices if p != "auto"]  # auto is resolved to one of the others before the engine exists


def compile_supported() -> bool:
    """torch.compile on the CPU needs a C++ compiler (inductor's CPU backend)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def max_ranks(kind: str) -> int:
    from mmscale.engines import engine_class

    return engine_class(kind).max_ranks or max(WORLDS)


FEATURES = ("ac", "accum2", "compile", "elastic")


def _valid(row: dict, can_compile: bool) -> bool:
    kind = row["overrides"]["engine.kind"]
    if row["world"] > max_ranks(kind):
        return False
    if row["compile"] and not can_compile:
        return False
    return not row["elastic"] or row["world"] == 2  # elastic: a world-2 checkpoint resumed on one rank


def _pairs(row: dict) -> set:
    values = [("engine", row["engine"]), ("precision", row["precision"]), ("world", row["world"])]
    values += [(f, row[f]) for f in FEATURES]
    return set(itertools.combinations(values, 2))


def build_matrix(can_compile: bool | None = None) -> tuple[list[dict], list[dict], int]:
    """(rows, refusal cells, number of factor-value pairs to cover)."""
    can_compile = compile_supported() if can_compile is None else can_compile
    engines, precs = engine_variants(), precisions()
    every = []
    for (name, ov), prec, world in itertools.product(engines, precs, WORLDS):
        for feats in itertools.product((False, True), repeat=len(FEATURES)):
            row = {"engine": name, "overrides": ov, "precision": prec, "world": world, **dict(zip(FEATURES, feats))}
            if _valid(row, can_compile):
                every.append(row)
    wanted = set().union(*(_pairs(r) for r in every))
    covered, rows = set(), []

    def best(candidates):
        # most new pairs; ties: the cheaper row (fewer compiles, fewer features), then the first
        return max(candidates, key=lambda r: (len(_pairs(r) - covered), -r["compile"],
                                              -sum(r[f] for f in FEATURES)))

    for (name, ov), prec, world in itertools.product(engines, precs, WORLDS):
        options = [r for r in every if (r["engine"], r["precision"], r["world"]) == (name, prec, world)]
        if options:  # every supported engine x precision x world cell once
            rows.append(best(options))
            covered |= _pairs(rows[-1])
    while covered != wanted:
        rows.append(best(every))
        covered |= _pairs(rows[-1])
    refusals = [{"engine": name, "overrides": ov, "precision": prec, "world": world}
                for (name, ov), prec, world in itertools.product(engines, precs, WORLDS)
                if world > max_ranks(ov["engine.kind"])]
    for i, row in enumerate(rows):
        row["name"] = (f"{i:02d}-{row['engine']}-{row['precision']}-w{row['world']}"
                       + "".join(f"-{f}" for f in FEATURES if row[f]))
    return rows, refusals, len(wanted)


def test_matrix_is_generated_from_the_code_and_covers_every_pair():
    from mmscale.config import load_config
    from mmscale.engines import KINDS
    from mmscale.errors import UserError

    rows, refusals, n_pairs = build_matrix(can_compile=True)
    names = {r["engine"] for r in rows}
    assert {n.split("-")[0] for n in names} == set(KINDS)
    # the ZeRO stages the engine lists are exactly those the config accepts
    stages = sorted(r["overrides"]["engine.zero_stage"] for r in rows if "engine.zero_stage" in r["overrides"])
    for stage in range(-1, 6):
        try:
            load_config(None, ["engine.kind=deepspeed", f"engine.zero_stage={stage}"])
            accepted = True
        except (UserError, SystemExit, Exception):
            accepted = False
        assert accepted == (stage in stages), stage
    cells = {(r["engine"], r["precision"], r["world"]) for r in rows}
    assert len(cells) + len(refusals) == len(engine_variants()) * len(precisions()) * len(WORLDS)
    covered = set().union(*(_pairs(r) for r in rows))
    assert len(covered) == n_pairs
    # the single engine has no rank count but 1: its 2- and 3-rank cells are refusals
    assert {(c["engine"], c["world"]) for c in refusals} == {("single", 2), ("single", 3)}


# ----------------------------------------------------------------------------------------------
# the worker: CUDA's semantics on the CPU, the dtype hooks, the runs of one launch

BINDINGS: list = []


def install_cuda_emulation() -> None:
    """See the module docstring, (a) and (b). Only in worker processes (never the pytest process)."""
    import torch
    import torch.distributed as dist

    from mmscale import distributed

    real_query = torch.is_autocast_enabled

    def is_autocast_enabled(*args, **kwargs):
        # (a) stands for CUDA: with no argument torch asks about the GPU, whose autocast the engine entered
        return real_query("cpu") if not args and not kwargs else real_query(*args, **kwargs)

    torch.is_autocast_enabled = is_autocast_enabled

    # (b) stands for NCCL's start path: init_process_group(..., device_id=<this rank's device>)
    distributed.group_binding = lambda device: {"device_id": device}
    real_init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        device = kwargs.pop("device_id", None)
        BINDINGS.append(None if device is None else str(device))
        return real_init(*args, **kwargs)

    dist.init_process_group = init_process_group


def _hooked_model(dtypes: dict):
    import torch.nn as nn

    def build(cfg):
        from mmscale.models import build_model

        model = build_model(cfg.model)
        for block in model.blocks:
            linear = next(m for m in block.modules() if isinstance(m, nn.Linear))

            def hook(module, args, output):
                dtypes.setdefault("train" if module.training else "eval", set()).add(str(output.dtype))

            linear.register_forward_hook(hook)
        return model
    return build


def matrix_worker(payload: dict) -> list:
    """Each run: {"config": dict}; returns [{"status", "dtypes", "bindings"}] (status: exit status or the
    one-line UserError)."""
    from mmscale.config import config_from_dict
    from mmscale.errors import UserError
    from mmscale.run.train import train
    from tests._dist import fresh_rendezvous, synthetic_data

    import mmscale.engines

    install_cuda_emulation()
    build = mmscale.engines.build_engine
    comm: list = []

    def build_and_record(cfg, model, info, device):
        engine = build(cfg, model, info, device)
        if hasattr(engine, "ds_config"):  # DeepSpeed: the dtype each parameter's gradient is reduced in
            ds = engine.wrapped
            if hasattr(ds.optimizer, "get_param_comm_dtype"):  # ZeRO 1-3: per parameter (torch_autocast)
                comm.extend(sorted({str(ds.optimizer.get_param_comm_dtype(p)) for p in ds.module.parameters()}))
            else:  # ZeRO-0 all-reduces every gradient in the engine's communication dtype
                comm.append(str(ds.communication_data_type))
        return engine

    mmscale.engines.build_engine = build_and_record
    out = []
    for i, run in enumerate(payload["runs"]):
        fresh_rendezvous(i)
        dtypes: dict = {}
        BINDINGS.clear()
        comm.clear()
        cfg = config_from_dict(run["config"])
        section = ds_engine = None
        if run.get("control") == "deepspeed_without_torch_autocast":  # the DeepSpeed config before the fix
            import mmscale.engines.deepspeed as ds_engine

            section, ds_engine.torch_autocast_section = ds_engine.torch_autocast_section, lambda precision: {}
        try:
            status = train(cfg, model_factory=_hooked_model(dtypes), data_factory=synthetic_data)
        except UserError as e:
            status = f"UserError: {e}"
        finally:
            if section is not None:
                ds_engine.torch_autocast_section = section
        out.append({"status": status, "dtypes": {k: sorted(v) for k, v in dtypes.items()},
                    "bindings": list(BINDINGS), "reduce_dtypes": list(comm)})
    return out


def run_one_process(payload: dict, timeout: float = 600, env: dict | None = None) -> list:
    """The worker as `mmscale train` runs on a laptop: one plain process, no launcher variables."""
    with tempfile.TemporaryDirectory(prefix="mmscale_matrix_") as out:
        extra = env or {}
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "TMPDIR": out, **extra})
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "_dist.py"), "tests.test_engines_matrix:matrix_worker",
                               json.dumps(payload), out], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        f = Path(out) / "rank_0.json"
        if proc.returncode != 0 or not f.is_file():
            raise RuntimeError(f"one-process run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        return [json.loads(f.read_text())]


# ----------------------------------------------------------------------------------------------
# the runs of a row

def _config(root: Path, row: dict, run: str, **extra) -> dict:
    ov = {"train.max_steps": STEPS, "train.lr": 1e-2, "train.warmup_steps": 1, "train.micro_batch_size": 2,
          "train.grad_accum": 2 if row["accum2"] else 1, "train.eval_every": SAVE_AT, "train.eval_batches": 1,
          "checkpoint.every": SAVE_AT, "checkpoint.keep": 4, "engine.precision": row["precision"],
          "engine.activation_checkpointing": row["ac"], "engine.compile": row["compile"],
          "model.vocab_size": 512, "data.train": str(root / "tokenizer_dir"),
          "log.sample_every": SAVE_AT, "log.sample_prompts": ["Once upon a time"], "log.sample_tokens": 4,
          "log.sample_temperature": 0.0, **row["overrides"], **extra}
    if row["elastic"]:  # the samples of a step fixed across world sizes: the data order continues exactly
        ov["train.global_batch_size"] = 2 * 2 * ov["train.grad_accum"]
    return tiny_config(root / row["name"] / run, **ov)


def _read(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = run_dir / "samples.jsonl"
    return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "val": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
            "samples": ([json.loads(x) for x in samples.read_text().splitlines()] if samples.is_file() else [])}


def _check_row(root: Path, row: dict, results: dict, problems: list) -> None:
    name = row["name"]
    for run in ("full", "resumed") + (("elastic",) if row["elastic"] else ()):
        r = results[(name, run)]
        if r["status"] != 0:
            problems.append(f"{name}/{run}: status {r['status']}")
            return
        want = {"torch.bfloat16"} if row["precision"] == "bf16" else {"torch.float32"}
        if not row["compile"]:  # a compiled block runs the hook inside its graph: not recorded reliably
            for mode in ("train", "eval"):  # eval: evaluation and samples
                got = set(r["dtypes"].get(mode, []))
                if got != want:
                    problems.append(f"{name}/{run}: {mode} Linear outputs {sorted(got)}, want {sorted(want)}")
        kind = row["overrides"]["engine.kind"]
        if kind == "deepspeed" and r["reduce_dtypes"] != ["torch.float32"]:  # the policy: fp32 reduction
            problems.append(f"{name}/{run}: DeepSpeed reduces gradients in {r['reduce_dtypes']}")
        binds = r["bindings"]
        from mmscale.engines import engine_class
        world = 1 if run == "elastic" else row["world"]
        if engine_class(kind).needs_process_group(world):
            if binds != ["cpu"]:
                problems.append(f"{name}/{run}: process group bindings {binds}, want one device_id=cpu")
        elif binds:
            problems.append(f"{name}/{run}: started a process group on one rank: {binds}")
    full = _read(root / name / "full")
    res = _read(root / name / "resumed")
    loss = full["loss"]
    if sorted(loss) != list(range(1, STEPS + 1)) or not all(math.isfinite(v) for v in loss.values()):
        problems.append(f"{name}: losses {loss}")
        return
    if not loss[STEPS] < loss[1]:
        problems.append(f"{name}: the loss did not fall: {loss}")
    if sorted(full["val"]) != [SAVE_AT, STEPS]:
        problems.append(f"{name}: val_loss at steps {sorted(full['val'])}")
    steps_sampled = sorted({s["step"] for s in full["samples"]})
    if steps_sampled != [SAVE_AT, STEPS] or not all(s["tokens"] > 0 for s in full["samples"]):
        problems.append(f"{name}: samples {full['samples']}")
    # the resumed run continues the uninterrupted one bit for bit
    after = {k: v for k, v in loss.items() if k > SAVE_AT}
    if res["loss"] != after:
        problems.append(f"{name}: resumed losses {res['loss']} != {after}")
    if res["val"].get(STEPS) != full["val"][STEPS]:
        problems.append(f"{name}: resumed val_loss {res['val']} != {full['val']}")
    last = [(s["prompt"], s["text"]) for s in full["samples"] if s["step"] == STEPS]
    if [(s["prompt"], s["text"]) for s in res["samples"] if s["step"] == STEPS] != last:
        problems.append(f"{name}: resumed samples differ")
    if row["elastic"]:
        el = _read(root / name / "elastic")["loss"]
        tol = ELASTIC_TOL[row["precision"]]
        bad = {k: (el.get(k), v) for k, v in after.items() if el.get(k) is None or abs(el[k] - v) > tol * abs(v)}
        if bad:
            problems.append(f"{name}: elastic 2->1 losses (got, want) {bad}")


def _tokenizer_dir(root: Path) -> None:
    from tests._data_helpers import make_tiny_corpus

    _, tok = make_tiny_corpus(vocab_size=512)
    (root / "tokenizer_dir").mkdir(parents=True, exist_ok=True)
    shutil.copy(tok, root / "tokenizer_dir" / "tokenizer.model")


@pytest.mark.slow
@pytest.mark.distributed
def test_matrix(tmp_path):
    rows, refusals, _ = build_matrix()
    problems = run_matrix(tmp_path, rows, refusals)
    assert not problems, "\n".join(problems)


def run_matrix(tmp_path: Path, rows: list, refusals: list) -> list:
    """Run the rows (all cells of one world size in one launch) and the refusal cells; returns the problems."""
    _tokenizer_dir(tmp_path)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # one compile cache for every launch
    results, refused = {}, {}

    def launch(world, runs, keys):
        payload = {"runs": runs}
        if world == 1:
            got = run_one_process(payload, env=env)
        else:
            got = run_distributed("tests.test_engines_matrix:matrix_worker", payload, nproc=world, env=env, timeout=900)
        for rank_result in got[:1]:
            for key, r in zip(keys, rank_result):
                results[key] = r

    for world in sorted({r["world"] for r in rows}, reverse=True):  # world 2 before world 1 (elastic)
        runs, keys = [], []
        for row in [r for r in rows if r["world"] == world]:
            step_dir = tmp_path / row["name"] / "full" / "checkpoints" / f"step_{SAVE_AT:08d}"
            runs.append({"config": _config(tmp_path, row, "full")})
            runs.append({"config": _config(tmp_path, row, "resumed", **{"run.resume": str(step_dir)})})
            keys += [(row["name"], "full"), (row["name"], "resumed")]
        if world == 1:  # the elastic resumes of world-2 rows, on one rank
            for row in [r for r in rows if r["elastic"]]:
                step_dir = tmp_path / row["name"] / "full" / "checkpoints" / f"step_{SAVE_AT:08d}"
                runs.append({"config": _config(tmp_path, row, "elastic", **{"run.resume": str(step_dir)})})
                keys.append((row["name"], "elastic"))
        if world == 1:  # negative control: the emulation shows DeepSpeed's fp32 compute without the fix
            control = {"name": "control-deepspeed-bf16-without-torch_autocast", "precision": "bf16", "world": 1,
                       "overrides": {"engine.kind": "deepspeed", "engine.zero_stage": 2}, "ac": False,
                       "accum2": False, "compile": False, "elastic": False}
            runs.append({"config": _config(tmp_path, control, "full"), "control": "deepspeed_without_torch_autocast"})
            keys.append((control["name"], "control"))
        for cell in [c for c in refusals if c["world"] == world]:
            cell = {**cell, "name": f"refused-{cell['engine']}-{cell['precision']}-w{world}", "ac": False,
                    "accum2": False, "compile": False, "elastic": False}
            runs.append({"config": _config(tmp_path, cell, "full")})
            keys.append((cell["name"], "refused"))
        launch(world, runs, keys)

    problems = []
    for row in rows:
        _check_row(tmp_path, row, results, problems)
    for key, r in results.items():
        if key[1] == "refused":
            msg = str(r["status"])
            if not (msg.startswith("UserError: ") and "\n" not in msg and "cannot run on" in msg):
                problems.append(f"{key[0]}: want a one-line refusal at start-up, got {msg!r}")
        if key[1] == "control" and r["dtypes"].get("train") != ["torch.float32"]:
            problems.append(f"{key[0]}: the emulated CUDA autocast query did not show DeepSpeed computing fp32 "
                            f"without its torch_autocast section: {r}")
    return problems
