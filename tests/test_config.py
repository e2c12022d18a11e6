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


# ----------------------------------------------------------------------------------------------
# engine.precision: auto (mmscale/precision.py)

XEON_AMX = dict(kind="cpu", name="Intel(R) Xeon(R) Platinum 8481C", avx512_bf16=True, amx_bf16=True, mkldnn_bf16=True)
EPYC_AVX2 = dict(kind="cpu", name="AMD EPYC 7B13", mkldnn_bf16=False)
ZEN4 = dict(kind="cpu", name="AMD EPYC 9B14", avx512_bf16=True, mkldnn_bf16=True)
SKYLAKE = dict(kind="cpu", name="Intel(R) Xeon(R) Gold 6148", mkldnn_bf16=True)  # AVX-512, no BF16: emulated


@pytest.mark.parametrize("facts,want,why", [
    (XEON_AMX, "bf16", "AMX-BF16 and AVX512-BF16: native"),
    (ZEN4, "bf16", "AVX512-BF16: native"),
    (EPYC_AVX2, "fp32", "no AVX512-BF16 or AMX-BF16"),
    (SKYLAKE, "fp32", "oneDNN emulates bf16"),
    (dict(kind="cuda", name="NVIDIA H100", cuda_capability=(9, 0)), "bf16", "9.0 >= 8.0"),
    (dict(kind="cuda", name="NVIDIA A100", cuda_capability=(8, 0)), "bf16", "8.0 >= 8.0"),
    (dict(kind="cuda", name="Tesla V100", cuda_capability=(7, 0)), "fp32", "7.0 < 8.0"),
])
def test_auto_precision_follows_what_the_device_computes_natively(facts, want, why):
    from mmscale.precision import DeviceFacts, choose

    got, line = choose("auto", DeviceFacts(**facts))
    assert got == want and f"auto -> {want}" in line and why in line and facts["name"] in line and "\n" not in line
    # explicit values are kept; bf16 where it is not native says, in one line, that it is slow and why
    assert choose("fp32", DeviceFacts(**facts))[0] == "fp32"
    got, line = choose("bf16", DeviceFacts(**facts))
    assert got == "bf16" and ("much slower" in line) == (want == "fp32") and "\n" not in line
    # the test suite's pin applies to auto only
    assert choose("auto", DeviceFacts(**facts), override="fp32")[0] == "fp32"
    assert choose("bf16", DeviceFacts(**facts), override="fp32")[0] == "bf16"


def test_auto_precision_on_resume_keeps_the_checkpoint_precision_or_says_why():
    from mmscale.errors import UserError
    from mmscale.precision import DeviceFacts, choose

    xeon, epyc = DeviceFacts(**XEON_AMX), DeviceFacts(**EPYC_AVX2)
    assert choose("auto", xeon, resume="fp32")[0] == "fp32"  # a run keeps its precision where it started
    assert choose("auto", epyc, resume="fp32")[0] == "fp32"
    assert choose("auto", xeon, resume="bf16", resume_strict=True)[0] == "bf16"
    # DeepSpeed / FSDP resume only the same precision: bf16 on the EPYC, with the slowness and the way out
    got, line = choose("auto", epyc, resume="bf16", resume_strict=True)
    assert got == "bf16" and "much slower" in line and "mmscale convert" in line and "\n" not in line
    # single / ddp resume across precisions: fp32 on the EPYC, saying the checkpoint was bf16
    got, line = choose("auto", epyc, resume="bf16", resume_strict=False)
    assert got == "fp32" and "written in bf16" in line
    # the pin does not override a checkpoint's precision (DeepSpeed would refuse the resume)
    assert choose("auto", xeon, resume="bf16", resume_strict=True, override="fp32")[0] == "bf16"
    with pytest.raises(UserError, match="MMSCALE_AUTO_PRECISION='fp16' is not a precision"):
        choose("auto", xeon, override="fp16")


def test_this_cpu_facts_agree_with_the_kernels_flags():
    """torch's answers (torch.cpu._is_*_supported) against /proc/cpuinfo, read independently here."""
    from mmscale.precision import cpu_facts, cpu_key

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo")
    lines = info.read_text().splitlines()
    flags = set(next(ln for ln in lines if ln.startswith("flags")).split(":", 1)[1].split())
    model = " ".join(next(ln for ln in lines if ln.startswith("model name")).split(":", 1)[1].split())
    facts = cpu_facts()
    assert facts.kind == "cpu" and facts.name == model
    assert facts.avx512_bf16 == ("avx512_bf16" in flags)
    assert facts.amx_bf16 == ("amx_bf16" in flags)
    assert cpu_key().startswith(model + "|") and ("avx512_bf16" in cpu_key()) == ("avx512_bf16" in flags)


def test_auto_is_the_default_and_a_run_records_the_concrete_choice(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    from mmscale import precision
    from mmscale.config import config_from_dict
    from mmscale.run.train import train
    from tests._dist import synthetic_data, tiny_config

    assert load_config(None).engine.precision == "auto"
    monkeypatch.delenv("MMSCALE_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_facts", lambda: precision.DeviceFacts(**EPYC_AVX2))
    tree = tiny_config(tmp_path / "run", **{"train.max_steps": 2, "checkpoint.every": 2})
    del tree["engine"]["precision"]  # the default
    assert train(config_from_dict(tree), data_factory=synthetic_data) == 0
    err = capsys.readouterr().err
    assert "engine.precision: auto -> fp32 (AMD EPYC 7B13 has no AVX512-BF16" in err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["engine"]["precision"] == "fp32"
    start = next(json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if '"event": "start"' in x)
    assert (start["precision"], start["precision_requested"]) == ("fp32", "auto")
    assert "no AVX512-BF16" in start["precision_reason"]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["precision"] == "fp32"  # checkpoints record the concrete precision
    # resumed on a bf16-native CPU with auto: the checkpoint's fp32 stays
    monkeypatch.setattr(precision, "cpu_facts", lambda: precision.DeviceFacts(**XEON_AMX))
    tree["train"]["max_steps"] = 3
    assert train(config_from_dict(tree), data_factory=synthetic_data) == 0
    assert "auto -> fp32, the precision of the checkpoint being resumed" in capsys.readouterr().err
    # an explicit bf16 on a CPU without native bf16 runs, and says once that it is slow and why
    monkeypatch.setattr(precision, "cpu_facts", lambda: precision.DeviceFacts(**EPYC_AVX2))
    slow = tiny_config(tmp_path / "slow", **{"train.max_steps": 1, "engine.precision": "bf16"})
    assert train(config_from_dict(slow), data_factory=synthetic_data) == 0
    err = capsys.readouterr().err
    assert err.count("much slower") == 1 and "AMD EPYC 7B13" in err
    assert yaml.safe_load((tmp_path / "slow" / "config.yaml").read_text())["engine"]["precision"] == "bf16"
