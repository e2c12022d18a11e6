"""The statistics of the report: mean ± sd over seeds, plain verdicts (a difference within two standard errors is
no difference), and budget views (the same val-loss curves read at a common budget, never extrapolated)."""
from __future__ import annotations

import math
import statistics

from mmscale.experiment.spec import Spec


VIEW_LABELS = {"flops": "training FLOPs", "tokens": "training tokens", "wall_clock": "training seconds"}


def training_seconds(train_rows: list[dict]) -> list[tuple[int, float]]:
    """[(step, seconds spent training up to that step)], starting at (0, 0): each logged row's step time stands
    for every step since the previous logged row (rows come every log.every steps); evaluation, checkpoint
    pauses and the gaps of a resume are not counted."""
    out, total, prev, last = [(0, 0.0)], 0.0, 0, 0.0
    for r in sorted(train_rows, key=lambda r: int(r["step"])):
        st = r.get("step_time")
        st = float(st) if isinstance(st, (int, float)) and math.isfinite(st) and st >= 0 else last
        step = int(r["step"])
        if step <= prev:
            continue
        total += (step - prev) * st
        out.append((step, total))
        prev, last = step, st
    return out


def linear_at(points: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def loss_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The val loss at budget x read off a curve [(budget, loss)] of evaluation points: linear in log(loss)
    against the budget between the two points around x (a point's own loss at a point); None when x lies before
    the first or beyond the last point (never extrapolated). x within 1e-9 (relative) of an end counts as it."""
    pts = sorted((float(b), float(v)) for b, v in curve if v is not None and v > 0 and math.isfinite(v))
    if not pts:
        return None
    eps = 1e-9 * max(abs(pts[-1][0]), 1e-300)
    if x < pts[0][0] - eps or x > pts[-1][0] + eps:
        return None
    x = min(max(x, pts[0][0]), pts[-1][0])
    y = linear_at([(b, math.log(v)) for b, v in pts], x)
    return None if y is None else math.exp(y)


def view_axis(spec: Spec, view: str) -> str:
    return {"flops": "flops_" + spec.budget["count"], "tokens": "tokens", "wall_clock": "seconds"}[view]


def read_views(spec: Spec, runs: list[dict]) -> dict:
    """{view: {"at": the common budget, "not_read": [why, ...]}} for one axis point's main runs, and each run's
    r["views"][view] = its loss there (None: not read). The common budget of a view is the smallest budget the
    finished runs all reached (the last evaluation point of the shortest one), so no finished run is read beyond
    its curve; a run that stops short of it (unfinished, or no curve) is named instead of extrapolated."""
    out = {}
    finished = [r for r in runs if r["curve"] and r["summary"].get("status") == "finished"] or \
        [r for r in runs if r["curve"]]
    for view in spec.budget["views"]:
        axis = view_axis(spec, view)
        ends = [r["curve"][-1].get(axis) for r in finished if r["curve"][-1].get(axis) is not None]
        at = min(ends) if ends else None
        notes = []
        for r in runs:
            pts = [(c.get(axis), c["val_loss"]) for c in r["curve"] if c.get(axis) is not None]
            v = loss_at(pts, at) if at is not None and pts else None
            r.setdefault("views", {})[view] = v
            if v is None and at is not None:
                where = (f"beyond its curve, which ends at {fmt(float(pts[-1][0]))}" if pts and at > pts[-1][0] else
                         f"before its first evaluation point, at {fmt(float(pts[0][0]))}" if pts else
                         "outside its curve: it has no val-loss curve")
                notes.append(f"{r['arm']} seed {r['seed']}: the common budget lies {where}; not read (never "
                             "extrapolated)")
        out[view] = {"at": at, "axis": axis, "not_read": notes}
    return out


def mean_sd(xs: list[float]) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def verdict(a: list[float], b: list[float], a_name: str, b_name: str, lower_better: bool, unit: str = "") -> str:
    """Plain verdict comparing arm a with arm b: the difference of means ± its standard error; a difference
    within two standard errors is "no difference within noise"."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if ma is None or mb is None:
        return "not measured"
    diff = (mb - ma) if lower_better else (ma - mb)  # > 0: a better
    if sa is None or sb is None:
        who = a_name if diff > 0 else b_name
        return (f"{who} better by {abs(diff):.4g}{unit} (one seed: no estimate of the noise, not a verdict)"
                if diff else "equal (one seed)")
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    if abs(diff) <= 2 * se:
        return f"no difference within noise ({a_name} - {b_name}: {ma - mb:+.4g} ± {se:.2g}{unit})"
    who = a_name if diff > 0 else b_name
    return f"{who} better by {abs(diff):.4g} ± {se:.2g}{unit}"


def fmt(v, nd=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100 and abs(v) < 1e6:
        return f"{v:.0f}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def ms(xs, nd=4) -> str:
    m, s, n = mean_sd(xs)
    if m is None:
        return "–"
    if abs(m) >= 100:
        nd = 0
    return f"{m:.{nd}f} ± {s:.{nd}f}" if s is not None else f"{m:.{nd}f}"
