"""FSDP2 shards of the token-mixing weights (issue 24, item 3): flattened to [heads * k * T, T] rows before sharding,
so each rank holds ceil(rows / ranks) rows for any rank count (before: with n_ctx not a multiple of the rank count,
every rank held the whole T x T matrix). Same math as one process, and checkpoints stay [heads, k, T, T]: those
written before the change (rows or dim-0 placement) resume, and a checkpoint of 2 ranks resumes on 3 and back.

The ranks run in float64 with plain AdamW; the reference is one plain process on the same inputs."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from mmscale.config import ModelConfig
from mmscale.models import TokenMixer, build_model
from tests._dist import run_distributed

os.environ.setdefault("OMP_NUM_THREADS", "1")

CFGS = {"flat": dict(d_model=32, n_layers=2, n_ctx=16, vocab_size=64, heads=1),
        "multihead": dict(d_model=32, n_layers=2, n_ctx=16, vocab_size=64, heads=2, mixer="multihead", kernel_size=3)}
LR = 1e-2


def _model(name):
    return build_model(ModelConfig(**CFGS[name])).double()


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)


def _reference(tmp_path, name):
    """init.pt (the starting weights), inputs.pt, after.pt (loss, grads, weights and Adam moments after one step)."""
    torch.manual_seed(0)
    model = _model(name)
    ids = torch.randint(0, 64, (3, 16))
    labels = torch.cat([ids, torch.randint(0, 64, (3, 1))], 1)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / f"{name}_init.pt")
    torch.save({"ids": ids, "labels": labels}, tmp_path / f"{name}_inputs.pt")
    opt = _optimizer(model)
    loss = model(ids, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    names = {p: n for n, p in model.named_parameters()}
    moments = {f"{names[p]}.{k}": v.clone() for p, st in opt.state.items() for k, v in st.items() if k != "step"}
    torch.save({"loss": loss.item(), "grads": grads, "weights": model.state_dict(), "moments": moments},
               tmp_path / f"{name}_after.pt")


# ----------------------------------------------------------------------------------------------
# on the ranks (tests._dist runs these under torchrun)

def _old_placement(shard_size):
    """mmscale's placement before the flattening: rows (dim 2) of [heads, k, T, T] when the ranks divide T, else
    dim 0 (FSDP2 then pads every rank to the whole first chunk)."""
    from torch.distributed.tensor import Shard

    def place(p):
        return Shard(2) if p.dim() == 4 and p.shape[2] % shard_size == 0 else Shard(0)
    return place


def _shard(model, world, layout):
    from torch.distributed.fsdp import fully_shard

    from mmscale.engines.fsdp import build_mesh, shard_with_fsdp

    mesh = build_mesh(world, 1, "cpu")
    if layout == "new":
        return shard_with_fsdp(model, mesh, "fp32")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, shard_placement_fn=_old_placement(world))
    return fully_shard(model, mesh=mesh, shard_placement_fn=_old_placement(world))


def _mixing_storage(model):
    """{name: [elements FSDP2 stores on this rank (padded), rows of the unpadded local shard]} per mixing weight."""
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for mod in model.modules():
        state = mod._get_fsdp_state() if hasattr(mod, "_get_fsdp_state") else None
        for fp in (state._fsdp_param_group.fsdp_params if state and state._fsdp_param_group else []):
            m = fp._module_info.module
            if isinstance(m, TokenMixer) and fp._module_info.param_name == "weight":
                out[f"{names[m]}.weight"] = [fp._sharded_param_data.numel(), m.weight.to_local().shape[0]]
    return out


def _full(t, shape):
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.reshape(shape)


def _diffs(model, opt, after):
    """Largest |difference| of the weights and Adam moments (gathered, 4-D) from the reference's after one step."""
    names = {p: n for n, p in model.named_parameters()}
    w = max((_full(p.detach(), after["weights"][n].shape) - after["weights"][n]).abs().max().item()
            for n, p in model.named_parameters())
    ref = after["moments"]
    m = max((_full(v, ref[f"{names[p]}.{k}"].shape) - ref[f"{names[p]}.{k}"]).abs().max().item()
            for p, st in opt.state.items() for k, v in st.items() if k != "step")
    return w, m


def ranks(payload):
    import torch.distributed as dist

    from mmscale.engines.fsdp import load_sharded, save_sharded

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.set_num_threads(1)
    root = payload["root"]
    out = []
    for job in payload["jobs"]:
        name = job["cfg"]
        model = _model(name)
        model.load_state_dict(torch.load(f"{root}/{name}_init.pt"))
        model = _shard(model, world, job.get("layout", "new"))
        opt = _optimizer(model)
        after = torch.load(f"{root}/{name}_after.pt")
        res = {"storage": _mixing_storage(model)}
        if job["do"] == "train":
            inputs = torch.load(f"{root}/{name}_inputs.pt")
            loss = model(inputs["ids"], labels=inputs["labels"])  # every rank the whole batch: mean grads = one's
            loss.backward()
            res["loss"] = loss.item() - after["loss"]
            res["grad"] = max((_full(p.grad, after["grads"][n].shape) - after["grads"][n]).abs().max().item()
                              for n, p in model.named_parameters())
            opt.step()
            res["weights"], res["moments"] = _diffs(model, opt, after)
            if job["layout"] == "new":
                save_sharded(model, opt, Path(root) / job["save"])
            else:  # what FSDPEngine.save wrote before the flattening
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

                dcp.save(get_model_state_dict(model), checkpoint_id=f"{root}/{job['save']}/model")
                dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=f"{root}/{job['save']}/optimizer")
        else:
            load_sharded(model, opt, Path(root) / job["load"])
            res["weights"], res["moments"] = _diffs(model, opt, after)
        out.append(res)
    dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------------------------

