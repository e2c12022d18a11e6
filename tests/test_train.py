"""The training loop: signals -> checkpoint -> exact resume, non-finite losses, metrics, bad input,
launcher environments, and the real entry points on a real (tiny) prepared dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.run import checkpoint as ckpt
from mmscale.config import config_from_dict
from mmscale.errors import UserError
from tests._dist import REPO, read_losses, run_distributed, tiny_config, train_runs

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# signals and non-finite losses on 2 ranks

@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_checkpoint_resume_identical_and_nan_skip_two_ranks(tmp_path):
    runs, cases = [], {"zero2_bf16": {"engine.kind": "deepspeed", "engine.zero_stage": 2, "engine.precision": "bf16"},
                       "fsdp_fp32": {"engine.kind": "fsdp"}}
    for name, ov in cases.items():
        ov = {**ov, "train.max_steps": 6}
        runs.append({"config": tiny_config(tmp_path / f"{name}_full", **ov)})
        # SIGTERM reaches only rank 1 during step 3: both ranks agree to stop after the next step
        interrupted = tiny_config(tmp_path / f"{name}_stopped", **ov)
        runs.append({"config": interrupted, "kill_self_at": {"step": 3, "ranks": [1], "signal": "SIGTERM"}})
        runs.append({"config": interrupted})  # the requeued job: same command, resumes automatically
    # a NaN loss at step 3 under ZeRO-2 bf16 is skipped and training goes on with finite losses
    runs.append({"config": tiny_config(tmp_path / "nan", **{**cases["zero2_bf16"], "train.max_steps": 5,
                                                            "train.max_bad_steps": 1}),
                 "nan_steps": [3]})
    statuses = run_distributed("tests._dist:train_runs", {"runs": runs})
    assert statuses[0] == statuses[1] == [0, 75, 0, 0, 75, 0, 0]
    for name in cases:
        full, stopped = read_losses(tmp_path / f"{name}_full"), read_losses(tmp_path / f"{name}_stopped")
        assert stopped == full, name  # every step's loss, bit for bit
        saved = [p.name for p in ckpt.list_complete(tmp_path / f"{name}_stopped" / "checkpoints")]
        assert saved == ["step_00000004", "step_00000006"], saved  # the signal's checkpoint, then the end
    rows = [r for r in _rows(tmp_path / "nan") if "loss" in r]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and all(r["loss"] > 0 for r in rows if not r["skipped"])


def test_nan_step_is_skipped_exactly_and_too_many_stop_with_status_3(tmp_path, capsys):
    one = tiny_config(tmp_path / "one", **{"train.max_steps": 4, "checkpoint.every": 1, "checkpoint.keep": 9})
    many = tiny_config(tmp_path / "many", **{"train.max_steps": 8, "checkpoint.every": 1, "checkpoint.keep": 9,
                                             "train.max_bad_steps": 2})
    assert train_runs({"runs": [{"config": one, "nan_steps": [3]},
                                {"config": many, "nan_steps": [3, 4, 5, 6]}]}) == [0, 3]
    # the skipped step changed nothing: weights and optimizer state after step 3 == after step 2
    root = tmp_path / "one" / "checkpoints"
    for name in ("model.pt", "optimizer.pt"):
        a = torch.load(root / "step_00000002" / name)
        b = torch.load(root / "step_00000003" / name)
        assert str(a) == str(b), name
    assert not torch.equal(torch.load(root / "step_00000004" / "model.pt")["embed.weight"],
                           torch.load(root / "step_00000003" / "model.pt")["embed.weight"])
    # three bad steps in a row with max_bad_steps=2: stop at step 5 without saving it
    saved = [p.name for p in ckpt.list_complete(tmp_path / "many" / "checkpoints")]
    assert saved[-1] == "step_00000004"
    assert "stopping: 3 non-finite losses in a row" in capsys.readouterr().err


def test_sigusr2_and_sigint_in_one_process(tmp_path):
    full = tiny_config(tmp_path / "full", **{"train.max_steps": 5, "engine.precision": "bf16"})
    runs = [{"config": full}]
    for sig in ("SIGUSR2", "SIGINT"):
        cfg = tiny_config(tmp_path / sig, **{"train.max_steps": 5, "engine.precision": "bf16"})
        runs += [{"config": cfg, "kill_self_at": {"step": 2, "ranks": [0], "signal": sig}}, {"config": cfg}]
    assert train_runs({"runs": runs}) == [0, 75, 0, 75, 0]
    for sig in ("SIGUSR2", "SIGINT"):
        assert read_losses(tmp_path / sig) == read_losses(tmp_path / "full")


# ----------------------------------------------------------------------------------------------
# metrics

def test_metrics_rows_mfu_and_plot(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 4, "train.eval_every": 2, "log.peak_flops": 1e12,
                                   "log.every": 2})
    assert train_runs({"runs": [{"config": cfg}]}) == [0]
    rows = _rows(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    from tests._dist import tiny_model
    model = tiny_model(config_from_dict(cfg))
    flops = model.flops_per_token()["dense"] if hasattr(model, "flops_per_token") else 6 * sum(
        p.numel() for p in model.parameters())
    for r in train_rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time", "data_wait", "peak_mem"):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_time"])
        assert r["tokens"] == r["step"] * 2 * 16
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config_from_dict(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text())).model.d_model == 32


# ----------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero status, nothing overwritten

def _cli(*args, cwd=REPO):
    proc = subprocess.run([sys.executable, "-m", "mmscale.cli", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc.returncode, proc.stderr.strip().splitlines()


def test_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    rc, err = _cli("model.d_model=-3", f"run.dir={tmp_path / 'r'}")
    assert rc == 2 and err == ["mmscale train: error: model.d_model must be >= 1, got -3"]
    rc, err = _cli(f"run.dir={tmp_path / 'r'}")
    assert rc == 1 and len(err) == 1 and "data.train is empty" in err[0]
    rc, err = _cli(f"run.dir={tmp_path / 'a_file' / 'run'}", "data.train=x")
    assert rc == 1 and len(err) == 1 and "is not writable" in err[0]
    rc, err = _cli(f"run.dir={tmp_path / 'r'}", "train.global_batch_size=5", "train.micro_batch_size=2")
    assert rc == 1 and len(err) == 1 and "not divisible by micro_batch_size x ranks (2 x 1)" in err[0]
    rc, err = _cli(f"run.dir={tmp_path / 'r'}", f"data.train={tmp_path / 'missing'}")
    assert rc == 1 and len(err) == 1 and "missing" in err[0]


def test_world_size_checks():
    from mmscale.run.train import resolve_grad_accum

    cfg = config_from_dict({"train": {"micro_batch_size": 2, "global_batch_size": 16}, "engine": {"kind": "ddp"}})
    assert resolve_grad_accum(cfg, 4) == 2 and resolve_grad_accum(cfg, 8) == 1
    with pytest.raises(UserError, match="not divisible"):
        resolve_grad_accum(cfg, 3)
    cfg.engine.kind = "single"
    with pytest.raises(UserError, match="cannot run on 2 ranks"):
        resolve_grad_accum(cfg, 2)


# ----------------------------------------------------------------------------------------------
# launcher environments

def test_detect_torchrun_slurm_and_plain():
    from mmscale.distributed import detect

    info = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port) == (3, 1, 4, "h1", 1234)
    slurm = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "no-such-node-mmscale[1-2]"}
    info = detect(slurm)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (2, 0, 4, "slurm")
    assert info.master_addr == "127.0.0.1"  # the first node's name does not resolve
    assert info.master_port == 15000 + 4242 and detect({**slurm, "MASTER_PORT": "999"}).master_port == 999
    assert detect({**slurm, "SLURM_JOB_NODELIST": "localhost"}).master_addr == "localhost"
    assert detect({}).world_size == 1 and detect({}).launcher == "none"


# ----------------------------------------------------------------------------------------------
# real entry points on a real prepared dataset

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from tests._data_helpers import make_tiny_dataset
    return make_tiny_dataset(tmp_path_factory.mktemp("train_data"), n_ctx=16, vocab_size=512, stories=120)


def _real_config(tmp_path, dataset, run_name, **extra):
    cfg = tiny_config(tmp_path / run_name, **{"model.vocab_size": 512, "data.train": str(dataset), **extra})
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    return path


def test_mismatched_dataset_refused(tmp_path, tiny_dataset):
    cfg = _real_config(tmp_path, tiny_dataset, "r", **{"model.n_ctx": 32})
    rc, err = _cli("--config", str(cfg))
    # a configuration error (exit 2), found before the run dir or the model exist
    assert rc == 2 and len(err) == 1 and "prepared with n_ctx 16 but model.n_ctx is 32" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_entry_points_on_real_data(tmp_path, tiny_dataset):
    """`python -m mmscale.train` (1 rank) and `deepspeed mmscale/train.py` (2 ranks, ZeRO-2, bf16) then
    `torchrun mmscale/train.py` resuming it to more steps from the same run dir."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TMPDIR": str(tmp_path)}
    one = _real_config(tmp_path, tiny_dataset, "one", **{"train.max_steps": 3, "train.eval_every": 3,
                                                          "log.wandb": "offline"})
    proc = subprocess.run([sys.executable, "-m", "mmscale.train", "--config", str(one)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(tmp_path / "one") if "val_loss" in r] == [3]
    assert list((tmp_path / "one" / "wandb").rglob("offline-run-*")), "wandb offline files inside run.dir"

    two = _real_config(tmp_path, tiny_dataset, "two", **{"engine.kind": "deepspeed", "engine.precision": "bf16",
                                                          "train.max_steps": 3, "train.eval_every": 3})
    ds = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "0"]
    from tests._dist import _free_port
    ds[-1] = str(_free_port())
    proc = subprocess.run(ds + ["mmscale/train.py", "--config", str(two)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = ckpt.read_meta(tmp_path / "two" / "checkpoints" / "step_00000003")
    assert (meta["engine"], meta["zero_stage"], meta["world_size"], meta["precision"]) == ("deepspeed", 2, 2, "bf16")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "mmscale/train.py", "--config", str(two), "train.max_steps=5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = read_losses(tmp_path / "two")
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(0 < v < 10 for v in losses.values())
    assert ckpt.read_meta(tmp_path / "two" / "checkpoints" / "step_00000005")["tokens_seen"] == 5 * 2 * 2 * 16


def test_one_process_fsdp_and_deepspeed_match_single_and_leave_no_env(tmp_path):
    """`mmscale train` with engine.kind=fsdp / deepspeed on one process: a private rendezvous, the same
    losses as the single engine, and no RANK/WORLD_SIZE left behind for the next run."""
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    runs = [{"config": tiny_config(tmp_path / kind, **{"engine.kind": kind, "train.max_steps": 3})}
            for kind in ("single", "fsdp", "deepspeed")]
    assert train_runs({"runs": runs}) == [0, 0, 0]
    reference = read_losses(tmp_path / "single")
    for kind in ("fsdp", "deepspeed"):
        got = read_losses(tmp_path / kind)
        assert got.keys() == reference.keys()
        assert all(abs(got[s] - reference[s]) <= 1e-5 * reference[s] for s in got), kind
    assert {k: os.environ.get(k) for k in before} == before


def test_dataset_without_val_split(tmp_path):
    """No val split: data.val naming it is refused up front; as data.train, training runs without val_loss."""
    from tests._data_helpers import make_tiny_dataset

    data = make_tiny_dataset(tmp_path, n_ctx=16, vocab_size=512, stories=60, val_fraction=0.0, name="noval")
    cfg = _real_config(tmp_path, data, "r", **{"train.max_steps": 2, "train.eval_every": 1})
    rc, err = _cli("--config", str(cfg), f"data.val={data}")
    assert rc == 1 and err == [f"mmscale train: error: data.val '{data}' has no val samples; "
                               "prepare it with --val-fraction > 0"]
    assert not (tmp_path / "r" / "checkpoints").exists()
    rc, err = _cli("--config", str(cfg), "log.progress=false")
    assert rc == 0 and any("has no val split" in line for line in err)
    assert not [r for r in _rows(tmp_path / "r") if "val_loss" in r]
