"""Helpers for tests/test_report.py: tiny real training runs (a prepared dataset with its tokenizer, the
default model and data factories) and a headless Chromium that loads a page and takes a screenshot."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path


def real_config(run_dir, data_dir, **overrides) -> list[str]:
    """Overrides of a tiny real run on a make_tiny_dataset(n_ctx=32, vocab_size=512) dataset."""
    base = {"data.train": str(data_dir), "model.n_ctx": 32, "model.vocab_size": 512, "model.d_model": 32,
            "model.heads": 1, "train.micro_batch_size": 4, "train.lr": 3e-3, "train.warmup_steps": 2,
            "train.eval_batches": 2, "engine.precision": "fp32", "log.wandb": "disabled", "log.progress": False,
            "run.dir": str(run_dir), "run.seed": 7}
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items()]


def train_real_runs(payload: dict) -> list:
    """Distributed worker target: each run is a list of overrides; returns the exit statuses."""
    from mmscale.config import load_config
    from mmscale.run.train import train

    statuses = []
    from tests._dist import fresh_rendezvous

    for i, overrides in enumerate(payload["runs"]):
        fresh_rendezvous(i)
        statuses.append(train(load_config(None, overrides)))
    return statuses


# ----------------------------------------------------------------------------------------------
# Chromium

def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """(binary, why not): Debian's chromium, installed with apt-get when missing and we are root."""
    found = chromium_binary()
    if found:
        return found, ""
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root (apt-get install chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        ok = subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
        if not ok:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            ok = subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"apt-get install chromium failed ({e})"
    found = chromium_binary()
    return (found, "") if ok and found else (None, "apt-get install chromium failed")


def run_chromium(binary: str, args: list[str], profile_dir: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium in its own process group (killed as a group, by its pid, on a timeout)."""
    cmd = [binary, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
           f"--user-data-dir={profile_dir}", *args]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"chromium timed out after {timeout} s: {err[-2000:]}")
    finally:
        try:  # helpers Chromium left behind in its group (zygote, GPU process)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def console_errors(stderr: str) -> list[str]:
    """Console output of the page, from --enable-logging=stderr --v=0 (Chromium logs every console message,
    console.error and uncaught exceptions included, as INFO:CONSOLE lines). The report writes none."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
