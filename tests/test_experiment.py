"""`mmscale experiment`: a tiny spec end to end (sweep, equal-FLOPs runs, measures, report whose numbers are the run
dirs'), resume of an interrupted experiment, the budget rule, one-line spec errors, and a two-run SLURM array on
the local cluster (tests/test_slurm.py's fixture)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from mmscale import experiment as X
from mmscale.experiment import runner
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
        assert tput[r["arm"]][col] == X.fmt(tps)
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
            from mmscale.run.train import train
            cfg = load_config(cfg_path, ["train.max_steps=4"])
            assert train(cfg) == 0
            raise KeyboardInterrupt
        return real(cfg_path)

    monkeypatch.setattr(runner, "train_run", interrupted)
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
    monkeypatch.setattr(runner, "train_run", lambda p: (calls.append(Path(p).stem), real(p))[1])
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
    ({"eval": {"batches": "many"}}, "eval.batches"),  # typed like a run config: the same one-line messages
    ({"launcher": {"slurm": {"gpus": 1}}}, "launcher.slurm.gpus"),
    ({"retrieval": {"negatives": "hard"}}, "retrieval.negatives"),
    ({"arms": {"a": {"resources": {"mem_gb": "lots"}}, "b": {}}}, "arms.a.resources.mem_gb"),
    ({"launcher": {"slurm": {"arms": {"a": {"partiton": "gpu"}}}}}, "launcher.slurm.arms.a.partiton"),
    ({"base": ["model.d_model=64"]}, "base"),
    ({"retrieval": {"position": "middle"}}, "retrieval.position"),  # the run config's own rule
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


def test_experiment_keys_lists_every_spec_key_with_its_meaning(capsys):
    from mmscale.experiment.sections import SpecFile

    assert cli_main(["experiment", "keys"]) == 0
    out = capsys.readouterr().out
    listed = {ln.split()[0] for ln in out.splitlines()}
    # every leaf key of the spec's dataclasses, counted here by walking them another way (their fields' names)
    want = set()
    for f in fields(SpecFile):
        sub = f.default_factory() if callable(f.default_factory) else None
        if sub is not None and is_dataclass(sub):
            for g in fields(sub):
                h = getattr(sub, g.name)
                want |= ({f"{f.name}.{g.name}.{x.name}" for x in fields(h)} if is_dataclass(h)
                         else {f"{f.name}.{g.name}"})
        else:
            want.add(f.name)
    assert listed == want and "budget.match_keys" in listed and "launcher.slurm.mem_gb" in listed
    assert all(len(ln.split(None, 2)) == 3 for ln in out.splitlines())  # key, default, meaning
    assert cli_main(["experiment", "keys", "sweep"]) == 0
    assert {ln.split()[0] for ln in capsys.readouterr().out.splitlines()} == {k for k in want if k.startswith("sweep.")}
    assert cli_main(["experiment", "keys", "colour"]) == 2
    assert "no spec key starts with 'colour'" in capsys.readouterr().err


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


def test_report_document_writes_the_same_blocks_as_markdown_and_html(tmp_path):
    """report.md and report.html come from one document (no Markdown parsed back): the same cells, escaped in
    HTML, marks only in text (a code block keeps its ** as typed), a missing PNG linked instead of inlined."""
    from mmscale.experiment.document import Code, Heading, Image, Table, to_markdown
    from mmscale.experiment.report import html_body

    (tmp_path / "a.png").write_bytes(b"\x89PNG fake")
    doc = [Heading(2, "Point `ctx16`"), "", Table(["arm", "seed 0"], [["mix<er>", "**3.1**"], ["t&t", "–"]]), "",
           "**Verdict (a vs b):** see [runs.html](runs.html)", Code(["mmscale x **y**"]), Image("a.png", "cap"),
           Image("gone.png", "missing")]
    assert to_markdown(doc).splitlines() == [
        "## Point `ctx16`", "", "| arm | seed 0 |", "|---|---|", "| mix<er> | **3.1** |", "| t&t | – |", "",
        "**Verdict (a vs b):** see [runs.html](runs.html)", "```", "mmscale x **y**", "```", "![cap](a.png)",
        "![missing](gone.png)"]
    assert html_body(doc, tmp_path) == [
        "<h2>Point <code>ctx16</code></h2>",
        "<table><tr><th>arm</th><th>seed 0</th></tr><tr><td>mix&lt;er&gt;</td><td><b>3.1</b></td></tr>"
        "<tr><td>t&amp;t</td><td>–</td></tr></table>",
        '<p><b>Verdict (a vs b):</b> see <a href="runs.html">runs.html</a></p>',
        "<pre>mmscale x **y**</pre>",
        '<figure><img src="data:image/png;base64,iVBORyBmYWtl" alt="cap"><figcaption>cap</figcaption></figure>',
        '<figure><img src="gone.png" alt="missing"><figcaption>missing</figcaption></figure>']


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


# ----------------------------------------------------------------------------------------------
# issue 27: parameter-matched arms, a self-extending learning-rate sweep, budget views

def _tiny_match_spec(match="params", arms=None, **budget):
    return X.parse_spec({"data": {"train": "x"}, "axes": {"n_ctx": [16]},
                         "arms": arms or {"mixer": {"model.kind": "mixer"},
                                          "transformer": {"model.kind": "transformer", "model.heads": 2}},
                         "base": {"model.d_model": 32, "model.n_layers": 2, "model.vocab_size": 512},
                         "budget": {"rule": "flops", "flops": 1e9, "match": match, **budget}})


def _count(overrides: dict) -> tuple[int, float]:
    """Parameters and causal FLOPs/token of a config, counted another way: a real (CPU) model's tensors."""
    import torch

    from mmscale.config import config_from_dict
    from mmscale.models import build_model

    cfg = config_from_dict({}, X.override_list(overrides))
    torch.manual_seed(0)
    m = build_model(cfg.model)
    return sum(p.numel() for p in m.parameters()), float(m.flops_per_token()["causal"])


