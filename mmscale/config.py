"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["model.d_model=128", "engine.kind=fsdp"])

Every section is a dataclass; unknown keys, wrong types and impossible values raise
`ConfigError` with a one-line message that names the key and what is allowed. The CLI turns
that into `mmscale: error: ...` and exit status 2.
"""
from __future__ import annotations

import dataclasses
import math
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


# ----------------------------------------------------------------------------------------------
# bounded YAML: every YAML that mmscale reads (configs, experiment specs, overrides, spec.yaml) goes through
# load_yaml / load_yaml_file: a size limit, a limit on what aliases expand to, duplicate keys refused

YAML_MAX_BYTES = 4 << 20       # a config or spec is a few KiB; a 50 MB one is a mistake (or an attack)
YAML_MAX_NODES = 200_000       # nodes after expanding every alias (a "billion laughs" file expands to 10**9)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (naming both lines) and documents whose aliases expand past
    YAML_MAX_NODES nodes (checked on the node graph, before anything is constructed)."""

    where = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor says so itself
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise ConfigError(f"{self.where} has the key '{key}' twice (lines {first} and {line}); "
                                      "keep one of them")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root, where: str) -> int:
    """Nodes of the document with every alias expanded (shared nodes counted each time they are used);
    an alias inside its own anchor (a structure holding itself) is refused."""
    memo: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative post-order (deep nesting must not hit the recursion limit)
        node, done = stack.pop()
        kids = []
        if isinstance(node, yaml.SequenceNode):
            kids = node.value
        elif isinstance(node, yaml.MappingNode):
            kids = [n for kv in node.value for n in kv]
        if done:
            open_.discard(id(node))
            memo[id(node)] = min(1 + sum(memo[id(k)] for k in kids), YAML_MAX_NODES + 1)
            continue
        if id(node) in memo:
            continue
        if id(node) in open_:
            raise ConfigError(f"{where}: an alias (*name) is used inside its own anchor (line "
                              f"{node.start_mark.line + 1}), so the value would contain itself; write it out")
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids)
    return memo[id(root)]


