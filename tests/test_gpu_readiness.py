"""What can be guarded on CPU of the GPU path (issue F3): collectives on the engine's device, the
process-group backend for CUDA, FSDP2 on a rank count that does not divide n_ctx, no T x T mask buffer,
the device-dependent fast choices (fused AdamW, TF32) and the precision policy's FSDP2 layout."""
from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

from mmscale import distributed
from mmscale.config import load_config
from mmscale.engines.base import build_optimizer
from mmscale.models import build_model
from tests._dist import read_losses, run_distributed, tiny_config, train_runs

os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_backend_serves_cpu_and_cuda_tensors_on_gpu_machines():
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    # plain "nccl" refuses CPU tensors ("No backend type associated with device type cpu")
    assert distributed.backend_for(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    # the loop's reductions must name a device: there is no CPU default to fall back on
    assert inspect.signature(distributed.all_reduce_sum).parameters["device"].default is inspect.Parameter.empty


def test_all_reduce_sum_keeps_values_exact_and_reads_tensors_without_python_floats():
    loss = torch.tensor(2.0 / 3.0, dtype=torch.float32)
    out = distributed.all_reduce_sum([loss.double() / 3, 1.0, 7, torch.tensor(True)], torch.device("cpu"))
    assert out == [float(loss) / 3, 1.0, 7.0, 1.0]  # the same float64 arithmetic as Python floats


@pytest.mark.slow
@pytest.mark.distributed
def test_every_collective_of_the_loop_gets_the_engines_device(tmp_path):
    common = {"train.max_steps": 4, "train.grad_accum": 2, "train.eval_every": 2, "checkpoint.every": 2}
    runs = [{"config": tiny_config(tmp_path / k, **{**common, **ov})} for k, ov in
            {"ddp": {"engine.kind": "ddp"}, "fsdp": {"engine.kind": "fsdp"},
             "zero2": {"engine.kind": "deepspeed", "engine.zero_stage": 2}}.items()]
    results = run_distributed("tests._dist:train_runs_recording_collectives", {"runs": runs})
    for r in results:
        assert r["statuses"] == [0, 0, 0]
        assert r["engine_devices"] == ["cpu"]
        # the loop, FSDP2 and DeepSpeed handed tensors to torch.distributed, all on the engine's device
        assert r["tensor_devices"] == r["engine_devices"], r


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_on_three_ranks_with_n_ctx_not_divisible_by_three(tmp_path):
    # n_ctx 16 on 3 ranks: torch allows uneven shards on dim 0 only, so the T x T weights are sharded as
    # [heads * k * T, T] rows (tests/test_fsdp_shards.py); the losses must still be those of one process
    common = {"train.max_steps": 6, "train.grad_accum": 1, "model.n_ctx": 16}
    train_runs({"runs": [{"config": tiny_config(tmp_path / "single", **{**common, "train.micro_batch_size": 6})}]})
    reference = read_losses(tmp_path / "single")
    runs = [{"config": tiny_config(tmp_path / name, **{**common, "train.micro_batch_size": 2, "engine.kind": "fsdp",
                                                       **extra})}
            for name, extra in {"flat": {}, "multihead": {"model.mixer": "multihead", "model.heads": 2}}.items()]
    train_runs({"runs": [{"config": tiny_config(tmp_path / "single_mh", **{**common, "train.micro_batch_size": 6,
                                                                           "model.mixer": "multihead",
                                                                           "model.heads": 2})}]})
    statuses = run_distributed("tests._dist:train_runs", {"runs": runs}, nproc=3)
    assert statuses == [[0, 0]] * 3
    for name, ref in (("flat", reference), ("multihead", read_losses(tmp_path / "single_mh"))):
        got = read_losses(tmp_path / name)
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (name, step, got[step], ref[step])


def test_no_mask_buffer_and_the_init_is_still_causal():
    for mixer in ("flat", "multihead"):
        cfg = load_config(None, [f"model.mixer={mixer}", "model.heads=2", "model.n_ctx=12", "model.d_model=16",
                                 "model.n_layers=2", "model.vocab_size=32"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        assert not [n for n, _ in model.named_buffers() if n.endswith("mask")]
        assert not [k for k in model.state_dict() if k.endswith("mask")]
        for name, p in model.named_parameters():
            if p.dim() == 4:  # [heads, k, T, T]: nothing above the diagonal at init
                assert torch.equal(p, torch.tril(p)), name
                assert (torch.tril(p) != 0).sum() > 0.9 * p.shape[0] * p.shape[1] * 12 * 13 / 2


def test_adamw_is_torchs_fused_kernel_on_every_device():
    model = torch.nn.Linear(4, 4)
    cfg = load_config(None, [])
    for device in (torch.device("cpu"), torch.device("cuda", 0), None):
        # fused AdamW checks its parameters' device when it steps, not when built
        assert build_optimizer(model, cfg.train, device).defaults["fused"] is True


def test_fused_adamw_matches_the_per_parameter_loop_and_ignores_zero_state():
    """The fused kernel computes the loop's update (to float rounding) also where exp_avg_sq is exactly 0 (the
    masked half of a mixing matrix, whose gradient is exactly 0): those entries stay exactly 0."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 64, generator=g).tril()
    grads = [torch.randn(64, 64, generator=g).tril() for _ in range(5)]
    cfg = load_config(None, ["train.weight_decay=0.1"])
    out = {}
    for name in ("fused", "loop"):
        p = torch.nn.Parameter(w0.clone())
        opt = (build_optimizer(torch.nn.ParameterList([p]), cfg.train) if name == "fused" else
               torch.optim.AdamW([p], lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8,
                                 weight_decay=0.1, foreach=False))
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        out[name] = p.detach()
    assert torch.equal(out["fused"].triu(1), torch.zeros(64, 64))
    assert torch.allclose(out["fused"], out["loop"], rtol=0, atol=1e-6)
    assert not torch.equal(out["fused"], w0)


def test_a_resumed_optimizer_takes_this_runs_hyperparameters_and_private_step_tensors():
    """Loading an optimizer state under engines.base.config_hyperparameters: the saved groups' weight decay and
    kernel flags (an older checkpoint's per-parameter loop) give way to this run's, the moments and step counts
    are the saved ones, and every parameter has its own float32 step tensor (the fused kernel advances each)."""
    from mmscale.engines.base import config_hyperparameters

    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    old = torch.optim.AdamW([{"params": [params[0]], "weight_decay": 0.3}, {"params": [params[1]]}], lr=1e-3,
                            foreach=False)
    for p in params:
        p.grad = torch.ones_like(p)
    old.step()
    saved = old.state_dict()
    shared = torch.tensor(1.0)
    for st in saved["state"].values():  # what DeepSpeed's universal load hands over: one tensor for all
        st["step"] = shared
    new = build_optimizer(torch.nn.ParameterList(params), load_config(None, ["train.weight_decay=0.1"]).train)
    with config_hyperparameters(new):
        new.load_state_dict(saved)
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    assert all(g["fused"] is True and not g["foreach"] for g in new.param_groups)
    steps = [new.state[p]["step"] for p in params]
    assert steps[0] is not steps[1] and all(s.dtype == torch.float32 and float(s) == 1.0 for s in steps)
    assert torch.equal(new.state[params[0]]["exp_avg"], old.state[params[0]]["exp_avg"])


def test_dist_timeout_and_tf32_are_config_keys():
    cfg = load_config(None, ["engine.dist_timeout_min=120", "engine.tf32=false"])
    assert cfg.engine.dist_timeout_min == 120 and cfg.engine.tf32 is False
    from mmscale.errors import UserError
    with pytest.raises(UserError, match="engine.dist_timeout_min"):
        load_config(None, ["engine.dist_timeout_min=0"])
    assert math.isclose(load_config(None, []).engine.dist_timeout_min, 60)


_TRACE_TRITON_BLOCK = r'''
import re, sys
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition
import mmscale.ops.triton_mixing as tm
from mmscale.config import ModelConfig
from mmscale.models.mixer import MixerBlock

# no GPU here: pass the op's device check; the kernels stay JIT functions and are only traced (fake
# tensors), never launched: the forward compiler stops before anything runs
tm._interpreting = lambda: True
joint = []
class Traced(Exception):
    pass
def partition(gm, inputs, **kw):
    joint.append(gm.code)
    return default_partition(gm, inputs, **kw)
def forward_compiler(gm, example_inputs):
    raise Traced()
T = int(sys.argv[1])
block = MixerBlock(ModelConfig(d_model=32, n_ctx=T, n_layers=1, vocab_size=64, mixer_impl="triton"))
compiled = torch.compile(block, backend=aot_autograd(fw_compiler=forward_compiler, partition_fn=partition),
                         fullgraph=True)
try:
    compiled(torch.randn(2, T, 32, requires_grad=True))
except Exception:  # dynamo wraps the forward compiler's Traced in its own error
    if not joint:
        raise
kernels = re.findall(r"triton_kernel_wrapper_functional\(kernel_idx = (\d+)", joint[0])
print(len(joint), sorted(set(kernels)))
'''


def test_triton_block_traces_fullgraph_with_its_kernels_in_forward_and_backward():
    """torch.compile(fullgraph=True) of a mixer block on the Triton path: no graph break, and the joint
    forward+backward graph holds the three kernels (forward, input gradient, weight gradient) as traced
    custom ops rather than an opaque autograd.Function. Running it needs a GPU (tools/gpu_check.sh)."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _TRACE_TRITON_BLOCK, "40"], capture_output=True, text=True,
                         env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "1 ['0', '1', '2']", out.stdout


def test_one_host_sync_per_step_in_the_loop(tmp_path, monkeypatch):
    """The loop keeps losses (and the gradient norm) on the device and reads back once per step, in the one
    all-reduce; a torch.profiler trace shows that read-back once per step, and no float()/item() from
    mmscale's own code runs except on the step it logs."""
    import traceback

    from torch.profiler import profile

    from mmscale.config import config_from_dict
    from mmscale.distributed import HOST_SYNC
    from mmscale.run.train import train
    from tests._dist import synthetic_data, tiny_model

    stray = []
    for name in ("item", "__float__"):
        original = getattr(torch.Tensor, name)

        def spy(self, _original=original, _name=name):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/mmscale/" in caller.replace("\\", "/"):
                stray.append((_name, caller))
            return _original(self)
        monkeypatch.setattr(torch.Tensor, name, spy)
    steps = 4
    cfg = config_from_dict(tiny_config(tmp_path / "run", **{"train.max_steps": steps, "train.grad_accum": 4,
                                                           "log.every": 1000}))
    with profile() as prof:
        assert train(cfg, model_factory=tiny_model, data_factory=synthetic_data) == 0
    syncs = [e for e in prof.events() if e.name == HOST_SYNC]
    assert len(syncs) == steps  # grad_accum 4: one read-back per step, not one per micro-batch
    # the only stray read-back: the gradient norm of the one logged row (the last step)
    assert [n for n, _ in stray] in ([], ["__float__"]), stray


@pytest.fixture
def restore_fp32_precision():
    legacy = torch.get_float32_matmul_precision()
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
             torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = saved[0]
    torch.backends.cuda.matmul.fp32_precision = saved[1]
    torch.backends.cudnn.conv.fp32_precision = saved[2]


@pytest.mark.parametrize("tf32", [True, False])
def test_triton_precision_survives_torch_compiles_restore_of_the_tf32_setting(tf32, restore_fp32_precision):
    """The trainer's CUDA set-up, then what torch.compile does around every traced frame (save the CUDA
    matmul setting and restore it through the fp32_precision API, torch/_dynamo/convert_frame.py): the Triton
    path must still read the setting, the same one, without torch's error on mixing the legacy allow_tf32
    flag with the new API."""
    from mmscale.ops.triton_mixing import _precision
    from mmscale.run.train import configure_cuda

    configure_cuda(load_config(None, [f"engine.tf32={str(tf32).lower()}"]))
    saved = torch._C._get_fp32_precision_getter("cuda", "matmul")
    torch._C._set_fp32_precision_setter("cuda", "matmul", saved)  # dynamo's restore
    assert _precision(torch.float32) == ("tf32" if tf32 else "ieee")
    assert _precision(torch.bfloat16) == "tf32"
    # torch.set_float32_matmul_precision is seen too (torch mirrors it into the new API)
    torch.set_float32_matmul_precision("highest" if tf32 else "high")
    assert _precision(torch.float32) == ("ieee" if tf32 else "tf32")


def test_reading_the_legacy_tf32_flag_after_the_new_api_is_the_error_avoided(restore_fp32_precision):
    """The failure _precision used to hit: the legacy getter refuses after a set through the new API. If a
    torch release drops this check, the test says so (and the one-API rule is merely tidy)."""
    from mmscale.ops.triton_mixing import _precision

    torch.set_float32_matmul_precision("highest")  # through the legacy API: TF32 off
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # what a restore through the new API may leave
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cuda.matmul.allow_tf32
    assert _precision(torch.float32) == "tf32"  # the new API is the one in force, and reads fine


# ---------------------------------------------------------------------------------------------- gpu_check.sh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_wheel(folder) -> str:
    """A pure-Python wheel written by hand (no network, no build backend): what the install step gets here."""
    import base64
    import hashlib
    import zipfile

    name, ver = "mmscale_gpu_probe", "0.1"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
             f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
    record = [f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(v.encode())}" for k, v in files.items()]
    files[f"{name}-{ver}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{ver}.dist-info/RECORD,,"]) + "\n"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{ver}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_gpu_check_dry_run_installs_wheels_skips_gpu_rows_and_kills_escaped_children(tmp_path):
    """GPU_CHECK_DRY=1 on this CPU machine: the wheel folder is installed into a fresh --target dir, every
    step runs its plumbing and writes its row in the issue's order (GPU steps SKIPPED: no CUDA), a step past
    its limit is killed together with a child it started in its own session (as torchrun starts workers),
    and with OUT unset the results land in ./gpu_check_out of the caller's directory, not the repo's."""
    import subprocess
    import sys

    wheels = tmp_path / "wheels"
    _tiny_wheel(wheels)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(GPU_CHECK_DRY="1", PYTHON=sys.executable, GPU_CHECK_SITE=str(site))
    p = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(wheels)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "gpu_check_out"
    assert {f.name for f in out.iterdir()} >= {"RESULTS-gpu.md", "rows.tsv", "gpu_check.log"}
    rows = [line.split("\t") for line in (out / "rows.tsv").read_text().splitlines()]
    status = {name: st for name, st, _ in rows}
    assert (site / "mmscale_gpu_probe.py").read_text() == "VALUE = 42\n"
    assert status["install wheels"] == "OK" and status["versions"] == "OK"
    gpu_rows = ["triton vs float64", "op benchmark", "fullgraph compile, Triton block",
                *[f"train {e}" for e in ("single", "ddp", "fsdp", "zero2", "zero3")], "MFU single", "MFU ZeRO-2"]
    names = [r[0] for r in rows]
    assert [n for n in names if n in gpu_rows] == gpu_rows  # the order
    for name in gpu_rows:
        assert status[name] == "SKIPPED" and dict((r[0], r[2]) for r in rows)[name] == "no CUDA", name
    assert status["timeout plumbing (a step past its limit)"] == "TIMEOUT"
    assert status["timeout plumbing"] == "OK", rows
    text = (out / "RESULTS-gpu.md").read_text()
    assert "### Versions" in text and "| MFU ZeRO-2 | SKIPPED | no CUDA |" in text
    assert not (tmp_path / "mmscale_gpu_check").exists()


def test_gpu_check_goes_on_when_the_wheels_do_not_install(tmp_path):
    """A broken wheel folder is a FAILED row, not the end of the run (the old script exited)."""
    import subprocess
    import sys

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GPU_CHECK_DRY="1", PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(wheels)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r.split("\t")[0]: r.split("\t")[1] for r in (tmp_path / "out" / "rows.tsv").read_text().splitlines()}
    assert rows["install wheels"] == "FAILED" and rows["versions"] == "OK"


@pytest.mark.slow
def test_gpu_smoke_train_step_on_cpu_checkpoints_resumes_and_reports_a_bf16_linear(tmp_path):
    """The train step of gpu_check.sh (tools/gpu_smoke.py), on the CPU: one-process torchrun, bf16, 3 steps with
    a checkpoint, a second start that resumes to 6, and the dtype of a Linear's output seen by the hook."""
    import subprocess
    import sys

    rows = tmp_path / "rows.tsv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["prepare", "--stories", "150"], ["train", "--engine", "single"]):
        p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_smoke.py"), *args, "--cpu", "--work",
                            str(tmp_path), "--rows", str(rows)], env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    got = [r.split("\t") for r in rows.read_text().splitlines()]
    assert [r[:2] for r in got] == [["smoke dataset", "OK"], ["train single", "OK"]], got
    assert "resumed" in got[1][2] and "Linear output torch.bfloat16" in got[1][2]
    assert (tmp_path / "run-single" / "checkpoints" / "step_00000006").is_dir()


def test_gpu_wheel_list_closes_the_requirements_of_mmscale_and_of_what_it_carries():
    """tools/gpu_wheels.sh: every non-optional requirement of mmscale (pyproject) and of each carried package
    (as installed here, the same pins) is on the GPU image, carried, or named as not needed with a reason."""
    import re
    from importlib import metadata
    from pathlib import Path

    text = (Path(REPO) / "tools" / "gpu_wheels.sh").read_text()
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    carried = {norm(m) for m in re.findall(r'^\s+"([A-Za-z0-9_.\-]+)==', text, re.M)}
    carried.add(norm(re.search(r"^DEEPSPEED=([A-Za-z0-9_.\-]+)==", text, re.M).group(1)))
    image = {norm(n) for n in re.search(r'IMAGE_HAS="([^"]+)"', text).group(1).split()}
    not_carried = {norm(n) for n in re.search(r'NOT_CARRIED="([^"]+)"', text).group(1).split()}
    known = carried | image | not_carried
    assert "wandb" not in carried and {"deepspeed", "mosaicml-streaming", "hjson", "pydantic"} <= carried

    from packaging.requirements import Requirement

    def names(reqs):  # as pip would resolve them on the image: Python 3.12, Linux, no extras
        env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "extra": ""}
        parsed = [Requirement(r) for r in reqs or []]
        return {norm(r.name) for r in parsed if r.marker is None or r.marker.evaluate(env)}

    import tomllib
    project = tomllib.loads((Path(REPO) / "pyproject.toml").read_text())["project"]["dependencies"]
    assert names(project) - known == set()
    for pkg in carried:
        try:
            reqs = metadata.requires(pkg)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a setup without the ecosystem extra)
        assert names(reqs) - known == set(), pkg