def test_budget_match_params_sizes_the_other_arm_to_the_closest_ffn_width():
    spec = _tiny_match_spec("params", params_tolerance=0.02)
    exp = X.Experiment(spec, Path("/nonexistent"))
    sized = exp.sizing["ctx16"]
    assert sized["transformer"] == {} and set(sized["mixer"]["changed"]) == {"ffn_hidden"}
    ov = exp.arm_ovs["ctx16"]
    target = _count(ov["transformer"])[0]
    got = _count(ov["mixer"])[0]
    assert got == exp.numbers["ctx16"]["mixer"]["params"] == sized["mixer"]["value"]
    assert abs(got / target - 1) <= 0.02 and sized["mixer"]["within"]
    # the closest multiple of 8, by brute force over every width (the harness bisects)
    base = X.arm_overrides(spec, "mixer", 16, {})
    brute = min(range(32, 257, 8), key=lambda h: (abs(_count({**base, "model.ffn_hidden": h})[0] - target), h))
    assert ov["mixer"]["model.ffn_hidden"] == brute
    # match flops: FLOPs per token (causal count) matched instead
    exp = X.Experiment(_tiny_match_spec("flops", params_tolerance=0.02), Path("/nonexistent"))
    ov = exp.arm_ovs["ctx16"]
    assert abs(_count(ov["mixer"])[1] / _count(ov["transformer"])[1] - 1) <= 0.02
    # match none: nothing changes
    exp = X.Experiment(_tiny_match_spec("none"), Path("/nonexistent"))
    assert exp.sizing["ctx16"] == {} and "model.ffn_hidden" not in exp.arm_ovs["ctx16"]["mixer"]


def test_budget_match_leaves_keys_the_arm_sets_itself():
    # the arm fixes its FFN: the next key in the rule (d_model) is sized
    arms = {"mixer": {"model.kind": "mixer", "model.ffn_mult": 4},
            "transformer": {"model.kind": "transformer", "model.heads": 2, "model.d_model": 64}}
    exp = X.Experiment(_tiny_match_spec("params", arms), Path("/nonexistent"))
    rec = exp.sizing["ctx16"]["mixer"]
    assert "ffn_hidden" not in rec["changed"] and set(rec["changed"]) <= {"d_model", "n_layers"} and rec["changed"]
    assert "model.ffn_hidden" not in exp.arm_ovs["ctx16"]["mixer"]
    # every sizable key fixed by hand: not sized, and the report's MISMATCH stays
    arms["mixer"].update({"model.d_model": 32, "model.n_layers": 2})
    exp = X.Experiment(_tiny_match_spec("params", arms), Path("/nonexistent"))
    rec = exp.sizing["ctx16"]["mixer"]
    assert rec["changed"] == {} and not rec["within"] and "not sized" in rec["rule"]
    assert exp.arm_ovs["ctx16"]["mixer"] == X.arm_overrides(exp.spec, "mixer", 16, {})


