"""`mmscale experiment`: a tiny spec end to end (sweep, equal-FLOPs runs, measures, report whose numbers are the run
dirs'), resume of an interrupted experiment, the budget rule, one-line spec errors, and a two-run SLURM array on
the local cluster (tests/test_slurm.py's fixture)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmscale import experiment as X
from mmscale.cli import main as cli_main
from mmscale.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny",
        "data": {"text": "synth", "synth_stories": 300, "vocab_size": 512, "retrieval": "synth"},
        "base": {"model.d_model": 32, "model.n_layers": 1, "model.vocab_size": 512, "train.micro_batch_size": 4,
                 "train.warmup_steps": 1, "log.wandb": "disabled", "engine.precision": "fp32"},
        "arms": {"mixer": {"model.kind": "mixer"},
                 "transformer": {"model.kind": "transformer", "model.heads": 2}},
        "axes": {"seeds": [0, 1], "n_ctx": [16]},
        "budget": {"rule": "flops", "reference_arm": "transformer", "reference_steps": 6},
        "sweep": {"lr": [1e-3, 1e-2], "steps": 2},
        "eval": {"batches": 2, "batch_size": 4, "points": 2},
        "retrieval": {"steps": 2, "group_size": 4, "candidates": [8], "micro_batch_size": 2},
        "representation": {"samples": 2, "steps": 3},
    }
    for k, v in changes.items():
        sec, _, key = k.partition("__")
        if key:
            spec[sec][key] = v
        elif v is None:
            spec.pop(sec, None)
        else:
            spec[sec] = v
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def _table(md: str, title: str) -> dict:
    """{arm: [cells]} of the table under the heading `title` in report.md."""
    part = md.split(f"### {title}", 1)[1].split("###", 1)[0]
    rows = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| arm") and "---" not in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_tiny_spec_end_to_end_and_report_numbers_are_the_run_dirs(tmp_path):
    spec_path = write_spec(tmp_path, tiny_spec())
    exp_dir = X.run_experiment(str(spec_path), str(tmp_path / "exp"), log=lambda m: None)
    plan = json.loads((exp_dir / "plan.json").read_text())
    main = [r for r in plan["runs"] if r["phase"] == "main"]
    assert len(main) == 4 and len([r for r in plan["runs"] if r["phase"] == "sweep"]) == 4
    md = (exp_dir / "report" / "report.md").read_text()
    assert (exp_dir / "report" / "report.html").stat().st_size > 1000
    assert list((exp_dir / "report").glob("loss_vs_flops_*.png"))
    # every number of the loss tables is the run dir's: trainer val loss from metrics.jsonl, held-out from eval.json
    trainer = _table(md, "Trainer's last val loss")
    held = _table(md, "Held-out loss of the training source")
    tput = _table(md, "Throughput")
    for r in main:
        rd = exp_dir / "runs" / "main" / r["name"]
        col = [0, 1].index(r["seed"])
        vals = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        last_val = [v["val_loss"] for v in vals if "val_loss" in v][-1]
        assert trainer[r["arm"]][col] == f"{last_val:.4f}"
        ev = json.loads((rd / "eval.json").read_text())
        assert held[r["arm"]][col] == f"{ev['heldout']['loss']:.4f}"
        assert ev["done"] and ev["retrieval"]["baseline"]["metrics"]["ndcg@10"] >= 0
        assert 0 <= ev["representation"]["before"]["error"] <= 1
        tps = X.median_throughput(rd)
        assert tput[r["arm"]][col] == X._fmt(tps)
        assert (rd / "checkpoints" / "latest").exists() and (rd / "export" / "model.safetensors").is_file()
    # the same eval tokens for every run, seeds' spread and a verdict per claim
    assert len({json.loads((exp_dir / "runs" / "main" / r["name"] / "eval.json").read_text())["heldout"]["tokens"]
                for r in main}) == 1
    assert md.count("**Verdict (mixer vs transformer):**") >= 6
    assert "BM25 on the same queries" in md and "Git commit" in md and "Machine:" in md
    assert "mmscale experiment run" in md
    # equal FLOPs within one step: each arm's logged tokens x its FLOPs/token is the target to half a step
    target = X.budget_target(X.load_spec(spec_path), plan["numbers"]["ctx16"])
    for r in main:
        n = plan["numbers"][r["point"]][r["arm"]]
        rows = [json.loads(x) for x in (exp_dir / "runs" / "main" / r["name"] / "metrics.jsonl").read_text()
                .splitlines()]
        tokens = [x["tokens"] for x in rows if "tokens" in x][-1]
        assert abs(tokens * n["flops_causal"] - target) <= 0.5 * n["tokens_per_step"] * n["flops_causal"]
    # the sweep chose each arm's best final val loss
    sweep = json.loads((exp_dir / "sweep.json").read_text())["ctx16"]
    for arm, entry in sweep.items():
        assert entry["lr"] == min(entry["sweep"], key=lambda s: s["val_loss"])["lr"]
    # status through the CLI
    assert cli_main(["experiment", "status", str(exp_dir)]) == 0


def test_interrupted_experiment_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch, capsys):
    spec = tiny_spec(retrieval=None, representation={"enabled": False}, sweep={"lr": []},
                     data={"text": "synth", "synth_stories": 300, "vocab_size": 512},
                     budget={"rule": "tokens", "tokens": 6 * 4 * 16})
    spec["base"]["checkpoint.every"] = 2
    spec_path = write_spec(tmp_path, spec)
    out = tmp_path / "exp"
    real = X.train_run
    calls = []

    def interrupted(cfg_path):
        calls.append(Path(cfg_path).stem)
        if len(calls) == 2:  # the second run: 4 of 6 steps (a checkpoint at 4), then the machine "goes away"
            from mmscale.config import load_config
            from mmscale.train import train
            cfg = load_config(cfg_path, ["train.max_steps=4"])
            assert train(cfg) == 0
            raise KeyboardInterrupt
        return real(cfg_path)

    monkeypatch.setattr(X, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        X.run_experiment(str(spec_path), str(out), log=lambda m: None)
    first, second = calls
    finished = out / "runs" / "main" / first / "metrics.jsonl"
    before = finished.read_bytes()
    assert X.run_state(out / "runs" / "main" / second, 6) == ("partial", 4)
    # without --resume: one line, nothing touched
    assert cli_main(["experiment", "run", str(spec_path), "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(X, "train_run", lambda p: (calls.append(Path(p).stem), real(p))[1])
    X.run_experiment(str(spec_path), str(out), resume=True, log=lambda m: None)
    assert first not in calls and second in calls and len(calls) == 3  # the partial one and the two not started
    assert finished.read_bytes() == before
    rows = [json.loads(x) for x in (out / "runs" / "main" / second / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in rows) and [r["step"] for r in rows if "loss" in r][-1] == 6
    for r in json.loads((out / "plan.json").read_text())["runs"]:
        assert X.run_state(out / "runs" / r["phase"] / r["name"], r["steps"])[0] == "finished"
    # a rerun with --resume does nothing but the report
    calls.clear()
    X.run_experiment(str(spec_path), str(out), resume=True, log=lambda m: None)
    assert calls == []
    # a changed measure section (representation) is measured again without retraining; a changed budget is refused
    spec["representation"] = {"enabled": True, "samples": 1, "steps": 2}
    write_spec(tmp_path, spec)
    X.run_experiment(str(spec_path), str(out), resume=True, log=lambda m: None)
    assert calls == []
    ev = json.loads((out / "runs" / "main" / first / "eval.json").read_text())
    assert ev["representation"]["after"]["steps"] == 2 and ev["heldout"]
    spec["budget"]["tokens"] = 8 * 4 * 16
    write_spec(tmp_path, spec)
    with pytest.raises(UserError, match="outside"):
        X.run_experiment(str(spec_path), str(out), resume=True, log=lambda m: None)


def test_budget_rule_gives_equal_flops_or_tokens_within_one_step():
    for arms in ({"mixer": {"model.kind": "mixer"}, "llama": {"model.kind": "transformer"}},
                 {"mh": {"model.kind": "mixer", "model.mixer": "multihead"},
                  "k3": {"model.kind": "mixer", "model.kernel_size": 3},
                  "llama": {"model.kind": "transformer", "model.d_model": 96}}):
        for rule, amount in (("flops", {"flops": 3.3e12}), ("tokens", {"tokens": 1.1e6})):
            for count in ("causal", "dense"):
                spec = X.parse_spec({"data": {"train": "x"}, "arms": arms, "axes": {"n_ctx": [64]},
                                     "base": {"model.d_model": 64, "train.micro_batch_size": 8},
                                     "budget": {"rule": rule, "count": count, **amount}})
                exp = X.Experiment(spec, Path("/nonexistent"))
                nums = exp.numbers["ctx64"]
                for an in arms:
                    steps = X.budget_steps(spec, nums, an)
                    per_step = nums[an]["tokens_per_step"] * (nums[an][f"flops_{count}"] if rule == "flops" else 1)
                    target = amount[rule]
                    assert abs(steps * per_step - target) <= per_step / 2
                    assert steps == round(target / per_step)
    # wall-clock: seconds x the measured throughput
    spec = X.parse_spec({"data": {"train": "x"}, "arms": arms, "axes": {"n_ctx": [64]},
                         "budget": {"rule": "wall_clock", "seconds": 60}, "sweep": {"steps": 5}})
    nums = X.Experiment(spec, Path("/nonexistent")).numbers["ctx64"]
    assert X.budget_steps(spec, nums, "llama", throughput=1024.0) == round(60 * 1024 / (8 * 64))


@pytest.mark.parametrize("change,key", [
    ({"arms": {"mixer": {"model.kind": "mixer"}}}, "arms"),
    ({"budget": {"rule": "equal"}}, "budget.rule"),
    ({"budget": {"rule": "flops"}}, "budget.flops"),
    ({"budget": {"rule": "flops", "flops": 1e9, "extra": 1}}, "budget.extra"),
    ({"budget": {"rule": "flops", "reference_arm": "gpt", "reference_steps": 3}}, "budget.reference_arm"),
    ({"axes": {"seeds": [0, 0]}}, "axes.seeds"),
    ({"axes": {"n_ctx": [1]}}, "axes.n_ctx"),
    ({"sweep": {"lr": ["fast"]}}, "sweep.lr"),
    ({"sweep": {"lr": [1e-3], "fraction": 2}}, "sweep.fraction"),
    ({"arms": {"mixer": {"model.kind": "mixer", "model.widht": 3}, "t": {"model.kind": "transformer"}}},
     "model.widht"),
    ({"arms": {"mixer": {"model.kind": "mixer"}, "t": {"model.kind": "transformer", "model.heads": 5}}},
     "arms.t"),
    ({"colour": "red"}, "colour"),
    ({"data": {"text": "synth", "train": "x"}}, "data"),
    ({"retrieval": {"enabled": True}}, "retrieval.enabled"),
    ({"budget": {"rule": "wall_clock", "seconds": 10}, "sweep": {"lr": [1e-3]}}, "sweep.steps"),
    ({"baseline": "gpt"}, "baseline"),
])
def test_bad_specs_are_one_line_errors_naming_the_key(tmp_path, change, key, capsys):
    spec = tiny_spec(retrieval=None, data={"text": "synth", "vocab_size": 512}, budget={"rule": "flops", "flops": 1e9})
    spec.update(change)
    with pytest.raises(UserError) as e:
        X.parse_spec(spec)
    msg = str(e.value)
    assert key in msg and "\n" not in msg and e.value.exit_code == 2
    # the CLI: one line on stderr, exit status 2, nothing written
    p = write_spec(tmp_path, spec)
    assert cli_main(["experiment", "run", str(p), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and not (tmp_path / "exp").exists()


def test_status_and_report_of_a_folder_that_is_not_an_experiment(tmp_path, capsys):
    assert cli_main(["experiment", "status", str(tmp_path)]) == 1
    assert cli_main(["experiment", "report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("spec.yaml" in ln for ln in err)
    assert cli_main(["experiment", "run", str(tmp_path / "missing.yaml")]) == 2


def test_spec_overrides_on_the_command_line(tmp_path, capsys):
    p = write_spec(tmp_path, tiny_spec(retrieval=None))
    spec = X.load_spec(p, ["budget.reference_steps=9", "data.other_text=synth"])
    assert spec.budget["reference_steps"] == 9 and spec.data["other_text"] == "synth"
    for bad, key in (("colour.red=1", "colour"), ("budget", "budget"), ("budget.bogus=1", "budget.bogus")):
        assert cli_main(["experiment", "run", str(p), bad, "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and key in err


def test_verdicts_are_stated_plainly():
    assert X.verdict([3.0, 3.1, 3.05], [3.5, 3.6, 3.55], "mixer", "llama", True).startswith("mixer better by 0.5")
    assert X.verdict([3.0, 3.4], [3.1, 3.3], "mixer", "llama", True).startswith("no difference within noise")
    assert X.verdict([0.2, 0.21], [0.5, 0.52], "mixer", "llama", False).startswith("llama better by")


# ----------------------------------------------------------------------------------------------
# SLURM: a two-run job array on the local cluster

@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_launcher_runs_a_two_run_array_on_the_local_cluster(cluster, tmp_path):
    spec = tiny_spec(retrieval=None, representation={"enabled": False}, sweep={"lr": []},
                     data={"text": "synth", "synth_stories": 300, "vocab_size": 512},
                     budget={"rule": "tokens", "tokens": 4 * 4 * 16}, axes={"seeds": [0], "n_ctx": [16]},
                     launcher={"slurm": {"cpus_per_task": 1, "time_min": 10}})
    spec_path = write_spec(tmp_path, spec)
    out = tmp_path / "exp"
    env = cluster.job_env(tmp_path)
    res = subprocess.run([sys.executable, "-m", "mmscale.cli", "experiment", "run", str(spec_path), "--out", str(out),
                          "--launcher", "slurm"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    arrays = re.findall(r"submitted array (\d+) \((\d+) runs", res.stdout)
    assert arrays and sum(int(n) for _, n in arrays) == 2, res.stdout
    for arm in ("mixer", "transformer"):
        rd = out / "runs" / "main" / f"{arm}-ctx16-s0"
        assert X.run_state(rd, 4) == ("finished", 4)
        assert json.loads((rd / "eval.json").read_text())["done"]
    assert (out / "report" / "report.md").is_file()
    logs = list((out / "submitit").rglob("*_log.out"))
    assert logs, "submitit wrote no task logs"
    assert not [p for p in Path("/dev/shm").glob("mmscale-exp-*")]


from tests.test_slurm import cluster  # noqa: E402,F401  (the module-scoped local SLURM cluster fixture)
