"""Checkpoints: layout, atomic save and retention, refusals, and bit-exact resume for every engine."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from mmscale.run import checkpoint as ckpt
from mmscale.config import config_from_dict
from mmscale.errors import UserError
from tests._dist import read_losses, run_distributed, tiny_config, train_runs

os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS, CUT = 6, 3


def _resume_pair(tmp_path, name, overrides):
    """An uninterrupted run saving at CUT, and a run resuming from that checkpoint in another dir."""
    full = tiny_config(tmp_path / f"{name}_full", **{"train.max_steps": STEPS, "checkpoint.every": CUT, **overrides})
    resumed = tiny_config(tmp_path / f"{name}_resumed", **{
        "train.max_steps": STEPS, "run.resume": str(tmp_path / f"{name}_full" / "checkpoints" / ckpt.step_dir_name(CUT)),
        **overrides})
    return [{"config": full}, {"config": resumed}]


def _assert_exact(tmp_path, name):
    full = read_losses(tmp_path / f"{name}_full")
    resumed = read_losses(tmp_path / f"{name}_resumed")
    assert sorted(resumed) == list(range(CUT + 1, STEPS + 1)), name
    for step in resumed:
        assert resumed[step] == full[step], f"{name}: step {step}: resumed {resumed[step]} != {full[step]}"


def test_single_resume_is_bit_identical_fp32_and_bf16(tmp_path):
    runs = []
    for precision in ("fp32", "bf16"):
        runs += _resume_pair(tmp_path, f"single_{precision}", {"engine.precision": precision, "train.grad_accum": 2})
    assert train_runs({"runs": runs}) == [0] * len(runs)
    for precision in ("fp32", "bf16"):
        _assert_exact(tmp_path, f"single_{precision}")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_resume_is_bit_identical_every_engine(tmp_path):
    engines = {"ddp": {"engine.kind": "ddp"},
               "zero1": {"engine.kind": "deepspeed", "engine.zero_stage": 1},
               "zero2": {"engine.kind": "deepspeed", "engine.zero_stage": 2},
               "zero3": {"engine.kind": "deepspeed", "engine.zero_stage": 3},
               "fsdp": {"engine.kind": "fsdp"}}
    runs, names = [], []
    for precision in ("fp32", "bf16"):
        for engine, ov in engines.items():
            name = f"{engine}_{precision}"
            names.append(name)
            runs += _resume_pair(tmp_path, name, {**ov, "engine.precision": precision})
    statuses = run_distributed("tests._dist:train_runs", {"runs": runs}, timeout=600)
    assert statuses == [[0] * len(runs)] * 2
    for name in names:
        _assert_exact(tmp_path, name)
    # the layout promised in run/checkpoint.py
    meta = ckpt.read_meta(tmp_path / "zero3_bf16_full" / "checkpoints" / ckpt.step_dir_name(STEPS))
    assert (meta["engine"], meta["zero_stage"], meta["precision"], meta["world_size"]) == ("deepspeed", 3, "bf16", 2)
    assert meta["model_format"] == "deepspeed" and meta["model_files"] == ["ds"] and meta["step"] == STEPS
    assert meta["rank_files"] == ["rank_00000.pt", "rank_00001.pt"]
    assert meta["tokens_seen"] == STEPS * 2 * 2 * 16
    fsdp_meta = ckpt.read_meta(tmp_path / "fsdp_fp32_full" / "checkpoints" / ckpt.step_dir_name(STEPS))
    assert fsdp_meta["model_format"] == "dcp" and fsdp_meta["model_files"] == ["model"]


def test_checkpoints_convert_without_a_process_group(tmp_path):
    """The consolidated weights of a DeepSpeed (ZeRO-3) and an FSDP2 checkpoint, read as run/checkpoint.py
    documents, equal those of a single-process run of the same steps (fp32)."""
    pytest.importorskip("deepspeed")
    from tests._dist import run_distributed

    runs = [{"config": tiny_config(tmp_path / "z3", **{"engine.kind": "deepspeed", "engine.zero_stage": 3,
                                                       "train.max_steps": 2})},
            {"config": tiny_config(tmp_path / "fsdp", **{"engine.kind": "fsdp", "train.max_steps": 2})}]
    run_distributed("tests._dist:train_runs", {"runs": runs})
    train_runs({"runs": [{"config": tiny_config(tmp_path / "single", **{"train.max_steps": 2,
                                                                        "train.micro_batch_size": 4})}]})
    step = ckpt.step_dir_name(2)
    reference = torch.load(tmp_path / "single" / "checkpoints" / step / "model.pt")

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ds_sd = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "z3" / "checkpoints" / step), tag="ds")
    dcp_to_torch_save(str(tmp_path / "fsdp" / "checkpoints" / step / "model"), str(tmp_path / "fsdp.pt"))
    fsdp_sd = torch.load(tmp_path / "fsdp.pt")
    for name, sd in (("zero3", ds_sd), ("fsdp", fsdp_sd)):
        assert set(reference) - set(sd) <= {k for k in reference if "mask" in k}, name
        for key, value in sd.items():
            torch.testing.assert_close(value.float(), reference[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


# ----------------------------------------------------------------------------------------------
# layout, atomicity, retention and refusals (no training)

def _fake_save(root, step, keep=2, files=("model.pt",)):
    tmp = ckpt.prepare_tmp_dir(root, step)
    for f in files:
        (tmp / f).write_text("x")
    return ckpt.finalize(root, tmp, step, {"step": step, "model_files": list(files), "rank_files": []}, keep)


def test_atomic_save_latest_and_retention(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _fake_save(root, step)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000020", "step_00000030"]
    assert (root / "latest").read_text().strip() == "step_00000030"
    # an interrupted save (no meta.json) is never picked, and the next save removes it
    (root / ".tmp_step_00000040").mkdir()
    (root / "step_00000050").mkdir()  # renamed but without meta.json: not complete
    assert ckpt.find_latest(root).name == "step_00000030"
    _fake_save(root, 60, keep=3)
    assert not (root / ".tmp_step_00000040").exists()
    # a step saved twice is not overwritten
    first_meta = (root / "step_00000060" / "meta.json").read_text()
    _fake_save(root, 60, keep=3)
    assert (root / "step_00000060" / "meta.json").read_text() == first_meta
    meta = json.loads((root / "step_00000060" / "meta.json").read_text())
    assert meta["format"] == "mmscale-checkpoint" and meta["version"] == 1 and meta["step"] == 60
    assert meta["files"] == {"model.pt": {"size": 1, "xxh64": meta["files"]["model.pt"]["xxh64"]}}
    # ... unless it is damaged (a resume fell back past it): then it is kept aside and the new one published
    (root / "step_00000060" / "model.pt").write_text("y")
    _fake_save(root, 60, keep=3)
    assert ckpt.verify(root / "step_00000060") is None
    assert [p.name.split(".")[1] for p in root.glob(".damaged_step_00000060.*")] == ["damaged_step_00000060"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    root = tmp_path / "checkpoints"
    final = _fake_save(root, 5, files=("model.pt", "optimizer.pt"))
    (final / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="missing 'optimizer.pt'"):
        ckpt.read_meta(final)
    (final / "meta.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        ckpt.read_meta(final)
    with pytest.raises(UserError, match="no meta.json"):
        ckpt.read_meta(tmp_path)
    assert final.is_dir() and (final / "model.pt").is_file()  # nothing deleted


def test_resume_refusals(tmp_path):
    run_dir = tmp_path / "run"
    assert train_runs({"runs": [{"config": tiny_config(run_dir, **{"train.max_steps": 2})}]}) == [0]
    before = sorted(p.name for p in (run_dir / "checkpoints").rglob("*"))

    def attempt(**ov):
        return train_runs({"runs": [{"config": tiny_config(run_dir, **{"train.max_steps": 4, **ov})}]})[0]

    assert "different model (model.d_model is 32 there, 64 here)" in attempt(**{"model.d_model": 64})
    assert "engine.kind=single, this run uses engine.kind=fsdp" in attempt(**{"engine.kind": "fsdp"})
    assert "already holds checkpoints and run.resume=never" in attempt(**{"run.resume": "never"})
    assert "does not exist" in attempt(**{"run.resume": str(tmp_path / "nope")})
    # nothing was overwritten or deleted by the refused runs
    assert sorted(p.name for p in (run_dir / "checkpoints").rglob("*")) == before
    # auto resumes and continues to step 4 (the single and ddp engines share a format)
    assert attempt() == 0
    assert sorted(read_losses(run_dir)) == [1, 2, 3, 4]


def test_check_compatible_deepspeed_stage_and_precision(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, **{"engine.kind": "deepspeed", "engine.zero_stage": 2}))
    meta = {"engine": "deepspeed", "zero_stage": 2, "world_size": 2, "precision": "fp32",
            "model": cfg.to_dict()["model"]}
    ckpt.check_compatible(meta, cfg, 2, "here")
    ckpt.check_compatible(meta, cfg, 4, "here")  # another world size: resharded on load (tests/test_checkpoint_elastic.py)
    with pytest.raises(UserError, match="same ZeRO stage"):
        ckpt.check_compatible({**meta, "zero_stage": 3}, cfg, 2, "here")
    with pytest.raises(UserError, match="same precision"):
        ckpt.check_compatible({**meta, "precision": "bf16"}, cfg, 2, "here")


def test_resume_path_may_name_the_checkpoints_folder(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _fake_save(root, 7)
    cfg = config_from_dict(tiny_config(tmp_path / "other", **{"run.resume": str(root)}))
    assert ckpt.resolve_resume(cfg) == root / "step_00000007"
    shutil.rmtree(root / "step_00000007")
    cfg = config_from_dict(tiny_config(tmp_path / "run"))
    assert ckpt.resolve_resume(cfg) is None


# ----------------------------------------------------------------------------------------------
# verification that does not grow with the rank count (issue 24)

def test_each_file_is_hashed_by_one_writer_and_verified_by_its_readers():
    """On random checkpoints: at save every file has exactly one writer; at resume onto the same world size each
    rank verifies the files of the whole checkpoint and its own, onto another one each per-rank file once."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        saved, world = rng.randint(1, 9), rng.randint(1, 9)
        own = [f"rank_{r:05d}.pt" for r in range(saved)] + [f"model/__{r}_0.distcp" for r in range(saved)]
        own += [f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(saved)]
        shared = ["model/.metadata", "model.pt", "ds/mp_rank_00_model_states.pt"]
        files = own + shared
        rng.shuffle(files)
        # save: hand count of who writes what
        for f in files:
            want = next((r for r in range(saved) if f in (f"rank_{r:05d}.pt", f"model/__{r}_0.distcp",
                                                           f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt")), 0)
            assert ckpt.writer(f, saved) == want, f
        verified = [ckpt.reads(files, r, world, saved) for r in range(world)]
        for f in shared:
            assert all(f in v for v in verified)
        for f in own:
            by = [r for r in range(world) if f in verified[r]]
            assert len(by) == 1, (f, by)
            if world == saved:
                assert by == [ckpt.file_rank(f)]


def counted_train_runs(payload: dict) -> dict:
    """tests._dist.train_runs on this rank, recording every file fsutil.digest reads: (path, bytes, fsync)."""
    from mmscale import fsutil

    real, records = fsutil.digest, []

    def counting(path, sync=False):
        out = real(path, sync)
        records.append([str(path), out[0], bool(sync)])
        return out

    import mmscale.engines

    build, mixing = mmscale.engines.build_engine, []

    def build_and_measure(cfg, model, info, device):  # FSDP2's own storage of the [h, k, T, T] mixing weights
        engine = build(cfg, model, info, device)
        held = total = 0
        for m in engine.module().modules():
            get = getattr(m, "_get_fsdp_state", None)
            group = get()._fsdp_param_group if get is not None else None
            for fp in (group.fsdp_params if group is not None else []):
                if type(fp._module_info.module).__name__ == "TokenMixer" and fp._module_info.param_name == "weight":
                    held += fp._sharded_param_data.numel()
                    total += fp._orig_size.numel()
        mixing.append([held, total])
        return engine

    fsutil.digest = counting
    mmscale.engines.build_engine = build_and_measure
    start = fsutil.bytes_hashed()
    try:
        statuses = train_runs(payload)
    finally:
        fsutil.digest = real
        mmscale.engines.build_engine = build
    return {"statuses": statuses, "hashed": records, "bytes": fsutil.bytes_hashed() - start, "mixing": mixing}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_hash_what_they_wrote_and_verify_what_they_read(tmp_path):
    """FSDP2 on 2 ranks: at save each rank hashes (and fsyncs) exactly the files it wrote, at resume exactly the
    files it reads; bytes counted per rank equal those files' sizes; the resume stays exact."""
    runs = _resume_pair(tmp_path, "fsdp", {"engine.kind": "fsdp"})
    out = run_distributed("tests.test_checkpoint:counted_train_runs", {"runs": runs}, timeout=600)
    assert [o["statuses"] for o in out] == [[0, 0]] * 2
    _assert_exact(tmp_path, "fsdp")
    # each rank holds half of every mixing weight (FSDP2 pads uneven shards to the first chunk: it must not)
    for o in out:
        assert len(o["mixing"]) == 2 and all(total > 0 and 2 * held == total for held, total in o["mixing"])
    cut = tmp_path / "fsdp_full" / "checkpoints" / ckpt.step_dir_name(CUT)
    meta = json.loads((cut / "meta.json").read_text())
    # by hand: what FSDP2 + DCP write on each rank; rank 0 also writes DCP's .metadata
    wrote = {r: {f"model/__{r}_0.distcp", f"optimizer/__{r}_0.distcp", f"rank_{r:05d}.pt"} for r in (0, 1)}
    wrote[0] |= {"model/.metadata", "optimizer/.metadata"}
    assert set(meta["files"]) == wrote[0] | wrote[1]
    read = {r: wrote[r] | {"model/.metadata", "optimizer/.metadata"} for r in (0, 1)}
    tmp_cut = cut.parent / f".tmp_{cut.name}"
    for r, o in enumerate(out):
        at_save = {os.path.relpath(p, tmp_cut) for p, _, sync in o["hashed"] if sync and p.startswith(str(tmp_cut))}
        at_resume = [(os.path.relpath(p, cut), n) for p, n, sync in o["hashed"] if not sync and p.startswith(str(cut))]
        assert at_save == wrote[r], r
        assert sorted(f for f, _ in at_resume) == sorted(read[r]), r
        assert sum(n for _, n in at_resume) == sum(meta["files"][f]["size"] for f in read[r])
        # every byte this rank hashed in both runs: 3 saves (steps 3 and 6, and 6 again resumed) of what it
        # wrote, and one verification of what it read
        saves = sum(n for _, n, sync in o["hashed"] if sync)
        assert o["bytes"] == saves + sum(n for _, n in at_resume)
        assert sum(n for p, n, sync in o["hashed"] if sync and p.startswith(str(tmp_cut))) == sum(
            meta["files"][f]["size"] for f in wrote[r])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_fall_back_together_when_a_file_only_one_rank_reads_is_damaged(tmp_path):
    """The newest checkpoint's `model/__1_0.distcp` (rank 1's shard, same size, one byte flipped) is hashed by rank 1
    only; both ranks agree on it being damaged and resume the older one, and the steps after it are recomputed
    exactly."""
    from tests._dist import read_losses

    run = tmp_path / "run"
    first = tiny_config(run, **{"engine.kind": "fsdp", "train.max_steps": 4, "checkpoint.every": 2,
                                "checkpoint.keep": 3})
    assert run_distributed("tests._dist:train_runs", {"runs": [{"config": first}]}) == [[0], [0]]
    full = read_losses(run)
    victim = run / "checkpoints" / ckpt.step_dir_name(4) / "model" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = dict(first, train={**first["train"], "max_steps": 6})
    out = run_distributed("tests.test_checkpoint:counted_train_runs", {"runs": [{"config": again}]})
    assert [o["statuses"] for o in out] == [[0], [0]]
    losses = read_losses(run)
    assert [losses[s] for s in (3, 4)] == [full[3], full[4]] and sorted(losses) == list(range(1, 7))

    def verified(o):  # at resume: what a rank hashed before its first save (finalize later checks the old step 4)
        first_save = next(i for i, (_, _, sync) in enumerate(o["hashed"]) if sync)
        return {os.path.relpath(p, run / "checkpoints") for p, _, _ in o["hashed"][:first_save]}

    assert "step_00000004/model/__1_0.distcp" in verified(out[1])
    assert "step_00000004/model/__1_0.distcp" not in verified(out[0])
    assert "step_00000002/model/__0_0.distcp" in verified(out[0])  # then both checked the older one
    assert list((run / "checkpoints").glob(".damaged_step_00000004.*"))  # kept aside when step 4 was saved again


class _ByGetattr:
    """Pickles as getattr(obj, name), the way Python 3.12 (and Debian's 3.11.2) pickle an Enum member."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


def test_enum_members_pickled_through_getattr_load_and_other_getattr_is_refused(tmp_path):
    import pickle

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from mmscale.checkpoint_format import safe_unpickling

    ok = tmp_path / "ok.pt"
    torch.save({"zero_stage": _ByGetattr(ZeroStageEnum, "optimizer_states")}, ok)
    with safe_unpickling():
        assert torch.load(ok)["zero_stage"] is ZeroStageEnum.optimizer_states
    for i, (obj, name) in enumerate([(ZeroStageEnum, "__init__"), (ZeroStageEnum, "nope"),
                                     (torch.Size, "__init__")]):
        bad = tmp_path / f"bad{i}.pt"
        torch.save({"x": _ByGetattr(obj, name)}, bad)
        with safe_unpickling(), pytest.raises(pickle.UnpicklingError):
            torch.load(bad)
