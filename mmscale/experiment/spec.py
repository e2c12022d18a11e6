"""The experiment spec: typed sections loaded through mmscale.config's machinery (the same one-line errors for an
unknown key or a wrong type as a run config), then the checks between keys that types cannot say.

    spec = load_spec("experiments/paper-small.yaml", ["data.text=stories.txt"])
    spec.budget.rule, spec.budget["rule"], spec.data.get("train")   # attribute or dict-style reads

`mmscale experiment keys [PREFIX]` lists every key with its default and meaning (sections.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmscale.config import ConfigError, build_section, config_from_dict, load_yaml, load_yaml_file
from mmscale.errors import UserError
from mmscale.experiment.sections import (MATCH_KEYS, MATCHES, RULES, TOP_KEYS, AxesSpec, BudgetSpec, DataSpec, EvalSpec,
                                         RepresentationSpec, RetrievalSpec, SlurmResources, SpecFile, SweepSpec)
from mmscale.retrieval.pairs import parse_corpus_pairs


class SpecError(UserError):
    exit_code = 2


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


@dataclass
class Spec:
    name: str
    raw: dict
    data: DataSpec
    base: dict
    arms: dict           # name -> flat overrides
    arm_resources: dict  # name -> slurm resources
    baseline: str
    seeds: list
    n_ctx: list
    shapes: list         # [{"d_model": .., "n_layers": ..}] or [{}]
    budget: BudgetSpec
    sweep: SweepSpec
    eval: EvalSpec
    retrieval: RetrievalSpec
    representation: RepresentationSpec
    launcher: dict       # {"jobs": N, "slurm": the resources as given}
    base_dir: Path = field(default=Path("."))


# ----------------------------------------------------------------------------------------------

def flat_overrides(d: dict) -> dict:
    """{'model.kind': 'mixer', 'train': {'lr': 1e-3}} -> {'model.kind': 'mixer', 'train.lr': 0.001}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            for kk, vv in flat_overrides(v).items():
                out[f"{k}.{kk}"] = vv
        else:
            out[str(k)] = v
    return out


def override_list(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items()]


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> Spec:
    p = Path(path)
    need(p.is_file(), f"spec '{path}' does not exist; pass a YAML file such as experiments/paper-small.yaml")
    raw = load_yaml_file(p, f"spec '{path}'") or {}  # bounded: size, alias expansion, duplicate keys
    need(isinstance(raw, dict), "a spec must be a mapping with keys such as data, arms, budget")
    for o in overrides or []:
        k, eq, v = o.partition("=")
        need(bool(eq) and "." in k, f"spec override '{o}' is not of the form section.key=value "
                                    "(e.g. data.text=stories.txt)")
        sec, key = k.split(".", 1)
        need(sec in TOP_KEYS, f"unknown spec key '{sec}' in override '{o}'; valid keys: {', '.join(sorted(TOP_KEYS))}")
        node = raw.setdefault(sec, {})
        need(isinstance(node, dict), f"spec key '{sec}' is not a section; cannot set '{k}'")
        try:
            node[key] = load_yaml(v, f"spec override '{k}'") if v.strip() else ""
        except yaml.YAMLError:
            node[key] = v
    return parse_spec(raw, p.resolve().parent)


def load_spec_from(path: Path, base_dir: Path) -> Spec:
    return parse_spec(load_yaml_file(path) or {}, base_dir)


def _typed(raw: dict) -> SpecFile:
    """Every key known and of its type, as a run config's keys are (the same one-line messages)."""
    try:
        return build_section(SpecFile, raw, "")
    except ConfigError as e:
        raise SpecError(f"spec: {e} (`mmscale experiment keys` lists every spec key)") from None


def parse_spec(raw: dict, base_dir: Path = Path(".")) -> Spec:
    need(isinstance(raw, dict), "a spec must be a mapping with keys such as data, arms, budget")
    f = _typed(raw)
    _check_data(f.data)
    need(isinstance(f.base or {}, dict), f"spec key 'base' must be a mapping of config overrides, got {f.base!r}")
    base = flat_overrides(f.base or {})
    arms, resources = _check_arms(f.arms)
    seeds, n_ctx, shapes = _check_axes(f.axes)
    _check_budget(f.budget, arms)
    _check_sweep(f.sweep, f.budget.rule)
    for k in ("batches", "batch_size", "points"):
        _at_least(f.eval, "eval", k, 1)
    _check_retrieval(f.retrieval, f.data)
    for k in ("samples", "steps"):
        _at_least(f.representation, "representation", k, 1)
    _at_least(f.launcher, "launcher", "jobs", 1)
    slurm = (raw.get("launcher") or {}).get("slurm") or {}
    per_arm = [(f"arms.{an}.resources", res) for an, res in resources.items()]
    per_arm += [(f"launcher.slurm.arms.{an}", res) for an, res in (f.launcher.slurm.arms or {}).items()]
    for where, res in per_arm:
        need(isinstance(res, dict), f"spec key '{where}' must be a mapping of SLURM resources, got {res!r}")
        try:
            build_section(SlurmResources, res, where)
        except ConfigError as e:
            raise SpecError(f"spec: {e}") from None
    baseline = _pick_baseline(f.baseline, base, arms)
    for k in base:
        need(not k.startswith("run.") and k != "data.train",
             f"spec key 'base.{k}' is set by the experiment (run dirs, seeds, data); remove it")
    spec = Spec(name=str(f.name or "experiment"), raw=raw, data=f.data, base=base, arms=arms, arm_resources=resources,
                baseline=baseline, seeds=seeds, n_ctx=n_ctx, shapes=shapes, budget=f.budget, sweep=f.sweep,
                eval=f.eval, retrieval=f.retrieval, representation=f.representation,
                launcher={"jobs": f.launcher.jobs, "slurm": dict(slurm)}, base_dir=base_dir)
    _check_arm_configs(spec)
    return spec


