"""`mmscale convert CHECKPOINT OUT [--dtype fp32|bf16] [--verify]`: any engine's checkpoint -> an export.

    mmscale convert runs/tiny out/tiny-export                 # a run dir: its latest checkpoint
    mmscale convert runs/tiny/checkpoints/step_00000300 out/x --dtype bf16 --verify

Reads the checkpoints of every engine written by any number of ranks, with no process group and
no GPU, through the offline reader of the engine that wrote them (Engine.read_state, next to its
save/load: single/ddp read model.pt memory-mapped; fsdp reads only the model's tensors from DCP by
their metadata; deepspeed slices the fp32 master weights out of memory-mapped ZeRO partitions, never
reading the optimizer states). This module checks names and shapes against the model, casts,
and writes and verifies the export.

Memory stays within about twice the model: the output state dict, plus (for --verify) the model
built once more to compute reference logits. `--verify` then loads the export in a fresh process
(mmscale.export.load_export) and compares its logits on a sample batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from mmscale.cli.conventions import check_output_path
from mmscale.config import ConfigError, ModelConfig, build_section
from mmscale.data.tokenizer import load_tokenizer
from mmscale.engines import engine_for_checkpoint
from mmscale.errors import UserError
from mmscale.export.format import save_export
from mmscale.fsutil import file_sha256
from mmscale.models import build_model
from mmscale.run import checkpoint as ckpt
from mmscale.run.metrics import read_jsonl

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------
# locating a checkpoint

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step folder from a run dir, a checkpoints/ dir or a step folder itself."""
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
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}


def _model_config(meta: dict, where: Path):
    try:
        return build_section(ModelConfig, meta.get("model", {}), "model")
    except ConfigError as e:
        raise UserError(f"checkpoint '{where}': its meta.json holds no valid model config ({e})") from None


# ---------------------------------------------------------------------------------------------
# reading: each engine owns the offline reader of the files it writes (Engine.read_state)

def read_checkpoint(step_dir: Path, meta: dict, model_cfg):
    """(name, fp32 tensor) pairs, one at a time, from the reader of the engine that wrote the checkpoint."""
    return engine_for_checkpoint(meta, step_dir).read_state(step_dir, meta, model_cfg)


def load_checkpoint_state(step_dir: Path, meta: dict, model_cfg, dtype=None, progress: bool = False) -> dict:
    """The model's full state dict from a checkpoint, checked name by name and shape by shape."""
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
    for row in read_jsonl(path)[0]:
        if row.get("val_loss") is not None and row.get("step", 0) <= step:
            val, at = row["val_loss"], row.get("step")
    return val, at


def check_tokenizer(tok: Path, model_cfg, run_cfg: dict, step_dir: Path) -> None:
    """The tokenizer to ship loads, fits the model's vocab, and is the one the run's data was made with."""
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
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model_cfg.vocab_size, (2, model_cfg.n_ctx), generator=g)


def reference_logits(state: dict, model_cfg, ids):
    model = build_model(model_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model.eval()(ids)


def verify_export(export: Path, ids, ref_logits, dtype: str) -> dict:
    """Load `export` in a fresh interpreter and compare its logits with `ref_logits` on `ids`."""
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
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    out = Path(out)
    step_dir = resolve_checkpoint(checkpoint)
    # never the run being converted nor a folder holding it; an existing file is not replaced by a folder
    check_output_path(out, "--out", overwrite=overwrite, inputs=[step_dir] + ([tokenizer] if tokenizer else []))
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
            "engine": meta.get("engine"), "world_size": meta.get("world_size"),
            **engine_for_checkpoint(meta, step_dir).describe(meta)}
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
