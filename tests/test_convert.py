"""`mmscale convert`: checkpoints of every engine written by 2 ranks -> exports, against independent readers.

References: DeepSpeed's own zero_to_fp32 (ZeRO 1-3), torch's dcp_to_torch_save (FSDP2), the plain
model.pt (single) and the bf16 module weights (ZeRO-0). Keys and shapes must be exact and the
export's logits equal to the reference weights' logits within 1e-6 (fp32).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmscale.cli import main as cli_main
from mmscale.config import ModelConfig, config_from_dict
from mmscale.errors import UserError
from mmscale.export.convert import convert, resolve_checkpoint
from mmscale.export.format import load_export, load_export_state
from tests._data_helpers import make_tiny_corpus
from tests._dist import REPO, run_distributed, synthetic_data, tiny_config, tiny_model

VOCAB = 512
MIXER = {"model.vocab_size": VOCAB, "train.max_steps": 2}
TIED_TRANSFORMER = {**MIXER, "model.kind": "transformer", "model.heads": 2, "model.tie_embeddings": True}
MEDIUM = {"model.vocab_size": 4096, "model.d_model": 256, "model.n_layers": 4, "model.n_ctx": 64,
          "train.max_steps": 1}
RUNS = {  # name: overrides
    "zero0_bf16": {**MIXER, "engine.kind": "deepspeed", "engine.zero_stage": 0, "engine.precision": "bf16"},
    "zero1_bf16": {**MIXER, "engine.kind": "deepspeed", "engine.zero_stage": 1, "engine.precision": "bf16"},
    "zero2_fp32": {**TIED_TRANSFORMER, "engine.kind": "deepspeed", "engine.zero_stage": 2, "engine.precision": "fp32"},
    "zero3_bf16": {**MIXER, "engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.precision": "bf16"},
    "fsdp_fp32": {**TIED_TRANSFORMER, "engine.kind": "fsdp", "engine.precision": "fp32"},
    "zero3_medium": {**MEDIUM, "engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.precision": "bf16"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_runs")
    payload = {"runs": [{"config": tiny_config(root / name, **ov)} for name, ov in RUNS.items()]}
    assert run_distributed("tests._dist:train_runs", payload, nproc=2, timeout=400) == [[0] * len(RUNS)] * 2
    # a single-process run (model.pt) in this process
    from mmscale.run.train import train
    cfg = config_from_dict(tiny_config(root / "single", **MIXER))
    assert train(cfg, model_factory=tiny_model, data_factory=synthetic_data) == 0
    _, tok = make_tiny_corpus(stories=200, vocab_size=VOCAB)
    return root, tok


def reference_state(name: str, step_dir: Path, tmp_path: Path) -> dict:
    if name.startswith("zero0"):
        module = torch.load(step_dir / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {k: v for k, v in module.items()}
    if name.startswith("zero"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds"))
    if name.startswith("fsdp"):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(str(step_dir / "model"), str(tmp_path / "ref.pt"))
        return torch.load(tmp_path / "ref.pt", weights_only=True)
    return torch.load(step_dir / "model.pt", weights_only=True)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["zero0_bf16", "zero1_bf16", "zero2_fp32", "zero3_bf16", "fsdp_fp32", "single"])
def test_convert_matches_reference_reader(runs, tmp_path, name):
    root, tok = runs
    out = tmp_path / "export"
    summary = convert(root / name, out, tokenizer=tok, progress=False)
    step_dir = resolve_checkpoint(root / name)
    assert summary["steps"] == 2 and summary["checkpoint"] == str(step_dir)
    from safetensors.torch import load_file
    got = load_file(str(out / "model.safetensors"))
    ref = reference_state(name, step_dir, tmp_path)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == torch.float32, k
    if name.startswith("zero0"):
        # ZeRO-0 bf16 keeps no partitioned master: its fp32 copies must round to the module's bf16 weights
        for k in ref:
            assert torch.equal(got[k].to(ref[k].dtype), ref[k]), k
        ref = got
    model, meta = load_export(out)
    reference = model.__class__(model.config)
    reference.load_state_dict({k: v.float() for k, v in ref.items()})
    ids = torch.randint(0, VOCAB, (3, model.config.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids) - reference.eval()(ids)).abs().max().item()
    assert diff <= 1e-6
    assert meta["steps"] == 2 and (out / "tokenizer.model").read_bytes() == Path(tok).read_bytes()
    assert "steps: 2" in (out / "README.md").read_text()


@pytest.mark.distributed
def test_cli_bf16_verify_and_tool_script(runs, tmp_path, capsys):
    root, tok = runs
    out = tmp_path / "bf16"
    assert cli_main(["convert", str(root / "zero3_bf16"), str(out), "--dtype", "bf16", "--verify",
                     "--tokenizer", str(tok)]) == 0
    assert "-> OK" in capsys.readouterr().out
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    # the tool script, in its own process, with --verify in fp32 (a tied transformer from FSDP2)
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(root / "fsdp_fp32"),
                          str(tmp_path / "fsdp"), "--verify", "--tokenizer", str(tok)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "max |logit difference| 0 " in res.stdout and "-> OK" in res.stdout


@pytest.mark.distributed
def test_memory_stays_near_twice_the_model(runs, tmp_path):
    """Peak RSS growth while converting a ZeRO-3 checkpoint whose optimizer files hold 3x the model."""
    root, tok = runs
    code = (
        "import json, resource, sys\n"
        "import torch, deepspeed, safetensors.torch, tqdm\n"
        "from mmscale.export.convert import convert, expected_shapes\n"
        "from mmscale.config import ModelConfig\n"
        "expected_shapes(ModelConfig())  # imports of the model code are not the model's memory\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024\n"
        "before = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
        "s = convert(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], progress=False)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(json.dumps({'growth': peak - before, 'model_bytes': 4 * s['parameters']}))\n")
    res = subprocess.run([sys.executable, "-c", code, str(root / "zero3_medium"), str(tmp_path / "m"), str(tok)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    ds_bytes = sum(f.stat().st_size for f in (resolve_checkpoint(root / "zero3_medium") / "ds").iterdir())
    assert ds_bytes > 3 * r["model_bytes"]  # loading the optimizer files would break the bound below
    assert r["growth"] <= 2.5 * r["model_bytes"], r


@pytest.mark.distributed
def test_bad_checkpoints_and_outputs(runs, tmp_path, capsys):
    root, tok = runs

    def fails(argv, needle):
        assert cli_main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err

    # incomplete: one rank's ZeRO-3 partition missing (ZeRO 1/2 keep whole fp32 weights in the module states)
    broken = tmp_path / "broken"
    shutil.copytree(resolve_checkpoint(root / "zero3_bf16"), broken)
    next((broken / "ds").glob("*rank_1*optim_states.pt")).unlink()
    fails(["convert", str(broken), str(tmp_path / "o1"), "--tokenizer", str(tok)], "incomplete")
    # an interrupted save (no meta.json)
    partial = tmp_path / ".tmp_step_00000009"
    partial.mkdir()
    fails(["convert", str(partial), str(tmp_path / "o2"), "--tokenizer", str(tok)], "incomplete")
    # files of another model under this meta.json
    other = tmp_path / "other"
    shutil.copytree(resolve_checkpoint(root / "fsdp_fp32"), other)
    meta = json.loads((other / "meta.json").read_text())
    meta["model"]["d_model"] = 64
    (other / "meta.json").write_text(json.dumps(meta))
    fails(["convert", str(other), str(tmp_path / "o3"), "--tokenizer", str(tok)], "another model")
    # no tokenizer anywhere
    fails(["convert", str(root / "single"), str(tmp_path / "o4")], "--tokenizer")
    # an existing output is never touched
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(["convert", str(root / "single"), str(out), "--tokenizer", str(tok)], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


@pytest.mark.distributed
def test_init_from_gives_the_same_weights(runs, tmp_path):
    from mmscale.run.train import default_model_factory

    root, tok = runs
    export = tmp_path / "exp"
    convert(root / "zero2_fp32", export, tokenizer=tok, progress=False)
    model_cfg = json.loads((export / "config.json").read_text())["model"]
    cfg = config_from_dict({"model": model_cfg, "train": {"init_from": str(export)}})
    torch.manual_seed(123)
    model = default_model_factory(cfg)
    state = load_export_state(export, cfg.model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(UserError, match="model.n_layers"):
        load_export_state(export, ModelConfig(**{**model_cfg, "n_layers": 3}))
