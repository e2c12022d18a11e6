"""The command line of `mmscale experiment run|status|report|keys` (and run-one, what child processes and SLURM
tasks execute)."""
from __future__ import annotations

import argparse
import json

from mmscale.cli.config import keys_table
from mmscale.errors import UserError
from mmscale.experiment.expdir import reopen
from mmscale.experiment.orchestrate import run_experiment, status_rows
from mmscale.experiment.report import write_experiment_report
from mmscale.experiment.runner import execute_run
from mmscale.experiment.sections import SpecFile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="run (or resume) an experiment spec: sweeps, full-budget runs, measures, report")
    r.add_argument("spec", help="the experiment spec (YAML), e.g. experiments/paper-small.yaml")
    r.add_argument("spec_overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted spec overrides, e.g. data.text=stories.txt budget.reference_steps=200")
    r.add_argument("--out", default=None, help="experiment directory (default runs/experiments/NAME)")
    r.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: runs on this machine (in sequence, or --jobs at a time); slurm: submitit job arrays")
    r.add_argument("--jobs", type=int, default=0, help="local launcher: runs at a time (0 = launcher.jobs of the spec)")
    r.add_argument("--resume", action="store_true", help="continue an experiment dir: skip finished runs, resume "
                                                         "partial ones")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    s = sub.add_parser("status", help="every run of an experiment: finished, partial (step) or not started")
    s.add_argument("dir", help="the experiment directory")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    p = sub.add_parser("report", help="tables with verdicts, loss-vs-FLOPs plots (markdown + HTML + PNG)")
    p.add_argument("dir", help="the experiment directory")
    p.add_argument("--out", default=None, help="report folder (default DIR/report)")
    k = sub.add_parser("keys", help="every spec key: default, meaning, allowed values (like `mmscale config keys`)")
    k.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. budget or sweep.lr")
    o = sub.add_parser("run-one", help=argparse.SUPPRESS)
    o.add_argument("dir", help="the experiment directory")
    o.add_argument("phase", choices=["sweep", "main"], help="sweep or main")
    o.add_argument("name", help="the run's name (plan.json)")


def _argv_of(args) -> list[str]:
    argv = ["experiment", "run", args.spec, *args.spec_overrides]
    if args.out:
        argv += ["--out", args.out]
    argv += ["--launcher", args.launcher]
    if args.jobs:
        argv += ["--jobs", str(args.jobs)]
    if args.resume:
        argv.append("--resume")
    return argv


def run(args: argparse.Namespace) -> int:
    if args.action == "run":
        if args.jobs < 0:
            raise UserError(f"--jobs must be >= 0, got {args.jobs}", 2)
        run_experiment(args.spec, args.out, launcher=args.launcher, resume=args.resume, jobs=args.jobs or None,
                       report=not args.no_report, argv=_argv_of(args), overrides=args.spec_overrides)
        return 0
    if args.action == "status":
        rows = status_rows(args.dir)
        if getattr(args, "json", False):
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no runs planned yet")
            return 0
        w = max(len(r["phase"] + r["name"]) for r in rows) + 1
        for r in rows:
            state = {"finished": "finished", "new": "not started"}.get(r["state"], f"partial (step {r['step']})")
            extra = f"  val {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
            meas = "  measured" if r["measured"] else ""
            print(f"{r['phase'] + '/' + r['name']:<{w}}  {r['steps']:>6} steps  {state}{extra}{meas}")
        done = sum(r["state"] == "finished" for r in rows)
        print(f"{done}/{len(rows)} runs finished")
        return 0
    if args.action == "keys":
        print(keys_table(args.prefix, SpecFile, "spec"))
        return 0
    if args.action == "report":
        paths = write_experiment_report(args.dir, args.out)
        print(f"wrote {paths['markdown']}, {paths['html']}" + (f" and {len(paths['pngs'])} PNG(s)" if paths["pngs"]
                                                                else ""))
        return 0
    # run-one: one run of an experiment (what the parallel local launcher and SLURM tasks execute)
    exp = reopen(args.dir)
    plan = json.loads((exp.exp / "plan.json").read_text())
    choice = plan.get("choice")
    runs = exp.sweep_runs() if args.phase == "sweep" else exp.main_runs(choice)
    run_ = next((r for r in runs if r.name == args.name), None)
    if run_ is None:
        raise UserError(f"no {args.phase} run named '{args.name}' in {exp.exp}")
    print(f"{args.phase}/{args.name}: " + execute_run(exp, run_, evaluate=args.phase == "main"), flush=True)
    return 0