def load_yaml(text: str, where: str = "YAML"):
    """Parse one YAML document from `text` with the limits above; errors are ConfigError naming `where`
    ('config file X', 'spec X', ...). A YAML syntax error stays a yaml.YAMLError (callers word it)."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(f"{where} is {len(text) / 2**20:.1f} MiB, over the {YAML_MAX_BYTES >> 20} MiB limit for "
                          "YAML input; a config or spec is a few KiB: check that this is the right file")
    loader = _BoundedLoader(text)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, where) > YAML_MAX_NODES:
            raise ConfigError(f"{where}: its aliases (*name) expand to more than {YAML_MAX_NODES:,} values; "
                              "write the values out or use fewer nested aliases")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, where: str | None = None):
    """load_yaml of a file: a size check before reading, UTF-8 required, syntax errors as one line."""
    p = Path(path)
    where = where or f"'{path}'"
    try:
        size = p.stat().st_size
        if size > YAML_MAX_BYTES:
            raise ConfigError(f"{where} is {size / 2**20:.1f} MiB, over the {YAML_MAX_BYTES >> 20} MiB limit for "
                              "YAML input; a config or spec is a few KiB: check that this is the right file")
        with open(p, "rb") as f:
            raw = f.read(YAML_MAX_BYTES + 1)  # (a FIFO or device has no size: read at most one past the limit)
    except OSError as e:
        raise ConfigError(f"{where} cannot be read ({e.strerror or e}); check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{where} is not UTF-8 text (line {line}); save it as UTF-8") from None
    try:
        return load_yaml(text, where)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}; fix its syntax") from None


def opt(default: Any, help: str, allowed: str = "") -> Any:
    """A config field with its one-line meaning (and, where the type does not say it, the allowed values).

    The meaning lives here and nowhere else: `mmscale config show|keys` and the README read it back.
    """
    meta = {"help": help, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    kind: Literal["mixer", "transformer"] = opt("mixer", "masked mixer or the Llama-style transformer baseline")
    d_model: int = opt(64, "width of the residual stream", ">= 1, divisible by heads")
    n_layers: int = opt(2, "number of blocks", ">= 1")
    n_ctx: int = opt(64, "context length T (the mixer's window is fixed to it)", ">= 2")
    vocab_size: int = opt(4096, "tokenizer vocabulary size (must match the dataset's)", ">= 2")
    heads: int = opt(4, "mixer: heads of the multi-head token mixing; transformer: attention heads", ">= 1")
    kv_heads: int = opt(0, "transformer: key/value heads for grouped-query attention (0 = same as heads)",
                        ">= 0, divides heads")
    mixer: Literal["flat", "multihead"] = opt("flat", "mixer: token-mixing variant")
    kernel_size: int = opt(1, "mixer: taps of the token-mixing conv along the feature axis (paper's kernel size)",
                           "odd, >= 1")
    mixer_impl: Literal["auto", "dense", "blocked", "triton"] = opt(
        "auto", "mixer: how masked token mixing is computed (all give the same result)")
    ffn_mult: int = opt(4, "FFN hidden size = ffn_mult x d_model (transformer: SwiGLU hidden)", ">= 1")
    ffn_hidden: int = opt(0, "explicit FFN hidden size (0 = ffn_mult x d_model)", ">= 0")
    tie_embeddings: bool = opt(False, "share the embedding and LM-head weights")
    bidirectional: bool = opt(False, "mixer: no mask on token mixing (sees the future); transformer: non-causal")
    final_norm: bool = opt(False, "a norm before the LM head (off reproduces the paper's mixer; Llama has one)")
    norm_eps: float = opt(1e-5, "epsilon of the norms", "> 0")
    rope_theta: float = opt(10000.0, "transformer: RoPE base")
    init_std: float = opt(0.02, "standard deviation of the weight init", "> 0")


@dataclass
class DataConfig:
    train: str = opt("", "prepared MDS dataset: a local directory or a remote (s3://, gs://, ...) cached "
                         "under cache_dir")
    val: str = opt("", "held-out dataset (empty = the val/ split of train)")
    cache_dir: str = opt("", "local cache for remote datasets")
    num_workers: int = opt(0, "data-loader worker processes", ">= 0")
    shuffle: bool = opt(True, "shuffle samples (seeded by run.seed)")
    num_canonical_nodes: int = opt(1, "fixes the global sample order independently of the number of nodes "
                                      "(mosaicml-streaming)", ">= 1")
    shuffle_block_size: int = opt(1 << 18, "samples per shuffle block (mosaicml-streaming)")


@dataclass
class TrainConfig:
    max_steps: int = opt(100, "optimizer steps to train for", ">= 1")
    micro_batch_size: Union[int, Literal["auto"]] = opt(
        8, "samples per rank per forward/backward; auto: the largest that fits, probed at start (halving on "
           "out-of-memory), keeping train.global_batch_size through grad_accum", ">= 1 or auto")
    grad_accum: int = opt(1, "micro-batches per optimizer step (derived when global_batch_size is set)", ">= 1")
    global_batch_size: int = opt(0, "samples per optimizer step over all ranks (0 = micro_batch_size x grad_accum "
                                    "x ranks); a multiple of micro_batch_size x ranks", ">= 0")
    lr: float = opt(5e-4, "peak learning rate", "> 0")
    min_lr_ratio: float = opt(0.1, "the cosine schedule ends at min_lr_ratio x lr", "[0, 1]")
    warmup_steps: int = opt(10, "linear warm-up steps", ">= 0")
    schedule: Literal["cosine", "constant"] = opt("cosine", "learning-rate schedule after warm-up")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", ">= 0")
    beta1: float = opt(0.9, "AdamW beta1", "[0, 1)")
    beta2: float = opt(0.95, "AdamW beta2", "[0, 1)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", ">= 0")
    eval_every: int = opt(50, "held-out loss every N steps (0 = never)", ">= 0")
    eval_batches: int = opt(8, "batches per held-out evaluation", ">= 1")
    max_bad_steps: int = opt(5, "stop after this many non-finite losses in a row (each one's step is skipped)",
                             ">= 0")
    init_from: str = opt("", "start from a consolidated export (mmscale convert) instead of a fresh init")


@dataclass
class EngineConfig:
    kind: Literal["single", "ddp", "deepspeed", "fsdp"] = opt("single", "how the model is trained across ranks")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage", "0, 1, 2 or 3")
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "compute precision (master weights stay fp32); auto: bf16 where the device computes it natively "
                "(CUDA capability >= 8.0, a CPU with AVX512-BF16 or AMX), else fp32 (mmscale/precision.py)")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward")
    compile: bool = opt(False, "torch.compile each block")
    offload_optimizer: bool = opt(False, "DeepSpeed: offload optimizer states to CPU memory")
    deepspeed_config: str = opt("", "DeepSpeed: a raw DeepSpeed JSON merged on top of the generated config "
                                    "(experts only)")
    hsdp_replicas: int = opt(1, "FSDP2: replicas of a 2-D (replicate, shard) mesh for HSDP; 1 = plain FSDP",
                             ">= 1, divides the ranks")
    dist_timeout_min: int = opt(60, "minutes a collective may wait for the other ranks before the process "
                                    "group gives up (rank-0 work such as checkpoint finalising runs meanwhile)",
                                ">= 1")
    tf32: bool = opt(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions (no effect on CPU)")


@dataclass
class CheckpointConfig:
    every: int = opt(50, "save a checkpoint every N steps (0 = only at the end)", ">= 0")
    keep: int = opt(2, "complete checkpoints kept in run.dir", ">= 1")


@dataclass
class RunConfig:
    dir: str = opt("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/, samples, traces")
    seed: int = opt(1234, "seed of the initial weights and the data order")
    resume: str = opt("auto", "auto: continue from the latest complete checkpoint in dir; never; or a "
                              "checkpoint path", "auto, never or a path")


@dataclass
class LogConfig:
    every: int = opt(1, "write a metrics.jsonl row every N steps", ">= 1")
    wandb: Literal["offline", "online", "disabled"] = opt("offline", "Weights & Biases mode (files under "
                                                                     "run.dir/wandb)")
    wandb_project: str = opt("mmscale", "wandb project")
    wandb_entity: str = opt("", "wandb entity (team or user; empty = your default)")
    wandb_group: str = opt("", "wandb group (e.g. one per comparison)")
    wandb_tags: list[str] = opt([], "wandb tags, e.g. [mixer, d512]")
    project: str = opt("", "deprecated spelling of wandb_project (used when set)")
    tensorboard: bool = opt(False, "also write the metrics.jsonl scalars to run.dir/tensorboard")
    peak_flops: float = opt(0.0, "peak FLOP/s of one device for MFU (0 = from the built-in GPU table by "
                                 "torch.cuda.get_device_name and engine.precision; none on CPU)", ">= 0")
    progress: bool = opt(True, "show a progress bar with ETA on rank 0")
    sample_every: int = opt(0, "write generated continuations of sample_prompts to run.dir/samples.jsonl every "
                               "N steps and at the end (0 = never)", ">= 0")
    sample_prompts: list[str] = opt(["Once upon a time", "The little"], "prompts to continue")
    sample_tokens: int = opt(48, "new tokens per sample", ">= 1")
    sample_temperature: float = opt(0.8, "sampling temperature (0 = greedy); top-k 40", ">= 0")
    profile_steps: list[int] = opt([], "[start, count]: record a torch.profiler trace of steps start .. "
                                       "start+count-1 (empty = off)", "[] or [start >= 1, count >= 1]")
    profile_ranks: list[int] = opt([0], "ranks that record the profiler trace")


@dataclass
class RetrievalConfig:
    pairs: str = opt("", "JSONL of {query, passage[, negatives]} pairs")
    temperature: float = opt(0.02, "InfoNCE temperature on cosine similarity", "> 0")
    group_size: int = opt(32, "one query, one positive and group_size - 2 negatives per example", ">= 2")
    gather_negatives: bool = opt(False, "also use the other examples' passages on every rank as negatives")
    position: str = opt("mean", "what embeds a sequence: the mean over its real tokens, that mean weighted by the "
                                "corpus's inverse document frequency (idf), the last real token, or an "
                                "integer index (the paper: -2); see docs/retrieval-collapse.md",
                        "mean, idf, last or an integer")
    collection: str = opt("", "a BEIR-layout collection directory (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv); "
                              "instead of pairs")
    split: str = opt("", "the qrels split to train on (empty: train, or the only one)")
    negatives: Literal["random", "bm25", "model"] = opt("random", "hard negatives: random documents, or the top "
                                                                  "non-relevant ones of BM25 or of the initial export "
                                                                  "(mined once, cached)")
    hard_negatives: int = opt(0, "mined negatives per group (0 = half of the group_size - 2 slots, rounded up)", ">= 0")
    mine_depth: int = opt(32, "mined negatives kept per query; groups draw from them", ">= 1")
    passage_mode: Literal["truncate", "first_window", "max_chunk"] = opt(
        "truncate", "documents longer than n_ctx: cut, first title-prefixed window, or the best window (eval, mining)")
    cache_dir: str = opt("", "corpus embeddings and mined negatives cache (empty: run.dir/retrieval_cache)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the network"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "datasets"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "parallelism and precision"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "run directory, seed, resume"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "metrics, wandb, TensorBoard, "
                                                                        "samples, profiler"})
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig, metadata={"help": "retrieval fine-tuning"})

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
    if tp is Any:  # checked by the section's own code (a spec's list-or-scalar keys)
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: "
                              + ", ".join(str(c) for c in choices))
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
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


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the dataclass `cls` from a mapping: unknown keys and wrong types are one-line ConfigErrors
    naming `prefix.key` (the config's sections, and any other typed section such as an experiment spec's)."""
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
            kwargs[k] = build_section(tp, v if v is not None else {}, key)
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
            val = load_yaml(v, f"override '{k}'") if v.strip() != "" else ""
        except yaml.YAMLError:
            val = v
        out.append((k, val))
    return out


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    tree = dict(data or {})
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for k, v in parse_overrides(overrides):
        _set_dotted(tree, k, v)
    cfg = build_section(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/tiny.yaml")
        data = load_yaml_file(p, f"config file '{path}'") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, train:, ...)")
    return config_from_dict(data, overrides)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_finite(cfg: Config) -> None:
    """inf / nan in any number (train.lr=inf, ...) is refused before any other check."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{section.name}.{f.name} must be a finite number, got {v}")


def validate(cfg: Config) -> None:
    _check_finite(cfg)
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
    if t.micro_batch_size == "auto":
        _check(t.global_batch_size >= 1, "train.micro_batch_size=auto keeps the global batch fixed; set "
                                         "train.global_batch_size (e.g. train.global_batch_size=64)")
    else:
        _check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1 or auto, got {t.micro_batch_size}")
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
    _check(e.dist_timeout_min >= 1, f"engine.dist_timeout_min must be >= 1, got {e.dist_timeout_min}")
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0 (0 = only at the end), got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    _check(cfg.run.dir != "", "run.dir must not be empty")
    _check(cfg.log.every >= 1, f"log.every must be >= 1, got {cfg.log.every}")
    _check(cfg.log.peak_flops >= 0, f"log.peak_flops must be >= 0 (0 = from the GPU table), got {cfg.log.peak_flops}")
    lg = cfg.log
    _check(lg.sample_every >= 0, f"log.sample_every must be >= 0 (0 = never), got {lg.sample_every}")
    _check(lg.sample_tokens >= 1, f"log.sample_tokens must be >= 1, got {lg.sample_tokens}")
    _check(lg.sample_temperature >= 0, f"log.sample_temperature must be >= 0 (0 = greedy), got {lg.sample_temperature}")
    _check(not lg.sample_every or len(lg.sample_prompts) >= 1,
           "log.sample_prompts is empty; give at least one prompt (e.g. log.sample_prompts='[Once upon a time]')")
    _check(lg.profile_steps == [] or (len(lg.profile_steps) == 2 and lg.profile_steps[0] >= 1
                                      and lg.profile_steps[1] >= 1),
           f"log.profile_steps must be [] or [start, count] with start >= 1 and count >= 1, got {lg.profile_steps}")
    _check(all(r >= 0 for r in lg.profile_ranks), f"log.profile_ranks must be ranks >= 0, got {lg.profile_ranks}")
    _check(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    _check(cfg.data.num_canonical_nodes >= 1,
           f"data.num_canonical_nodes must be >= 1, got {cfg.data.num_canonical_nodes}")

    r = cfg.retrieval
    _check(r.temperature > 0, f"retrieval.temperature must be > 0, got {r.temperature}")
    _check(r.group_size >= 2, f"retrieval.group_size must be >= 2 (a query and its positive), got {r.group_size}")
    _check(r.hard_negatives >= 0, f"retrieval.hard_negatives must be >= 0 (0 = half the negatives), got {r.hard_negatives}")
    _check(r.mine_depth >= 1, f"retrieval.mine_depth must be >= 1, got {r.mine_depth}")
    if r.position not in ("last", "mean", "idf"):
        try:
            int(r.position)
        except ValueError:
            raise ConfigError(f"retrieval.position must be 'last', 'mean', 'idf' or an integer index, got {r.position!r}") from None
