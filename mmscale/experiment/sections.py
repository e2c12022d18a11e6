"""The sections of an experiment spec as typed dataclasses: each key's type, default and meaning (`opt`), loaded
by mmscale.config's build_section like a run config's sections; `mmscale experiment keys` prints them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mmscale.config import opt

RULES = ("flops", "tokens", "wall_clock")
MATCHES = ("none", "params", "flops")
MATCH_KEYS = ("ffn_hidden", "d_model", "n_layers")  # the order in which a sized arm's shape is changed


class Section:
    """Dict-style reads of a typed section beside attribute reads (spec.budget["rule"], spec.data.get("train")):
    a key whose value is None reads as absent (get returns its default)."""

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        v = getattr(self, key, None)
        return default if v is None else v

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __iter__(self):
        return iter(self.keys())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DataSpec(Section):
    train: str = opt("", "a prepared dataset (`mmscale prepare`); or give data.text")
    text: str = opt("", "a text file or folder the experiment prepares (tokenizer, one dataset per n_ctx), or synth "
                        "for the built-in corpus")
    synth_stories: Optional[int] = opt(None, "stories in the built-in corpus (default 3000)")
    vocab_size: Optional[int] = opt(None, "tokenizer vocabulary with data.text (default 1024)", ">= 8")
    val_fraction: Optional[float] = opt(None, "held-out fraction with data.text (default 0.05)")
    other: str = opt("", "held-out text from another source: a dataset prepared with the same tokenizer")
    other_text: str = opt("", "held-out text from another source: a text file (needs data.text) or synth")
    retrieval: Optional[str] = opt(None, "retrieval collection: a BEIR folder, a pairs JSONL or synth")
    retrieval_test_fraction: Optional[float] = opt(None, "held-out queries of a pairs JSONL (default 0.2)")


@dataclass
class AxesSpec(Section):
    seeds: Any = opt([0, 1, 2], "seeds; seed i of every arm uses run.seed = seeds[i]", "distinct integers")
    n_ctx: Any = opt(None, "context lengths (a list or one value)", "integers >= 2")
    shape: Any = opt([{}], "widths x depths: a list of {d_model: D, n_layers: L}")


@dataclass
class BudgetSpec(Section):
    rule: Literal["flops", "tokens", "wall_clock"] = opt("flops", "what every arm gets the same of")
    flops: Optional[float] = opt(None, "training FLOPs per run (rule flops)", "> 0")
    tokens: Optional[float] = opt(None, "training tokens per run (rule tokens)", "> 0")
    seconds: Optional[float] = opt(None, "training seconds per run (rule wall_clock)", "> 0")
    reference_arm: Optional[str] = opt(None, "the budget is this arm's reference_steps (instead of an amount)")
    reference_steps: Optional[int] = opt(None, "steps of budget.reference_arm", ">= 1")
    count: Literal["causal", "dense"] = opt("causal", "FLOPs counted on the live lower triangle or dense")
    params_tolerance: float = opt(0.1, "relative parameter (or FLOPs) difference counted as matched", ">= 0")
    match: str = opt("none", "size every arm's shape to the reference's parameters or FLOPs per token",
                     ", ".join(MATCHES))
    match_keys: Any = opt(list(MATCH_KEYS), "the shape keys budget.match may change, in order",
                          ", ".join(MATCH_KEYS))
    views: Any = opt([], "the same runs read at equal budgets", ", ".join(RULES))


@dataclass
class SweepSpec(Section):
    lr: Any = opt([], "learning-rate grid of every arm's sweep (empty: the base config's rate)", "> 0")
    fraction: float = opt(0.25, "sweep runs' share of the full budget", "(0, 1]")
    steps: Optional[int] = opt(None, "sweep steps instead of fraction (needed with rule wall_clock)", ">= 1")
    min_steps: int = opt(5, "fewest sweep steps", ">= 1")
    extend_factor: float = opt(3.0, "an edge best is extended by x (or /) this", "> 1")
    max_extend: int = opt(0, "rates the sweep may add beyond the grid", ">= 0")
    lr_min: float = opt(1e-6, "the sweep never goes below this rate", "> 0")
    lr_max: float = opt(1.0, "the sweep never goes above this rate", "> lr_min")


@dataclass
class EvalSpec(Section):
    batches: int = opt(8, "held-out batches (the same first windows for every run)", ">= 1")
    batch_size: int = opt(8, "windows per held-out batch", ">= 1")
    points: int = opt(8, "evaluation points along each main run", ">= 1")


@dataclass
class RetrievalSpec(Section):
    enabled: Optional[bool] = opt(None, "fine-tune and measure retrieval (default: when data.retrieval is set)")
    steps: int = opt(100, "InfoNCE steps from each pretrained model", ">= 1")
    group_size: int = opt(8, "query, positive and negatives per example", ">= 2")
    temperature: float = opt(0.05, "InfoNCE temperature", "> 0")
    lr: float = opt(1e-4, "fine-tuning learning rate", "> 0")
    candidates: Any = opt([32], "top-1 among this many candidates", "integers >= 2")
    micro_batch_size: int = opt(4, "examples per micro-batch", ">= 1")
    negatives: Literal["random", "bm25", "model"] = opt("random", "hard negatives")
    warmup_steps: int = opt(5, "warm-up steps", ">= 0")
    pairs: str = opt("", "pairs made from the corpus itself, mixed with the judged ones (retrieval.pairs syntax)")
    position: str = opt("mean", "what embeds a sequence",
                        "last, mean, idf (idf-weighted mean over the searched corpus) or an integer")
    gather_negatives: bool = opt(True, "other examples' passages as negatives too")
    passage_mode: Literal["truncate", "first_window", "max_chunk"] = opt("truncate", "documents longer than n_ctx")


@dataclass
class RepresentationSpec(Section):
    enabled: bool = opt(True, "measure the input-representation error before and after training")
    samples: int = opt(4, "windows", ">= 1")
    steps: int = opt(200, "gradient steps of the recovery", ">= 1")


@dataclass
class SlurmResources:
    partition: str = opt("", "SLURM partition")
    gpus_per_node: Optional[int] = opt(None, "GPUs per run")
    cpus_per_task: Optional[int] = opt(None, "CPU cores per run (default 1)")
    time_min: Optional[int] = opt(None, "time limit per run in minutes (default 60)")
    mem_gb: Optional[float] = opt(None, "memory per run in GB")
    array_parallelism: Optional[int] = opt(None, "runs of an array at a time (default 64)")


@dataclass
class SlurmSpec(SlurmResources):
    arms: Any = opt({}, "per-arm resources: {ARM: {gpus_per_node: 1, ...}}")


@dataclass
class LauncherSpec(Section):
    jobs: int = opt(1, "local launcher: runs at a time", ">= 1")
    slurm: SlurmSpec = field(default_factory=SlurmSpec, metadata={"help": "SLURM resources (--launcher slurm)"})


@dataclass
class SpecFile:
    """The keys of a spec file: the sections are typed; base and arms hold config overrides."""

    name: Any = opt("experiment", "the experiment's name (default folder runs/experiments/NAME)")
    description: Any = opt("", "a paragraph at the top of the report")
    data: DataSpec = field(default_factory=DataSpec, metadata={"help": "what every arm trains and is measured on"})
    base: Any = opt({}, "config overrides of every arm, e.g. {model.d_model: 256, train.micro_batch_size: 8}")
    arms: Any = opt({}, "at least two arms: {NAME: {config overrides, resources: {SLURM resources}}}")
    baseline: Any = opt(None, "the arm the others are compared with (default: the first transformer, else the last)")
    axes: AxesSpec = field(default_factory=AxesSpec, metadata={"help": "seeds, context lengths, shapes"})
    budget: BudgetSpec = field(default_factory=BudgetSpec, metadata={"help": "the budget rule and matched shapes"})
    sweep: SweepSpec = field(default_factory=SweepSpec, metadata={"help": "every arm's learning-rate sweep"})
    eval: EvalSpec = field(default_factory=EvalSpec, metadata={"help": "the fixed held-out tokens"})
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec, metadata={"help": "the retrieval measure"})
    representation: RepresentationSpec = field(default_factory=RepresentationSpec,
                                               metadata={"help": "the input-representation measure"})
    launcher: LauncherSpec = field(default_factory=LauncherSpec, metadata={"help": "how runs are launched"})


TOP_KEYS = tuple(f.name for f in dataclasses.fields(SpecFile))
