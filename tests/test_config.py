"""Typed configs: the shipped files, dotted overrides, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmscale.cli import main as cli_main
from mmscale.config import Config, ConfigError, load_config
from mmscale.models import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def test_shipped_configs_load_and_describe_the_intended_models():
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert (tiny.model.kind, tiny.model.d_model, tiny.model.n_layers, tiny.model.n_ctx) == ("mixer", 64, 2, 64)
    assert tiny.engine.kind == "single"

    mixer = load_config(CONFIGS / "tinystories-mixer.yaml").model
    assert (mixer.kind, mixer.d_model, mixer.n_layers, mixer.n_ctx, mixer.vocab_size) == ("mixer", 512, 8, 512, 4096)
    assert (mixer.mixer, mixer.kernel_size, mixer.tie_embeddings, mixer.final_norm) == ("flat", 1, False, False)

    llama = load_config(CONFIGS / "tinystories-llama.yaml").model
    assert (llama.kind, llama.d_model, llama.n_layers, llama.n_ctx, llama.vocab_size, llama.heads) == \
        ("transformer", 512, 8, 512, 4096, 4)
    assert llama.tie_embeddings is False


def test_paper_mixer_parameter_count_by_hand():
    """d 512, 8 layers, T 512, vocab 4096: embedding + head 2Vd; per layer T^2 + T mixing, 2 LayerNorms, FFN d-4d-d."""
    import torch

    cfg = load_config(CONFIGS / "tinystories-mixer.yaml").model
    with torch.device("meta"):
        model = build_model(cfg)
    V, d, T = 4096, 512, 512
    per_layer = (T * T + T) + 2 * 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert model.num_params() == 2 * V * d + 8 * per_layer == 23_109_632


def test_defaults_and_dotted_overrides():
    cfg = load_config(None)
    assert isinstance(cfg, Config) and cfg.model.kind == "mixer"
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.d_model=128", "model.kind=transformer", "train.lr=5e-4",
                                               "engine.kind=fsdp", "model.tie_embeddings=true", "run.dir=/tmp/x"])
    assert cfg.model.d_model == 128 and cfg.model.kind == "transformer" and cfg.model.tie_embeddings is True
    assert cfg.train.lr == pytest.approx(5e-4) and isinstance(cfg.train.lr, float)
    assert cfg.engine.kind == "fsdp" and cfg.run.dir == "/tmp/x"
    assert cfg.model.n_layers == 2  # untouched keys keep the file's values
    assert load_config(None, ["model.d_model=96"]).to_dict()["model"]["d_model"] == 96


@pytest.mark.parametrize("overrides,needle", [
    (["model.d_modle=64"], "unknown key 'model.d_modle'"),
    (["modle.d_model=64"], "unknown key 'modle'"),
    (["model.d_model=abc"], "model.d_model: expected an integer"),
    (["model.tie_embeddings=3"], "model.tie_embeddings: expected true or false"),
    (["model.kind=rnn"], "model.kind: 'rnn' is not allowed; choose one of: mixer, transformer"),
    (["model.mixer=expanded"], "model.mixer: 'expanded' is not allowed"),
    (["model.heads=5"], "model.d_model (64) must be divisible by model.heads (5)"),
    (["model.n_ctx=1"], "model.n_ctx must be >= 2"),
    (["engine.zero_stage=4"], "engine.zero_stage must be 0, 1, 2 or 3"),
    (["model.kernel_size=2"], "model.kernel_size must be an odd integer"),
    (["model.kv_heads=3"], "model.heads (4) must be divisible by model.kv_heads (3)"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["engine.precision=fp16"], "engine.precision: 'fp16' is not allowed"),
    (["model.d_model"], "not of the form section.key=value"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert err.value.exit_code == 2


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    bad.write_text("model: 5\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(bad)


def test_cli_reports_config_errors_with_exit_2_and_no_traceback(capsys):
    assert cli_main(["model-info", "--config", str(CONFIGS / "tiny.yaml"), "model.heads=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmscale model-info: error: model.d_model (64) must be divisible by model.heads (5)"
    # and for real, as a process
    r = subprocess.run([sys.executable, "-m", "mmscale.cli", "model-info", "--config", str(CONFIGS / "tiny.yaml"),
                        "engine.zero_stage=4"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "engine.zero_stage" in r.stderr and "Traceback" not in r.stderr