@pytest.mark.parametrize("change,key", [
    ({"match": "weights"}, "budget.match"), ({"views": ["flops", "steps"]}, "budget.views"),
    ({"match_keys": ["heads"]}, "budget.match_keys")])
def test_bad_budget_match_and_views_keys(change, key):
    with pytest.raises(UserError, match=re.escape(key)):
        X.parse_spec({"data": {"train": "x"}, "axes": {"n_ctx": [16]},
                      "arms": {"a": {"model.kind": "mixer"}, "b": {"model.kind": "transformer"}},
                      "budget": {"rule": "flops", "flops": 1e9, **change}})
    with pytest.raises(UserError, match="sweep.extend_factor"):
        X.parse_spec({"data": {"train": "x"}, "arms": {"a": {}, "b": {}}, "budget": {"rule": "tokens", "tokens": 9},
                      "sweep": {"lr": [1e-3], "extend_factor": 1}})


def test_sweep_extends_toward_the_edge_until_the_best_is_interior_or_a_bound():
    nxt = X.next_sweep_lr
    assert nxt([(1e-3, 5.0), (3e-3, 4.5), (1e-2, 4.3)], 3, 1e-6, 1, 0, 3) == (0.03, "best at the top")
    assert nxt([(1e-3, 4.0), (3e-3, 4.5), (1e-2, 4.9)], 3, 1e-6, 1, 0, 3)[0] == pytest.approx(1e-3 / 3)
    assert nxt([(1e-3, 4.6), (3e-3, 4.5), (1e-2, 4.9)], 3, 1e-6, 1, 0, 3) == (None, "best is interior")
    # a diverged rate above the best brackets it; every rate diverged: go down
    assert nxt([(1e-3, 5.0), (1e-2, 4.0), (3e-2, float("nan"))], 3, 1e-6, 1, 0, 3)[0] is None
    assert nxt([(1e-2, None), (3e-2, float("inf"))], 3, 1e-6, 1, 0, 3)[0] == pytest.approx(1e-2 / 3)
    # bounds: sweep.max_extend, sweep.lr_max / lr_min, a one-rate grid
    new, why = nxt([(1e-3, 5.0), (1e-2, 4.0)], 3, 1e-6, 1, 3, 3)
    assert new is None and "max_extend" in why
    new, why = nxt([(0.1, 5.0), (0.5, 4.0)], 3, 1e-6, 1.0, 0, 3)
    assert new is None and "lr_max" in why
    new, why = nxt([(1e-6, 4.0), (1e-5, 5.0)], 3, 1e-6, 1.0, 0, 3)
    assert new is None and "lr_min" in why
    assert nxt([(1e-3, 4.0)], 3, 1e-6, 1, 0, 3)[0] is None
    # the whole loop on a synthetic U-shaped loss (minimum at 0.05): the sweep walks up x3 and stops bracketed
    loss = lambda lr: 4 + (math.log(lr / 0.05)) ** 2  # noqa: E731
    tried = [1e-3, 3e-3, 1e-2]
    while True:
        new, why = nxt([(lr, loss(lr)) for lr in tried], 3, 1e-6, 1, len(tried) - 3, 5)
        if new is None:
            break
        tried.append(new)
    assert tried[3:] == [pytest.approx(0.03), pytest.approx(0.09)] and why == "best is interior"
    assert X.sweep_bracket([(lr, loss(lr)) for lr in tried]) == (0.01, pytest.approx(0.03), pytest.approx(0.09))


