"""`mmscale report RUN [RUN ...] [--out report.html]`: one self-contained HTML page about one or more runs.

Everything the page needs is inside it (the data as JSON, the charts drawn by a small inline script into
SVG, inline CSS): it opens from a laptop after `scp`, with no network. Per run and overlaid across runs:
train/val loss against step, tokens or wall-clock; learning rate; gradient norm; tokens/s; MFU (dense and
causal FLOPs); data wait; peak memory; checkpoints, resumes and skipped steps marked on the x axis; the
resolved configs side by side with the keys that differ highlighted; a table of final numbers; and the
generated samples (log.sample_every).

It reads what training writes into run.dir (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/)
and tolerates a run that is still being written or that crashed: a torn last line is skipped (and
counted), a missing config or samples file leaves its section empty.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import statistics
import time
from pathlib import Path

from mmscale.config import load_yaml_file
from mmscale.errors import UserError
from mmscale.fsutil import atomic_write
from mmscale.retrieval.report import report_section
from mmscale.run.metrics import read_jsonl

MAX_POINTS = 2000  # per series in the charts (the table always uses every row)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


# ----------------------------------------------------------------------------------------------
# reading a run

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_run(path: str | Path) -> dict:
    """Everything the report shows about one run directory, as plain data."""
    run_dir = Path(path)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"run '{path}' is not a directory; pass the run.dir of a training run")
    if not metrics.is_file():
        raise UserError(f"run '{path}' has no metrics.jsonl; pass a run.dir written by `mmscale train`")
    config: dict = {}
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            config = load_yaml_file(cfg_file) or {}
        except UserError:  # not valid YAML, too large, ...: the report shows the run without its config
            config = {}
    rows, bad = read_jsonl(metrics)
    # a step logged twice (a crash, then a resume that did not trim) counts once: the later row wins
    train: dict[int, dict] = {}
    val: dict[int, float] = {}
    events: list[dict] = []
    for r in rows:
        step = int(r["step"])
        if "event" in r:
            events.append(r)
        elif "val_loss" in r:
            if _finite(r["val_loss"]):
                val[step] = float(r["val_loss"])
        elif "loss" in r:
            train[step] = r
    train_rows = [train[s] for s in sorted(train)]
    samples, _ = read_jsonl(run_dir / "samples.jsonl")
    ckpt_root = run_dir / "checkpoints"
    checkpoints = sorted(int(p.name[5:]) for p in ckpt_root.glob("step_*") if p.name[5:].isdigit()) \
        if ckpt_root.is_dir() else []
    return {"dir": str(run_dir.resolve()), "name": run_dir.resolve().name, "config": config, "train": train_rows,
            "val": sorted(val.items()), "events": events, "samples": samples, "bad_lines": bad,
            "checkpoints_on_disk": checkpoints, "mtime": metrics.stat().st_mtime}


# ----------------------------------------------------------------------------------------------
# numbers

def _elapsed(train_rows: list[dict]) -> list[float]:
    """Seconds since the run's first row: from each row's "time", else the summed step times."""
    if train_rows and all(_finite(r.get("time")) for r in train_rows):
        t0 = train_rows[0]["time"] - (train_rows[0].get("step_time") or 0.0)
        return [r["time"] - t0 for r in train_rows]
    out, total = [], 0.0
    for r in train_rows:
        total += r.get("step_time") or 0.0
        out.append(total)
    return out


def summarize(run: dict) -> dict:
    """The final-numbers table of one run (every value a plain number, string or None)."""
    tr, cfg = run["train"], run["config"]
    max_steps = (cfg.get("train") or {}).get("max_steps")
    losses = [r["loss"] for r in tr if _finite(r.get("loss"))]
    tps = [r["tokens_per_s"] for r in tr if _finite(r.get("tokens_per_s")) and not r.get("skipped")]
    steady = tps[len(tps) // 10:] if len(tps) >= 10 else tps  # skip the warm-up steps
    mfu_d = [r["mfu_dense"] if "mfu_dense" in r else r.get("mfu") for r in tr]
    mfu_d = [v for v in mfu_d if _finite(v)]
    mfu_c = [r.get("mfu_causal") for r in tr if _finite(r.get("mfu_causal"))]
    step_t = sum(r["step_time"] for r in tr if _finite(r.get("step_time")))
    wait_t = sum(r["data_wait"] for r in tr if _finite(r.get("data_wait")))
    mem = [r["peak_mem"] for r in tr if _finite(r.get("peak_mem"))]
    last_step = tr[-1]["step"] if tr else 0
    vals = [v for _, v in run["val"]]
    starts = [e for e in run["events"] if e.get("event") in ("start", "resume")]
    resumes = [e for e in run["events"] if e.get("event") == "resume"]
    ckpts = sorted({int(e["step"]) for e in run["events"] if e.get("event") == "checkpoint"}
                   | set(run["checkpoints_on_disk"]))
    if max_steps and last_step >= max_steps:
        status = "finished"
    else:
        age = time.time() - run["mtime"]
        status = (f"stopped at step {last_step}" + (f" of {max_steps}" if max_steps else "")
                  + f"; last write {_age(age)} ago (still running, or crashed/preempted)")
    peak_note = next((e.get("peak_source") for e in reversed(starts) if e.get("peak_source")), None)
    last_start = starts[-1] if starts else {}
    setup = ", ".join(str(x) for x in (
        f"{last_start['world_size']} x {last_start['device']}" if last_start.get("device") else None,
        last_start.get("engine"), last_start.get("precision")) if x)
    elapsed = _elapsed(tr)
    return {
        "status": status,
        "steps": last_step,
        "max_steps": max_steps,
        "tokens": tr[-1].get("tokens") if tr else None,
        "last_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "last_val_loss": vals[-1] if vals else None,
        "min_val_loss": min(vals) if vals else None,
        "median_tokens_per_s": statistics.median(steady) if steady else None,
        "mean_mfu_dense": statistics.fmean(mfu_d) if mfu_d else None,
        "mean_mfu_causal": statistics.fmean(mfu_c) if mfu_c else None,
        "data_wait_fraction": wait_t / step_t if step_t > 0 else None,
        "max_peak_mem": max(mem) if mem else None,
        "skipped_steps": sum(1 for r in tr if r.get("skipped")),
        "checkpoints": len(ckpts),
        "resumes": len(resumes),
        "wall_clock_s": elapsed[-1] if elapsed else None,
        "samples": len(run["samples"]),
        "bad_lines": run["bad_lines"],
        "mfu_note": peak_note,
        "setup": setup,
        "threads": last_start.get("threads"),
        "load_avg_start": [e.get("load_avg") for e in starts if e.get("load_avg") is not None],
    }


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_rows(runs: list[dict]) -> list[tuple[str, list[str], bool]]:
    """(key, value per run as text, values differ) for every key any run has."""
    flats = [_flatten(r["config"]) for r in runs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    rows = []
    for k in keys:
        vals = [json.dumps(f[k]) if k in f else "(absent)" for f in flats]
        rows.append((k, vals, len(set(vals)) > 1))
    return rows


def _decimate(points: list, keep: set[int] | None = None) -> list:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return [p for i, p in enumerate(points) if i % stride == 0 or i == len(points) - 1
            or (keep and p[0] in keep)]


def chart_data(run: dict) -> dict:
    """Per-run series for the page's script: x in step, tokens and seconds; y per metric."""
    tr = run["train"]
    elapsed = _elapsed(tr)
    step_to = {r["step"]: (r.get("tokens"), e) for r, e in zip(tr, elapsed)}

    def x_of(step):
        if step in step_to:
            return step_to[step]
        before = [s for s in step_to if s <= step]
        return step_to[max(before)] if before else (None, None)

    def series(key, alt=None):
        pts = []
        for r, e in zip(tr, elapsed):
            v = r.get(key, r.get(alt) if alt else None)
            if _finite(v):
                pts.append([r["step"], r.get("tokens"), round(e, 3), v])
        return _decimate(pts)

    marks = []
    for e in run["events"]:
        kind = e.get("event")
        if kind in ("checkpoint", "resume", "profile"):
            tok, sec = x_of(int(e["step"]))
            marks.append({"kind": kind, "step": e["step"], "tokens": tok, "sec": sec})
    for r, e in zip(tr, elapsed):
        if r.get("skipped"):
            marks.append({"kind": "skipped", "step": r["step"], "tokens": r.get("tokens"), "sec": round(e, 3)})
    val = []
    for step, v in run["val"]:
        tok, sec = x_of(step)
        val.append([step, tok, sec, v])
    return {"loss": series("loss"), "val_loss": val, "lr": series("lr"), "grad_norm": series("grad_norm"),
            "tokens_per_s": series("tokens_per_s"), "mfu_dense": series("mfu_dense", "mfu"),
            "mfu_causal": series("mfu_causal"), "data_wait": series("data_wait"),
            "peak_mem": series("peak_mem"), "marks": marks}


