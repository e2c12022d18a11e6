"""The export directory format, shared by `mmscale convert`, tools/import_llama2c.py and every reader.

    EXPORT/
      model.safetensors   the model's state dict (parameters only; no mask buffers), one dtype
      config.json         {"format": "mmscale-export", "version": 1, "model": {ModelConfig fields}, "dtype": ...,
                           "tokenizer": "tokenizer.model", plus free-form provenance (steps, tokens, val_loss, ...)}
      tokenizer.model     the sentencepiece model the run was trained with
      README.md           a short model card

An export loads with nothing but torch + safetensors: `safetensors.torch.load_file(EXPORT/model.safetensors)`
gives a plain state dict; config.json says how to build the module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmscale.config import ModelConfig, build_section
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.fsutil import apply_umask_tree
from mmscale.models import build_model

FORMAT = "mmscale-export"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
CARD = "README.md"


def training_data_record(path) -> dict | None:
    """What a published export says about its training data: a name and a content hash, never a local path.

    A dataset of `mmscale prepare` (manifest.json): sha256 over manifest.json and each split's index.json (which
    hold the shards' xxh64 digests, so the hash follows the content, not the folder's place), and its token
    count; a file (retrieval pairs): sha256 of its bytes. A path that is gone keeps its name, hash None."""
    if path in (None, ""):
        return None
    p = Path(str(path))
    rec = {"name": p.name if p.name else str(path), "content_hash": None}
    try:
        if (p / "manifest.json").is_file():
            h = hashlib.sha256()
            for f in [p / "manifest.json"] + sorted(p.glob("*/index.json")):
                h.update(f.relative_to(p).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
            rec["content_hash"] = "sha256:" + h.hexdigest()
            rec["hashed"] = "manifest.json + */index.json (shard digests)"
            manifest = json.loads((p / "manifest.json").read_text())
            tokens = ((manifest.get("splits") or {}).get("train") or {}).get("tokens")
            if isinstance(tokens, int):
                rec["tokens"] = tokens
        elif p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            rec["content_hash"] = "sha256:" + h.hexdigest()
            rec["hashed"] = "file bytes"
    except (OSError, ValueError):
        rec["content_hash"] = None
    return rec


def _model_card(model_cfg: dict, info: dict) -> str:
    kind = "masked mixer" if model_cfg.get("kind") == "mixer" else "Llama-style transformer"
    lines = [
        f"# mmscale export: {kind}",
        "",
        f"- architecture: {kind}, d_model {model_cfg.get('d_model')}, {model_cfg.get('n_layers')} layers, "
        f"n_ctx {model_cfg.get('n_ctx')}, vocab {model_cfg.get('vocab_size')}",
    ]
    for key, label in [("parameters", "parameters"), ("trained_on", "trained on"), ("steps", "steps"),
                       ("tokens", "tokens seen"), ("val_loss", "validation loss (nats/token)"),
                       ("source", "converted from")]:
        if key in info and info[key] not in (None, ""):
            at = f" (at step {info['val_loss_step']})" if key == "val_loss" and info.get("val_loss_step") else ""
            lines.append(f"- {label}: {info[key]}{at}")
    lines += ["", "Load it with `mmscale.export.load_export(path)`, or with torch + safetensors alone "
              "(`safetensors.torch.load_file('model.safetensors')`) and config.json.", ""]
    return "\n".join(lines)


def save_export(out_dir: str | os.PathLike, state_dict: dict, model_cfg: Any, tokenizer_path: str | os.PathLike | None,
                info: dict | None = None, overwrite: bool = False) -> Path:
    """Write an export atomically (a temporary sibling directory renamed at the end).

    `model_cfg` is a ModelConfig or its dict; `info` is provenance for config.json and the model card.
    Refuses an existing `out_dir` unless `overwrite`.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output directory '{out}' already exists; choose another path or pass --overwrite")
    cfg = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    info = dict(info or {})
    if info.get("trained_on") and "training_data" not in info:  # hashed now, while the data is at hand
        info["training_data"] = training_data_record(info["trained_on"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # safetensors refuses tensors that share storage (a tied embedding/head): store a copy of each
        tensors, seen = {}, set()
        for k, v in state_dict.items():
            t = v.detach().contiguous().cpu()
            ptr = t.untyped_storage().data_ptr()
            tensors[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": VERSION, "model": cfg, "dtype": ",".join(dtypes),
                "tokenizer": TOKENIZER if tokenizer_path else None, **info}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / CARD).write_text(_model_card(cfg, info))
        apply_umask_tree(tmp)  # mkdtemp makes 0700: the export gets the modes of any other new folder
        if out.exists():  # overwrite: swap only once the new export is complete
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_export_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"export '{p}' is not a directory; pass the folder written by `mmscale convert`")
    cfg_file = p / CONFIG
    if not cfg_file.is_file():
        raise UserError(f"export '{p}' has no {CONFIG}; re-run `mmscale convert` to write a complete export")
    try:
        meta = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        raise UserError(f"export '{p}': {CONFIG} is not valid JSON (UTF-8); re-run `mmscale convert`") from None
    if not isinstance(meta, dict):
        raise UserError(f"export '{p}': {CONFIG} is not a JSON object; re-run `mmscale convert`")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise UserError(f"export '{p}': {CONFIG} is not an mmscale export config (format {meta.get('format')!r})")
    if not (p / WEIGHTS).is_file():
        raise UserError(f"export '{p}' has no {WEIGHTS}; re-run `mmscale convert`")
    tok = meta.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or Path(tok).name != tok or tok in ("", ".", "..")):
        raise UserError(f"export '{p}': {CONFIG} names the tokenizer {str(tok)[:80]!r}, which is not a file inside "
                        "the export; it must be a plain file name such as tokenizer.model")
    return meta