def _at_least(sec, where: str, key: str, minimum, strict: bool = False) -> None:
    v = getattr(sec, key)
    if v is None:
        return
    need(math.isfinite(v), f"spec key '{where}.{key}' must be a number, got {v!r}")
    need(v > minimum if strict else v >= minimum,
         f"spec key '{where}.{key}' must be {'>' if strict else '>='} {minimum}, got {v}")


def _check_data(d: DataSpec) -> None:
    need(bool(d.train) != bool(d.text),
         "spec key 'data': give exactly one of data.train (a prepared dataset) or data.text (a text file, "
         "or 'synth' for the built-in corpus)")
    if d.text:
        _at_least(d, "data", "vocab_size", 8)
    need(not (d.other and d.other_text), "spec key 'data': give data.other (prepared) or data.other_text (text), "
                                         "not both")
    if d.other_text and d.train:
        raise SpecError("spec key 'data.other_text' needs data.text (it is prepared with the experiment's "
                        "tokenizer); with data.train give data.other, a dataset prepared with the same tokenizer")


def _check_arms(arms_raw) -> tuple[dict, dict]:
    need(isinstance(arms_raw, dict) and len(arms_raw) >= 2,
         "spec key 'arms' must map at least two arm names to model overrides, e.g. "
         "{mixer: {model.kind: mixer}, transformer: {model.kind: transformer}}")
    arms, resources = {}, {}
    for an, ov in arms_raw.items():
        need(isinstance(an, str) and an.replace("-", "").replace("_", "").isalnum(),
             f"spec key 'arms': arm name {an!r} must be letters, digits, - or _")
        need(isinstance(ov or {}, dict), f"spec key 'arms.{an}' must be a mapping of config overrides")
        ov = dict(ov or {})
        resources[an] = ov.pop("resources", {}) or {}
        arms[an] = flat_overrides(ov)
    return arms, resources


def _check_axes(axes: AxesSpec) -> tuple[list, list, list]:
    seeds = axes.seeds
    need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
         and len(set(seeds)) == len(seeds), f"spec key 'axes.seeds' must be a list of distinct integers, got {seeds!r}")
    n_ctx = axes.n_ctx if isinstance(axes.n_ctx, list) else [axes.n_ctx]
    need(all(v is None or (isinstance(v, int) and v >= 2) for v in n_ctx) and n_ctx,
         f"spec key 'axes.n_ctx' must be a list of integers >= 2, got {axes.n_ctx!r}")
    shapes = axes.shape if isinstance(axes.shape, list) else [axes.shape]
    for s in shapes:
        need(isinstance(s, dict) and set(s) <= {"d_model", "n_layers"},
             f"spec key 'axes.shape' must be a list of {{d_model: D, n_layers: L}}, got {s!r}")
    return seeds, n_ctx, shapes


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def _check_budget(b: BudgetSpec, arms: dict) -> None:
    amount = {"flops": "flops", "tokens": "tokens", "wall_clock": "seconds"}[b.rule]
    if b.reference_arm is not None:
        need(b.reference_arm in arms, f"spec key 'budget.reference_arm' names {b.reference_arm!r}, which is not an "
                                      f"arm ({', '.join(arms)})")
        need(b.rule != "wall_clock", "spec key 'budget.reference_arm' works with rule flops or tokens; give "
                                     "budget.seconds for wall_clock")
        _at_least(b, "budget", "reference_steps", 1)
        need(b.reference_steps is not None, "spec key 'budget.reference_steps' is needed with budget.reference_arm")
    else:
        need(getattr(b, amount) is not None, f"spec key 'budget.{amount}' is needed for rule {b.rule} "
                                             f"(or budget.reference_arm + budget.reference_steps)")
        _at_least(b, "budget", amount, 1e-9)
    _at_least(b, "budget", "params_tolerance", 0)
    given = b.match
    b.match = str(given).lower() if given is not None else "none"
    need(b.match in MATCHES, f"spec key 'budget.match' must be one of {', '.join(MATCHES)}, got {given!r}")
    keys = _as_list(b.match_keys)
    need(bool(keys) and all(k in MATCH_KEYS for k in keys) and len(set(keys)) == len(keys),
         f"spec key 'budget.match_keys' must be a list of distinct keys from {', '.join(MATCH_KEYS)}, "
         f"got {b.match_keys!r}")
    b.match_keys = keys
    views = _as_list(b.views)
    need(all(v in RULES for v in views) and len(set(views)) == len(views),
         f"spec key 'budget.views' must be a list of distinct views from {', '.join(RULES)}, got {b.views!r}")
    b.views = views


