"""`mmscale experiment run` and `status`: data, the sweep (extended while a best rate sits at an edge), the
main runs at the chosen rates, their measures, the report; every step skips what is already done (--resume)."""
from __future__ import annotations

import json
from pathlib import Path

from mmscale.experiment.data import prepare_data
from mmscale.experiment.expdir import open_experiment, reopen, write_plan
from mmscale.experiment.measure import last_val_loss, measured, run_state, write_json
from mmscale.experiment.plan import Run, budget_steps, match_reference
from mmscale.experiment.provenance import log_command
from mmscale.experiment.report import write_experiment_report
from mmscale.experiment.runner import run_local, run_slurm
from mmscale.experiment.sweep import choose_lrs, extend_sweep


def run_experiment(spec_path: str, out: str | None = None, *, launcher: str = "local", resume: bool = False,
                   jobs: int | None = None, report: bool = True, argv: list[str] | None = None,
                   log=None, overrides: list[str] | None = None) -> Path:
    log = log or (lambda m: print(m, flush=True))
    exp = open_experiment(spec_path, out, resume, overrides)
    log_command(exp.exp, argv or ["experiment", "run", spec_path])
    jobs = jobs or exp.spec.launcher["jobs"]
    exp.data = prepare_data(exp.spec, exp.exp, exp.spec.n_ctx)
    for pk, rec in exp.sizing.items():
        for an, r in rec.items():
            if r:
                log(f"budget.match {exp.spec.budget['match']}: {pk}/{an} " + (", ".join(
                    f"model.{k} {a} -> {b}" for k, (a, b) in r["changed"].items()) or "unchanged")
                    + f" ({r['ratio']:+.2%} vs {match_reference(exp.spec)})")
    while True:  # the sweep, extended while a best rate sits at an edge of the rates tried (resumable: the
        sweep = exp.sweep_runs()  # same finished runs give the same decisions)
        for r in sweep:
            exp.write_config(r)
        write_plan(exp, None)
        log(f"experiment {exp.spec.name}: {len(sweep)} sweep run(s) in {exp.exp}")
        todo = [r for r in sweep if run_state(r.dir(exp.exp), r.steps)[0] != "finished"]
        if todo:
            (run_slurm(exp, todo, log) if launcher == "slurm" else run_local(exp, todo, False, jobs, log))
        added = extend_sweep(exp, sweep)
        if not added:
            break
        for line in added:
            log(f"sweep: {line}")
    choice = choose_lrs(exp, sweep) if sweep else {}
    if not sweep:  # no grid: the base config's learning rate for every arm
        for pk in exp.numbers:
            for an in exp.spec.arms:
                choice.setdefault(pk, {})[an] = {"lr": None, "steps": budget_steps(exp.spec, exp.numbers[pk], an),
                                                 "sweep": []}
    write_json(exp.exp / "sweep.json", choice)
    main = exp.main_runs(choice)
    for r in main:
        exp.write_config(r)
    write_plan(exp, choice)
    log(f"main: {len(main)} run(s); steps per arm: " + ", ".join(
        f"{pk}/{an} {c['steps']} (lr {c['lr'] if c['lr'] is not None else 'base'})"
        for pk, arms in choice.items() for an, c in arms.items()))
    todo = [r for r in main if run_state(r.dir(exp.exp), r.steps)[0] != "finished" or not measured(exp, r)]
    if todo:
        (run_slurm(exp, todo, log) if launcher == "slurm" else run_local(exp, todo, True, jobs, log))
    if report:
        paths = write_experiment_report(exp.exp)
        log(f"report: {paths['markdown']} and {paths['html']}")
    return exp.exp


# ----------------------------------------------------------------------------------------------
# status

def status_rows(exp_dir: str | Path) -> list[dict]:
    exp = reopen(exp_dir)
    plan = json.loads((exp.exp / "plan.json").read_text()) if (exp.exp / "plan.json").is_file() else {"runs": []}
    rows = []
    for r in plan["runs"]:
        rd = exp.exp / "runs" / r["phase"] / r["name"]
        state, step = run_state(rd, r["steps"])
        done = r["phase"] == "main" and measured(exp, Run(r["name"], "main", r["arm"], r["point"], r["seed"], r["lr"],
                                                             r["steps"], {}))
        rows.append({**r, "state": state, "step": step, "measured": bool(done),
                     "val_loss": last_val_loss(rd)})
    return rows
