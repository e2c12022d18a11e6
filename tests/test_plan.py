"""`mmscale plan` (mmscale/plan.py): the memory model against a hand count, against tensors a real forward
saves and a real run's checkpoint files, against DeepSpeed's own estimators; the recommendation logic; the
--json interface; bad input; and train.micro_batch_size auto on the CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mmscale import plan as pl
from mmscale.config import config_from_dict, load_config
from mmscale.errors import UserError

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_ctx=16", "model.vocab_size=64", "model.heads=2"]


def _sizes(cfg):
    s = pl.model_sizes(cfg.model)
    s["n_layers"] = cfg.model.n_layers
    s["largest_layer"] = max(s["block"], s["embedding"])
    return s


def test_model_states_match_a_hand_count_on_a_tiny_mixer():
    cfg = load_config(None, TINY)
    s = _sizes(cfg)
    d, T, V, H = 32, 16, 64, 128
    block = 2 * 2 * d + (T * T + T) + (d * H + H) + (H * d + d)  # 2 LayerNorms, mixing + bias, up, down
    assert s["block"] == block and s["total"] == V * d + 2 * block + d * V  # embedding, blocks, untied head
    N = s["total"]
    assert pl.model_states(s, {"engine": "single"}, 1, device="cpu") == {"params": 4 * N, "grads": 4 * N, "optimizer": 8 * N,
                                                           "buffers": 0}
    z2 = pl.model_states(s, {"engine": "deepspeed", "zero_stage": 2}, 3)
    per = -(-N // 3)
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (4 * N, 4 * per, 12 * per)
    z3 = pl.model_states(s, {"engine": "deepspeed", "zero_stage": 3}, 3)
    assert (z3["params"], z3["grads"], z3["optimizer"]) == (4 * per, 4 * per, 12 * per)
    f = pl.model_states(s, {"engine": "fsdp", "hsdp_replicas": 2}, 4)  # shards over 4 / 2 = 2 ranks
    assert (f["params"], f["grads"], f["optimizer"]) == (4 * (N // 2), 4 * (N // 2), 8 * (N // 2))


@pytest.mark.parametrize("stage", [2, 3])
def test_model_states_equal_deepspeeds_estimators(stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    g = torch.Generator().manual_seed(stage)
    for _ in range(20):
        N = int(torch.randint(10 ** 6, 10 ** 10, (1,), generator=g))
        largest = int(torch.randint(10 ** 5, N // 4, (1,), generator=g))
        gpn, nodes = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        s = {"total": N, "block": largest, "largest_layer": largest, "root": 0}
        m = pl.model_states(s, {"engine": "deepspeed", "zero_stage": stage}, gpn * nodes, convention="deepspeed")
        ours = m["params"] + m["grads"] + m["optimizer"] + m["buffers"]
        if stage == 2:
            _, ds = estimate_zero2_model_states_mem_needs(N, gpn, nodes, cpu_offload=False)
        else:
            _, ds, _ = estimate_zero3_model_states_mem_needs(N, largest, gpn, nodes, cpu_offload=False,
                                                             cpu_offload_params=False)
        assert abs(ours - ds) <= 1, (N, gpn, nodes, ours, ds)  # DeepSpeed truncates to an int


def _saved_bytes(model, B, T, vocab, precision) -> int:
    """Bytes of distinct storages saved for backward by one forward (parameters and their casts excluded by
    differencing two batch sizes)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(vocab, (B, T + 1), generator=torch.Generator().manual_seed(B))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids[:, :-1], ids)
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_count_matches_the_tensors_a_forward_saves(kind, precision):
    from mmscale.models import build_model

    cfg = load_config(None, [f"model.kind={kind}", "model.d_model=64", "model.n_layers=3", "model.n_ctx=32",
                             "model.vocab_size=256", "model.heads=4", f"engine.precision={precision}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    per_sample = (_saved_bytes(model, 4, 32, 256, precision) - _saved_bytes(model, 2, 32, 256, precision)) / 2
    m = cfg.model
    fp32 = precision == "fp32"
    saved_loss, _ = pl._loss_bytes(m, 1, "cpu")
    plan = pl._block_saved_bytes(m, 1, fp32) * m.n_layers + 4 * m.n_ctx * m.d_model + saved_loss
    assert abs(plan / per_sample - 1) < 0.08, (plan, per_sample)  # measured 0.7-3.6%


def test_plan_params_and_optimizer_match_a_real_runs_checkpoint_files(tmp_path):
    from mmscale.run.train import train
    from tests._dist import synthetic_data, tiny_config

    cfg = config_from_dict(tiny_config(tmp_path / "run", **{"train.max_steps": 2, "model.d_model": 64,
                                                            "model.n_ctx": 32, "model.vocab_size": 512}))
    assert train(cfg, data_factory=synthetic_data) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    files = {p.name: p.stat().st_size for p in step.iterdir()}
    mem, n = pl.layout_memory(cfg, "single", None, 1, device="cpu", sizes=None)
    weights = sum(v for k, v in files.items() if "model" in k)
    opt = sum(v for k, v in files.items() if "optim" in k)
    assert weights and opt, files
    assert abs(weights / mem["params"] - 1) < 0.05, (weights, mem["params"])
    assert abs(opt / mem["optimizer"] - 1) < 0.05, (opt, mem["optimizer"])


def _plan(overrides, **kw):
    return pl.make_plan(load_config(None, overrides), **kw)


def test_recommendation_rejects_replication_for_a_big_model_and_names_each_reason():
    big = ["model.d_model=6144", "model.n_layers=48", "model.n_ctx=1024", "model.vocab_size=32000",
           "train.micro_batch_size=auto", "train.global_batch_size=64"]  # 14.6B parameters
    p = _plan(big, gpus=8, device="h100")
    by = {r["name"]: r for r in p["layouts"]}
    assert not by["ddp"]["fits"] and "replicated" in by["ddp"]["why"]
    assert not by["ZeRO-1"]["fits"] and "whole fp32 model" in by["ZeRO-2"]["why"]
    assert by["ZeRO-3"]["fits"] and by["FSDP2"]["fits"]
    rec = p["recommended"]
    assert rec["fits"] and rec["name"] in ("ZeRO-3", "FSDP2")
    for r in p["layouts"]:
        assert r["name"] == rec["name"] or r["rejected_because"], r["name"]
        assert r["fits"] == (r["memory_per_rank_bytes"]["total"] <= p["cluster"]["usable_bytes"])
    # the recommended micro-batch is the largest dividing the per-rank batch that fits
    mb, per_rank = rec["micro_batch_size"], 64 // 8
    assert per_rank % mb == 0 and rec["grad_accum"] * mb * 8 == 64


def test_small_model_gets_ddp_and_nothing_fits_a_tiny_device_budget():
    p = _plan(TINY + ["train.micro_batch_size=2"], gpus=2, device="h100")
    assert p["recommended"]["engine"] == "ddp"
    huge = ["model.d_model=8192", "model.n_layers=96", "model.n_ctx=2048", "model.vocab_size=32000"]
    p = _plan(huge, gpus=2, device="a100-40")
    assert p["recommended"] is None and not any(r["fits"] for r in p["layouts"])


def test_activation_checkpointing_is_turned_on_only_when_needed():
    long = ["model.kind=transformer", "model.d_model=2048", "model.n_layers=24", "model.n_ctx=8192",
            "model.heads=16", "model.vocab_size=32000", "train.micro_batch_size=4"]
    p = _plan(long, gpus=8, device="h100")
    rec = p["recommended"]
    no_ac = pl.layout_memory(load_config(None, long), rec["engine"], rec["zero_stage"], 8, micro_batch=4,
                             checkpointing=False, hsdp_replicas=rec["hsdp_replicas"] or 1)[0]["total"]
    assert rec["activation_checkpointing"] == (no_ac > p["cluster"]["usable_bytes"])
    assert rec["activation_checkpointing"]  # 8k context at batch 4: activations do not fit without it
    short = _plan(TINY, gpus=8, device="h100")["recommended"]
    assert not short["activation_checkpointing"]


def test_more_nodes_add_hsdp_and_slow_communication():
    one = _plan(TINY + ["model.d_model=1024", "model.n_layers=8"], gpus=8, device="h100")
    many = _plan(TINY + ["model.d_model=1024", "model.n_layers=8"], gpus=8, nodes=4, device="h100",
                 interconnect="ib-200")
    assert any(r["hsdp_replicas"] == 4 for r in many["layouts"])
    assert not any((r["hsdp_replicas"] or 1) > 1 for r in one["layouts"])
    z3 = {p: next(r for r in x["layouts"] if r["zero_stage"] == 3) for p, x in (("one", one), ("many", many))}
    assert z3["many"]["comm_s"] > z3["one"]["comm_s"]


def test_json_interface(capsys):
    from mmscale.cli import main

    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    assert main(["plan", "--config", tiny, "--gpus", "2", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"layouts", "recommended"}
    for r in out["layouts"]:
        assert {"engine", "zero_stage", "ranks", "memory_per_rank_bytes", "fits", "why", "step_time_s",
                "tokens_per_s"} <= set(r)
        mem = r["memory_per_rank_bytes"]
        assert set(mem) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
        assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
        assert r["ranks"] == 2 and isinstance(r["fits"], bool) and r["why"]
        assert r["engine"] in ("ddp", "deepspeed", "fsdp")
        assert (r["zero_stage"] in (1, 2, 3)) == (r["engine"] == "deepspeed")
        assert r["step_time_s"] is None and r["tokens_per_s"] is None  # a CPU has no peak FLOP/s: said so
    assert out["recommended"]["engine"] in ("ddp", "deepspeed", "fsdp")
    assert main(["plan", "--gpus", "8", "--device", "h100", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in gpu["layouts"])


@pytest.mark.parametrize("argv, says", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--device", "tpu9"], "unknown --device 'tpu9'"),
    (["--gpus", "8", "--interconnect", "carrier-pigeon"], "unknown --interconnect"),
    (["--gpus", "8", "--nodes", "0"], "--nodes must be >= 1"),
    (["--gpus", "3", "train.global_batch_size=8"], "does not divide over 3 ranks"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    from mmscale.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# train.micro_batch_size: auto

def test_auto_micro_batch_in_a_real_cpu_run_keeps_the_global_batch(tmp_path):
    import yaml

    from mmscale.run.train import train
    from tests._dist import synthetic_data, tiny_config

    cfg = config_from_dict(tiny_config(tmp_path / "run", **{"train.micro_batch_size": "auto",
                                                            "train.global_batch_size": 8, "train.max_steps": 2}))
    assert train(cfg, data_factory=synthetic_data) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert resolved["micro_batch_size"] == 8 and resolved["grad_accum"] == 1  # a tiny model: all 8 fit
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r.get("event") == "micro_batch_size_auto"]
    assert len(ev) == 1 and "8 fits" in ev[0]["message"]
    assert [r["tokens"] for r in rows if "loss" in r] == [8 * 16, 16 * 16]  # the global batch every step


def test_auto_micro_batch_halves_on_out_of_memory_against_the_rss_limit():
    from mmscale.distributed import detect
    from mmscale.models import build_model

    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_ctx=256", "model.vocab_size=2048",
                             "train.micro_batch_size=auto", "train.global_batch_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    info, dev = detect(), torch.device("cpu")
    # a sample saves ~5 MiB (its fp32 logits and log-softmax: 256 x 2048 x 4 bytes each): 60 MiB of headroom
    # hold a few samples (less the first forward's one-off ~35 MiB in a fresh process), never 32
    new, line = pl.resolve_auto_micro_batch(cfg, model, info, dev, limit=pl._current_bytes(dev) + 60 * 2 ** 20)
    mb = new.train.micro_batch_size
    assert 1 <= mb <= 8 and 32 % mb == 0 and new.train.grad_accum * mb == 32
    assert "32 out of memory" in line and f"{mb} fits" in line
    tried = [int(x.split()[0]) for x in line.split("probe: ")[1].split(";")[0].split(", ")]
    assert all(b == a // 2 for a, b in zip(tried, tried[1:]))  # halving
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    with pytest.raises(UserError, match="not even one sample fits"):
        pl.resolve_auto_micro_batch(cfg, model, info, dev, limit=0)


@pytest.mark.distributed
def test_auto_micro_batch_on_two_fsdp_ranks_agrees_and_keeps_the_global_batch(tmp_path):
    import yaml

    from tests._dist import run_distributed, tiny_config

    cfg = tiny_config(tmp_path / "run", **{"engine.kind": "fsdp", "train.micro_batch_size": "auto",
                                           "train.global_batch_size": 8, "train.max_steps": 2})
    assert run_distributed("tests._dist:train_runs", {"runs": [{"config": cfg}]}) == [[0], [0]]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert (resolved["micro_batch_size"], resolved["grad_accum"]) == (4, 1)  # 8 over 2 ranks, all fit
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if "loss" in r] == [8 * 16, 16 * 16]


def test_probe_recomputes_blocks_under_activation_checkpointing_and_restores_them():
    from mmscale.models import build_model

    on = load_config(None, TINY + ["engine.activation_checkpointing=true"])
    torch.manual_seed(0)
    model = build_model(on.model)
    plain = _saved_bytes(model, 4, 16, 64, "fp32")
    with pl._checkpointed(model, on):
        recomputed = _saved_bytes(model, 4, 16, 64, "fp32")
    assert recomputed < plain  # only block inputs (and the loss) are kept
    assert all("forward" not in b.__dict__ for b in model.blocks)  # the engine applies its own checkpointing
    assert _saved_bytes(model, 4, 16, 64, "fp32") == plain