def _check_sweep(s: SweepSpec, rule: str) -> None:
    try:
        lrs = [float(x) for x in _as_list(s.lr)]
    except (TypeError, ValueError):
        raise SpecError(f"spec key 'sweep.lr' must be a list of learning rates, got {s.lr!r}") from None
    need(all(x > 0 and math.isfinite(x) for x in lrs), f"spec key 'sweep.lr' must hold positive numbers, got {lrs}")
    s.lr = lrs
    _at_least(s, "sweep", "fraction", 1e-6)
    need(s.fraction <= 1, f"spec key 'sweep.fraction' must be in (0, 1], got {s.fraction}")
    for k in ("steps", "min_steps"):
        _at_least(s, "sweep", k, 1)
    need(rule != "wall_clock" or s.steps is not None,
         "spec key 'sweep.steps' is needed with budget.rule wall_clock (the sweep measures each arm's throughput)")
    _at_least(s, "sweep", "extend_factor", 1, strict=True)
    _at_least(s, "sweep", "max_extend", 0)  # 0 by default: an experiment made before the sweep could extend
    _at_least(s, "sweep", "lr_min", 0, strict=True)  # itself resumes with the grid it had
    _at_least(s, "sweep", "lr_max", 0, strict=True)
    need(s.lr_min < s.lr_max, f"spec key 'sweep.lr_min' ({s.lr_min}) must be below sweep.lr_max ({s.lr_max})")


def _check_retrieval(r: RetrievalSpec, data: DataSpec) -> None:
    r.enabled = bool(data.retrieval) if r.enabled is None else r.enabled
    need(not r.enabled or bool(data.retrieval),
         "spec key 'retrieval.enabled' is true but data.retrieval is empty; give a collection, a pairs JSONL or "
         "'synth'")
    for k, low, strict in (("steps", 1, False), ("group_size", 2, False), ("temperature", 0, True),
                           ("lr", 0, True), ("micro_batch_size", 1, False), ("warmup_steps", 0, False)):
        _at_least(r, "retrieval", k, low, strict)
    # issue 29: mean pooling (the last token of a small causal model does not say what a document is about) and
    # pairs made from the corpus itself (a collection has tens of judged queries), mixed with the judged ones
    if r.pairs:
        try:
            parse_corpus_pairs(str(r.pairs))
        except UserError as e:
            raise SpecError(f"spec key 'retrieval.pairs': {e}") from None
    try:  # the run config's own rule for what embeds a sequence (the measure runs `retrieval train` with it)
        config_from_dict({"retrieval": {"position": r.position}})
    except ConfigError as e:
        raise SpecError(f"spec key {e}") from None
    cands = _as_list(r.candidates)
    need(all(isinstance(c, int) and not isinstance(c, bool) and c >= 2 for c in cands),
         f"spec key 'retrieval.candidates' must be a list of integers >= 2, got {cands!r}")
    r.candidates = sorted(set(cands))


def _pick_baseline(baseline, base: dict, arms: dict) -> str:
    if baseline is None:
        kinds = {an: ov.get("model.kind", base.get("model.kind", "mixer")) for an, ov in arms.items()}
        baseline = next((an for an, k in kinds.items() if k == "transformer"), list(arms)[-1])
    need(baseline in arms, f"spec key 'baseline' names {baseline!r}, which is not an arm ({', '.join(arms)})")
    return baseline


def _check_arm_configs(spec: Spec) -> None:
    """Every arm's config must load: a bad key is one line naming the arm and the key."""
    for an in spec.arms:
        for nc in spec.n_ctx:
            for sh in spec.shapes:
                try:
                    config_from_dict({}, override_list(arm_overrides(spec, an, nc, sh)))
                except ConfigError as e:
                    raise SpecError(f"spec key 'arms.{an}': {e}") from None


def arm_overrides(spec: Spec, arm: str, n_ctx, shape: dict) -> dict:
    ov = dict(spec.base)
    ov.update(spec.arms[arm])
    if n_ctx is not None:
        ov["model.n_ctx"] = n_ctx
    for k, v in (shape or {}).items():
        ov[f"model.{k}"] = v
    return ov