def load_export_tokenizer(path: str | os.PathLike, meta: dict, vocab_size: int):
    """The export's tokenizer, refused when it has more pieces than the model has embeddings."""
    tok_path = Path(path) / meta["tokenizer"]
    try:
        sp = load_tokenizer(tok_path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"export '{path}': '{tok_path.name}' is not a readable tokenizer ({type(e).__name__}); "
                        "re-run `mmscale convert` with the run's tokenizer") from None
    if sp.get_piece_size() > vocab_size:
        raise UserError(f"export '{path}': its tokenizer has {sp.get_piece_size()} pieces but the model's vocab_size is "
                        f"{vocab_size}; ship the tokenizer the model was trained with (mmscale convert --tokenizer)")
    return sp


def load_export(path: str | os.PathLike, dtype=None, device="cpu", require_tokenizer: bool = False):
    """Build the model described by an export and load its weights. Returns (model, meta).

    The tokenizer path, when present, is `Path(path) / meta["tokenizer"]`.
    """
    p = Path(path)
    meta = load_export_config(p)
    if require_tokenizer and not (meta.get("tokenizer") and (p / meta["tokenizer"]).is_file()):
        raise UserError(f"export '{p}' has no tokenizer.model; re-run `mmscale convert` with the run's tokenizer")
    model_cfg = build_section(ModelConfig, meta["model"], "model")
    model = build_model(model_cfg)
    sd = load_file(str(p / WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if model_cfg.tie_embeddings:  # the head is the embedding, stored once
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"export '{p}' does not match its config: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    model.to(device=device, dtype=dtype if dtype is not None else torch.float32)
    model.eval()
    return model, meta


def load_export_with_tokenizer(path: str | os.PathLike, dtype=None, device="cpu"):
    """An export's model and its tokenizer, for the commands that read or write text. Returns (model, meta, sp).

    Refuses (UserError) an export without its tokenizer.model and a tokenizer with more pieces than the
    model has embeddings (see load_export, load_export_tokenizer).
    """
    model, meta = load_export(path, dtype=dtype, device=device, require_tokenizer=True)
    sp = load_export_tokenizer(path, meta, model.config.vocab_size)
    return model, meta, sp


def load_export_state(path: str | os.PathLike, model_cfg: Any) -> dict:
    """The state dict of an export, checked against `model_cfg` (a ModelConfig or its dict).

    For `train.init_from`: every key of the model that `model_cfg` describes must be present with
    exactly its shape (dtypes are converted to fp32); a mismatch raises UserError naming the first
    difference. Tied weights appear once in the file and are returned under both names.
    """
    p = Path(path)
    meta = load_export_config(p)
    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else build_section(ModelConfig, dict(model_cfg), "model")
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    there = meta.get("model", {})
    for k, v in dataclasses.asdict(cfg).items():
        if k in there and there[k] != v and k in ("kind", "d_model", "n_layers", "n_ctx", "vocab_size", "heads",
                                                   "kv_heads", "mixer", "kernel_size", "ffn_mult", "ffn_hidden",
                                                   "tie_embeddings"):
            raise UserError(f"train.init_from: export '{p}' has model.{k}={there[k]!r}, this run has {v!r}; "
                            f"set model.{k}={there[k]!r} (or use an export of this model)")
    sd = load_file(str(p / WEIGHTS), device="cpu")
    if cfg.tie_embeddings and "lm_head.weight" not in sd and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"train.init_from: export '{p}' does not fit the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; use an export of the same architecture")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise UserError(f"train.init_from: '{k}' has shape {tuple(sd[k].shape)} in export '{p}' but the model "
                            f"needs {shape}; use an export of the same architecture")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
