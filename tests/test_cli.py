"""`mmscale` command line: the command list and `mmscale model-info`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.cli import COMMANDS
from mmscale.cli import main as cli_main
from mmscale.config import load_config
from mmscale.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "mmscale.cli", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"  {name}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mmscale.cli", "frobnicate"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize("overrides", [
    [],
    ["model.mixer=multihead", "model.kernel_size=3"],
    ["model.kind=transformer", "model.kv_heads=2", "model.tie_embeddings=true"],
])
def test_model_info_json_matches_the_built_model(capsys, overrides):
    assert cli_main(["model-info", "--config", TINY, "--json", *overrides]) == 0
    info = json.loads(capsys.readouterr().out)
    torch.manual_seed(0)
    model = build_model(load_config(TINY, overrides).model)
    n = model.num_params()
    assert info["parameters"] == model.param_breakdown() and info["parameters"]["total"] == n
    assert info["flops_per_token"]["training"] == model.flops_per_token()
    assert info["flops_per_token"]["forward"] == model.flops_per_token(backward=False)
    # fp32: params + 2 moments; bf16: bf16 params + fp32 master + 2 fp32 moments
    assert info["memory_bytes_params_adamw"] == {"fp32": 12 * n, "bf16": 14 * n}
    if info["model"]["kind"] == "mixer":
        T, heads = 64, (4 if "model.mixer=multihead" in overrides else 1)
        k = 3 if "model.kernel_size=3" in overrides else 1
        assert info["live_token_mixing_weights"] == 2 * heads * k * T * (T + 1) // 2


def test_model_info_table_names_every_part():
    r = subprocess.run([sys.executable, "-m", "mmscale.cli", "model-info", "--config", TINY],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    n = build_model(load_config(TINY).model).num_params()
    for needle in ["embedding", "token mixing", "FFN", "head", f"{n:,}", "dense  (full T x T mixing",
                   "causal (live lower triangle", "fp32", "bf16", "fp32 master"]:
        assert needle in out, needle


@pytest.mark.parametrize("argv", [["--help"], ["config", "keys"]])
def test_a_reader_that_leaves_early_gets_no_traceback(argv):
    """`mmscale --help | head`: the pipe's reader is gone before mmscale prints (both ends closed here at once),
    so every write fails with EPIPE; the command ends quietly with 141 (128 + SIGPIPE), as a shell would say."""
    import os

    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "mmscale.cli", *argv], stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    os.close(r)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err.decode() and "BrokenPipe" not in err.decode(), err.decode()
    assert proc.returncode == 141
