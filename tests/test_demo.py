"""`make demo` end to end, shrunk: corpus -> tokenizer -> shards -> deepspeed ZeRO-2 bf16 on 2 ranks ->
export -> eval -> a generated story, and the paths it promises exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._dist import REPO


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_pipeline_small(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mmscale.demo", "--workdir", str(work), "--steps", "4",
                           "--stories", "300", "--vocab-size", "512"], cwd=REPO, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "mmscale demo finished" in out
    paths = dict(re.findall(r"^  (checkpoint|export|metrics|loss plot|wandb files|config|report)\s+(\S+)", out,
                            re.M))
    assert set(paths) == {"checkpoint", "export", "metrics", "loss plot", "wandb files", "config", "report"}
    for name, path in paths.items():
        assert Path(path).exists(), name
    assert "loss " in out and "perplexity" in out  # mmscale eval ran
    assert Path(paths["checkpoint"]).name == "step_00000004"
    samples = (Path(paths["config"]).parent / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 2  # log.sample_every = 2: steps 2 and 4, two prompts each (ZeRO-2, 2 ranks)
    assert "Once upon a time" in Path(paths["report"]).read_text()
    # --data names the user's files; a missing one is a one-line error before any work
    proc = subprocess.run([sys.executable, "-m", "mmscale.demo", "--workdir", str(work), "--data",
                           str(tmp_path / "nope.txt")], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and "nope.txt' does not exist" in proc.stderr
