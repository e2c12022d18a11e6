"""The experiment directory: spec.yaml (a resumed experiment keeps its spec outside the measure sections),
spec_dir.txt, plan.json; opening a new or resumed one, reopening one for status, report and run-one."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from mmscale.config import load_yaml_file
from mmscale.errors import UserError
from mmscale.experiment.measure import write_json
from mmscale.experiment.plan import Experiment
from mmscale.experiment.spec import load_spec, load_spec_from

# sections that only decide how finished runs are measured (or launched): they may change on --resume
MEASURE_SECTIONS = ("retrieval", "representation", "launcher", "description")


def _spec_hash(raw: dict, training: bool = False) -> str:
    if training:
        raw = {k: v for k, v in raw.items() if k not in MEASURE_SECTIONS}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_experiment(spec_path: str, out: str | None, resume: bool, overrides: list[str] | None = None) -> Experiment:
    spec = load_spec(spec_path, overrides)
    exp_dir = Path(out or Path("runs") / "experiments" / spec.name).resolve()
    saved = exp_dir / "spec.yaml"
    if saved.is_file():
        if not resume:
            raise UserError(f"experiment dir '{exp_dir}' already holds an experiment; pass --resume to continue it "
                            "or --out another directory")
        old = load_yaml_file(saved) or {}
        if _spec_hash(old, training=True) != _spec_hash(spec.raw, training=True) and not _runs_started(exp_dir):
            # an earlier attempt failed before any run trained (bad data, a wrong key): start over with this spec;
            # what was derived from the old one (plan, configs, and the data when data changed) is made again
            _discard_derived(exp_dir, data_changed=old.get("data") != spec.raw.get("data"))
            old = spec.raw
            (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
            (exp_dir / "spec_dir.txt").write_text(str(spec.base_dir) + "\n")
        if _spec_hash(old, training=True) != _spec_hash(spec.raw, training=True):
            raise UserError(f"'{spec_path}' differs from the spec of the experiment in '{exp_dir}' (spec.yaml) outside "
                            f"{', '.join(MEASURE_SECTIONS)}; resume with the same data, arms, axes, budget, sweep and "
                            "eval, or --out a new directory")
        if _spec_hash(old) != _spec_hash(spec.raw):  # only how runs are measured changed: those measures are redone
            (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        (exp_dir / "spec_dir.txt").write_text(str(spec.base_dir) + "\n")
    return Experiment(spec, exp_dir)


def _runs_started(exp_dir: Path) -> bool:
    """Whether any run of the experiment has trained (logged a step or saved a checkpoint)."""
    runs = exp_dir / "runs"
    return runs.is_dir() and (any(runs.rglob("metrics.jsonl")) or any(runs.rglob("checkpoints")))


def _discard_derived(exp_dir: Path, data_changed: bool) -> None:
    (exp_dir / "plan.json").unlink(missing_ok=True)
    for name in ("configs", "runs") + (("data",) if data_changed else ()):
        if (exp_dir / name).is_dir():
            shutil.rmtree(exp_dir / name)


def reopen(exp_dir: str | Path) -> Experiment:
    exp_dir = Path(exp_dir).resolve()
    saved = exp_dir / "spec.yaml"
    if not saved.is_file():
        raise UserError(f"'{exp_dir}' is not an experiment directory (no spec.yaml); pass the --out of "
                        "`mmscale experiment run`")
    base = Path((exp_dir / "spec_dir.txt").read_text().strip()) if (exp_dir / "spec_dir.txt").is_file() else exp_dir
    spec = load_spec_from(saved, base)
    exp = Experiment(spec, exp_dir)
    plan = exp_dir / "plan.json"
    if plan.is_file():
        exp.sweep_ext = json.loads(plan.read_text()).get("sweep_extensions") or {}
        exp.data = json.loads(plan.read_text()).get("data")
        if exp.data:
            exp.data["train"] = {_nc(k): v for k, v in exp.data["train"].items()}
            exp.data["other"] = {_nc(k): v for k, v in exp.data["other"].items()}
    return exp


def _nc(k):
    return None if k in ("None", "null") else int(k)


def write_plan(exp: Experiment, choice: dict | None) -> None:
    data = dict(exp.data)
    data["train"] = {str(k): v for k, v in data["train"].items()}
    data["other"] = {str(k): v for k, v in data["other"].items()}
    plan = {"name": exp.spec.name, "budget": exp.spec.budget.to_dict(), "baseline": exp.spec.baseline, "data": data,
            "numbers": exp.numbers, "choice": choice, "sizing": exp.sizing, "sweep_extensions": exp.sweep_ext,
            "runs": [{"phase": r.phase, "name": r.name, "arm": r.arm, "point": r.point, "seed": r.seed,
                      "lr": r.lr, "steps": r.steps} for r in exp.sweep_runs() + exp.main_runs(choice)]}
    write_json(exp.exp / "plan.json", plan)