def _rows(name):
    c = CFGS[name]
    return c.get("heads", 1) * c.get("kernel_size", 1) * c["n_ctx"]


def _check_storage(res, name, world):
    """Each rank stores at most ceil(rows / world) rows of T (FSDP2's padding included); together all rows."""
    T, rows = CFGS[name]["n_ctx"], _rows(name)
    per_rank = [r["storage"] for r in res]
    for key in per_rank[0]:
        assert sum(s[key][1] for s in per_rank) == rows, key
        for s in per_rank:
            assert s[key][0] <= math.ceil(rows / world) * T, (name, world, key, s[key], rows)


@pytest.mark.distributed
def test_three_ranks_compute_what_one_process_does_and_each_holds_a_third(tmp_path):
    for name in CFGS:
        _reference(tmp_path, name)
    jobs = [{"do": "train", "cfg": name, "layout": "new", "save": f"{name}3"} for name in CFGS]
    jobs.append({"do": "train", "cfg": "flat", "layout": "old", "save": "old3"})  # the placement before
    res = run_distributed("tests.test_fsdp_shards:ranks", {"root": str(tmp_path), "jobs": jobs}, nproc=3)
    for i, name in enumerate(CFGS):
        per_job = [r[i] for r in res]
        for r in per_job:
            assert abs(r["loss"]) < 1e-12 and r["grad"] < 1e-12, (name, r)
            assert r["weights"] < 1e-12 and r["moments"] < 1e-12, (name, r)
        _check_storage(per_job, name, 3)
    # the old placement on 3 ranks (16 rows of 16: dim 0 of [1, 1, 16, 16]) stored the whole matrix on every rank
    old = [r[2]["storage"] for r in res]
    assert all(s[k][0] == 16 * 16 for s in old for k in s) and len(old[0]) == CFGS["flat"]["n_layers"]


def test_the_flattened_view_is_the_same_weight_and_math():
    torch.manual_seed(1)
    for name in CFGS:
        model = _model(name)
        ids = torch.randint(0, 64, (2, 16))
        want = model(ids)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 4}
        from mmscale.engines.fsdp import flatten_mixing_weights

        got_shapes = flatten_mixing_weights(model)
        assert got_shapes == shapes and shapes
        for n, p in model.named_parameters():
            if n in shapes:
                assert p.shape == (shapes[n][0] * shapes[n][1] * shapes[n][2], shapes[n][3])
        assert torch.equal(model(ids), want)


@pytest.mark.slow  # three launches: ~45 s on 2 loaded cores
@pytest.mark.distributed
def test_checkpoints_of_either_layout_resume_on_another_rank_count(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from mmscale.engines.fsdp import FSDPEngine

    _reference(tmp_path, "flat")
    run = lambda jobs, n: run_distributed("tests.test_fsdp_shards:ranks",  # noqa: E731
                                          {"root": str(tmp_path), "jobs": jobs}, nproc=n)
    two = run([{"do": "train", "cfg": "flat", "layout": "new", "save": "new2"},
               {"do": "train", "cfg": "flat", "layout": "old", "save": "old2"}], 2)  # old: rows (Shard(2))
    three = run([{"do": "train", "cfg": "flat", "layout": "new", "save": "new3"},
                 {"do": "train", "cfg": "flat", "layout": "old", "save": "old3"},  # old: dim 0, padded
                 {"do": "load", "cfg": "flat", "load": "new2"},
                 {"do": "load", "cfg": "flat", "load": "old2"}], 3)
    back = run([{"do": "load", "cfg": "flat", "load": "new3"}, {"do": "load", "cfg": "flat", "load": "old3"}], 2)
    for r in two + three + back:
        for job in r:
            assert job["weights"] < 1e-12 and job["moments"] < 1e-12, job
    _check_storage([r[2] for r in three], "flat", 3)
    # what users and `mmscale convert` read: the [heads, k, T, T] layout, as before
    after = torch.load(tmp_path / "flat_after.pt")
    for folder in ("new2", "new3"):
        dcp_to_torch_save(str(tmp_path / folder / "model"), str(tmp_path / f"{folder}.pt"))
        saved = torch.load(tmp_path / f"{folder}.pt")
        assert set(saved) == set(after["weights"])
        for k, v in after["weights"].items():
            assert saved[k].shape == v.shape and torch.allclose(saved[k], v, rtol=0, atol=1e-12), (folder, k)
        read = dict(FSDPEngine.read_state(tmp_path / folder, {}, ModelConfig(**CFGS["flat"])))
        for k, v in after["weights"].items():
            assert read[k].shape == v.shape and torch.allclose(read[k].double(), v, atol=1e-6), (folder, k)