def test_loss_at_interpolates_in_log_loss_and_never_extrapolates():
    curve = [(100.0, 4.0), (300.0, 2.0), (500.0, 1.5)]
    assert X.loss_at(curve, 200.0) == pytest.approx(math.sqrt(4.0 * 2.0))  # geometric mean at the midpoint
    assert X.loss_at(curve, 400.0) == pytest.approx(math.exp(0.5 * math.log(2.0) + 0.5 * math.log(1.5)))
    assert X.loss_at(curve, 150.0) == pytest.approx(4.0 ** 0.75 * 2.0 ** 0.25)
    assert X.loss_at(curve, 300.0) == 2.0 and X.loss_at(curve, 500.0 * (1 + 1e-12)) == 1.5
    assert X.loss_at(curve, 99.0) is None and X.loss_at(curve, 501.0) is None and X.loss_at([], 1.0) is None
    # training seconds: each logged step time stands for the steps since the previous logged row
    rows = [{"step": 10, "step_time": 0.5}, {"step": 20, "step_time": 0.7}, {"step": 25, "step_time": 1.0}]
    assert X.training_seconds(rows) == [(0, 0.0), (10, 5.0), (20, 12.0), (25, 17.0)]


def test_budget_views_read_every_run_at_the_common_budget_and_name_the_short_ones():
    import random

    rng = random.Random(5)
    spec = _tiny_match_spec("none", views=["flops", "tokens", "wall_clock"])

    def run(arm, seed, steps, finished=True):
        curve, loss = [], 6.0
        for s in range(10, steps + 1, 10):
            loss *= rng.uniform(0.85, 0.99)
            curve.append({"step": s, "tokens": s * 64, "flops_causal": s * 64 * (1e6 if arm == "a" else 2e6),
                          "seconds": s * (0.1 if arm == "a" else 0.3), "val_loss": loss})
        return {"arm": arm, "seed": seed, "curve": curve,
                "summary": {"status": "finished" if finished else "stopped at step 20"}}

    runs = [run("a", 0, 100), run("a", 1, 100), run("b", 0, 50), run("b", 1, 50), run("b", 2, 20, False)]
    views = X.read_views(spec, runs)
    assert views["tokens"]["at"] == 50 * 64 and views["flops"]["at"] == 50 * 64 * 2e6
    assert views["wall_clock"]["at"] == pytest.approx(100 * 0.1)
    for r in runs[:4]:  # the hand reading: the arm-a runs between their steps 30 and 40 (tokens), ...
        pts = {c["tokens"]: c["val_loss"] for c in r["curve"]}
        assert r["views"]["tokens"] == pytest.approx(pts[50 * 64])
        x = views["flops"]["at"]
        if r["arm"] == "a":  # flops 6.4e9 = step 100 for a: its last point
            assert r["views"]["flops"] == pytest.approx(r["curve"][-1]["val_loss"])
    b0 = runs[2]["curve"]  # wall-clock 10 s = step 33.3 of arm b: between its steps 30 and 40, in log(loss)
    t = (10.0 - 9.0) / (12.0 - 9.0)
    assert runs[2]["views"]["wall_clock"] == pytest.approx(
        math.exp((1 - t) * math.log(b0[2]["val_loss"]) + t * math.log(b0[3]["val_loss"])))
    # the unfinished run stops short: not read, and the view says so
    assert runs[4]["views"]["tokens"] is None
    assert any("b seed 2" in n and "beyond its curve" in n and "not read" in n for n in views["tokens"]["not_read"])
    assert x == 50 * 64 * 2e6