# ----------------------------------------------------------------------------------------------
# the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#24292f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
main{padding:12px 24px 40px;max-width:1400px}
h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.legend span{display:inline-block;margin-right:16px}.legend i{display:inline-block;width:22px;height:4px;
vertical-align:middle;margin-right:6px;border-radius:2px}
.controls{margin:8px 0}.controls label{margin-right:14px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.card{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:8px 10px}
.card h3{margin:0 0 4px;font-size:13px;font-weight:600}.card .note{color:#6a737d;font-size:12px;margin:4px 0 0}
svg text{font-size:10px;fill:#57606a}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #e1e4e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.diff td{background:#fff5cc}tr.diff td:first-child{font-weight:600}
.hide-same tr.same{display:none}
.sample{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:6px 10px;margin:6px 0;
white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.sample b{color:#0550ae}.muted{color:#6a737d}#js-errors{color:#b00020;white-space:pre-wrap}
"""

JS = r"""
(function () {
  "use strict";
  var errs = document.getElementById("js-errors");
  function fail(msg) { errs.textContent += msg + "\n"; document.body.setAttribute("data-js-error", "1"); }
  window.addEventListener("error", function (e) { fail("script error: " + e.message); });
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var XI = {step: 0, tokens: 1, time: 2};
  var SHOWN = DATA.runs.map(function () { return true; });  // the legend's checkboxes hide and show runs
  function el(name, attrs, parent) {
    var n = document.createElementNS(NS, name);
    for (var k in attrs) n.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(n);
    return n;
  }
  function fmt(v) {
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e9) return (v / 1e9).toPrecision(3) + "G";
    if (a >= 1e6) return (v / 1e6).toPrecision(3) + "M";
    if (a >= 1e4) return (v / 1e3).toPrecision(3) + "k";
    if (a < 1e-3) return v.toExponential(1);
    return +v.toPrecision(3) + "";
  }
  function fmtTime(s) { return s >= 7200 ? fmt(s / 3600) + "h" : s >= 120 ? fmt(s / 60) + "m" : fmt(s) + "s"; }
  function ticks(lo, hi, n) {
    var span = hi - lo, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = span / n / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }
  function draw(box, spec, xkey) {
    box.innerHTML = "";
    var W = 420, H = 230, L = 52, R = 10, T = 8, B = 30;
    var xi = XI[xkey], lines = [], xs = [], ys = [];
    var runs = DATA.runs.filter(function (run, ri) { return SHOWN[ri]; });
    runs.forEach(function (run) {
      spec.series.forEach(function (s) {
        var pts = (run.charts[s.key] || []).filter(function (p) { return p[xi] !== null && p[3] !== null; });
        if (!pts.length) return;
        pts.forEach(function (p) { xs.push(p[xi]); ys.push(p[3]); });
        lines.push({pts: pts, color: run.color, dash: s.dash, dots: s.dots, label: run.name + " " + s.label});
      });
    });
    if (!lines.length) {
      var p = document.createElement("p"); p.className = "note";
      p.textContent = spec.empty || "no data in these runs"; box.appendChild(p); return;
    }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (spec.zero) y0 = Math.min(0, y0);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; y0 = y0 - (Math.abs(y0) || 1) * 0.1; }
    var pad = (y1 - y0) * 0.05; y1 += pad; if (!spec.zero) y0 -= pad;
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: "100%", role: "img"}, box);
    var sx = function (v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (v) { return T + (1 - (v - y0) / (y1 - y0)) * (H - T - B); };
    ticks(y0, y1, 5).forEach(function (v) {
      el("line", {x1: L, x2: W - R, y1: sy(v), y2: sy(v), stroke: "#eaeef2"}, svg);
      el("text", {x: L - 4, y: sy(v) + 3, "text-anchor": "end"}, svg).textContent = fmt(v);
    });
    ticks(x0, x1, 6).forEach(function (v) {
      el("line", {x1: sx(v), x2: sx(v), y1: T, y2: H - B, stroke: "#f3f4f6"}, svg);
      el("text", {x: sx(v), y: H - B + 13, "text-anchor": "middle"}, svg).textContent =
        xkey === "time" ? fmtTime(v) : fmt(v);
    });
    el("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle"}, svg).textContent =
      {step: "step", tokens: "tokens", time: "wall-clock"}[xkey];
    el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#d0d7de"}, svg);
    var MARK = {checkpoint: ["#8c959f", "3,3"], resume: ["#e36209", ""], skipped: ["#cf222e", ""],
                profile: ["#8250df", "1,2"]};
    runs.forEach(function (run) {
      run.charts.marks.forEach(function (m) {
        var x = {step: m.step, tokens: m.tokens, time: m.sec}[xkey];
        if (x === null || x === undefined || x < x0 || x > x1) return;
        var style = MARK[m.kind];
        var ln = el("line", {x1: sx(x), x2: sx(x), y1: T, y2: H - B, stroke: style[0], "stroke-width": 1,
                             "stroke-dasharray": style[1], "class": "mark mark-" + m.kind}, svg);
        el("title", {}, ln).textContent = run.name + ": " + m.kind + " at step " + m.step;
      });
    });
    lines.forEach(function (ln) {
      var d = ln.pts.map(function (p, i) {
        return (i ? "L" : "M") + sx(p[xi]).toFixed(1) + " " + sy(p[3]).toFixed(1);
      });
      var path = el("path", {d: d.join(""), fill: "none", stroke: ln.color, "stroke-width": ln.dots ? 1.6 : 1.2,
                             "stroke-dasharray": ln.dash || "", "class": "series"}, svg);
      el("title", {}, path).textContent = ln.label;
      if (ln.dots) ln.pts.forEach(function (p) {
        var c = el("circle", {cx: sx(p[xi]), cy: sy(p[3]), r: 2.6, fill: ln.color}, svg);
        el("title", {}, c).textContent = ln.label + " " + fmt(p[3]) + " at step " + p[0];
      });
    });
  }
  function render() {
    var xkey = document.querySelector("input[name=xaxis]:checked").value;
    DATA.charts.forEach(function (spec) { draw(document.getElementById("chart-" + spec.id), spec, xkey); });
    document.body.setAttribute("data-rendered", String(document.querySelectorAll("svg path.series").length));
  }
  try {
    document.querySelectorAll("input[name=xaxis]").forEach(function (r) { r.addEventListener("change", render); });
    document.querySelectorAll("input.run-toggle").forEach(function (box) {
      box.addEventListener("change", function () { SHOWN[+box.getAttribute("data-index")] = box.checked; render(); });
    });
    var same = document.getElementById("only-diff");
    if (same) same.addEventListener("change", function () {
      document.getElementById("config-table").classList.toggle("hide-same", same.checked);
    });
    render();
  } catch (e) { fail("report script failed: " + e); }
})();
"""

CHARTS = [
    {"id": "loss", "title": "Loss (nats/token): train line, validation dots",
     "series": [{"key": "loss", "label": "train"}, {"key": "val_loss", "label": "val", "dash": "4,3", "dots": True}]},
    {"id": "lr", "title": "Learning rate", "series": [{"key": "lr", "label": "lr"}], "zero": True},
    {"id": "grad_norm", "title": "Gradient norm (before clipping)",
     "series": [{"key": "grad_norm", "label": "grad norm"}]},
    {"id": "tokens_per_s", "title": "Throughput (tokens/s, all ranks)",
     "series": [{"key": "tokens_per_s", "label": "tokens/s"}], "zero": True},
    {"id": "mfu", "title": "MFU: dense FLOPs (solid) and causal/live FLOPs (dashed)",
     "series": [{"key": "mfu_dense", "label": "MFU dense"},
                {"key": "mfu_causal", "label": "MFU causal", "dash": "5,3"}],
     "zero": True},
    {"id": "data_wait", "title": "Data wait (s per step)", "series": [{"key": "data_wait", "label": "data wait"}],
     "zero": True},
    {"id": "peak_mem", "title": "Peak memory (MiB per rank: CUDA max allocated, or peak RSS on CPU)",
     "series": [{"key": "peak_mem", "label": "peak mem"}], "zero": True},
]

TABLE = [  # (key, heading, format)
    ("status", "status", "text"),
    ("steps", "steps", "int"),
    ("tokens", "tokens", "int"),
    ("last_loss", "last train loss", "4"),
    ("min_loss", "min train loss", "4"),
    ("last_val_loss", "last val loss", "4"),
    ("min_val_loss", "min val loss", "4"),
    ("median_tokens_per_s", "median tokens/s", "0"),
    ("mean_mfu_dense", "mean MFU (dense FLOPs)", "pct"),
    ("mean_mfu_causal", "mean MFU (causal FLOPs)", "pct"),
    ("data_wait_fraction", "data wait / step time", "pct"),
    ("max_peak_mem", "peak memory (MiB)", "0"),
    ("skipped_steps", "skipped steps", "int"),
    ("checkpoints", "checkpoints", "int"),
    ("resumes", "resumes", "int"),
    ("wall_clock_s", "wall-clock (s)", "0"),
]


def _fmt(v, how: str) -> str:
    if v is None:
        return "—"
    if how == "text":
        return str(v)
    if how == "int":
        return f"{int(v):,}"
    if how == "pct":
        return f"{100 * v:.2f}%"
    return f"{v:,.{int(how)}f}"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


PAGE_END = "</main></body></html>"


def page_head(title: str, subtitle: str, css: str = CSS) -> list[str]:
    """The opening of every mmscale HTML page (this report, `mmscale experiment report`): the style, a header
    with the title and one line under it, then <main>; the caller adds the body and PAGE_END."""
    return ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>", f"<style>{css}</style></head><body>",
            f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header><main>"]


def build_html(runs: list[dict]) -> str:
    summaries = [summarize(r) for r in runs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # two runs called the same: tell them apart by their parent folder
        names = [str(Path(r["dir"]).parent.name + "/" + r["name"]) for r in runs]
    out = page_head(f"mmscale report: {', '.join(names)}",
                    f"made {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(runs)} run(s); "
                    "self-contained: opens without a network") + ['<div id="js-errors"></div>']
    out.append(_legend(runs, names))
    out.extend(_final_numbers(names, summaries))
    out.extend(report_section(runs, names))  # retrieval runs: in-batch accuracy, cosine, collapse warning
    out.extend(_curves())
    out.extend(_samples(runs, names))
    out.extend(_configs(runs, names))
    # no "<" inside the script element at all ("</script>", "<!--" would end or confuse it); JSON reads \u003c
    payload = json.dumps(_chart_payload(runs, names, summaries), separators=(",", ":"),
                         allow_nan=False).replace("<", "\\u003c")
    out.append(f'<script type="application/json" id="report-data">{payload}</script>')
    out.append(f"<script>{JS}</script>{PAGE_END}")
    return "\n".join(out)


def _chart_payload(runs: list[dict], names: list[str], summaries: list[dict]) -> dict:
    """What the page's script draws: each run's series and color, and the chart specs (MFU's empty note)."""
    data = {"runs": [{"name": n, "color": COLORS[i % len(COLORS)], "charts": chart_data(r)}
                     for i, (n, r) in enumerate(zip(names, runs))], "charts": []}
    mfu_notes = sorted({s["mfu_note"] for s in summaries if s["mfu_note"] and s["mean_mfu_dense"] is None})
    for spec in CHARTS:
        spec = dict(spec)
        if spec["id"] == "mfu":
            spec["empty"] = "MFU is empty: " + ("; ".join(mfu_notes) or "no peak FLOP/s for these runs "
                                                                       "(set log.peak_flops)")
        data["charts"].append(spec)
    return data


def _legend(runs: list[dict], names: list[str]) -> str:
    """One toggle per run, then the key to the marks on the x axis."""
    return ('<div class="legend">' + "".join(
        f'<span><label><input type="checkbox" class="run-toggle" data-index="{i}" checked>'
        f'<i style="background:{COLORS[i % len(COLORS)]}"></i>{_e(n)}</label> <span class="muted">({_e(r["dir"])})'
        f"</span></span>" for i, (n, r) in enumerate(zip(names, runs))) + "</div>"
        + '\n<div class="muted">marks on the x axis: <span style="color:#8c959f">dashed grey = checkpoint</span>, '
        '<span style="color:#e36209">orange = resume</span>, <span style="color:#cf222e">red = skipped '
        'step (non-finite loss)</span>, <span style="color:#8250df">purple = profiled steps</span></div>')


def _final_numbers(names: list[str], summaries: list[dict]) -> list[str]:
    """The table of final numbers, then the setup lines and notes (skipped lines, MFU's reference)."""
    out = ['<h2 id="final">Final numbers</h2><table id="final-table"><tr><th>run</th>'
           + "".join(f"<th>{_e(h)}</th>" for _, h, _ in TABLE) + "</tr>"]
    for n, s in zip(names, summaries):
        cells = []
        for key, _, how in TABLE:
            v = s[key]
            attr = f' data-key="{key}"' + (f' data-value="{_e(repr(v))}"' if isinstance(v, (int, float)) else "")
            cells.append(f'<td class="{"num" if how != "text" else ""}"{attr}>{_e(_fmt(v, how))}</td>')
        out.append(f'<tr data-run="{_e(n)}"><td>{_e(n)}</td>' + "".join(cells) + "</tr>")
    out.append("</table>")
    notes, setups = [], []
    for n, s in zip(names, summaries):
        if s["bad_lines"]:
            notes.append(f"{n}: {s['bad_lines']} unreadable line(s) in metrics.jsonl skipped (a run still being "
                         "written, or killed mid-line)")
        if s["mean_mfu_dense"] is None and s["mfu_note"]:
            notes.append(f"{n}: MFU empty: {s['mfu_note']}")
        elif s["mfu_note"]:
            notes.append(f"{n}: MFU against {s['mfu_note']}")
        if s["setup"]:
            setups.append(f"{n}: {s['setup']}")
    if setups or notes:
        out.append("<ul class=\"muted\">" + "".join(f"<li>{_e(x)}</li>" for x in setups + notes) + "</ul>")
    return out


def _curves() -> list[str]:
    """The x-axis switch and one empty card per chart (the script draws into them)."""
    out = ['<h2 id="charts">Curves</h2><div class="controls">x axis: '
           '<label><input type="radio" name="xaxis" value="step" checked> step</label>'
           '<label><input type="radio" name="xaxis" value="tokens"> tokens</label>'
           '<label><input type="radio" name="xaxis" value="time"> wall-clock</label></div><div class="grid">']
    for spec in CHARTS:
        out.append(f'<div class="card"><h3>{_e(spec["title"])}</h3><div id="chart-{spec["id"]}"></div></div>')
    out.append("</div>")
    return out


def _samples(runs: list[dict], names: list[str]) -> list[str]:
    """Each run's generated samples by step, newest first (the newest open)."""
    out = ['<h2 id="samples">Generated samples</h2>']
    any_samples = False
    for n, r in zip(names, runs):
        if not r["samples"]:
            continue
        any_samples = True
        out.append(f"<h3>{_e(n)}</h3>")
        by_step: dict[int, list] = {}
        for s in r["samples"]:
            by_step.setdefault(int(s["step"]), []).append(s)
        steps = sorted(by_step, reverse=True)
        for i, step in enumerate(steps):
            body = "".join(f'<div class="sample"><b>{_e(s.get("prompt", ""))}</b>{_e(s.get("text", ""))}</div>'
                           for s in by_step[step])
            out.append(f"<details{' open' if i == 0 else ''}><summary>step {step}</summary>{body}</details>")
    if not any_samples:
        out.append('<p class="muted">none: set log.sample_every (and log.sample_prompts) to write samples while '
                   "training</p>")
    return out


def _configs(runs: list[dict], names: list[str]) -> list[str]:
    """The resolved configs side by side, the keys that differ highlighted."""
    rows = config_rows(runs)
    n_diff = sum(1 for _, _, d in rows if d)
    out = [f'<h2 id="config">Resolved config</h2><p>{len(rows)} keys'
           + (f", <b>{n_diff} differ</b> between the runs (highlighted)" if len(runs) > 1 else "")
           + '. <label><input type="checkbox" id="only-diff"> show only keys that differ</label></p>',
           '<table id="config-table"><tr><th>key</th>' + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"]
    for key, vals, diff in rows:
        out.append(f'<tr class="{"diff" if diff else "same"}" data-key="{_e(key)}"><td>{_e(key)}</td>'
                   + "".join(f"<td>{_e(v)}</td>" for v in vals) + "</tr>")
    out.append("</table>")
    return out


def write_report(run_dirs: list[str], out: str | Path) -> Path:
    if not run_dirs:
        raise UserError("no run given; pass one or more run directories: mmscale report runs/a runs/b")
    runs = [load_run(d) for d in run_dirs]
    for r in runs:  # json cannot carry NaN/inf: drop them (the table counts from the rows themselves)
        r["train"] = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
                      for row in r["train"]]
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    if not out.parent.is_dir():
        raise UserError(f"--out: folder '{out.parent}' does not exist; create it or choose another path")
    atomic_write(out, build_html(runs))  # a page anyone can rewrite: not durable
    return out


# ----------------------------------------------------------------------------------------------
# `mmscale report`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (run.dir of mmscale train); "
                                                              "several are overlaid and compared")
    parser.add_argument("--out", default="report.html", help="the HTML file to write (a folder: FOLDER/report.html)")


def run(args: argparse.Namespace) -> int:
    out = write_report(args.runs, args.out)
    print(out)
    return 0
