"""`mmscale convert CHECKPOINT OUT [--dtype fp32|bf16] [--verify]`: any engine's checkpoint -> an export.

    mmscale convert runs/tiny out/tiny-export                 # a run dir: its latest checkpoint
    mmscale convert runs/tiny/checkpoints/step_00000300 out/x --dtype bf16 --verify

Reads the checkpoints of every engine (mmscale/checkpoint.py) written by any number of ranks,
with no process group and no GPU:

  torch      (single, ddp)   model.pt, memory-mapped
  dcp        (fsdp)          model/ (DCP): only the model's tensors are read, by their metadata
  deepspeed  (ZeRO 0-3)      ds/: the fp32 master weights. ZeRO 1-3 keep them flattened and
                             partitioned in the *_optim_states.pt files next to Adam's moments;
                             the files are memory-mapped and only the slices holding weights are
                             copied, so optimizer states are never read into memory (DeepSpeed's
                             zero_to_fp32 concatenates whole partitions and needs several times
                             the model). fp32 ZeRO 0-2 runs read the module's own fp32 weights.

Memory stays within about twice the model: the output state dict, plus (for --verify) the model
built once more to compute reference logits. `--verify` then loads the export in a fresh process
(mmscale.export.load_export) and compares its logits on a sample batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mmscale.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# locating a checkpoint

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from a run dir, a checkpoints/ dir or a step folder itself."""
    from mmscale import checkpoint as ckpt

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint '{path}' does not exist; pass a run dir, its checkpoints/ or a step_XXXXXXXX folder")
    if (p / ckpt.META).is_file():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and (latest := ckpt.find_latest(root)) is not None:
            return latest
    if p.name.startswith("step_") or p.name.startswith(ckpt.TMP_PREFIX):
        raise UserError(f"checkpoint '{path}' has no {ckpt.META}: it is incomplete (a save was interrupted); "
                        "convert an earlier step folder")
    raise UserError(f"'{path}' holds no complete checkpoint (no step_XXXXXXXX/{ckpt.META}); "
                    "pass a run dir, its checkpoints/ or a step folder")


def expected_shapes(model_cfg) -> dict[str, tuple]:
    """Parameter names and shapes of the model a ModelConfig describes (built on the meta device)."""
    import torch

    from mmscale.models import build_model

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}


def _model_config(meta: dict, where: Path):
    from mmscale.config import ConfigError, ModelConfig, _build

    try:
        return _build(ModelConfig, meta.get("model", {}), "model")
    except ConfigError as e:
        raise UserError(f"checkpoint '{where}': its meta.json holds no valid model config ({e})") from None


# ---------------------------------------------------------------------------------------------
# readers: each yields (name, fp32 tensor) one parameter at a time

def _slice_virtual(parts: list, start: int, n: int, out=None):
    """Elements [start, start + n) of the concatenation of 1-D `parts`, copied into `out` (fp32, new
    when None) without materialising the concatenation."""
    import torch

    out = torch.empty(n, dtype=torch.float32) if out is None else out
    offset, filled = 0, 0
    for part in parts:
        size = part.numel()
        lo, hi = max(start, offset), min(start + n, offset + size)
        if lo < hi:
            out[filled:filled + hi - lo].copy_(part[lo - offset:hi - offset])
            filled += hi - lo
        offset += size
        if offset >= start + n:
            break
    if filled != n:
        raise ValueError(f"wanted {n} elements at {start}, the partitions hold {filled}")
    return out