@pytest.mark.slow
def test_tiny_experiment_with_matched_arms_extended_sweep_and_views_resumes_without_retraining(
        tmp_path, monkeypatch):
    spec = tiny_spec(retrieval=None, representation={"enabled": False},
                     data={"text": "synth", "synth_stories": 200, "vocab_size": 512},
                     sweep={"lr": [1e-5, 1e-4], "steps": 4, "max_extend": 1},
                     axes={"seeds": [0], "n_ctx": [16]})
    spec["budget"].update({"match": "params", "views": ["flops", "tokens", "wall_clock"]})
    spec_path = write_spec(tmp_path, spec)
    exp_dir = X.run_experiment(str(spec_path), str(tmp_path / "exp"), log=lambda m: None)
    plan = json.loads((exp_dir / "plan.json").read_text())
    sweep_runs = [r for r in plan["runs"] if r["phase"] == "sweep"]
    for arm in ("mixer", "transformer"):  # the best of 1e-5, 1e-4 after 4 steps is the top: one rate added
        assert sorted(r["lr"] for r in sweep_runs if r["arm"] == arm) == [1e-5, 1e-4, pytest.approx(3e-4)]
    assert plan["sizing"]["ctx16"]["mixer"]["within"]
    md = (exp_dir / "report" / "report.md").read_text()
    assert "Shapes sized by `budget.match: params`" in md and "MISMATCH" not in md
    assert "final bracket" in md and md.count("lr") > 0
    for view in ("flops", "tokens", "wall-clock"):
        assert f"### Held-out loss at equal {view} (" in md
    # the training seconds say under which conditions they were measured (this process's threads, one_thread)
    assert "Conditions of the training seconds: mixer: 1 thread(s), load " in md
    assert "transformer: 1 thread(s), load " in md and "not a fair comparison" not in md
    assert md.count("**Verdict (mixer vs transformer):**") >= 6
    # a rerun reuses every finished sweep point (extended ones too) and main run: nothing trains
    monkeypatch.setattr(runner, "train_run", lambda cfg: (_ for _ in ()).throw(AssertionError(f"retrained {cfg}")))
    X.run_experiment(str(spec_path), str(tmp_path / "exp"), resume=True, log=lambda m: None)
    assert json.loads((exp_dir / "plan.json").read_text())["runs"] == plan["runs"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments").glob("*.yaml")))
def test_shipped_specs_parse_and_their_matched_arms_are_within_tolerance(name):
    spec = X.load_spec(REPO / "experiments" / name)
    if spec.budget["match"] == "none":
        return
    exp = X.Experiment(spec, Path("/nonexistent"))
    ref = X.match_reference(spec)
    for pk, nums in exp.numbers.items():
        for an, rec in exp.sizing[pk].items():
            if an != ref:
                assert rec["within"], (pk, an, rec)
                if spec.budget["match"] == "params":
                    assert abs(nums[an]["params"] / nums[ref]["params"] - 1) <= spec.budget["params_tolerance"]


def test_tokens_per_step_follow_the_global_batch_with_auto_micro_batch():
    """train.micro_batch_size=auto picks the micro-batch at start; the budget counts the global batch it keeps."""
    _model_numbers = X.model_numbers
    base = {"model.d_model": 32, "model.n_layers": 1, "model.n_ctx": 16, "model.vocab_size": 64}
    fixed = _model_numbers({**base, "train.micro_batch_size": 4, "train.grad_accum": 3})
    assert fixed["tokens_per_step"] == 4 * 3 * 16
    auto = _model_numbers({**base, "train.micro_batch_size": "auto", "train.global_batch_size": 24})
    assert auto["tokens_per_step"] == 24 * 16


def test_wall_clock_view_warns_when_arms_ran_with_different_thread_counts():
    from mmscale.experiment.document import _wall_clock_conditions

    class Spec:
        arms = {"mixer": {}, "transformer": {}}

    def run(arm, threads, load):
        return {"point": "ctx16", "arm": arm, "summary": {"threads": threads, "load_avg_start": [load]}}

    data = {"exp": type("E", (), {"spec": Spec()})(),
            "runs": [run("mixer", 2, 0.5), run("mixer", 2, 3.0), run("transformer", 1, 1.0)]}
    line = _wall_clock_conditions(data, "ctx16")[0]
    assert "mixer: 2 thread(s), load 0.5–3.0 at start; transformer: 1 thread(s)" in line
    assert "not a fair comparison" in line
    data["runs"][2]["summary"]["threads"] = 2
    assert "not a fair comparison" not in _wall_clock_conditions(data, "ctx16")[0]


def test_local_launcher_splits_the_cores_between_concurrent_runs(tmp_path, monkeypatch):
    """jobs runs at a time each get cores // jobs intra-op threads (torch's default is every core: jobs x cores
    threads would oversubscribe); a user's OMP_NUM_THREADS is kept."""
    seen = []

    class Proc:
        returncode = 0

        def __init__(self, cmd, env=None, **kw):
            seen.append(env["OMP_NUM_THREADS"])

        def poll(self):
            return 0

    class Run:
        def __init__(self, i):
            self.name, self.phase = f"r{i}", "main"

        def dir(self, exp_dir):
            return tmp_path / "runs" / self.name

    exp = type("E", (), {"exp": tmp_path})()
    monkeypatch.setattr(runner.subprocess, "Popen", Proc)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    monkeypatch.setattr("mmscale.fsutil.os.sched_getaffinity", lambda pid: set(range(8)))  # an 8-core mask
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    logs = []
    runner.run_local(exp, [Run(0), Run(1)], evaluate=True, jobs=3, log=logs.append)
    assert seen == ["2", "2"] and "OMP_NUM_THREADS=2 each" in logs[0]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    runner.run_local(exp, [Run(2)], evaluate=True, jobs=2, log=logs.append)
    assert seen[-1] == "3"


def test_report_points_follow_the_spec_axis_order_not_string_order():
    from mmscale.experiment.document import points_in_order

    data = {"plan": {"numbers": {"ctx32": {}, "ctx128": {}, "ctx512": {}}},
            "runs": [{"point": p} for p in ("ctx512", "ctx128", "ctx32", "ctx128", "extra")]}
    assert sorted({"ctx32", "ctx128", "ctx512"}) == ["ctx128", "ctx32", "ctx512"]  # what string order gave
    assert points_in_order(data) == ["ctx32", "ctx128", "ctx512", "extra"]


@pytest.mark.slow
def test_retrieval_section_takes_a_beir_collection_corpus_pairs_and_idf_pooling(tmp_path):
    """Issue 29 in the harness: data.retrieval a BEIR folder (judged train and test queries), retrieval.pairs
    corpus crops + title-body + the judged pairs, retrieval.position idf. The fine-tune's config carries them, and
    eval.json has the dense metrics, the BM25 row, the hybrid row with its paired comparison."""
    from tests._data_helpers import make_tiny_corpus

    text, _ = make_tiny_corpus(300, 0, 512)
    stories = [s.strip() for s in text.read_text().split("<|endoftext|>") if s.strip()][:60]
    corpus = [{"_id": f"d{i}", "title": s.split(".")[0], "text": s} for i, s in enumerate(stories)]
    queries = [{"_id": f"q{i}", "text": " ".join(s.split()[5:12])} for i, s in enumerate(stories[:30])]
    coll = tmp_path / "coll"
    (coll / "qrels").mkdir(parents=True)
    (coll / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (coll / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, ids in (("train", range(0, 20)), ("test", range(20, 30))):
        (coll / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                     + "".join(f"q{i}\td{i}\t1\n" for i in ids))
    spec = tiny_spec(representation={"enabled": False}, axes={"seeds": [0], "n_ctx": [32]},
                     retrieval={"steps": 3, "group_size": 2, "candidates": [8], "micro_batch_size": 4,
                                "pairs": "corpus:crop+title-body+judged", "position": "idf"})
    spec["data"]["retrieval"] = str(coll)
    exp_dir = X.run_experiment(str(write_spec(tmp_path, spec)), str(tmp_path / "exp"), log=lambda m: None)
    rd = exp_dir / "runs" / "main" / "mixer-ctx32-s0"
    ret_cfg = yaml.safe_load(next(rd.glob("retrieval-*/config.yaml")).read_text())
    assert ret_cfg["retrieval"]["pairs"] == "corpus:crop+title-body+judged"
    assert ret_cfg["retrieval"]["position"] == "idf" and ret_cfg["train"]["max_steps"] == 3
    ev = json.loads((rd / "eval.json").read_text())["retrieval"]
    assert (exp_dir / "runs" / "main" / "transformer-ctx32-s0" / "eval.json").is_file()
    assert ev["n_queries"] == 10 and ev["n_corpus"] == 60 and ev["split"] == "test"
    assert 0 <= ev["metrics"]["ndcg@10"] <= 1 and ev["baseline"]["metrics"]["ndcg@10"] > 0.5   # BM25 finds them
    assert "train queries" in ev["hybrid"]["name"] and 0 <= ev["hybrid"]["weight"] <= 1   # weight chosen on train
    assert ev["paired_ndcg@10"]["hybrid - bm25"]["n"] == 10 and "se" in ev["paired_ndcg@10"]["model - bm25"]
    md = (exp_dir / "report" / "report.md").read_text()
    assert "BM25 on the same queries" in md
    hy = _table(md, "Retrieval nDCG@10 of the hybrid row (BM25 + the fine-tuned model)")
    assert hy["mixer"][0] == f"{ev['hybrid']['metrics']['ndcg@10']:.4f}"
    d = ev["paired_ndcg@10"]["hybrid - bm25"]
    assert f"mixer seed 0 {d['mean']:+.4f} ± {d['se']:.4f}" in md
