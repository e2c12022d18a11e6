"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.d_model=128", "engine.kind=fsdp"])

Every section is a dataclass; unknown keys, wrong types and impossible values raise
`ConfigError` with a one-line message that names the key and what is allowed. The CLI turns
that into `mmscale: error: ...` and exit status 2.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mmscale.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value. The message is one line, meant for the user; exit status 2."""

    exit_code = 2


@dataclass
class ModelConfig:
    kind: Literal["mixer", "transformer"] = "mixer"
    d_model: int = 64
    n_layers: int = 2
    n_ctx: int = 64
    vocab_size: int = 4096
    # mixer: heads of the multi-head token mixing; transformer: attention heads
    heads: int = 4
    # transformer only: key/value heads for grouped-query attention (0 = same as heads)
    kv_heads: int = 0
    # mixer only: token-mixing variant
    mixer: Literal["flat", "multihead"] = "flat"
    # mixer only: taps of the token-mixing conv along the feature axis (paper's kernel size)
    kernel_size: int = 1
    # mixer only: how masked token mixing is computed (all give the same result)
    mixer_impl: Literal["auto", "dense", "blocked", "triton"] = "auto"
    # FFN hidden size = ffn_mult * d_model (transformer: SwiGLU hidden = ffn_mult * d_model unless ffn_hidden > 0)
    ffn_mult: int = 4
    ffn_hidden: int = 0
    tie_embeddings: bool = False
    # mixer: no mask on token mixing (sees the future); transformer: non-causal attention
    bidirectional: bool = False
    # a norm before the LM head (off reproduces the paper's mixer; Llama has one)
    final_norm: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02


@dataclass
class DataConfig:
    # a prepared MDS dataset: a local directory, or a remote (s3://, gs://, ... or a local path
    # used as remote) that is cached under cache_dir
    train: str = ""
    val: str = ""
    cache_dir: str = ""
    num_workers: int = 0
    shuffle: bool = True
    # fixes the global sample order independently of the number of nodes (mosaicml-streaming)
    num_canonical_nodes: int = 1
    shuffle_block_size: int = 1 << 18


@dataclass
class TrainConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    # samples per optimizer step over all ranks; 0 = micro_batch_size * grad_accum * ranks. When set,
    # grad_accum is derived from it (it must be a multiple of micro_batch_size * ranks)
    global_batch_size: int = 0
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    # stop after this many non-finite losses in a row (each one's step is skipped)
    max_bad_steps: int = 5
    # start from a consolidated export (mmscale convert) instead of a fresh init
    init_from: str = ""


@dataclass
class EngineConfig:
    kind: Literal["single", "ddp", "deepspeed", "fsdp"] = "single"
    zero_stage: int = 2
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    compile: bool = False
    # DeepSpeed: offload optimizer states to CPU memory
    offload_optimizer: bool = False
    # DeepSpeed: a raw DeepSpeed JSON merged on top of the generated config (experts only)
    deepspeed_config: str = ""
    # FSDP2: replicas of a 2-D (replicate, shard) mesh for HSDP; 1 = plain FSDP
    hsdp_replicas: int = 1


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 2


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1234
    # auto: continue from the latest complete checkpoint in dir; never; or a checkpoint path
    resume: str = "auto"


@dataclass
class LogConfig:
    every: int = 1
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mmscale"
    # peak FLOP/s of one device, for MFU (0 = do not report MFU)
    peak_flops: float = 0.0
    progress: bool = True


@dataclass
class RetrievalConfig:
    pairs: str = ""
    # InfoNCE temperature on cosine similarity
    temperature: float = 0.02
    # one query, one positive and group_size - 2 negatives per example
    group_size: int = 32
    # also use the other examples' passages on every rank as negatives
    gather_negatives: bool = False
    # which token embeds a sequence: "last" real token, or an integer index (the paper: -2)
    position: str = "last"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# loading and validation

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and minimally coerce) `value` against the annotation `tp`; raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: "
                              + ", ".join(str(c) for c in choices))
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 as a string (no dot)
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise ConfigError(f"unknown key '{key}'; valid keys here: " + ", ".join(fields))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key)
        else:
            kwargs[k] = _coerce(key, v, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for o in overrides or []:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form section.key=value (e.g. model.d_model=512)")
        k, v = o.split("=", 1)
        k = k.strip().lstrip("-")
        try:
            val = yaml.safe_load(v) if v.strip() != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k, val))
    return out


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    tree = dict(data or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for k, v in parse_overrides(overrides):
        _set_dotted(tree, k, v)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/tiny.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix its syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    return config_from_dict(data, overrides)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    m, t, e = cfg.model, cfg.train, cfg.engine
    _check(m.d_model >= 1, f"model.d_model must be >= 1, got {m.d_model}")
    _check(m.n_layers >= 1, f"model.n_layers must be >= 1, got {m.n_layers}")
    _check(m.n_ctx >= 2, f"model.n_ctx must be >= 2 (a context predicts at least one token), got {m.n_ctx}")
    _check(m.vocab_size >= 2, f"model.vocab_size must be >= 2, got {m.vocab_size}")
    _check(m.heads >= 1, f"model.heads must be >= 1, got {m.heads}")
    _check(m.d_model % m.heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})")
    _check(m.kv_heads >= 0, f"model.kv_heads must be >= 0 (0 = same as heads), got {m.kv_heads}")
    if m.kv_heads:
        _check(m.heads % m.kv_heads == 0,
               f"model.heads ({m.heads}) must be divisible by model.kv_heads ({m.kv_heads})")
    if m.kind == "transformer":
        _check((m.d_model // m.heads) % 2 == 0,
               f"model.d_model / model.heads must be even for RoPE, got {m.d_model // m.heads}")
    _check(m.kernel_size >= 1 and m.kernel_size % 2 == 1,
           f"model.kernel_size must be an odd integer >= 1, got {m.kernel_size}")
    _check(m.ffn_mult >= 1, f"model.ffn_mult must be >= 1, got {m.ffn_mult}")
    _check(m.ffn_hidden >= 0, f"model.ffn_hidden must be >= 0, got {m.ffn_hidden}")
    _check(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    _check(m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}")

    _check(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _check(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _check(t.global_batch_size >= 0, f"train.global_batch_size must be >= 0 (0 = derived), got {t.global_batch_size}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _check(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = never), got {t.eval_every}")
    _check(t.eval_batches >= 1, f"train.eval_batches must be >= 1, got {t.eval_batches}")
    _check(t.max_bad_steps >= 0, f"train.max_bad_steps must be >= 0, got {t.max_bad_steps}")

    _check(e.zero_stage in (0, 1, 2, 3), f"engine.zero_stage must be 0, 1, 2 or 3, got {e.zero_stage}")
    _check(e.hsdp_replicas >= 1, f"engine.hsdp_replicas must be >= 1, got {e.hsdp_replicas}")
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.run.dir != "", "run.dir must not be empty")
    _check(cfg.log.every >= 1, f"log.every must be >= 1, got {cfg.log.every}")
    _check(cfg.log.peak_flops >= 0, f"log.peak_flops must be >= 0, got {cfg.log.peak_flops}")
    _check(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _check(cfg.data.num_canonical_nodes >= 1,
           f"data.num_canonical_nodes must be >= 1, got {cfg.data.num_canonical_nodes}")

    r = cfg.retrieval
    _check(r.temperature > 0, f"retrieval.temperature must be > 0, got {r.temperature}")
    _check(r.group_size >= 2, f"retrieval.group_size must be >= 2 (a query and its positive), got {r.group_size}")
    if r.position != "last":
        try:
            int(r.position)
        except ValueError:
            raise ConfigError(f"retrieval.position must be 'last' or an integer index, got {r.position!r}") from None