def _load(path: Path, weights_only: bool = True):
    """torch.load under mmscale's allow-list (checkpoint.safe_unpickling): DeepSpeed's files pickle a few of
    its classes; anything else is refused unread. `weights_only` is kept for callers; loading is always safe."""
    import pickle

    import torch

    from mmscale import checkpoint as ckpt

    try:
        with ckpt.safe_unpickling():
            return torch.load(path, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        raise ckpt.unsafe_payload_error(path, e) from None
    except Exception as e:  # truncated or foreign files: one clear line
        raise UserError(f"cannot read '{path}' ({type(e).__name__}); the checkpoint is damaged or incomplete: "
                        "convert an earlier step folder") from None


def read_torch(step_dir: Path, meta: dict):
    sd = _load(step_dir / "model.pt")
    if not isinstance(sd, dict):
        raise UserError(f"'{step_dir / 'model.pt'}' does not hold a state dict; the checkpoint is damaged")
    for k, v in sd.items():
        yield k, v.float() if v.is_floating_point() else v


def read_dcp(step_dir: Path, meta: dict):
    """Only the tensors the DCP metadata lists under model/, loaded without a process group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    import pickle

    from mmscale import checkpoint as ckpt

    path = step_dir / "model"
    reader = dcp.FileSystemReader(str(path))
    try:
        with ckpt.safe_unpickling():  # DCP pickles its metadata: only its own classes are allowed
            md = reader.read_metadata().state_dict_metadata
    except pickle.UnpicklingError as e:
        raise ckpt.unsafe_payload_error(path / ".metadata", e) from None
    except Exception as e:
        raise UserError(f"cannot read the DCP metadata in '{path}' ({type(e).__name__}); the checkpoint is "
                        "damaged or incomplete: convert an earlier step folder") from None
    names = [k for k, v in md.items() if isinstance(v, TensorStorageMetadata)]
    # one tensor at a time keeps the peak at the output plus one tensor
    for name in names:
        t = md[name]
        buf = {name: torch.empty(tuple(t.size), dtype=t.properties.dtype)}
        try:
            with ckpt.safe_unpickling():
                dcp.load(buf, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, pickle.UnpicklingError) or "Unsupported global" in str(e):
                raise ckpt.unsafe_payload_error(path, e) from None
            raise UserError(f"cannot read '{name}' from '{path}' ({type(e).__name__}); the checkpoint is damaged "
                            "or incomplete: convert an earlier step folder") from None
        v = buf[name]
        yield name, v.float() if v.is_floating_point() else v


def _ds_files(ds_dir: Path, pattern: str) -> list[Path]:
    import re

    files = sorted(ds_dir.glob(pattern), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
    return files


def read_deepspeed(step_dir: Path, meta: dict, model_cfg):
    """fp32 weights of a DeepSpeed ZeRO 0-3 checkpoint (see the module docstring)."""
    ds_dir = step_dir / "ds"
    stage, world = int(meta.get("zero_stage", 0)), int(meta.get("world_size", 1))
    model_files = _ds_files(ds_dir, "*model_states.pt")
    if not model_files:
        raise UserError(f"'{ds_dir}' holds no DeepSpeed *_model_states.pt; the checkpoint is incomplete")
    states0 = _load(model_files[0], weights_only=False)
    param_shapes = [dict(g) for g in (states0.get("param_shapes") or [])]
    frozen_shapes = dict(states0.get("frozen_param_shapes") or {})
    shared = dict(states0.get("shared_params") or {})

    # DeepSpeed's bf16 mode (mmscale < 0.2 with engine.precision=bf16) keeps fp32 masters apart from the module
    ds_bf16 = meta.get("ds_bf16", meta.get("precision") == "bf16")
    if stage <= 2 and not ds_bf16:
        yield from ((k, v.float()) for k, v in states0["module"].items())
        return
    if stage == 0:
        yield from _ds_stage0_bf16(states0, model_cfg, ds_dir)
        return

    optim_files = _ds_files(ds_dir, "*optim_states.pt")
    if len(optim_files) != world:
        raise UserError(f"'{ds_dir}' holds {len(optim_files)} optimizer partition files but was written by "
                        f"{world} ranks; the checkpoint is incomplete: convert an earlier step folder")
    # memory-mapped: the Adam moments inside these files are never touched
    optim = [_load(f, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    if stage in (1, 2):
        groups = [o["single_partition_of_fp32_groups"] for o in optim]
        paddings = optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(param_shapes):
            parts = [groups[r][g] for r in range(world)]
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = math.prod(shape)
                yield name, _slice_virtual(parts, offset, n).view(tuple(shape))
                offset += n + (paddings[g][i] if paddings else 0)
        for name in frozen_shapes:  # frozen parameters are stored whole in the module states
            yield name, states0["frozen_param_fragments"][name].float().clone()
    else:
        import torch

        flats = [o["fp32_flat_groups"] for o in optim]
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                n = math.prod(shape)
                per_rank = math.ceil(n / world)
                full = torch.empty(n, dtype=torch.float32)
                for r in range(world):  # rank r holds elements [r * per_rank, (r + 1) * per_rank), padded at the end
                    take = min(per_rank, n - r * per_rank)
                    if take > 0:
                        _slice_virtual(flats[r], offset, take, full[r * per_rank:r * per_rank + take])
                yield name, full.view(tuple(shape))
                offset += per_rank
        if frozen_shapes:
            frags = [_load(f, weights_only=False)["frozen_param_fragments"] for f in model_files]
            for name, shape in frozen_shapes.items():
                n = math.prod(shape)
                yield name, torch.cat([f[name].reshape(-1).float() for f in frags])[:n].view(tuple(shape)).clone()
    for alias, source in shared.items():
        yield alias, ("shared", source)


def _ds_stage0_bf16(states0: dict, model_cfg, ds_dir: Path):
    """ZeRO-0 in bf16 keeps per-parameter fp32 copies in the order of the optimizer's param groups."""
    import torch

    from mmscale.engines.base import param_groups
    from mmscale.models import build_model

    opt = states0.get("optimizer") or {}
    fp32_groups = opt.get("fp32_groups")
    if fp32_groups is None:
        # no master copies (fp32 run): the module's own weights are exact
        yield from ((k, v.float()) for k, v in states0["module"].items())
        return
    with torch.device("meta"):
        model = build_model(model_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    # the engine builds its optimizer with param_groups(model, ...): the same order here
    order = [names[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]
    flat = [t for g in fp32_groups for t in g]
    if len(flat) != len(order):
        raise UserError(f"'{ds_dir}': {len(flat)} fp32 master weights for {len(order)} parameters; "
                        "the checkpoint was written for another model")
    for name, t in zip(order, flat):
        yield name, t.float().clone()


def read_checkpoint(step_dir: Path, meta: dict, model_cfg):
    fmt = meta.get("model_format")
    if fmt == "torch":
        return read_torch(step_dir, meta)
    if fmt == "dcp":
        return read_dcp(step_dir, meta)
    if fmt == "deepspeed":
        return read_deepspeed(step_dir, meta, model_cfg)
    raise UserError(f"checkpoint '{step_dir}' has model_format {fmt!r}; expected torch, dcp or deepspeed")


def load_checkpoint_state(step_dir: Path, meta: dict, model_cfg, dtype=None, progress: bool = False) -> dict:
    """The model's full state dict from a checkpoint, checked name by name and shape by shape."""
    import torch
    from tqdm import tqdm

    expected = expected_shapes(model_cfg)
    out: dict = {}
    aliases = {}
    try:
        tensors = read_checkpoint(step_dir, meta, model_cfg)
        first = next(tensors, None)  # a checkpoint that cannot be read fails here, before the progress bar
        tensors = itertools.chain([first] if first is not None else [], tensors)
        for name, tensor in tqdm(tensors, total=len(expected), unit="tensor",
                                 desc="reading", disable=not progress, file=sys.stderr, leave=False, delay=1.0):
            if isinstance(tensor, tuple):
                aliases[name] = tensor[1]
                continue
            if name not in expected:
                raise UserError(f"checkpoint '{step_dir}' holds '{name}', which the model of its meta.json does not "
                                "have: it was written for another model (or its files were mixed up)")
            if tuple(tensor.shape) != expected[name]:
                raise UserError(f"checkpoint '{step_dir}': '{name}' has shape {tuple(tensor.shape)} but the model of "
                                f"its meta.json needs {expected[name]}: it was written for another model")
            out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint '{step_dir}' does not match the model of its meta.json ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); it was written for another model or is damaged") from None
    for alias, source in aliases.items():
        if source in out:
            out.setdefault(alias, out[source])
    if model_cfg.tie_embeddings and "lm_head.weight" not in out and "embed.weight" in out:
        out["lm_head.weight"] = out["embed.weight"]
    missing = [k for k in expected if k not in out]
    if missing:
        raise UserError(f"checkpoint '{step_dir}' lacks {len(missing)} of the model's tensors ({missing[0]}, ...): "
                        "it is incomplete or was written for another model")
    return out


# ---------------------------------------------------------------------------------------------
# provenance

def find_tokenizer(cfg: dict) -> Path | None:
    """The run's tokenizer: next to its training data, or in the export it started from."""
    candidates = []
    data = cfg.get("data", {}) or {}
    if data.get("train"):
        candidates.append(Path(data["train"]) / "tokenizer.model")
    init = (cfg.get("train", {}) or {}).get("init_from")
    if init:
        candidates.append(Path(init) / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


def last_val_loss(run_dir: Path, step: int):
    return last_val_loss_at(run_dir, step)[0]


def last_val_loss_at(run_dir: Path, step: int) -> tuple:
    """(the last val_loss logged at or before `step`, the step it was measured at), or (None, None)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    val, at = None, None
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        if row.get("val_loss") is not None and row.get("step", 0) <= step:
            val, at = row["val_loss"], row.get("step")
    return val, at


def check_tokenizer(tok: Path, model_cfg, run_cfg: dict, step_dir: Path) -> None:
    """The tokenizer to ship loads, fits the model's vocab, and is the one the run's data was made with."""
    from mmscale.data.tokenizer import file_sha256, load_tokenizer

    sp = load_tokenizer(tok)  # a one-line error for a file that is not a tokenizer
    if sp.get_piece_size() > model_cfg.vocab_size:
        raise UserError(f"--tokenizer '{tok}' has {sp.get_piece_size()} pieces but the model of '{step_dir}' has "
                        f"vocab_size {model_cfg.vocab_size}; pass the tokenizer the run was trained with")
    data = ((run_cfg.get("data", {}) or {}).get("train") or "")
    manifest = Path(data) / "manifest.json" if data and "://" not in data else None
    if manifest is not None and manifest.is_file():
        try:
            want = (json.loads(manifest.read_text()).get("tokenizer") or {}).get("sha256")
        except (ValueError, AttributeError, OSError):
            want = None
        have = file_sha256(tok)
        if isinstance(want, str) and want != have:
            raise UserError(f"--tokenizer '{tok}' (sha256 {have[:16]}...) is not the tokenizer the run's data "
                            f"'{data}' was made with (sha256 {want[:16]}...); pass {Path(data) / 'tokenizer.model'}")


def sample_batch(model_cfg, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model_cfg.vocab_size, (2, model_cfg.n_ctx), generator=g)


def reference_logits(state: dict, model_cfg, ids):
    import torch

    from mmscale.models import build_model

    model = build_model(model_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model.eval()(ids)


def verify_export(export: Path, ids, ref_logits, dtype: str) -> dict:
    """Load `export` in a fresh interpreter and compare its logits with `ref_logits` on `ids`."""
    import torch

    with tempfile.TemporaryDirectory(prefix="mmscale-verify-") as tmp:
        torch.save({"ids": ids, "logits": ref_logits}, Path(tmp) / "ref.pt")
        code = ("import json, sys, torch\n"
                "from mmscale.export.format import load_export\n"
                "model, _ = load_export(sys.argv[1])\n"
                "ref = torch.load(sys.argv[2])\n"
                "with torch.no_grad():\n"
                "    diff = (model(ref['ids']) - ref['logits']).abs().max().item()\n"
                "print(json.dumps({'max_abs_diff': diff, 'max_abs_logit': ref['logits'].abs().max().item()}))\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                            os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, "-c", code, str(export), str(Path(tmp) / "ref.pt")],
                             capture_output=True, text=True, timeout=600, env=env)
    if res.returncode != 0:
        raise UserError(f"--verify: loading the export in a fresh process failed: "
                        f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    # fp32 must reproduce the checkpoint's logits; bf16 weights round each weight to 8 bits of mantissa
    tol = (1e-5 if dtype == "fp32" else 5e-2) * max(1.0, result["max_abs_logit"])
    result.update(tolerance=tol, ok=result["max_abs_diff"] <= tol)
    return result


# ---------------------------------------------------------------------------------------------

def convert(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32", *, tokenizer=None,
            overwrite: bool = False, verify: bool = False, progress: bool = True) -> dict:
    """Write an export of `checkpoint` to `out`; returns a summary (and the verify result)."""
    import torch

    from mmscale import checkpoint as ckpt
    from mmscale.export.format import save_export

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory '{out}' already exists; choose another path or pass --overwrite")
    step_dir = resolve_checkpoint(checkpoint)
    if out.exists():  # --overwrite never removes the run being converted, nor a folder holding it
        from mmscale.fsutil import check_output
        check_output(out, [checkpoint, step_dir] + ([tokenizer] if tokenizer else []), "--out")
    meta = ckpt.read_meta(step_dir)
    ckpt.verify_or_raise(step_dir)
    model_cfg = _model_config(meta, step_dir)
    run_cfg = meta.get("config", {}) or {}
    tok = Path(tokenizer) if tokenizer else find_tokenizer(run_cfg)
    if tok is None or not tok.is_file():
        raise UserError(f"no tokenizer found for '{step_dir}' (looked next to data.train and train.init_from); "
                        "pass --tokenizer PATH/tokenizer.model")
    check_tokenizer(tok, model_cfg, run_cfg, step_dir)

    state = load_checkpoint_state(step_dir, meta, model_cfg, getattr(torch, DTYPES[dtype]), progress)
    run_dir = step_dir.parent.parent
    n_params = sum(v.numel() for k, v in state.items() if not (model_cfg.tie_embeddings and k == "lm_head.weight"))
    info = {"parameters": n_params, "steps": meta.get("step"), "tokens": meta.get("tokens_seen"),
            "trained_on": (run_cfg.get("data", {}) or {}).get("train") or (run_cfg.get("retrieval", {}) or {}).get("pairs"),
            "init_from": (run_cfg.get("train", {}) or {}).get("init_from") or None,
            "val_loss": (val_at := last_val_loss_at(run_dir, meta.get("step", 0)))[0],
            "val_loss_step": val_at[1], "source": str(step_dir),
            "engine": meta.get("engine"), "zero_stage": meta.get("zero_stage"), "world_size": meta.get("world_size")}
    save_export(out, state, dataclasses.asdict(model_cfg), tok, info=info, overwrite=overwrite)
    summary = {"export": str(out), "checkpoint": str(step_dir), "dtype": dtype, "tensors": len(state), **info}
    del state
    if verify:
        # the reference comes from the checkpoint again (fp32), not from what was written
        fp32 = load_checkpoint_state(step_dir, meta, model_cfg, None, progress)
        ids = sample_batch(model_cfg)
        ref = reference_logits(fp32, model_cfg, ids)
        del fp32
        summary["verify"] = verify_export(out, ids, ref, dtype)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run dir (its latest checkpoint), its checkpoints/ or a step folder")
    parser.add_argument("out", help="the export folder to write (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--verify", action="store_true",
                        help="reload the export in a fresh process and compare its logits with the checkpoint's")
    parser.add_argument("--tokenizer", help="tokenizer.model to ship (default: the run's, found from its config)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    summary = convert(args.checkpoint, args.out, args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite,
                      verify=args.verify)
    print(f"wrote {summary['export']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
          f"{summary['dtype']}, from {summary['checkpoint']} (step {summary['steps']})")
    if "verify" in summary:
        v = summary["verify"]
        print(f"verify: max |logit difference| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}) "
              f"-> {'OK' if v['ok'] else 'MISMATCH'}")
        if not v["ok"]:
            print(f"mmscale convert: error: the export's logits differ from the checkpoint's by "
                  f"{v['max_abs_diff']:.3g}; do not use this export", file=sys.stderr)
            return 1
    return 0
