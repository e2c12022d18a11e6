"""Watching a run: `mmscale report` (numbers against metrics.jsonl, a real headless Chromium that loads the
page without a console error and paints it), samples while training (also with sharded parameters),
MFU from the device table, TensorBoard scalars, wandb on resume, and the profiler trace.

Chromium is Debian's package, installed with apt-get when missing and running as root (as the SLURM
tests install slurm); elsewhere the browser tests skip and say why. MMSCALE_REQUIRE_CHROMIUM=1 turns that
skip into a failure.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmscale.config import load_config
from mmscale.errors import UserError
from mmscale.run.train import train
from tests._data_helpers import make_tiny_dataset
from tests._report_helpers import console_errors, ensure_chromium, real_config, run_chromium

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# two tiny real runs: a mixer that crashed mid-write and was resumed, and a transformer that crashed

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    data = make_tiny_dataset(root, n_ctx=32, vocab_size=512)
    mixer, tf = root / "mixer", root / "transformer"
    common = {"log.sample_every": 4, "log.sample_temperature": 0, "log.sample_tokens": 12,
              "log.sample_prompts": "[Once upon a time, The little]"}
    ov = real_config(mixer, data, **common, **{"train.max_steps": 12, "train.eval_every": 4, "checkpoint.every": 6,
                                               "log.tensorboard": "true", "log.profile_steps": "[2,2]"})
    assert train(load_config(None, ov)) == 0
    with (mixer / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 4.1')  # killed mid-line
    # resumed (a longer run from the same run.dir): continues from the step-12 checkpoint
    ov = real_config(mixer, data, **common, **{"train.max_steps": 16, "train.eval_every": 4, "checkpoint.every": 6,
                                               "log.tensorboard": "true", "log.profile_steps": "[2,2]"})
    assert train(load_config(None, ov)) == 0
    # the transformer: a non-finite loss at step 3 (skipped); preempted (a signal in step 8: it stops after
    # step 9) and not resumed; then a torn line
    import mmscale.engines
    from mmscale.run.train import default_model_factory
    from tests._dist import _signal_self_at, with_nan_at_steps

    ov = real_config(tf, data, **{"model.kind": "transformer", "model.heads": 2, "train.max_steps": 10,
                                  "train.eval_every": 5, "checkpoint.every": 0, "log.peak_flops": 1e12,
                                  "log.sample_every": 5, "log.sample_tokens": 8})
    lr_at = mmscale.engines.lr_at
    try:
        _signal_self_at({"step": 8, "ranks": [0], "signal": "SIGTERM"})
        assert train(load_config(None, ov), model_factory=with_nan_at_steps(default_model_factory, [3])) == 75
    finally:
        mmscale.engines.lr_at = lr_at
    with (tf / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10, "loss"')
    return {"mixer": mixer, "transformer": tf, "data": data}


def test_samples_at_the_chosen_steps_and_a_resume_marker(runs):
    samples = _rows(runs["mixer"] / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (st, p) for st in (4, 8, 12, 16) for p in ("Once upon a time", "The little")]
    assert all(isinstance(s["text"], str) and 1 <= s["tokens"] <= 12 for s in samples)
    rows = _rows(runs["mixer"] / "metrics.jsonl")
    events = [(r["event"], r["step"]) for r in rows if "event" in r]
    assert ("start", 0) in events and ("resume", 12) in events
    assert [s for e, s in events if e == "checkpoint"] == [6, 12, 16]
    assert [s for e, s in events if e == "samples"] == [4, 8, 12, 16]
    # the resume trimmed the torn line: every line of metrics.jsonl is JSON again, steps 1..16 once each
    lines = (runs["mixer"] / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 17))
    start = next(r for r in rows if r.get("event") == "start")
    assert start["peak_flops"] is None and "CPU" in start["peak_source"]


def test_mfu_columns_dense_and_causal(runs):
    from mmscale.models import build_model

    cfg = load_config(runs["transformer"] / "config.yaml")
    flops = build_model(cfg.model).flops_per_token()
    assert flops["causal"] < flops["dense"]
    train_rows = [r for r in _rows(runs["transformer"] / "metrics.jsonl") if "loss" in r]
    for r in train_rows:
        assert r["mfu_dense"] == pytest.approx(r["tokens_per_s"] * flops["dense"] / 1e12)
        assert r["mfu_causal"] == pytest.approx(r["tokens_per_s"] * flops["causal"] / 1e12)
        assert r["mfu"] == r["mfu_dense"]
    mixer_rows = [r for r in _rows(runs["mixer"] / "metrics.jsonl") if "loss" in r]
    assert all(r["mfu_dense"] is None and r["mfu_causal"] is None for r in mixer_rows)  # CPU: no peak


def test_peak_flops_table_by_device_name():
    from mmscale.peak_flops import device_peak, lookup
    import torch

    T = 1e12
    assert lookup("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.5 * T
    assert lookup("NVIDIA H100 PCIe", "bf16")[0] == 756.5 * T
    assert lookup("NVIDIA H100 NVL", "bf16")[0] == 835.5 * T
    assert lookup("NVIDIA H200", "bf16")[0] == 989.5 * T
    assert lookup("NVIDIA H200 NVL", "fp32")[0] == 60 * T
    assert lookup("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312 * T
    assert lookup("NVIDIA A100 80GB PCIe", "fp32")[0] == 19.5 * T
    assert lookup("NVIDIA L40S", "bf16")[0] == 362.05 * T
    assert lookup("NVIDIA L40", "bf16")[0] == 181.05 * T
    assert lookup("NVIDIA L4", "bf16")[0] == 121 * T
    assert lookup("NVIDIA A10", "bf16")[0] == 125 * T
    assert lookup("NVIDIA A10G", "bf16")[0] is None  # not a datasheet part: unknown, not A10's number
    assert lookup("AMD Instinct MI300X", "bf16")[0] == 1307.4 * T
    assert device_peak(torch.device("cpu"), "bf16")[0] is None
    # on CUDA the device's name picks the row (the name as torch reports it on an H200 and an A10G)
    for name, want in (("NVIDIA H200", 989.5 * T), ("NVIDIA A10G", None)):
        import unittest.mock
        with unittest.mock.patch.object(torch.cuda, "get_device_name", lambda device=None, n=name: n):
            peak, note = device_peak(torch.device("cuda"), "bf16")
        assert peak == want and (("H200" in note) if want else "set log.peak_flops" in note), note
    assert device_peak(torch.device("cpu"), "bf16", 5e13) == (5e13, "log.peak_flops")


def test_tensorboard_scalars_are_the_metrics_jsonl_names(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["mixer"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = _rows(runs["mixer"] / "metrics.jsonl")
    numeric = {k for r in rows if "event" not in r for k, v in r.items()
               if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None}
    assert numeric and numeric <= tags, numeric - tags
    want = {r["step"]: r["loss"] for r in rows if "loss" in r}
    got = {}
    for ev in acc.Scalars("loss"):  # the resume purged what the first start logged after its checkpoint
        got[ev.step] = ev.value
    assert sorted(got) == sorted(want)
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want)
    assert [e.step for e in acc.Scalars("val_loss")] == [4, 8, 12, 16]


def test_profiler_trace_is_a_chrome_trace(runs):
    trace = runs["mixer"] / "profile" / "steps_2-3" / "rank0.pt.trace.json"
    data = json.loads(trace.read_text())
    names = {e.get("name", "") for e in data["traceEvents"]}
    assert len(data["traceEvents"]) > 100 and any("aten::" in n for n in names)
    ev = [r for r in _rows(runs["mixer"] / "metrics.jsonl") if r.get("event") == "profile"]
    assert [(e["first"], e["last"], e["trace"]) for e in ev] == [(2, 3, str(trace))]


# ----------------------------------------------------------------------------------------------
# the report's numbers

class _Table(HTMLParser):
    """{run: {key: value}} from the final-numbers table's data-key / data-value cells."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, dict] = {}
        self.text: dict[str, dict] = {}
        self.config_rows: dict[str, str] = {}
        self._run = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-run" in a:
            self._run = a["data-run"]
            self.values[self._run], self.text[self._run] = {}, {}
        elif tag == "tr" and "data-key" in a:
            self.config_rows[a["data-key"]] = a.get("class", "")
        if tag == "td" and self._run and "data-key" in a:
            self._cell = a["data-key"]
            if "data-value" in a:
                self.values[self._run][a["data-key"]] = float(a["data-value"])

    def handle_data(self, data):
        if self._cell:
            self.text[self._run][self._cell] = self.text[self._run].get(self._cell, "") + data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "table":
            self._run = None


