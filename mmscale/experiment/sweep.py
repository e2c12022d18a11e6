"""The learning-rate sweep: every arm's grid, extended toward an edge best (sweep.extend_factor) until the best
is interior or a bound stops it; the best final val loss is carried to the full budget."""
from __future__ import annotations

import math

from mmscale.errors import UserError
from mmscale.experiment.measure import last_val_loss, median_throughput
from mmscale.experiment.plan import Experiment, Run, budget_steps


def next_sweep_lr(results: list[tuple[float, float | None]], factor: float, lr_min: float, lr_max: float,
                  extended: int, max_extend: int) -> tuple[float | None, str]:
    """The sweep's next learning rate (None: the sweep is done) and why, from the (lr, final val loss) pairs tried
    so far: when the best finite loss is at the top of the rates tried, try best x factor; at the bottom,
    best / factor; when every run diverged, lowest / factor. Stops when the best is interior (a diverged rate
    above or below counts as a bracket), after max_extend added rates, or when the next rate would pass
    lr_min / lr_max. A one-rate grid is not extended (nothing to bracket)."""
    lrs = sorted({lr for lr, _ in results})
    if len(lrs) < 2:
        return None, "one rate: not a sweep, not extended"
    ok = [(loss, lr) for lr, loss in results if loss is not None and math.isfinite(loss)]
    if not ok:
        new, where = lrs[0] / factor, "every rate diverged"
    else:
        best = min(ok)[1]
        if lrs[0] < best < lrs[-1]:
            return None, "best is interior"
        new, where = (best * factor, "best at the top") if best == lrs[-1] else (best / factor, "best at the bottom")
    new = float(f"{new:.12g}")
    if extended >= max_extend:
        return None, f"{where}; sweep.max_extend ({max_extend}) rates added, not extended further"
    if new > lr_max * (1 + 1e-9) or new < lr_min * (1 - 1e-9):
        return None, (f"{where}; the next rate {new:.3g} is beyond sweep.{'lr_max' if new > lr_max else 'lr_min'} "
                      f"({lr_max if new > lr_max else lr_min:g}), not extended")
    return new, where


def sweep_bracket(results: list[tuple[float, float | None]]) -> tuple[float | None, float | None, float | None]:
    """(lower neighbour, best, upper neighbour) of the best finite loss among the rates tried."""
    lrs = sorted({lr for lr, _ in results})
    ok = [(loss, lr) for lr, loss in results if loss is not None and math.isfinite(loss)]
    if not ok:
        return None, None, None
    best = min(ok)[1]
    i = lrs.index(best)
    return (lrs[i - 1] if i > 0 else None), best, (lrs[i + 1] if i + 1 < len(lrs) else None)


def extend_sweep(exp: Experiment, sweep: list[Run]) -> list[str]:
    """Add the next rate to every (point, arm) sweep whose best is at an edge (exp.sweep_ext); returns what was
    added, one line each (empty: every sweep is done)."""
    s = exp.spec.sweep
    added = []
    groups: dict = {}
    for run in sweep:
        if run.lr is not None:
            groups.setdefault((run.point, run.arm), []).append((run.lr, last_val_loss(run.dir(exp.exp))))
    for (pk, an), results in groups.items():
        ext = exp.sweep_ext.setdefault(pk, {}).setdefault(an, [])
        new, why = next_sweep_lr(results, s["extend_factor"], s["lr_min"], s["lr_max"], len(ext), s["max_extend"])
        if new is not None and new not in {lr for lr, _ in results}:
            ext.append(new)
            added.append(f"{pk}/{an}: {why}; adding lr {new:.4g}")
    return added


def choose_lrs(exp: Experiment, sweep: list[Run]) -> dict:
    """{point: {arm: {"lr", "steps", "sweep": [{lr, val_loss, tokens_per_s}]}}}."""
    choice: dict = {}
    for run in sweep:
        rd = run.dir(exp.exp)
        entry = choice.setdefault(run.point, {}).setdefault(run.arm, {"sweep": []})
        entry["sweep"].append({"lr": run.lr, "val_loss": last_val_loss(rd), "tokens_per_s": median_throughput(rd),
                               "steps": run.steps, "run": str(rd)})
    for pk, arms in choice.items():
        for an, entry in arms.items():
            ok = [s for s in entry["sweep"] if s["val_loss"] is not None and math.isfinite(s["val_loss"])]
            if not ok:
                raise UserError(f"no sweep run of arm '{an}' ({pk}) has a finite val loss; widen sweep.lr or check "
                                "the data's val split")
            best = min(ok, key=lambda s: s["val_loss"])
            entry["lr"] = best["lr"]
            entry["sweep"].sort(key=lambda s: s["lr"] or 0)
            results = [(x["lr"], x["val_loss"]) for x in entry["sweep"] if x["lr"] is not None]
            if results:
                sw = exp.spec.sweep
                ext = exp.sweep_ext.get(pk, {}).get(an, [])
                entry["bracket"] = list(sweep_bracket(results))
                entry["extended"] = list(ext)
                entry["stop"] = next_sweep_lr(results, sw["extend_factor"], sw["lr_min"], sw["lr_max"], len(ext),
                                              sw["max_extend"])[1]
            tps = best["tokens_per_s"]
            entry["steps"] = budget_steps(exp.spec, exp.numbers[pk], an, tps)
    return choice
