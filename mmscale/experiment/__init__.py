"""`mmscale experiment run|status|report`: a fair, rerunnable comparison of masked mixers and transformers.

    mmscale experiment run experiments/paper-small.yaml [--out DIR] [--launcher local|slurm] [--jobs N] [--resume]
    mmscale experiment status DIR
    mmscale experiment report DIR

A spec (YAML) names the data, the arms (model overrides), the axes (n_ctx, width x depth, seeds), the budget
rule and what is measured; see experiments/paper-small.yaml for every key. The experiment directory holds:

    spec.yaml            the spec as given (a resumed experiment must be run with the same spec)
    plan.json            the resolved plan: arms, parameter counts, FLOPs per token, steps of every run
    sweep.json           the learning rate chosen per arm and axis point, with the sweep's losses
    commands.log         every command that touched the experiment (time, git commit, argv)
    data/                prepared data (when the spec gives text instead of prepared datasets)
    runs/sweep/NAME/     learning-rate sweep runs (ordinary mmscale run dirs)
    runs/main/NAME/      full-budget runs: checkpoints/, metrics.jsonl, export/, eval.json, retrieval/
    report/              report.md, report.html (self-contained), *.png, runs.html (`mmscale report`)

Fairness, by construction: every arm trains on the same prepared data with the same tokenizer; seed i of every arm
uses run.seed = seeds[i] (the same data order); every arm gets its own learning-rate sweep (the same grid, the same
short budget, the best final val loss carried to the full budget); every arm is evaluated on the same fixed first
eval.batches x eval.batch_size windows of the held-out split (the same tokens), unshuffled.

Budget rules (budget.rule): `flops` gives every arm the same training FLOPs (model.flops_per_token(), counted
`causal` = the live lower triangle, or `dense`; budget.count), `tokens` the same training tokens, `wall_clock`
the same seconds, converted to steps with each arm's throughput measured in its sweep. Steps are rounded to
the nearest whole step, so arms differ by less than one step's worth. The other two quantities are recorded.

Matched shapes (budget.match: none | params | flops): every arm but the reference (budget.reference_arm, else the
baseline) is sized so its parameter count (params) or training FLOPs per token (flops, budget.count) is the
closest the shape allows to the reference's, counted by the models themselves (meta-device builds). The rule, in
the order of budget.match_keys (default ffn_hidden, d_model, n_layers): FFN hidden size in multiples of 8 from
d_model (ffn_mult 1) up, else
d_model in multiples of 8 (valid for the arm's heads), else n_layers, each tried alone from the arm's own shape;
the first whose closest value is within budget.params_tolerance is kept (none: the closest of all). A key the arm
sets itself (model.ffn_mult / ffn_hidden, d_model, n_layers under arms.NAME) is the user's and never changed: with
all three set, the arm is not sized and the report's MISMATCH stays. plan.json's "sizing" and the report's budget
table say what changed.

The sweep extends itself (sweep.max_extend > 0; default 0, the grid as given): when an arm's best final val loss
is at the top (bottom) of the rates tried, best x (/) sweep.extend_factor (default 3) is tried next, until the best
is interior (a diverged rate beyond it counts as a bracket), max_extend rates were added, or the next rate passes
sweep.lr_min / lr_max. Decisions depend only on finished runs, so --resume makes the same ones and reuses every
finished sweep point; the report lists the whole sweep and the final bracket.

Budget views (budget.views: any of flops, tokens, wall_clock): the same main runs read off their val-loss curves
at a common budget per view (the smallest budget every finished run reached), interpolated linearly in log(loss)
against the budget between evaluation points, never extrapolated (a run whose curve does not cover it is named,
not read); wall-clock is training seconds (logged step times; evaluation and checkpoint pauses excluded). One
verdict per view.
"""
from __future__ import annotations

from mmscale.experiment.cli import add_arguments, run
from mmscale.experiment.data import prepare_data
from mmscale.experiment.expdir import open_experiment, reopen
from mmscale.experiment.measure import evaluate_run, last_val_loss, measure_key, measured, median_throughput, run_state
from mmscale.experiment.orchestrate import run_experiment, status_rows
from mmscale.experiment.plan import (Experiment, Run, budget_steps, budget_target, match_arms, match_reference,
                                     model_numbers, size_arm)
from mmscale.experiment.report import collect, write_experiment_report
from mmscale.experiment.runner import execute_run, run_local, run_slurm, train_run
from mmscale.experiment.spec import Spec, SpecError, arm_overrides, load_spec, override_list, parse_spec
from mmscale.experiment.stats import fmt, loss_at, mean_sd, read_views, training_seconds, verdict
from mmscale.experiment.sweep import choose_lrs, extend_sweep, next_sweep_lr, sweep_bracket

__all__ = ["Experiment", "Run", "Spec", "SpecError", "add_arguments", "arm_overrides", "budget_steps",
           "budget_target", "choose_lrs", "collect", "evaluate_run", "execute_run", "extend_sweep", "fmt",
           "last_val_loss", "load_spec", "loss_at", "match_arms", "match_reference", "mean_sd", "measure_key",
           "measured", "median_throughput", "model_numbers", "next_sweep_lr", "open_experiment", "override_list",
           "parse_spec", "prepare_data", "read_views", "reopen", "run", "run_experiment", "run_local", "run_slurm",
           "run_state", "size_arm", "status_rows", "sweep_bracket", "train_run", "training_seconds", "verdict",
           "write_experiment_report"]
