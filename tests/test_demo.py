"""`make demo` end to end, shrunk: corpus -> tokenizer -> shards -> deepspeed ZeRO-2 on 2 ranks (precision auto:
fp32 under the suite's pin, the path is the subject) -> export -> eval -> a generated story, and the paths it
promises exist; the time sizing (probe, plan) and its summary."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.fsutil import usable_cpus
from tests._dist import REPO


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_pipeline_small(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mmscale.demo", "--workdir", str(work), "--steps", "4",
                           "--stories", "300", "--vocab-size", "512"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "mmscale demo finished" in out
    paths = dict(re.findall(r"^  (checkpoint|export|metrics|loss plot|wandb files|config|report)\s+(\S+)", out,
                            re.M))
    assert set(paths) == {"checkpoint", "export", "metrics", "loss plot", "wandb files", "config", "report"}
    for name, path in paths.items():
        assert Path(path).exists(), name
    assert "loss " in out and "perplexity" in out  # mmscale eval ran
    assert "engine.precision: auto -> fp32 (MMSCALE_AUTO_PRECISION=fp32" in proc.stderr  # the suite's pin reached it
    assert re.search(r"^  held-out loss  step 1: \d", out, re.M)  # the summary's losses by step
    assert Path(paths["checkpoint"]).name == "step_00000004"
    samples = (Path(paths["config"]).parent / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2  # log.sample_every = 2: steps 2 and 4, two prompts each (ZeRO-2, 2 ranks)
    assert "Once upon a time" in Path(paths["report"]).read_text()
    # --data names the user's files; a missing one is a one-line error before any work
    proc = subprocess.run([sys.executable, "-m", "mmscale.demo", "--workdir", str(work), "--data",
                           str(tmp_path / "nope.txt")], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "nope.txt' does not exist" in proc.stderr


def test_demo_sizes_training_by_time():
    from mmscale import demo

    # 240 s budget, 40 s spent, 12 process starts of 2 s: 176 s left; 0.5 s x 1.4 per step -> 251 steps
    steps, why = demo.plan_steps(240, 40, 0.5, 2.0)
    assert steps == int(176 / (0.5 * demo.RANK_OVERHEAD)) == 251 and "251 steps" in why
    # a slow CPU (or a busy one) still trains the steps that show learning, and says it runs over
    steps, why = demo.plan_steps(240, 40, 2.3, 2.0)
    assert steps == demo.MIN_STEPS and "run over" in why
    assert demo.plan_steps(240, 300, 0.5, 2.0)[0] == demo.MIN_STEPS  # nothing left at all
    assert demo.plan_steps(3600, 0, 0.01, 1.0)[0] == demo.MAX_STEPS
    # twice the budget, about twice the training time
    assert demo.plan_steps(480, 40, 0.5, 2.0)[0] == int((480 - 40 - 24) / (0.5 * demo.RANK_OVERHEAD))


def test_demo_probe_times_the_step_in_the_precision_auto_picks(monkeypatch):
    from mmscale import demo

    monkeypatch.setenv("MMSCALE_AUTO_PRECISION", "fp32")
    step_s, startup_s, line = demo.probe_step_seconds(64, 1, steps=1)
    assert 0 < step_s < 120 and 0 < startup_s < 300
    assert "engine.precision: auto -> fp32" in line and "\n" not in line
    assert usable_cpus(2) == max(1, len(os.sched_getaffinity(0)) // 2)     # the demo's threads per rank


def test_demo_summary_reads_losses_and_step_time(tmp_path):
    import json

    from mmscale import demo

    rows = [{"step": 0, "event": "start", "time": 100.0}, {"step": 10, "loss": 5.0, "time": 110.0},
            {"step": 20, "loss": 4.0, "time": 125.0}, {"step": 20, "val_loss": 3.5, "time": 126.0},
            {"step": 30, "loss": 3.0, "time": 140.0}, {"step": 30, "val_loss": 2.25, "time": 141.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    vals, per_step = demo.training_summary(tmp_path)
    assert vals == "step 20: 3.500, step 30: 2.250" and per_step == pytest.approx(30 / 20)


def test_demo_bad_minutes_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mmscale.demo", "--minutes", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--minutes must be > 0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
