"""Retrieval: the InfoNCE loss, the pair groups, top-1 evaluation, fine-tuning of a tiny pretrained
mixer on the built-in story pairs, and the same training under DeepSpeed and FSDP2 on 2 ranks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmscale.cli import main as cli_main
from mmscale.config import config_from_dict
from mmscale.errors import UserError
from mmscale.retrieval.collection import read_pairs
from mmscale.retrieval.evaluate import top1_table
from mmscale.retrieval.loss import info_nce
from mmscale.retrieval.pairs import PairGroups
from tests._dist import run_distributed


# ---------------------------------------------------------------------------------------------
# pieces, against references computed another way

def test_info_nce_matches_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, G, d, tau = 3, 5, 8, 0.07
    emb = F.normalize(torch.randn(B * G, d, generator=g, dtype=torch.float64), dim=-1)
    total = 0.0
    for b in range(B):
        q, cands = emb[b * G], emb[b * G + 1:(b + 1) * G]
        s = [float(q @ c) / tau for c in cands]
        total += -(s[0] - math.log(sum(math.exp(x) for x in s)))
    assert float(info_nce(emb.float(), G, tau)) == pytest.approx(total / B, rel=1e-5)
    # with gathered negatives (one process): every group's candidates are candidates of every query
    total = 0.0
    allc = torch.cat([emb[b * G + 1:(b + 1) * G] for b in range(B)])
    for b in range(B):
        s = (allc @ emb[b * G] / tau).tolist()
        total += -(s[b * (G - 1)] - math.log(sum(math.exp(x) for x in s)))
    assert float(info_nce(emb.float(), G, tau, gather=True)) == pytest.approx(total / B, rel=1e-5)


def test_top1_table_matches_naive_count():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    p = (q + rng.normal(scale=1.5, size=q.shape)).astype(np.float32)
    got = top1_table(q, p, [5, 40], seed=3, chunk=7)
    for row, n in zip(got, [5, 40]):
        # the same distractors, drawn query by query in order, then ranked by hand
        r = np.random.default_rng([3, n])
        hits, rr = 0, 0.0
        for i in range(40):
            d = r.choice(39, n - 1, replace=False)
            d = [j + 1 if j >= i else j for j in d]
            true = float(q[i] @ p[i])
            rank = 1 + sum(float(q[i] @ p[j]) >= true for j in d)
            hits += rank == 1
            rr += 1 / rank
        assert row["top1"] == pytest.approx(hits / 40) and row["mrr"] == pytest.approx(rr / 40)
    assert got[1]["top1"] == pytest.approx(np.mean([(q[i] @ p[i]) > max(q[i] @ p[j] for j in range(40) if j != i)
                                                    for i in range(40)]))
    with pytest.raises(UserError, match="held-out passages"):
        top1_table(q, p, [41])


def test_read_pairs_errors(tmp_path):
    cases = {'{"query": "a"}\n{"query": "b", "passage": "c"}\n': ":1 has no non-empty string field \"passage\"",
             '{"query": "a", "passage": "b"}\nnot json\n': ":2 is not valid JSON",
             '{"query": "a", "passage": "b", "negatives": "x"}\n{"query": "a", "passage": "b"}\n': "negatives",
             '{"query": "a", "passage": "b"}\n': "at least 2"}
    for i, (text, needle) in enumerate(cases.items()):
        f = tmp_path / f"p{i}.jsonl"
        f.write_text(text)
        with pytest.raises(UserError, match=needle.replace('"', '.')):
            read_pairs(f)


def _groups(rank, world, mb, seed=5):
    n = 20
    q = [[100 + i] for i in range(n)]
    p = [[200 + i, 7] for i in range(n)]
    negs = [[[300 + i]] if i % 3 == 0 else [] for i in range(n)]
    return PairGroups(q, p, negs, group_size=4, micro_batch=mb, n_ctx=6, seed=seed, rank=rank, world=world)


def test_pair_groups_layout_sharding_and_resume():
    one = _groups(0, 1, 4)
    b = one.batch_at(0)
    # labels: 16 lengths, then the packed [4, 3] mask of relevant candidates (one 32-bit word per query)
    assert b["input_ids"].shape == (16, 6) and b["labels"].shape == (16 + 4,)
    assert torch.equal(b["labels"][:16], (b["input_ids"] != 0).sum(1)) and not b["labels"][16:].any()
    for grp in b["input_ids"].view(4, 4, 6):
        i = int(grp[0, 0]) - 100
        assert grp[1, :2].tolist() == [200 + i, 7]                       # its own passage second
        if i % 3 == 0:
            assert grp[2, 0] == 300 + i                                  # given negatives first
        others = [int(x) for x in grp[2 + (i % 3 == 0):, 0]]
        assert all(200 <= x < 220 and x != 200 + i for x in others)      # then other passages
    # 2 ranks with half the micro-batch see exactly the same global batches
    halves = [_groups(r, 2, 2) for r in range(2)]
    for k in range(7):  # crosses an epoch (20 pairs / 4 per batch)
        both = torch.cat([h.batch_at(k)["input_ids"] for h in halves])
        assert torch.equal(both, one.batch_at(k)["input_ids"])
    # resume onto another world size continues the same stream
    it = iter(one)
    for _ in range(3):
        next(it)
    r1 = _groups(1, 2, 2)
    r1.load_state_dict(one.state_dict())
    assert torch.equal(next(iter(r1))["input_ids"], one.batch_at(3)["input_ids"][8:])


# ---------------------------------------------------------------------------------------------
# fine-tuning a tiny pretrained mixer on the built-in pairs

N_CTX, VOCAB, STORIES, HELD_OUT = 64, 512, 3000, 200


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny mixer pre-trained briefly on built-in stories, its export, and train/test pair files."""
    from mmscale.export.convert import convert
    from mmscale.run.train import train
    from tests._data_helpers import make_tiny_corpus, make_tiny_dataset

    root = tmp_path_factory.mktemp("retrieval")
    data = make_tiny_dataset(root, n_ctx=N_CTX, vocab_size=VOCAB, stories=STORIES)
    text, _ = make_tiny_corpus(STORIES, 0, VOCAB)
    pairs = (text.parent / "pairs.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(pairs[:-HELD_OUT]) + "\n")
    (root / "test.jsonl").write_text("\n".join(pairs[-HELD_OUT:]) + "\n")
    cfg = config_from_dict({
        "model": {"kind": "mixer", "d_model": 64, "n_layers": 2, "n_ctx": N_CTX, "vocab_size": VOCAB},
        "data": {"train": str(data)}, "engine": {"kind": "single", "precision": "fp32"},
        "train": {"max_steps": 400, "micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 10, "eval_every": 0},
        "checkpoint": {"every": 0}, "run": {"dir": str(root / "pre")}, "log": {"wandb": "disabled", "progress": False}})
    assert train(cfg) == 0
    convert(root / "pre", root / "pre_export", progress=False)
    return root


def retrieval_config(root: Path, run: str, **over) -> dict:
    tree = {"engine": {"kind": "single", "precision": "fp32"},
            "train": {"max_steps": 400, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 10, "eval_every": 0},
            "retrieval": {"group_size": 8, "temperature": 0.05, "gather_negatives": True},
            "checkpoint": {"every": 0}, "run": {"dir": str(root / run), "seed": 3},
            "log": {"wandb": "disabled", "progress": False}}
    for key, value in over.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


@pytest.mark.slow
def test_finetuned_tiny_mixer_retrieves_held_out_stories(pretrained, tmp_path, capsys):
    from mmscale.export.convert import convert
    from mmscale.retrieval.train import prepare_config, train_retrieval

    root = pretrained
    before = tmp_path / "before.json"
    assert cli_main(["retrieval", "eval", str(root / "pre_export"), "--pairs", str(root / "test.jsonl"),
                     "--candidates", "32", "--json", str(before)]) == 0
    cfg = prepare_config(config_from_dict(retrieval_config(root, "ret")), str(root / "pre_export"),
                         str(root / "train.jsonl"))
    assert train_retrieval(cfg) == 0
    convert(root / "ret", root / "ret_export", progress=False)
    after = tmp_path / "after.json"
    assert cli_main(["retrieval", "eval", str(root / "ret_export"), "--pairs", str(root / "test.jsonl"),
                     "--candidates", "32,64", "--json", str(after)]) == 0
    table = capsys.readouterr().out
    assert "candidates" in table and "MRR" in table
    top1 = {r["candidates"]: r["top1"] for r in json.loads(after.read_text())["results"]}
    chance = json.loads(before.read_text())["results"][0]["top1"]
    assert top1[32] >= 0.3, top1            # chance is 1/32 = 0.031
    assert top1[32] >= chance + 0.2 and top1[64] <= top1[32] + 0.05
    # the export of a retrieval run is an ordinary export: the LM head stayed the pre-trained one
    from safetensors.torch import load_file
    pre, ret = (load_file(str(root / e / "model.safetensors")) for e in ("pre_export", "ret_export"))
    assert torch.equal(pre["lm_head.weight"], ret["lm_head.weight"])
    assert not torch.equal(pre["embed.weight"], ret["embed.weight"])


def test_eval_bad_input(pretrained, tmp_path, capsys):
    root = pretrained
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q"}\n')
    out = tmp_path / "o.json"
    cases = [(["--pairs", str(root / "test.jsonl"), "--candidates", str(HELD_OUT + 1)], "held-out passages"),
             (["--pairs", str(bad)], "passage"),
             (["--pairs", str(root / "test.jsonl"), "--candidates", "a,b"], "comma-separated")]
    for extra, needle in cases:
        assert cli_main(["retrieval", "eval", str(root / "pre_export"), *extra, "--json", str(out)]) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    out.write_text("keep")
    assert cli_main(["retrieval", "eval", str(root / "pre_export"), "--pairs", str(root / "test.jsonl"),
                     "--json", str(out)]) != 0
    assert out.read_text() == "keep"
    assert cli_main(["retrieval", "train", "--init", str(root / "pre_export"), "--pairs", str(bad),
                     f"run.dir={tmp_path / 'r'}"]) != 0
    assert ":1 has no" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 2 ranks: DeepSpeed and FSDP2 give the single-process loss, checkpoints resume exactly

def retrieval_runs(payload: dict) -> list:
    """Worker target: several retrieval trainings one after the other in the same ranks."""
    from mmscale.retrieval.train import prepare_config, train_retrieval
    from mmscale.run.checkpoint import resolve_resume

    statuses = []
    for run in payload["runs"]:
        cfg = prepare_config(config_from_dict(run), None, None)
        resumes = resolve_resume(cfg) is not None
        statuses.append(train_retrieval(cfg) if not resumes else [train_retrieval(cfg), "resumed"])
    return statuses


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


@pytest.mark.distributed
def test_two_ranks_deepspeed_and_fsdp_match_single_and_resume(pretrained, tmp_path):
    from mmscale.export.convert import convert
    from mmscale.retrieval.train import prepare_config, train_retrieval

    root = pretrained
    # without gathered negatives the 2-rank gradient is exactly the single-process one
    common = {"train.micro_batch_size": 2, "train.init_from": str(root / "pre_export"),
              "retrieval.pairs": str(root / "train.jsonl"), "checkpoint.every": 2,
              "retrieval.gather_negatives": False}
    engines = {"fsdp": {"engine.kind": "fsdp"}, "ds": {"engine.kind": "deepspeed", "engine.zero_stage": 2}}
    gather = {**common, "retrieval.gather_negatives": True, "train.max_steps": 1, "engine.kind": "fsdp"}
    # 2 steps on both engines, then each resumes to step 4; further runs get launches of their own
    # (some sequences of several runs in the same processes hang at the next start: see the report)
    # (a fresh launch per run: an FSDP run followed by a DeepSpeed one in the same processes hung in CI)
    for name, eng in engines.items():
        first = [retrieval_config(tmp_path, name, **common, **eng, **{"train.max_steps": 2})]
        assert run_distributed("tests.test_retrieval:retrieval_runs", {"runs": first}, nproc=2, timeout=120) == \
            [[0]] * 2
    for name, eng in engines.items():
        runs = [retrieval_config(tmp_path, name, **common, **eng, **{"train.max_steps": 4})]
        assert run_distributed("tests.test_retrieval:retrieval_runs", {"runs": runs}, nproc=2, timeout=120) == \
            [[[0, "resumed"]]] * 2
    runs = [retrieval_config(tmp_path, "gather", **gather)]
    assert run_distributed("tests.test_retrieval:retrieval_runs", {"runs": runs}, nproc=2, timeout=120) == [[0]] * 2
    # one process with the whole global batch, uninterrupted
    single = retrieval_config(tmp_path, "single", **{**common, "train.micro_batch_size": 4, "train.max_steps": 4})
    assert train_retrieval(prepare_config(config_from_dict(single), None, None)) == 0
    ref = _losses(tmp_path / "single")
    for name in engines:
        got = _losses(tmp_path / name)
        assert [got[s] for s in (1, 2, 3, 4)] == pytest.approx([ref[s] for s in (1, 2, 3, 4)], rel=1e-4), name
    # with gathered negatives: each query scores all 2 x 2 groups' candidates, as one process does
    single_gather = retrieval_config(tmp_path, "single_gather", **{**gather, "train.micro_batch_size": 4,
                                                                    "engine.kind": "single"})
    assert train_retrieval(prepare_config(config_from_dict(single_gather), None, None)) == 0
    assert _losses(tmp_path / "gather")[1] == pytest.approx(_losses(tmp_path / "single_gather")[1], rel=1e-5)
    assert _losses(tmp_path / "gather")[1] != pytest.approx(ref[1], rel=1e-2)
    # a 2-rank retrieval checkpoint (frozen LM head under ZeRO-2) converts like any other
    summary = convert(tmp_path / "ds", tmp_path / "ds_export", progress=False)
    assert summary["steps"] == 4 and (tmp_path / "ds_export" / "tokenizer.model").is_file()
    from safetensors.torch import load_file
    pre, ret = (load_file(str(p)) for p in (root / "pre_export" / "model.safetensors",
                                            tmp_path / "ds_export" / "model.safetensors"))
    assert torch.equal(pre["lm_head.weight"], ret["lm_head.weight"])
