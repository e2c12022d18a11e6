"""engine.precision: auto -> bf16 or fp32, by what the device computes natively.

    facts = device_facts(device)                  # what this machine reports (torch, /proc/cpuinfo)
    precision, reason = choose("auto", facts)     # pure: testable for every CPU or GPU kind without one
    cfg, line = resolve_for_run(cfg, device, ...) # train(): once, before the engine is built

bf16 is native on CUDA devices of compute capability >= 8.0 and on CPUs with AVX512-BF16 or AMX-BF16
(Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere oneDNN emulates bf16
matmuls: an AVX2-only AMD EPYC ran a 2048x256 @ 256x1024 matmul 70x slower in bf16 than in fp32 and the
demo's training step 12x slower (issue 22), so auto picks fp32 there.

MMSCALE_AUTO_PRECISION=fp32|bf16 fixes what auto picks whatever the device (the test suite sets fp32, so a
test that only exercises a path runs the same on every CPU; tests whose subject is bf16 say bf16).

Each rank resolves `auto` for itself, before the process group exists: ranks on machines of one kind agree;
a job spread over CPUs that differ in bf16 support should set engine.precision explicitly.

cpu_key() names this CPU (model and the ISA flags that change speed) for caches of measured choices
(mmscale.ops.token_mixing): a choice measured on one CPU is never reused on another.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from mmscale.errors import UserError

ENV_AUTO = "MMSCALE_AUTO_PRECISION"
# the ISA flags (as /proc/cpuinfo spells them) that decide bf16 and matmul speed on x86
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@dataclass(frozen=True)
class DeviceFacts:
    kind: str                                  # "cpu" or "cuda"
    name: str                                  # the CPU model or the GPU name
    cuda_capability: tuple[int, int] | None = None
    avx512_bf16: bool = False                  # CPU: AVX512-BF16 instructions (torch.cpu / cpuinfo)
    amx_bf16: bool = False                     # CPU: AMX tiles with BF16
    mkldnn_bf16: bool = False                  # oneDNN runs bf16 at all (also emulated, on plain AVX-512)


def native_bf16(facts: DeviceFacts) -> tuple[bool, str]:
    """(whether the device computes bf16 natively, the reason in words)."""
    if facts.kind == "cuda":
        cap = facts.cuda_capability or (0, 0)
        if cap >= (8, 0):
            return True, f"{facts.name} (compute capability {cap[0]}.{cap[1]} >= 8.0) computes bf16 natively"
        return False, f"{facts.name} (compute capability {cap[0]}.{cap[1]} < 8.0) has no native bf16"
    if facts.kind == "cpu":
        have = [n for n, on in (("AMX-BF16", facts.amx_bf16), ("AVX512-BF16", facts.avx512_bf16)) if on]
        if have:
            return True, f"{facts.name} has {' and '.join(have)}: native bf16"
        how = "oneDNN emulates bf16 on AVX-512" if facts.mkldnn_bf16 else "bf16 matmuls run emulated"
        return False, (f"{facts.name} has no AVX512-BF16 or AMX-BF16 ({how}; measured up to 70x slower than fp32 "
                       "on an AVX2-only EPYC)")
    return False, f"device {facts.kind} ({facts.name}): bf16 not known to be native"


def choose(requested: str, facts: DeviceFacts, *, resume: str | None = None, resume_strict: bool = False,
           override: str | None = None) -> tuple[str, str]:
    """(the concrete precision, one line saying what was chosen and why) for engine.precision `requested`.

    `resume`: the precision of the checkpoint this run resumes (None: a fresh start); `resume_strict`: the
    engine resumes only the same precision (DeepSpeed, FSDP). `override`: MMSCALE_AUTO_PRECISION's value.
    """
    native, why = native_bf16(facts)
    if requested in ("bf16", "fp32"):
        if requested == "bf16" and not native:
            return "bf16", (f"engine.precision: bf16 as set, but {why}: this run will be much slower than in fp32; "
                            "set engine.precision=auto or fp32 for speed")
        return requested, f"engine.precision: {requested} as set ({why})"
    if requested != "auto":
        raise UserError(f"engine.precision: {requested!r} is not allowed; choose one of: auto, bf16, fp32", 2)
    if resume in ("bf16", "fp32"):
        if resume_strict or resume == "fp32" or native:
            slow = resume == "bf16" and not native
            tail = (f"; {why}: it will be much slower (convert it with `mmscale convert` and start an fp32 run "
                    "from the export with train.init_from to change)") if slow else f" ({why})"
            return resume, (f"engine.precision: auto -> {resume}, the precision of the checkpoint being resumed"
                            + (" (this engine resumes only the same precision)" if resume_strict else "") + tail)
        return "fp32", (f"engine.precision: auto -> fp32, although the checkpoint being resumed was written in bf16: "
                        f"{why}; this engine resumes across precisions")
    if override:
        if override not in ("bf16", "fp32"):
            raise UserError(f"{ENV_AUTO}={override!r} is not a precision; set it to bf16 or fp32, or unset it", 2)
        return override, f"engine.precision: auto -> {override} ({ENV_AUTO}={override}; the device: {why})"
    return ("bf16" if native else "fp32"), f"engine.precision: auto -> {'bf16' if native else 'fp32'} ({why})"


# ---------------------------------------------------------------------------------------------------------
# what this machine reports

def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = " ".join(value.split())
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            if name and flags:
                break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU", flags


def cpu_facts() -> DeviceFacts:
    name, flags = _cpuinfo()

    def ask(fn_name: str, flag: str) -> bool:
        fn = getattr(torch.cpu, fn_name, None)
        try:
            if fn is not None:
                return bool(fn())
        except Exception:  # a torch without the probe: the kernel's flags answer
            pass
        return flag in flags

    try:
        mkldnn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        mkldnn = False
    # torch reports AMX tiles; the flags say whether they do BF16 (every AMX CPU so far does)
    amx = ask("_is_amx_tile_supported", "amx_tile") and ("amx_bf16" in flags or not flags)
    return DeviceFacts("cpu", name, None, ask("_is_avx512_bf16_supported", "avx512_bf16"), amx, mkldnn)


def device_facts(device) -> DeviceFacts:
    device = torch.device(device)
    if device.type == "cuda":
        return DeviceFacts("cuda", torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))
    if device.type == "cpu":
        return cpu_facts()
    return DeviceFacts(device.type, device.type)


def cpu_key() -> str:
    """This CPU for caches of measured choices: its model and the speed-relevant ISA flags."""
    name, flags = _cpuinfo()
    isa = "+".join(f for f in SPEED_FLAGS if f in flags) or "noflags"
    return f"{name}|{isa}"


# ---------------------------------------------------------------------------------------------------------
# the run's one resolution

_last: dict = {}


def resume_precision(cfg) -> str | None:
    """The precision of the checkpoint this run would resume (meta.json of `latest` or run.resume's folder),
    read without verifying digests (Checkpointer.find does that next); None for a fresh start."""
    # lazy on purpose: run/checkpoint is the layer above (it imports engines); ops -> precision at module level
    # would make `import mmscale.models` load run/ and engines (the arrow models -> engines must not exist)
    from mmscale.run import checkpoint as ckpt

    if cfg.run.resume == "never":
        return None
    try:
        if cfg.run.resume == "auto":
            step_dir = ckpt.find_latest(ckpt.checkpoints_root(cfg.run.dir))
        else:
            step_dir = Path(cfg.run.resume)
            if not (step_dir / ckpt.META).is_file() and (step_dir / ckpt.LATEST).is_file():
                step_dir = step_dir / (ckpt.read_latest(step_dir) or "")
        if step_dir is None:
            return None
        value = json.loads((Path(step_dir) / ckpt.META).read_text()).get("precision")
    except (OSError, ValueError, AttributeError, UserError):
        return None  # Checkpointer.find reports what is wrong with it
    return value if value in ("bf16", "fp32") else None


def resolve_for_run(cfg, device, strict_resume: bool = False):
    """(cfg with engine.precision concrete, the one line saying what and why). Called once by train()."""
    requested = cfg.engine.precision
    resume = resume_precision(cfg) if requested == "auto" else None
    precision, line = choose(requested, device_facts(device), resume=resume, resume_strict=strict_resume,
                             override=os.environ.get(ENV_AUTO) or None)
    _last.clear()
    _last.update(precision=precision, precision_requested=requested, precision_reason=line)
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, precision=precision)), line


def recorded(precision: str) -> dict:
    """The requested value and the reason of this process's last resolution, for the metrics' start event
    (empty when `precision` was not resolved here, e.g. an engine built directly by a test)."""
    if _last.get("precision") != precision:
        return {}
    return {k: v for k, v in _last.items() if k != "precision"}