def _expected(run_dir: Path) -> dict:
    """The table's numbers, computed here straight from metrics.jsonl."""
    rows = _rows(run_dir / "metrics.jsonl")
    tr = [r for r in rows if "loss" in r and "event" not in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    losses = [r["loss"] for r in tr if r["loss"] is not None]
    tps = [r["tokens_per_s"] for r in tr if not r["skipped"]]
    steady = tps[len(tps) // 10:] if len(tps) >= 10 else tps
    mfu = [r["mfu_dense"] for r in tr if r.get("mfu_dense") is not None]
    return {"steps": tr[-1]["step"], "tokens": tr[-1]["tokens"], "last_loss": losses[-1], "min_loss": min(losses),
            "last_val_loss": vals[-1], "min_val_loss": min(vals), "median_tokens_per_s": statistics.median(steady),
            "data_wait_fraction": sum(r["data_wait"] for r in tr) / sum(r["step_time"] for r in tr),
            "max_peak_mem": max(r["peak_mem"] for r in tr), "skipped_steps": sum(r["skipped"] for r in tr),
            "resumes": sum(1 for r in rows if r.get("event") == "resume"),
            "mean_mfu_dense": statistics.fmean(mfu) if mfu else None}


def _report(tmp_path, *run_dirs) -> tuple[str, Path]:
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "mmscale.cli", "report", *map(str, run_dirs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return out.read_text(), out


def test_report_table_matches_metrics_and_config_diff(runs, tmp_path):
    html, _ = _report(tmp_path, runs["mixer"], runs["transformer"])
    t = _Table()
    t.feed(html)
    assert set(t.values) == {"mixer", "transformer"}
    for name in ("mixer", "transformer"):
        want, got = _expected(runs[name]), t.values[name]
        for key, value in want.items():
            if value is None:
                assert key not in got and t.text[name][key] == "—", key
            else:
                assert got[key] == pytest.approx(value, rel=1e-9), (name, key)
    assert t.values["mixer"]["resumes"] == 1 and t.values["mixer"]["checkpoints"] >= 3
    assert t.text["mixer"]["status"] == "finished"
    assert t.text["transformer"]["status"].startswith("stopped at step 9 of 10")
    assert t.values["transformer"]["skipped_steps"] == 1 and t.values["mixer"]["skipped_steps"] == 0
    assert "1 unreadable line(s) in metrics.jsonl" in html  # the transformer's torn last line
    assert "mixer: 1 x cpu, single, fp32" in html and "transformer: MFU against log.peak_flops" in html
    # config: keys that differ are highlighted, equal ones are not
    assert "diff" in t.config_rows["model.kind"] and "diff" in t.config_rows["train.max_steps"]
    assert "same" in t.config_rows["model.d_model"] and "same" in t.config_rows["train.lr"]
    # samples of both runs are in the page, escaped
    sample = _rows(runs["mixer"] / "samples.jsonl")[-1]
    from html import escape
    assert escape(sample["text"]) in html
    # self-contained: nothing fetched at view time
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", html)
    assert "@import" not in html and "url(" not in html


def test_report_on_a_run_still_being_written(tmp_path):
    """No config, a torn line, a NaN-skipped step, a step logged twice, rows without time (older runs)."""
    run = tmp_path / "live<!--<script>"  # a name that would break the page if it reached the script unescaped
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s,
             "mfu": None, "step_time": 0.5, "data_wait": 0.1, "peak_mem": 100.0 + s, "tokens": 64 * s,
             "skipped": False} for s in range(1, 8)]
    rows[3] = {**rows[3], "loss": None, "grad_norm": None, "skipped": True}
    lines = [json.dumps(r) for r in rows] + [json.dumps({**rows[6], "loss": 4.2})]  # step 7 again, later row wins
    lines += [json.dumps({"step": 5, "val_loss": 4.5}), '{"step": 8, "lo']
    (run / "metrics.jsonl").write_text("\n".join(lines))
    html, _ = _report(tmp_path, run)
    t = _Table()
    t.feed(html)
    assert html.count("<script") == 2 and html.count("</script>") == 2
    got = t.values["live<!--<script>"]
    assert got["steps"] == 7 and got["last_loss"] == 4.2 and got["skipped_steps"] == 1
    assert got["min_val_loss"] == 4.5 and got["wall_clock_s"] == pytest.approx(3.5)  # summed step times
    assert got["data_wait_fraction"] == pytest.approx(0.2)
    assert t.text["live<!--<script>"]["status"].startswith("stopped at step 7")
    assert "mean_mfu_dense" not in got


def test_report_bad_input_is_one_line(tmp_path):
    from mmscale.report import write_report

    with pytest.raises(UserError, match="has no metrics.jsonl"):
        write_report([str(tmp_path)], tmp_path / "r.html")
    with pytest.raises(UserError, match="is not a directory"):
        write_report([str(tmp_path / "nope")], tmp_path / "r.html")
    proc = subprocess.run([sys.executable, "-m", "mmscale.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_report_never_replaces_a_special_file_or_a_folder(runs, tmp_path):
    """The report is written by a rename over --out: over a FIFO (or /dev/null, as root) that would replace the node
    itself. It is refused in one line and the node is left as it was."""
    import stat

    from mmscale.fsutil import atomic_write
    from mmscale.report import write_report

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="special file"):
        write_report([str(runs["mixer"])], fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    with pytest.raises(UserError, match="is a folder"):  # every atomic writer: a folder is not replaced either
        atomic_write(tmp_path, "x")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and tmp_path.is_dir()


# ----------------------------------------------------------------------------------------------
# a real browser

@pytest.fixture(scope="module")
def chromium():
    binary, why = ensure_chromium()
    if binary is None:
        if os.environ.get("MMSCALE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return binary


def _load(chromium, page: Path, tmp_path: Path) -> tuple[str, list[str], Path]:
    """(DOM after the scripts ran, console lines, screenshot) of `page` in headless Chromium."""
    dom = run_chromium(chromium, ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                                  page.as_uri()], tmp_path / "profile-dom")
    shot = tmp_path / "shot.png"
    run_chromium(chromium, ["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,900",
                            page.as_uri()], tmp_path / "profile-shot")
    return dom.stdout, console_errors(dom.stderr), shot


def _painted_fraction(png: Path) -> tuple[float, int]:
    """(fraction of pixels that are not the background, number of distinct colours) of a screenshot."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int64)
    codes = px[:, 0] << 16 | px[:, 1] << 8 | px[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    return 1.0 - counts.max() / len(codes), len(values)


def test_report_in_headless_chromium(runs, chromium, tmp_path):
    _, page = _report(tmp_path, runs["mixer"], runs["transformer"])
    dom, console, shot = _load(chromium, page, tmp_path)
    assert console == [], console
    assert 'data-js-error="1"' not in dom and re.search(r'<div id="js-errors"></div>', dom)
    # the script drew every chart: loss (train + val) x 2 runs, lr, grad norm, tokens/s, data wait, peak mem
    # x 2 runs, and MFU dense + causal for the run with a peak
    drawn = int(re.search(r'data-rendered="(\d+)"', dom).group(1))
    assert drawn == 2 * 2 + 5 * 2 + 2, drawn
    assert dom.count('class="mark mark-checkpoint"') >= 3 and 'class="mark mark-resume"' in dom
    assert 'class="mark mark-skipped"' in dom
    painted, colours = _painted_fraction(shot)
    assert painted > 0.05 and colours > 50, (painted, colours)
    # the legend hides a run; the x axis switches to tokens and wall-clock (same series, no error)
    click = ('<script>var b = document.querySelector("input.run-toggle"); b.checked = false;'
             'b.dispatchEvent(new Event("change")); var t = document.querySelector("input[value=time]");'
             't.checked = true; t.dispatchEvent(new Event("change"));</script></main>')
    page2 = tmp_path / "clicked.html"
    page2.write_text(page.read_text().replace("</main>", click))
    (tmp_path / "c").mkdir()
    dom, console, _ = _load(chromium, page2, tmp_path / "c")
    assert console == [] and 'data-js-error="1"' not in dom
    assert int(re.search(r'data-rendered="(\d+)"', dom).group(1)) == 2 + 5 + 2  # the transformer alone
    assert ">wall-clock</text>" in dom


def test_the_browser_check_catches_a_broken_page(chromium, tmp_path):
    """The checks above can fail: a page whose script throws is caught by both the console and the DOM hook."""
    from mmscale import report

    page = tmp_path / "broken.html"
    run = {"dir": str(tmp_path), "name": "x", "config": {}, "train": [], "val": [], "events": [], "samples": [],
           "bad_lines": 0, "checkpoints_on_disk": [], "mtime": 0.0}
    html = report.build_html([run])
    page.write_text(html.replace("</main>", "<script>undefinedThing();</script></main>"))  # uncaught
    dom, console, _ = _load(chromium, page, tmp_path)
    assert any("undefinedThing" in line for line in console), console
    assert 'data-js-error="1"' in dom
    page.write_text(html.replace("render();", "render(); undefinedThing();"))  # caught by the report's script
    (tmp_path / "2").mkdir()
    dom, console, _ = _load(chromium, page, tmp_path / "2")
    assert 'data-js-error="1"' in dom and "undefinedThing" in dom


# ----------------------------------------------------------------------------------------------
# wandb on resume

def test_wandb_is_not_sent_steps_it_has_already_seen(tmp_path, monkeypatch):
    from mmscale.run.metrics import MetricsLogger

    sent = []

    class FakeRun:
        def log(self, row, step):
            sent.append(step)

        def finish(self):
            pass

    inits = []
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, [f"run.dir={tmp_path}", "log.wandb=offline", "log.progress=false",
                             "log.wandb_project=p", "log.wandb_entity=team", "log.wandb_group=cmp",
                             "log.wandb_tags=[mixer, small]"])
    first = MetricsLogger(cfg, tmp_path, True, 0, 10)
    for s in range(1, 7):
        first.log({"step": s, "loss": 1.0})
    first.log({"step": 6, "val_loss": 0.9})  # the same step again in one session is fine
    first.close()  # "crash" after step 6; the checkpoint was at step 4
    second = MetricsLogger(cfg, tmp_path, True, 4, 10)
    for s in range(5, 9):
        second.log({"step": s, "loss": 1.0})
    second.close()
    assert sent == [1, 2, 3, 4, 5, 6, 6, 7, 8]  # 5 and 6 were not sent twice
    assert inits[0]["project"] == "p" and inits[0]["entity"] == "team" and inits[0]["group"] == "cmp"
    assert inits[0]["tags"] == ["mixer", "small"] and inits[1]["id"] == inits[0]["id"]


# ----------------------------------------------------------------------------------------------
# samples with sharded parameters: every rank takes part in the forward

@pytest.mark.slow
@pytest.mark.distributed
def test_samples_under_fsdp_and_zero3_equal_the_single_process_ones(runs, tmp_path):
    from tests._dist import run_distributed
    from tests._report_helpers import train_real_runs

    ov = {"train.max_steps": 4, "train.eval_every": 0, "checkpoint.every": 0, "log.sample_every": 2,
          "log.sample_temperature": 0, "log.sample_tokens": 10, "train.micro_batch_size": 2}
    single = real_config(tmp_path / "single", runs["data"], **{**ov, "train.micro_batch_size": 4})
    assert train_real_runs({"runs": [single]}) == [0]
    sharded = [real_config(tmp_path / "fsdp", runs["data"], **ov,
                           **{"engine.kind": "fsdp", "log.profile_steps": "[3,1]",
                              "log.profile_ranks": "[1]"}),
               real_config(tmp_path / "zero3", runs["data"], **ov, **{"engine.kind": "deepspeed",
                                                                      "engine.zero_stage": 3})]
    statuses = run_distributed("tests._report_helpers:train_real_runs", {"runs": sharded}, timeout=240)
    assert statuses == [[0, 0], [0, 0]]
    want = [(s["step"], s["prompt"], s["text"]) for s in _rows(tmp_path / "single" / "samples.jsonl")]
    assert len(want) == 4 and all(t for _, _, t in want)
    for name in ("fsdp", "zero3"):
        got = [(s["step"], s["prompt"], s["text"]) for s in _rows(tmp_path / name / "samples.jsonl")]
        assert got == want, name  # greedy, fp32, same data: the sharded model generates the same text
    # the profiler ran on the chosen rank only
    assert [p.name for p in (tmp_path / "fsdp" / "profile" / "steps_3-3").iterdir()] == ["rank1.pt.trace.json"]
    assert not (tmp_path / "zero3" / "profile").exists()


def test_report_starts_without_torch():
    """`mmscale report` reads metrics.jsonl and writes HTML: loading torch (~2 s) only to print --help was a
    regression of the one-reader change (run.metrics imported torch at module level for a CUDA peak)."""
    code = "import sys, mmscale.report, mmscale.run.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
