"""Elastic resume: a checkpoint written by 2 ranks resumes on 1, and one written by 1 resumes on 2 (SLURM requeues
onto other node counts), for DeepSpeed ZeRO-0/1/2/3 and FSDP2. The global batch is fixed, so the resumed run sees
exactly the samples the uninterrupted run saw, and its losses continue the uninterrupted run's within fp32
reduction-order noise (the reference is the uninterrupted run on the *checkpoint's* world size)."""
from __future__ import annotations

import os

import pytest

from mmscale.run import checkpoint as ckpt
from tests._dist import read_losses, run_distributed, tiny_config

os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS, CUT = 6, 3
ENGINES = {"zero0": {"engine.kind": "deepspeed", "engine.zero_stage": 0},
           "zero1": {"engine.kind": "deepspeed", "engine.zero_stage": 1},
           "zero2": {"engine.kind": "deepspeed", "engine.zero_stage": 2},
           "zero3": {"engine.kind": "deepspeed", "engine.zero_stage": 3},
           "fsdp": {"engine.kind": "fsdp"}}
COMMON = {"train.max_steps": STEPS, "train.global_batch_size": 4, "train.micro_batch_size": 2}


def _full(root, name, ranks):
    return {"config": tiny_config(root / f"{name}_full{ranks}", **{**COMMON, **ENGINES[name], "checkpoint.every": CUT})}


def _resumed(root, name, src_ranks):
    src = root / f"{name}_full{src_ranks}" / "checkpoints" / ckpt.step_dir_name(CUT)
    return {"config": tiny_config(root / f"{name}_from{src_ranks}", **{**COMMON, **ENGINES[name], "run.resume": str(src)})}


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_onto_another_world_size_continues_the_losses(tmp_path):
    names = list(ENGINES)
    one = run_distributed("tests._dist:train_runs", {"runs": [_full(tmp_path, n, 1) for n in names]}, nproc=1)
    assert one == [[0] * len(names)]
    two = run_distributed("tests._dist:train_runs", {"runs": [_full(tmp_path, n, 2) for n in names]
                                                     + [_resumed(tmp_path, n, 1) for n in names]}, nproc=2)
    assert two == [[0] * 2 * len(names)] * 2
    back = run_distributed("tests._dist:train_runs", {"runs": [_resumed(tmp_path, n, 2) for n in names]}, nproc=1)
    assert back == [[0] * len(names)]
    for name in names:
        for src, dst in ((2, 1), (1, 2)):
            full, resumed = read_losses(tmp_path / f"{name}_full{src}"), read_losses(tmp_path / f"{name}_from{src}")
            assert sorted(resumed) == list(range(CUT + 1, STEPS + 1)), (name, src, resumed)
            for step, loss in resumed.items():
                assert abs(loss - full[step]) <= 1e-5 * abs(full[step]), (name, f"{src} -> {dst} ranks", step, loss,
                                                                         full[step])
        # the step folder resharded from is untouched and no work folder is left behind
        for src in (1, 2):
            root = tmp_path / f"{name}_full{src}" / "checkpoints"
            assert ckpt.verify(root / ckpt.step_dir_name(CUT)) is None
            assert not [p.name for p in root.iterdir() if p.name.startswith(".reshard")]


@pytest.mark.slow
@pytest.mark.distributed
def test_resharding_reads_the_checkpoint_under_the_allow_list(tmp_path):
    """DeepSpeed's converter unpickles every file of the step folder: a planted payload is refused in one line and
    never runs, as on a same-size resume; the step folder is untouched and no work folder stays."""
    from tests._dist import train_runs
    from tests.test_checkpoint_damage import _plant_torch, _reseal

    cfg = tiny_config(tmp_path / "src", **{**COMMON, **ENGINES["zero2"], "train.max_steps": 1})
    assert run_distributed("tests._dist:train_runs", {"runs": [{"config": cfg}]}, nproc=2) == [[0], [0]]
    step = tmp_path / "src" / "checkpoints" / ckpt.step_dir_name(1)
    marker = tmp_path / "PWNED"
    _plant_torch(step / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    _reseal(step)
    resumed = tiny_config(tmp_path / "dst", **{**COMMON, **ENGINES["zero2"], "run.resume": str(step)})
    (status,) = train_runs({"runs": [{"config": resumed}]})
    assert not marker.exists()
    assert isinstance(status, str) and "allow-list" in status and "\n" not in status, status
    assert ckpt.verify(step) is None
    assert not list((tmp_path / "dst").rglob(".reshard*"))
