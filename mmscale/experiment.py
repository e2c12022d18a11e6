"""`mmscale experiment run|status|report`: a fair, rerunnable comparison of masked mixers and transformers.

    mmscale experiment run experiments/paper-small.yaml [--out DIR] [--launcher local|slurm] [--jobs N] [--resume]
    mmscale experiment status DIR
    mmscale experiment report DIR

A spec (YAML) names the data, the arms (model overrides), the axes (n_ctx, width x depth, seeds), the budget
rule and what is measured; see experiments/paper-small.yaml for every key. The experiment directory holds:

    spec.yaml            the spec as given (a resumed experiment must be run with the same spec)
    plan.json            the resolved plan: arms, parameter counts, FLOPs per token, steps of every run
    sweep.json           the learning rate chosen per arm and axis point, with the sweep's losses
    commands.log         every command that touched the experiment (time, git commit, argv)
    data/                prepared data (when the spec gives text instead of prepared datasets)
    runs/sweep/NAME/     learning-rate sweep runs (ordinary mmscale run dirs)
    runs/main/NAME/      full-budget runs: checkpoints/, metrics.jsonl, export/, eval.json, retrieval/
    report/              report.md, report.html (self-contained), *.png, runs.html (`mmscale report`)

Fairness, by construction: every arm trains on the same prepared data with the same tokenizer; seed i of every arm
uses run.seed = seeds[i] (the same data order); every arm gets its own learning-rate sweep (the same grid, the same
short budget, the best final val loss carried to the full budget); every arm is evaluated on the same fixed first
eval.batches x eval.batch_size windows of the held-out split (the same tokens), unshuffled.

Budget rules (budget.rule): `flops` gives every arm the same training FLOPs (model.flops_per_token(), counted
`causal` = the live lower triangle, or `dense`; budget.count), `tokens` the same training tokens, `wall_clock`
the same seconds, converted to steps with each arm's throughput measured in its sweep. Steps are rounded to
the nearest whole step, so arms differ by less than one step's worth. The other two quantities are recorded.

Matched shapes (budget.match: none | params | flops): every arm but the reference (budget.reference_arm, else the
baseline) is sized so its parameter count (params) or training FLOPs per token (flops, budget.count) is the
closest the shape allows to the reference's, counted by the models themselves (meta-device builds). The rule, in
the order of budget.match_keys (default ffn_hidden, d_model, n_layers): FFN hidden size in multiples of 8 from
d_model (ffn_mult 1) up, else
d_model in multiples of 8 (valid for the arm's heads), else n_layers, each tried alone from the arm's own shape;
the first whose closest value is within budget.params_tolerance is kept (none: the closest of all). A key the arm
sets itself (model.ffn_mult / ffn_hidden, d_model, n_layers under arms.NAME) is the user's and never changed: with
all three set, the arm is not sized and the report's MISMATCH stays. plan.json's "sizing" and the report's budget
table say what changed.

The sweep extends itself (sweep.max_extend > 0; default 0, the grid as given): when an arm's best final val loss
is at the top (bottom) of the rates tried, best x (/) sweep.extend_factor (default 3) is tried next, until the best
is interior (a diverged rate beyond it counts as a bracket), max_extend rates were added, or the next rate passes
sweep.lr_min / lr_max. Decisions depend only on finished runs, so --resume makes the same ones and reuses every
finished sweep point; the report lists the whole sweep and the final bracket.

Budget views (budget.views: any of flops, tokens, wall_clock): the same main runs read off their val-loss curves
at a common budget per view (the smallest budget every finished run reached), interpolated linearly in log(loss)
against the budget between evaluation points, never extrapolated (a run whose curve does not cover it is named,
not read); wall-clock is training seconds (logged step times; evaluation and checkpoint pauses excluded). One
verdict per view.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmscale.errors import UserError
from mmscale.launch import ChildTask

REPO = Path(__file__).resolve().parent.parent
RULES = ("flops", "tokens", "wall_clock")
TOP_KEYS = {"name", "description", "data", "base", "arms", "baseline", "axes", "budget", "sweep", "eval",
            "retrieval", "representation", "launcher"}
DATA_KEYS = {"train", "text", "synth_stories", "vocab_size", "val_fraction", "other", "other_text", "retrieval",
             "retrieval_test_fraction"}
AXES_KEYS = {"seeds", "n_ctx", "shape"}
BUDGET_KEYS = {"rule", "flops", "tokens", "seconds", "reference_arm", "reference_steps", "count",
               "params_tolerance", "match", "match_keys", "views"}
SWEEP_KEYS = {"lr", "fraction", "steps", "min_steps", "extend_factor", "max_extend", "lr_min", "lr_max"}
MATCHES = ("none", "params", "flops")
MATCH_KEYS = ("ffn_hidden", "d_model", "n_layers")  # the order in which a sized arm's shape is changed
EVAL_KEYS = {"batches", "batch_size", "points"}
RETRIEVAL_KEYS = {"enabled", "steps", "group_size", "temperature", "lr", "candidates", "micro_batch_size",
                  "negatives", "warmup_steps", "pairs", "position", "gather_negatives", "passage_mode"}
REPR_KEYS = {"enabled", "samples", "steps"}
LAUNCHER_KEYS = {"jobs", "slurm"}
SLURM_KEYS = {"partition", "gpus_per_node", "cpus_per_task", "time_min", "mem_gb", "array_parallelism", "arms"}


class SpecError(UserError):
    exit_code = 2


# ----------------------------------------------------------------------------------------------
# the spec

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


def _section(raw: dict, key: str, allowed: set, default: dict | None = None) -> dict:
    sec = raw.get(key, default if default is not None else {})
    if sec is None:
        sec = {}
    _need(isinstance(sec, dict), f"spec key '{key}' must be a mapping, got {sec!r}")
    for k in sec:
        _need(k in allowed, f"unknown spec key '{key}.{k}'; valid keys here: {', '.join(sorted(allowed))}")
    return dict(sec)


def _num(sec: dict, key: str, where: str, default, kind=float, minimum=None):
    v = sec.get(key, default)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise SpecError(f"spec key '{where}.{key}' must be a number, got {v!r}") from None
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          f"spec key '{where}.{key}' must be a number, got {v!r}")
    if kind is int:
        _need(float(v).is_integer(), f"spec key '{where}.{key}' must be an integer, got {v!r}")
        v = int(v)
    else:
        v = float(v)
    if minimum is not None:
        _need(v >= minimum, f"spec key '{where}.{key}' must be >= {minimum}, got {v}")
    return v


def _flat_overrides(d: dict, where: str) -> dict:
    """{'model.kind': 'mixer', 'train': {'lr': 1e-3}} -> {'model.kind': 'mixer', 'train.lr': 0.001}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            for kk, vv in _flat_overrides(v, where).items():
                out[f"{k}.{kk}"] = vv
        else:
            out[str(k)] = v
    return out


def _override_list(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items()]


@dataclass
class Spec:
    name: str
    raw: dict
    data: dict
    base: dict
    arms: dict           # name -> flat overrides
    arm_resources: dict  # name -> slurm resources
    baseline: str
    seeds: list
    n_ctx: list
    shapes: list         # [{"d_model": .., "n_layers": ..}] or [{}]
    budget: dict
    sweep: dict
    eval: dict
    retrieval: dict
    representation: dict
    launcher: dict
    base_dir: Path = field(default=Path("."))


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> Spec:
    import yaml

    p = Path(path)
    _need(p.is_file(), f"spec '{path}' does not exist; pass a YAML file such as experiments/paper-small.yaml")
    from mmscale.config import load_yaml, load_yaml_file  # bounded: size, alias expansion, duplicate keys

    raw = load_yaml_file(p, f"spec '{path}'") or {}
    _need(isinstance(raw, dict), "a spec must be a mapping with keys such as data, arms, budget")
    for o in overrides or []:
        k, eq, v = o.partition("=")
        _need(bool(eq) and "." in k, f"spec override '{o}' is not of the form section.key=value "
                                     "(e.g. data.text=stories.txt)")
        sec, key = k.split(".", 1)
        _need(sec in TOP_KEYS, f"unknown spec key '{sec}' in override '{o}'; valid keys: {', '.join(sorted(TOP_KEYS))}")
        node = raw.setdefault(sec, {})
        _need(isinstance(node, dict), f"spec key '{sec}' is not a section; cannot set '{k}'")
        try:
            node[key] = load_yaml(v, f"spec override '{k}'") if v.strip() else ""
        except yaml.YAMLError:
            node[key] = v
    return parse_spec(raw, p.resolve().parent)


def parse_spec(raw: dict, base_dir: Path = Path(".")) -> Spec:
    _need(isinstance(raw, dict), "a spec must be a mapping with keys such as data, arms, budget")
    for k in raw:
        _need(k in TOP_KEYS, f"unknown spec key '{k}'; valid keys: {', '.join(sorted(TOP_KEYS))}")
    name = str(raw.get("name") or "experiment")
    data = _parse_data(raw)
    base = _flat_overrides(raw.get("base") or {}, "base")
    arms, resources = _parse_arms(raw)
    seeds, n_ctx, shapes = _parse_axes(raw)
    budget = _parse_budget(raw, arms)
    sweep = _parse_sweep(raw, budget["rule"])
    ev = _parse_eval(raw)
    ret = _parse_retrieval(raw, data)
    rep = _parse_representation(raw)
    la = _parse_launcher(raw)
    for an, res in resources.items():
        _need(isinstance(res, dict) and set(res) <= SLURM_KEYS - {"arms"},
              f"spec key 'arms.{an}.resources' may hold {', '.join(sorted(SLURM_KEYS - {'arms'}))}")
    baseline = _pick_baseline(raw, base, arms)
    for k in base:
        _need(not k.startswith("run.") and k != "data.train",
              f"spec key 'base.{k}' is set by the experiment (run dirs, seeds, data); remove it")
    spec = Spec(name=name, raw=raw, data=data, base=base, arms=arms, arm_resources=resources, baseline=baseline,
                seeds=seeds, n_ctx=n_ctx, shapes=shapes, budget=budget, sweep=sweep, eval=ev, retrieval=ret,
                representation=rep, launcher=la, base_dir=base_dir)
    _check_arm_configs(spec)
    return spec


def _parse_data(raw: dict) -> dict:
    data = _section(raw, "data", DATA_KEYS)
    _need(bool(data.get("train")) != bool(data.get("text")),
          "spec key 'data': give exactly one of data.train (a prepared dataset) or data.text (a text file, "
          "or 'synth' for the built-in corpus)")
    if data.get("text"):
        _num(data, "vocab_size", "data", 1024, int, 8)
    _need(not (data.get("other") and data.get("other_text")),
          "spec key 'data': give data.other (prepared) or data.other_text (text), not both")
    if data.get("other_text") and data.get("train"):
        raise SpecError("spec key 'data.other_text' needs data.text (it is prepared with the experiment's "
                        "tokenizer); with data.train give data.other, a dataset prepared with the same tokenizer")
    return data


def _parse_arms(raw: dict) -> tuple[dict, dict]:
    arms_raw = raw.get("arms")
    _need(isinstance(arms_raw, dict) and len(arms_raw) >= 2,
          "spec key 'arms' must map at least two arm names to model overrides, e.g. "
          "{mixer: {model.kind: mixer}, transformer: {model.kind: transformer}}")
    arms, resources = {}, {}
    for an, ov in arms_raw.items():
        _need(isinstance(an, str) and an.replace("-", "").replace("_", "").isalnum(),
              f"spec key 'arms': arm name {an!r} must be letters, digits, - or _")
        ov = dict(ov or {})
        _need(isinstance(ov, dict), f"spec key 'arms.{an}' must be a mapping of config overrides")
        resources[an] = ov.pop("resources", {}) or {}
        arms[an] = _flat_overrides(ov, f"arms.{an}")
    return arms, resources


def _parse_axes(raw: dict) -> tuple[list, list, list]:
    axes = _section(raw, "axes", AXES_KEYS)
    seeds = axes.get("seeds", [0, 1, 2])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
          and len(set(seeds)) == len(seeds), f"spec key 'axes.seeds' must be a list of distinct integers, got {seeds!r}")
    n_ctx = axes.get("n_ctx", [None])
    n_ctx = n_ctx if isinstance(n_ctx, list) else [n_ctx]
    _need(all(v is None or (isinstance(v, int) and v >= 2) for v in n_ctx) and n_ctx,
          f"spec key 'axes.n_ctx' must be a list of integers >= 2, got {axes.get('n_ctx')!r}")
    shapes = axes.get("shape", [{}])
    shapes = shapes if isinstance(shapes, list) else [shapes]
    for s in shapes:
        _need(isinstance(s, dict) and set(s) <= {"d_model", "n_layers"},
              f"spec key 'axes.shape' must be a list of {{d_model: D, n_layers: L}}, got {s!r}")
    return seeds, n_ctx, shapes


def _parse_budget(raw: dict, arms: dict) -> dict:
    budget = _section(raw, "budget", BUDGET_KEYS)
    rule = budget.get("rule", "flops")
    _need(rule in RULES, f"spec key 'budget.rule' must be one of {', '.join(RULES)}, got {rule!r}")
    budget["rule"] = rule
    count = budget.get("count", "causal")
    _need(count in ("causal", "dense"), f"spec key 'budget.count' must be causal or dense, got {count!r}")
    budget["count"] = count
    amount = {"flops": "flops", "tokens": "tokens", "wall_clock": "seconds"}[rule]
    if budget.get("reference_arm") is not None:
        _need(budget["reference_arm"] in arms, f"spec key 'budget.reference_arm' names {budget['reference_arm']!r}, "
                                               f"which is not an arm ({', '.join(arms)})")
        _need(rule != "wall_clock", "spec key 'budget.reference_arm' works with rule flops or tokens; "
                                    "give budget.seconds for wall_clock")
        budget["reference_steps"] = _num(budget, "reference_steps", "budget", None, int, 1)
        _need(budget["reference_steps"] is not None, "spec key 'budget.reference_steps' is needed with "
                                                     "budget.reference_arm")
    else:
        _need(budget.get(amount) is not None, f"spec key 'budget.{amount}' is needed for rule {rule} "
                                              f"(or budget.reference_arm + budget.reference_steps)")
        budget[amount] = _num(budget, amount, "budget", None, float, 1e-9)
    budget["params_tolerance"] = _num(budget, "params_tolerance", "budget", 0.1, float, 0)
    budget["match"] = str(budget.get("match", "none")).lower() if budget.get("match") is not None else "none"
    _need(budget["match"] in MATCHES, f"spec key 'budget.match' must be one of {', '.join(MATCHES)}, "
                                      f"got {budget.get('match')!r}")
    keys = budget.get("match_keys", list(MATCH_KEYS))
    keys = keys if isinstance(keys, list) else [keys]
    _need(bool(keys) and all(k in MATCH_KEYS for k in keys) and len(set(keys)) == len(keys),
          f"spec key 'budget.match_keys' must be a list of distinct keys from {', '.join(MATCH_KEYS)}, "
          f"got {budget.get('match_keys')!r}")
    budget["match_keys"] = keys
    views = budget.get("views", [])
    views = views if isinstance(views, list) else [views]
    _need(all(v in RULES for v in views) and len(set(views)) == len(views),
          f"spec key 'budget.views' must be a list of distinct views from {', '.join(RULES)}, "
          f"got {budget.get('views')!r}")
    budget["views"] = views
    return budget


def _parse_sweep(raw: dict, rule: str) -> dict:
    sweep = _section(raw, "sweep", SWEEP_KEYS)
    lrs = sweep.get("lr", [])
    lrs = lrs if isinstance(lrs, list) else [lrs]
    try:
        lrs = [float(x) for x in lrs]
    except (TypeError, ValueError):
        raise SpecError(f"spec key 'sweep.lr' must be a list of learning rates, got {sweep.get('lr')!r}") from None
    _need(all(x > 0 and math.isfinite(x) for x in lrs), f"spec key 'sweep.lr' must hold positive numbers, got {lrs}")
    sweep["lr"] = lrs
    sweep["fraction"] = _num(sweep, "fraction", "sweep", 0.25, float, 1e-6)
    _need(sweep["fraction"] <= 1, f"spec key 'sweep.fraction' must be in (0, 1], got {sweep['fraction']}")
    sweep["steps"] = _num(sweep, "steps", "sweep", None, int, 1)
    sweep["min_steps"] = _num(sweep, "min_steps", "sweep", 5, int, 1)
    _need(rule != "wall_clock" or sweep["steps"] is not None,
          "spec key 'sweep.steps' is needed with budget.rule wall_clock (the sweep measures each arm's throughput)")
    sweep["extend_factor"] = _num(sweep, "extend_factor", "sweep", 3.0, float, 1.0)
    _need(sweep["extend_factor"] > 1, f"spec key 'sweep.extend_factor' must be > 1, got {sweep['extend_factor']}")
    # 0 by default: an experiment made before the sweep could extend itself resumes with the grid it had
    sweep["max_extend"] = _num(sweep, "max_extend", "sweep", 0, int, 0)
    sweep["lr_min"] = _num(sweep, "lr_min", "sweep", 1e-6, float, 1e-300)
    sweep["lr_max"] = _num(sweep, "lr_max", "sweep", 1.0, float, 1e-300)
    _need(sweep["lr_min"] < sweep["lr_max"], f"spec key 'sweep.lr_min' ({sweep['lr_min']}) must be below "
                                             f"sweep.lr_max ({sweep['lr_max']})")
    return sweep


def _parse_eval(raw: dict) -> dict:
    ev = _section(raw, "eval", EVAL_KEYS)
    ev["batches"] = _num(ev, "batches", "eval", 8, int, 1)
    ev["batch_size"] = _num(ev, "batch_size", "eval", 8, int, 1)
    ev["points"] = _num(ev, "points", "eval", 8, int, 1)
    return ev


def _parse_retrieval(raw: dict, data: dict) -> dict:
    ret = _section(raw, "retrieval", RETRIEVAL_KEYS)
    ret["enabled"] = bool(ret.get("enabled", bool(data.get("retrieval"))))
    _need(not ret["enabled"] or data.get("retrieval"),
          "spec key 'retrieval.enabled' is true but data.retrieval is empty; give a collection, a pairs JSONL or "
          "'synth'")
    ret["steps"] = _num(ret, "steps", "retrieval", 100, int, 1)
    ret["group_size"] = _num(ret, "group_size", "retrieval", 8, int, 2)
    ret["temperature"] = _num(ret, "temperature", "retrieval", 0.05, float, 1e-9)
    ret["lr"] = _num(ret, "lr", "retrieval", 1e-4, float, 1e-12)
    ret["micro_batch_size"] = _num(ret, "micro_batch_size", "retrieval", 4, int, 1)
    ret["warmup_steps"] = _num(ret, "warmup_steps", "retrieval", 5, int, 0)
    ret["negatives"] = ret.get("negatives", "random")
    _need(ret["negatives"] in ("random", "bm25", "model"),
          f"spec key 'retrieval.negatives' must be random, bm25 or model, got {ret['negatives']!r}")
    # issue 29: mean pooling (the last token of a small causal model does not say what a document is about) and
    # pairs made from the corpus itself (a collection has tens of judged queries), mixed with the judged ones
    ret["pairs"] = ret.get("pairs", "")
    if ret["pairs"]:
        from mmscale.retrieval import parse_corpus_pairs
        try:
            parse_corpus_pairs(str(ret["pairs"]))
        except UserError as e:
            raise SpecError(f"spec key 'retrieval.pairs': {e}") from None
    ret["position"] = str(ret.get("position", "mean"))
    _need(ret["position"] in ("last", "mean") or ret["position"].lstrip("-").isdigit(),
          f"spec key 'retrieval.position' must be last, mean or an integer index, got {ret['position']!r}")
    ret["gather_negatives"] = bool(ret.get("gather_negatives", True))
    ret["passage_mode"] = ret.get("passage_mode", "truncate")
    _need(ret["passage_mode"] in ("truncate", "first_window", "max_chunk"),
          f"spec key 'retrieval.passage_mode' must be truncate, first_window or max_chunk, got {ret['passage_mode']!r}")
    cands = ret.get("candidates", [32])
    cands = cands if isinstance(cands, list) else [cands]
    _need(all(isinstance(c, int) and c >= 2 for c in cands),
          f"spec key 'retrieval.candidates' must be a list of integers >= 2, got {cands!r}")
    ret["candidates"] = sorted(set(cands))
    return ret


def _parse_representation(raw: dict) -> dict:
    rep = _section(raw, "representation", REPR_KEYS)
    rep["enabled"] = bool(rep.get("enabled", True))
    rep["samples"] = _num(rep, "samples", "representation", 4, int, 1)
    rep["steps"] = _num(rep, "steps", "representation", 200, int, 1)
    return rep


def _parse_launcher(raw: dict) -> dict:
    la = _section(raw, "launcher", LAUNCHER_KEYS)
    la["jobs"] = _num(la, "jobs", "launcher", 1, int, 1)
    sl = la.get("slurm") or {}
    _need(isinstance(sl, dict), "spec key 'launcher.slurm' must be a mapping")
    for k in sl:
        _need(k in SLURM_KEYS, f"unknown spec key 'launcher.slurm.{k}'; valid keys: {', '.join(sorted(SLURM_KEYS))}")
    la["slurm"] = sl
    return la


def _pick_baseline(raw: dict, base: dict, arms: dict) -> str:
    baseline = raw.get("baseline")
    if baseline is None:
        kinds = {an: ov.get("model.kind", base.get("model.kind", "mixer")) for an, ov in arms.items()}
        baseline = next((an for an, k in kinds.items() if k == "transformer"), list(arms)[-1])
    _need(baseline in arms, f"spec key 'baseline' names {baseline!r}, which is not an arm ({', '.join(arms)})")
    return baseline


def _check_arm_configs(spec: Spec) -> None:
    """Every arm's config must load: a bad key is one line naming the arm and the key."""
    from mmscale.config import ConfigError, config_from_dict

    for an in spec.arms:
        for nc in spec.n_ctx:
            for sh in spec.shapes:
                try:
                    config_from_dict({}, _override_list(arm_overrides(spec, an, nc, sh)))
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


# ----------------------------------------------------------------------------------------------
# data

def _resolve(spec: Spec, p: str) -> str:
    if p in ("synth",) or "://" in p:
        return p
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (spec.base_dir / q).resolve() if (spec.base_dir / q).exists() else q.resolve())


def prepare_data(spec: Spec, exp: Path, n_ctx_values: list[int], progress: bool = False) -> dict:
    """Prepared datasets for every n_ctx (keyed by n_ctx), the other source, the retrieval collection."""
    out = {"train": {}, "other": {}, "retrieval": None, "tokenizer": None}
    data_dir = exp / "data"
    if spec.data.get("train"):
        _use_prepared_datasets(spec, n_ctx_values, out)
    else:
        try:
            _prepare_from_text(spec, data_dir, n_ctx_values, progress, out)
        except UserError as e:  # tokenizer train's / prepare's hints name their flags: name the spec keys
            raise UserError(_spec_keys_for_flags(str(e)), e.exit_code) from None
    if spec.retrieval["enabled"]:
        out["retrieval"] = _retrieval_collection(spec, data_dir)
    return out


def _use_prepared_datasets(spec: Spec, n_ctx_values: list[int], out: dict) -> None:
    from mmscale.data.loader import read_manifest

    d = spec.data
    train = _resolve(spec, d["train"])
    _need(Path(train).is_dir(), f"spec key 'data.train': '{train}' is not a prepared dataset folder")
    m = read_manifest(train)
    for nc in n_ctx_values:
        _need(nc is None or m.get("n_ctx") == nc,
              f"spec key 'axes.n_ctx': {nc} differs from data.train's n_ctx {m.get('n_ctx')}; give data.text "
              "so the experiment prepares each n_ctx, or one n_ctx")
        out["train"][nc] = train
    out["tokenizer"] = str(Path(train) / "tokenizer.model")
    if d.get("other"):
        other = _resolve(spec, d["other"])
        _need(Path(other).is_dir(), f"spec key 'data.other': '{other}' is not a prepared dataset folder")
        for nc in n_ctx_values:
            out["other"][nc] = other


def _synth_corpus(d: dict, data_dir: Path) -> Path:
    """The built-in corpus (stories.txt, pairs.jsonl) under data_dir/synth, written once."""
    from mmscale.data.synth import write_corpus

    corpus = data_dir / "synth"
    if not (corpus / "pairs.jsonl").is_file():
        write_corpus(corpus, int(d.get("synth_stories", 3000)), 0, overwrite=True)
    return corpus


_FLAG_TO_SPEC = {"--vocab-size": "data.vocab_size", "--val-fraction": "data.val_fraction", "--n-ctx": "axes.n_ctx"}


def _spec_keys_for_flags(msg: str) -> str:
    """A data error worded for `mmscale prepare` / `tokenizer train`, reworded for a spec: flags with a spec key
    become that key; a hint at an option the experiment does not have is dropped."""
    import re

    for flag, key in _FLAG_TO_SPEC.items():
        msg = msg.replace(f"pass {flag}", f"set the spec's {key} to").replace(flag, f"the spec's {key}")
    return re.sub(r"[;,]?\s*(or )?(pass |use )?--[a-z][a-z-]*[^;]*", "", msg)


def _prepare_from_text(spec: Spec, data_dir: Path, n_ctx_values: list[int], progress: bool, out: dict) -> None:
    from mmscale.data.prepare import PrepareOptions, prepare
    from mmscale.data.tokenizer import train_tokenizer

    d = spec.data
    text = d["text"]
    data_dir.mkdir(parents=True, exist_ok=True)
    if text == "synth":
        text = str(_synth_corpus(d, data_dir) / "stories.txt")
    else:
        text = _resolve(spec, text)
        _need(Path(text).exists(), f"spec key 'data.text': '{text}' does not exist; give a text file or 'synth'")
    tok = data_dir / "tokenizer.model"
    if not tok.is_file():
        train_tokenizer([text] if Path(text).is_file() else [str(p) for p in sorted(Path(text).glob("*.txt"))],
                        int(d.get("vocab_size", 1024)), tok)
    out["tokenizer"] = str(tok)
    other_text = d.get("other_text")
    if other_text == "synth":
        other_text = str(_synth_corpus(d, data_dir) / "stories.txt")
    elif other_text:
        other_text = _resolve(spec, other_text)
        _need(Path(other_text).exists(), f"spec key 'data.other_text': '{other_text}' does not exist")
    for nc in n_ctx_values:
        _need(nc is not None, "spec key 'axes.n_ctx' is needed with data.text (the windows to prepare)")
        target = data_dir / f"train-{nc}"
        if not (target / "manifest.json").is_file():
            prepare(PrepareOptions(inputs=[text], tokenizer=str(tok), n_ctx=nc, out=str(target),
                                   val_fraction=float(d.get("val_fraction", 0.05)), workers=1,
                                   progress=progress, overwrite=target.exists()))
        out["train"][nc] = str(target)
        if other_text:
            target = data_dir / f"other-{nc}"
            if not (target / "manifest.json").is_file():
                prepare(PrepareOptions(inputs=[other_text], tokenizer=str(tok), n_ctx=nc, out=str(target),
                                       val_fraction=0.5, workers=1, progress=progress, overwrite=target.exists()))
            out["other"][nc] = str(target)
    if d.get("other"):
        for nc in n_ctx_values:
            out["other"][nc] = _resolve(spec, d["other"])


def _retrieval_collection(spec: Spec, data_dir: Path) -> str:
    d = spec.data
    r = d["retrieval"]
    if r == "synth":
        r = str(_synth_corpus(d, data_dir) / "pairs.jsonl")
    else:
        r = _resolve(spec, r)
        _need(Path(r).exists(), f"spec key 'data.retrieval': '{r}' does not exist; give a BEIR folder, a pairs "
                                "JSONL or 'synth'")
    if Path(r).is_file():  # a pairs JSONL: held-out queries, as `retrieval import --test-fraction` writes
        coll = data_dir / "retrieval"
        if not (coll / "corpus.jsonl").is_file():
            from mmscale.retrieval_data import import_collection

            import_collection(argparse.Namespace(
                format="pairs", pairs=r, out=str(coll), split="test", seed=0, overwrite=True,
                test_fraction=float(d.get("retrieval_test_fraction", 0.2))))
        r = str(coll)
    return r


# ----------------------------------------------------------------------------------------------
# the plan

def _model_numbers(overrides: dict) -> dict:
    import torch

    from mmscale.config import config_from_dict
    from mmscale.models import build_model

    cfg = config_from_dict({}, _override_list(overrides))
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    fl = model.flops_per_token()
    return {"params": int(n), "flops_dense": float(fl["dense"]), "flops_causal": float(fl["causal"]),
            "tokens_per_step": _samples_per_step(cfg.train) * cfg.model.n_ctx,
            "n_ctx": cfg.model.n_ctx, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
            "kind": cfg.model.kind, "warmup_steps": cfg.train.warmup_steps, "lr": cfg.train.lr}


def _samples_per_step(train_cfg) -> int:
    """Samples per optimizer step of one experiment run (one process): the global batch when it is set (always,
    with train.micro_batch_size=auto, whose probe keeps it through grad_accum), else micro-batch x grad_accum."""
    if train_cfg.global_batch_size:
        return int(train_cfg.global_batch_size)
    return int(train_cfg.micro_batch_size) * int(train_cfg.grad_accum)


def _point_key(n_ctx, shape) -> str:
    parts = []
    if n_ctx is not None:
        parts.append(f"ctx{n_ctx}")
    if shape:
        parts.append(f"d{shape.get('d_model', '')}x{shape.get('n_layers', '')}")
    return "-".join(parts) or "base"


def _lr_tag(lr: float) -> str:
    short = f"{lr:.0e}"
    if float(short) != lr:  # a rate the sweep added (x extend_factor): enough digits to tell it from the grid's
        short = f"{lr:.4g}" if "e" in f"{lr:.4g}" else f"{lr:.3e}"
    return f"lr{short}".replace("+", "").replace("-0", "-")


def budget_steps(spec: Spec, numbers: dict, arm: str, throughput: float | None = None) -> int:
    """Steps for `arm` under the budget rule (nearest whole step)."""
    b, n = spec.budget, numbers[arm]
    key = "flops_" + b["count"]
    if b["rule"] == "wall_clock":
        if not throughput:
            raise UserError(f"arm '{arm}' has no measured throughput; its sweep runs did not log tokens_per_s")
        return max(1, round(b["seconds"] * throughput / n["tokens_per_step"]))
    if b.get("reference_arm"):
        ref = numbers[b["reference_arm"]]
        total = b["reference_steps"] * ref["tokens_per_step"] * (ref[key] if b["rule"] == "flops" else 1)
    else:
        total = b["flops"] if b["rule"] == "flops" else b["tokens"]
    per_step = n["tokens_per_step"] * (n[key] if b["rule"] == "flops" else 1)
    return max(1, round(total / per_step))


def budget_target(spec: Spec, numbers: dict) -> float | None:
    b = spec.budget
    if b["rule"] == "wall_clock":
        return b["seconds"]
    if b.get("reference_arm"):
        ref = numbers[b["reference_arm"]]
        return b["reference_steps"] * ref["tokens_per_step"] * (ref["flops_" + b["count"]] if b["rule"] == "flops" else 1)
    return b["flops"] if b["rule"] == "flops" else b["tokens"]


# ----------------------------------------------------------------------------------------------
# budget.match: one arm sized so its parameters (or FLOPs per token) match the reference arm's

def match_reference(spec: Spec) -> str:
    """The arm the others are sized against: budget.reference_arm, else the baseline."""
    return spec.budget.get("reference_arm") or spec.baseline


def _match_value(overrides: dict, match: str, count: str) -> float | None:
    """The matched quantity of a config, counted by the model itself (None: the shape is not a valid config)."""
    from mmscale.config import ConfigError

    try:
        n = _model_numbers(overrides)
    except (ConfigError, ValueError):
        return None
    return float(n["params"] if match == "params" else n["flops_" + count])


def _valid_shape(ov: dict) -> bool:
    from mmscale.config import ConfigError, config_from_dict

    try:
        config_from_dict({}, _override_list(ov))
    except (ConfigError, ValueError):
        return False
    return True


def _closest(candidates: list[int], key: str, ov: dict, target: float, match: str, count: str):
    """(value, matched quantity) of the candidate (ascending; the quantity grows with it) closest to the target,
    found by bisection on the models' own counts; ties go to the smaller value. None: no valid candidate."""
    if key != "ffn_hidden":  # d_model must divide by heads (and by 2 x heads for RoPE): keep valid shapes only
        candidates = [c for c in candidates if _valid_shape({**ov, f"model.{key}": c})]
    if not candidates:
        return None
    memo: dict = {}

    def q(i):
        if i not in memo:
            memo[i] = _match_value({**ov, f"model.{key}": candidates[i]}, match, count)
        return memo[i]

    lo, hi = 0, len(candidates) - 1
    if q(lo) >= target:
        return candidates[lo], q(lo)
    if q(hi) <= target:
        return candidates[hi], q(hi)
    while hi - lo > 1:  # invariant: q(lo) < target < q(hi)
        mid = (lo + hi) // 2
        if q(mid) <= target:
            lo = mid
        else:
            hi = mid
    return min(((candidates[i], q(i)) for i in (lo, hi)), key=lambda t: (abs(t[1] - target), t[0]))


def size_arm(ov: dict, target: float, match: str, count: str, tol: float, keys: list[str],
             fixed: set[str]) -> dict:
    """Size one arm's shape so its parameter count (match params) or training FLOPs per token (match flops)
    is as close as the shape allows to `target`, by this rule: try the keys in order (budget.match_keys, default
    FFN hidden size in multiples of 8 from d_model up, then d_model in multiples of 8, then n_layers), each alone
    from the arm's
    own shape, and keep the first whose closest value is within the tolerance; when none is, keep the closest of
    all. A key in `fixed` (set by the arm itself: the user's shape) is never changed; with every key fixed the arm
    is left as it is. Deterministic: the same spec gives the same shape. Returns {"overrides", "changed" {key:
    [old, new]}, "value", "target", "ratio", "within", "rule"}."""
    from mmscale.config import config_from_dict

    cfg = config_from_dict({}, _override_list(ov)).model
    now = _match_value(ov, match, count)
    tried = []
    for key in keys:
        if key in fixed:
            continue
        if key == "ffn_hidden":
            old = cfg.ffn_hidden or cfg.ffn_mult * cfg.d_model
            low = max(8, -(-cfg.d_model // 8) * 8)  # no narrower than the residual stream (ffn_mult 1)
            cands = list(range(low, max(old * 8, low) + 1, 8))
        elif key == "d_model":
            old = cfg.d_model
            cands = list(range(8, max(old * 4, 64) + 1, 8))
        else:
            old = cfg.n_layers
            cands = list(range(1, max(old * 4, 8) + 1))
        best = _closest(cands, key, ov, target, match, count)
        if best is None:
            continue
        tried.append((key, old, best[0], best[1]))
        if abs(best[1] / target - 1) <= tol:
            break
    if not tried:
        return {"overrides": dict(ov), "changed": {}, "value": now, "target": target,
                "ratio": now / target - 1, "within": abs(now / target - 1) <= tol,
                "rule": "every sizable key is set by the arm (" + ", ".join(sorted(fixed)) + "): not sized"}
    within = [t for t in tried if abs(t[3] / target - 1) <= tol]
    key, old, new, value = within[0] if within else min(tried, key=lambda t: abs(t[3] - target))
    if abs(now - target) <= abs(value - target) and not within:
        key, old, new, value = key, old, old, now
    out = dict(ov)
    if new != old:
        out[f"model.{key}"] = new
    return {"overrides": out, "changed": {key: [old, new]} if new != old else {}, "value": value, "target": target,
            "ratio": value / target - 1, "within": abs(value / target - 1) <= tol,
            "rule": (f"model.{key} sized" + (f" (the first of {', '.join(k for k in keys if k not in fixed)} to come "
                                            "within the tolerance)" if within else
                                            " (the closest of every key tried; none came within the tolerance)"))
            if new != old else f"model.{key} already closest"}


def _fixed_keys(arm_ov: dict) -> set[str]:
    """The sizable keys an arm sets itself (the user fixed them: the harness does not change them)."""
    fixed = set()
    if "model.ffn_hidden" in arm_ov or "model.ffn_mult" in arm_ov:
        fixed.add("ffn_hidden")
    for k in ("d_model", "n_layers"):
        if f"model.{k}" in arm_ov:
            fixed.add(k)
    return fixed


def match_arms(spec: Spec, overrides: dict) -> dict:
    """{arm: sizing record} for budget.match params|flops (the reference arm: {}); `overrides` (arm -> the arm's
    config overrides at one axis point) is updated in place with the sized shapes."""
    b = spec.budget
    if b["match"] == "none":
        return {}
    ref = match_reference(spec)
    target = _match_value(overrides[ref], b["match"], b["count"])
    out = {ref: {}}
    for an in spec.arms:
        if an == ref:
            continue
        rec = size_arm(overrides[an], target, b["match"], b["count"], b["params_tolerance"], b["match_keys"],
                       _fixed_keys(spec.arms[an]))
        overrides[an] = rec.pop("overrides")
        out[an] = rec
    return out


@dataclass
class Run:
    name: str
    phase: str          # sweep | main
    arm: str
    point: str
    seed: int
    lr: float | None
    steps: int
    overrides: dict

    def dir(self, exp: Path) -> Path:
        return exp / "runs" / self.phase / self.name


class Experiment:
    def __init__(self, spec: Spec, exp: Path):
        self.spec, self.exp = spec, Path(exp)
        self.points = [(nc, sh) for nc in spec.n_ctx for sh in spec.shapes]
        self.data: dict | None = None
        self.numbers = {}  # point -> arm -> model numbers
        self.arm_ovs = {}  # point -> arm -> config overrides (the sized shape under budget.match)
        self.sizing = {}  # point -> arm -> what budget.match changed
        self.sweep_ext: dict = {}  # point -> arm -> learning rates the sweep added to the grid (sweep.extend_factor)
        for nc, sh in self.points:
            pk = _point_key(nc, sh)
            ovs = {an: arm_overrides(spec, an, nc, sh) for an in spec.arms}
            self.sizing[pk] = match_arms(spec, ovs)
            self.arm_ovs[pk] = ovs
            self.numbers[pk] = {an: _model_numbers(ovs[an]) for an in spec.arms}

    # ---- runs
    def _common(self, run_dir: Path, steps: int, seed: int, lr: float | None, train_data: str) -> dict:
        ev = self.spec.eval
        ov = {"data.train": train_data, "run.dir": str(run_dir), "run.seed": seed, "run.resume": "auto",
              "train.max_steps": steps, "train.eval_every": max(1, steps // ev["points"]),
              "train.eval_batches": ev["batches"], "log.progress": False}
        if lr is not None:
            ov["train.lr"] = lr
        return ov

    def sweep_steps(self, pk: str, arm: str) -> int:
        s = self.spec.sweep
        if s["steps"]:
            return s["steps"]
        return max(s["min_steps"], round(s["fraction"] * budget_steps(self.spec, self.numbers[pk], arm)))

    def sweep_runs(self) -> list[Run]:
        runs = []
        for nc, sh in self.points:
            pk = _point_key(nc, sh)
            for an in self.spec.arms:
                steps = self.sweep_steps(pk, an)
                lrs = sorted(set(self.spec.sweep["lr"]) | set(self.sweep_ext.get(pk, {}).get(an, []))) or [None]
                for lr in lrs:
                    if lr is None and self.spec.budget["rule"] != "wall_clock":
                        continue  # no grid: nothing to sweep
                    name = f"{an}-{pk}-{_lr_tag(lr) if lr else 'lr-base'}"
                    ov = dict(self.arm_ovs[pk][an])
                    ov.update(self._common(self.exp / "runs" / "sweep" / name, steps, self.spec.seeds[0], lr,
                                           self.data["train"][nc] if self.data else ""))
                    runs.append(Run(name, "sweep", an, pk, self.spec.seeds[0], lr, steps, ov))
        return runs

    def main_runs(self, choice: dict | None = None) -> list[Run]:
        runs = []
        for nc, sh in self.points:
            pk = _point_key(nc, sh)
            for an in self.spec.arms:
                c = (choice or {}).get(pk, {}).get(an, {})
                lr = c.get("lr")
                steps = c.get("steps") or (budget_steps(self.spec, self.numbers[pk], an)
                                           if self.spec.budget["rule"] != "wall_clock" else 0)
                for seed in self.spec.seeds:
                    name = f"{an}-{pk}-s{seed}"
                    ov = dict(self.arm_ovs[pk][an])
                    ov.update(self._common(self.exp / "runs" / "main" / name, steps, seed, lr,
                                           self.data["train"][nc] if self.data else ""))
                    runs.append(Run(name, "main", an, pk, seed, lr, steps, ov))
        return runs

    def config_path(self, run: Run) -> Path:
        return self.exp / "configs" / run.phase / f"{run.name}.yaml"

    def write_config(self, run: Run) -> Path:
        from mmscale.config import config_from_dict

        cfg = config_from_dict({}, _override_list(run.overrides))
        p = self.config_path(run)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(cfg.to_yaml())
        os.replace(tmp, p)
        return p


def run_state(run_dir: Path, steps: int) -> tuple[str, int]:
    """('finished' | 'partial' | 'new', last checkpointed step)."""
    from mmscale import checkpoint as ckpt

    root = run_dir / "checkpoints"
    last = ckpt.find_latest(root) if root.is_dir() else None
    step = 0
    if last is not None:
        try:
            step = int(ckpt.read_meta(last).get("step", 0))
        except Exception:
            step = 0
    if step >= steps > 0:
        return "finished", step
    if step > 0 or (run_dir / "metrics.jsonl").exists():
        return "partial", step
    return "new", 0


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                rows.append(r)
    return rows


def last_val_loss(run_dir: Path) -> float | None:
    vals = {int(r["step"]): r["val_loss"] for r in _read_jsonl(run_dir / "metrics.jsonl")
            if "val_loss" in r and r["val_loss"] is not None}
    return vals[max(vals)] if vals else None


def median_throughput(run_dir: Path) -> float | None:
    tps = [r["tokens_per_s"] for r in _read_jsonl(run_dir / "metrics.jsonl")
           if "tokens_per_s" in r and r.get("tokens_per_s") and not r.get("skipped")]
    tps = tps[len(tps) // 10:] if len(tps) >= 10 else tps
    return statistics.median(tps) if tps else None


# ----------------------------------------------------------------------------------------------
# executing one run: train (resuming), then the measures

def train_run(cfg_path: Path) -> int:
    from mmscale.config import load_config
    from mmscale.run.train import train

    return train(load_config(cfg_path))


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _fixed_batches(dataset: str, n_ctx: int, batch_size: int, batches: int):
    """The first `batches` batches of the val split (train when there is none), unshuffled: the same tokens for
    every arm and seed."""
    from mmscale.data.loader import read_manifest
    from mmscale.export.evaluate import _dataset_batches

    m = read_manifest(dataset)
    split = "val" if m.get("splits", {}).get("val", {}).get("samples", 0) > 0 else "train"
    return list(_dataset_batches(dataset, n_ctx, batch_size, split, batches)), split


def measure_key(spec: Spec, name: str) -> str:
    """A short hash of what one measure depends on besides the trained model (its spec section)."""
    sec = dict(getattr(spec, name))
    if name == "retrieval":
        sec["data"] = [spec.data.get("retrieval"), spec.data.get("retrieval_test_fraction"),
                       spec.data.get("synth_stories")]
    return hashlib.sha256(json.dumps(sec, sort_keys=True, default=str).encode()).hexdigest()[:8]


def measured(exp: Experiment, run: Run) -> bool:
    """eval.json holds every measure, made with the spec's current measure sections."""
    path = run.dir(exp.exp) / "eval.json"
    if not path.is_file():
        return False
    ev = json.loads(path.read_text())
    spec = exp.spec
    return bool(ev.get("done")
                and (not spec.retrieval["enabled"] or ev.get("retrieval_key") == measure_key(spec, "retrieval"))
                and (not spec.representation["enabled"]
                     or ev.get("representation_key") == measure_key(spec, "representation")))


def evaluate_run(exp: Experiment, run: Run, progress: bool = False) -> dict:
    """The measures of one finished main run, each stored in run_dir/eval.json once done (resumable)."""
    import torch

    from mmscale.export.convert import convert
    from mmscale.export.evaluate import evaluate_loss
    from mmscale.export.format import load_export

    spec, rd = exp.spec, run.dir(exp.exp)
    path = rd / "eval.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    export = rd / "export"
    if not (export / "model.safetensors").is_file():
        convert(rd, export, overwrite=export.exists(), progress=False)
    model, meta = load_export(export)
    n_ctx = model.config.n_ctx
    nc = run.overrides.get("model.n_ctx")
    ev = spec.eval
    if "heldout" not in out:
        batches, split = _fixed_batches(exp.data["train"][nc], n_ctx, ev["batch_size"], ev["batches"])
        out["heldout"] = {**evaluate_loss(model, batches, progress=False), "split": split,
                          "dataset": exp.data["train"][nc]}
        _atomic_json(path, out)
    if exp.data["other"].get(nc) and "other" not in out:
        batches, split = _fixed_batches(exp.data["other"][nc], n_ctx, ev["batch_size"], ev["batches"])
        out["other"] = {**evaluate_loss(model, batches, progress=False), "split": split,
                        "dataset": exp.data["other"][nc]}
        _atomic_json(path, out)
    rkey = measure_key(spec, "representation")
    if spec.representation["enabled"] and ("representation" not in out or out.get("representation_key") != rkey):
        from mmscale.config import config_from_dict
        from mmscale.models import build_model
        from mmscale.representation import representation_error

        r = spec.representation
        batches, _ = _fixed_batches(exp.data["train"][nc], n_ctx, r["samples"], 1)
        ids = batches[0]["input_ids"][:r["samples"]]
        cfg = config_from_dict({}, _override_list(run.overrides))
        torch.manual_seed(run.seed)  # the run's own initial weights
        init = build_model(cfg.model)
        before = representation_error(init, ids, steps=r["steps"], seed=run.seed)
        after = representation_error(model, ids, steps=r["steps"], seed=run.seed)
        out["representation"] = {"before": before, "after": after}
        out["representation_key"] = rkey
        _atomic_json(path, out)
    del model
    key = measure_key(spec, "retrieval")
    if spec.retrieval["enabled"] and ("retrieval" not in out or out.get("retrieval_key") != key):
        out["retrieval"] = retrieval_measure(exp, run, export)
        out["retrieval_key"] = key
        _atomic_json(path, out)
    out["done"] = True
    _atomic_json(path, out)
    return out


def retrieval_measure(exp: Experiment, run: Run, export: Path) -> dict:
    from mmscale.config import load_config
    from mmscale.export.convert import convert
    from mmscale.retrieval import evaluate_export, prepare_config, train_retrieval

    r, rd = exp.spec.retrieval, run.dir(exp.exp)
    coll = exp.data["retrieval"]
    ret_dir = rd / f"retrieval-{measure_key(exp.spec, 'retrieval')}"  # a changed retrieval spec: a new run
    cfg = load_config(None, [f"run.dir={ret_dir}", f"run.seed={run.seed}", f"train.max_steps={r['steps']}",
                             f"train.lr={r['lr']}", f"train.warmup_steps={min(r['warmup_steps'], r['steps'] - 1)}",
                             f"train.micro_batch_size={r['micro_batch_size']}", "train.eval_every=0",
                             "checkpoint.every=0", f"retrieval.group_size={r['group_size']}",
                             f"retrieval.temperature={r['temperature']}", "log.progress=false",
                             f"retrieval.position={r['position']}", f"retrieval.gather_negatives={r['gather_negatives']}",
                             f"retrieval.passage_mode={r['passage_mode']}",
                             "log.wandb=disabled",
                             *[f"{k}={v}" for k, v in run.overrides.items() if k.startswith("engine.")]])
    cfg = prepare_config(cfg, str(export), r["pairs"] or None, coll,
                         "train" if (Path(coll) / "qrels" / "train.tsv").is_file() else None, r["negatives"])
    if run_state(ret_dir, r["steps"])[0] != "finished":
        status = train_retrieval(cfg)
        if status != 0:
            raise UserError(f"retrieval fine-tuning of {run.name} stopped with exit status {status}; rerun with "
                            "--resume")
    ret_export = ret_dir / "export"
    if not (ret_export / "model.safetensors").is_file():
        convert(ret_dir, ret_export, overwrite=ret_export.exists(), progress=False)
    res = evaluate_export(str(ret_export), coll, r["candidates"], seed=0, progress=False, position=r["position"],
                          passage_mode=r["passage_mode"], cache_dir=ret_dir / "retrieval_cache", device="auto")
    return {k: res.get(k) for k in ("n_queries", "n_corpus", "split", "metrics", "results", "baseline", "truncated",
                                    "hybrid", "paired_ndcg@10")}


def execute_run(exp: Experiment, run: Run, *, evaluate: bool, progress: bool = False) -> str:
    """Train (or resume) one run, then measure it (main runs). Returns what was done."""
    cfg_path = exp.config_path(run)
    if not cfg_path.is_file():
        exp.write_config(run)
    state, step = run_state(run.dir(exp.exp), run.steps)
    did = "skipped (finished)"
    if state != "finished":
        status = train_run(cfg_path)
        if status != 0:
            raise UserError(f"run {run.name} stopped with exit status {status} (75: interrupted after saving a "
                            f"checkpoint); rerun `mmscale experiment run SPEC --out {exp.exp} --resume` to continue",
                            status)
        did = "resumed" if state == "partial" else "trained"
    if evaluate:
        if not measured(exp, run):
            evaluate_run(exp, run, progress)
            did += ", measured"
    return did


# ----------------------------------------------------------------------------------------------
# launchers

def _child_command(exp_dir: Path, phase: str, name: str) -> list[str]:
    return [sys.executable, "-m", "mmscale.cli", "experiment", "run-one", str(exp_dir), phase, name]


def run_local(exp: Experiment, runs: list[Run], evaluate: bool, jobs: int, log) -> None:
    if jobs <= 1:
        for i, run in enumerate(runs):
            t0 = time.time()
            did = execute_run(exp, run, evaluate=evaluate)
            log(f"[{i + 1}/{len(runs)}] {run.phase}/{run.name}: {did} ({time.time() - t0:.0f} s)")
        return
    pending, active, failed = list(runs), {}, []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                run.dir(exp.exp).parent.mkdir(parents=True, exist_ok=True)
                logf = open(run.dir(exp.exp).parent / f"{run.name}.log", "a")
                active[run.name] = (subprocess.Popen(_child_command(exp.exp, run.phase, run.name), stdout=logf,
                                                     stderr=subprocess.STDOUT, cwd=os.getcwd()), logf, run)
            time.sleep(0.5)
            for name, (proc, logf, run) in list(active.items()):
                if proc.poll() is not None:
                    logf.close()
                    del active[name]
                    log(f"{run.phase}/{run.name}: exit {proc.returncode}")
                    if proc.returncode != 0:
                        failed.append(run.name)
    except BaseException:  # interrupted: the running trainers checkpoint and stop (75), never left orphaned
        import signal

        for proc, _, _ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, logf, _ in active.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logf.close()
        raise
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their .log files under "
                        f"{exp.exp / 'runs'} and rerun with --resume")


class RunJob(ChildTask):
    """One run of an experiment as a submitit task: `mmscale experiment run-one` in a child process (its own
    /dev/shm on emulated nodes); on preemption the trainer checkpoints and the task is requeued."""

    def __init__(self, exp_dir: str, phase: str, name: str, cwd: str):
        self.exp_dir, self.phase, self.name, self.cwd = exp_dir, phase, name, cwd
        self._child = None

    def __call__(self) -> dict:
        import shutil

        import submitit

        from mmscale.launch import EXIT_REQUEUE, _wait_child, private_shm_prefix

        env = submitit.JobEnvironment()
        node_shm = f"/dev/shm/mmscale-exp-{str(env.job_id).replace('_', '-')}"
        prefix = private_shm_prefix(node_shm) if env.cluster == "slurm" else []
        child_env = dict(os.environ)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            child_env.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])
        self._child = subprocess.Popen(prefix + _child_command(Path(self.exp_dir), self.phase, self.name),
                                       cwd=self.cwd, env=child_env)
        rc = _wait_child(self._child)
        if prefix:
            shutil.rmtree(node_shm, ignore_errors=True)
        if rc == EXIT_REQUEUE and env.cluster == "slurm":
            sys.stderr.flush()
            os._exit(EXIT_REQUEUE)
        if rc != 0:
            raise RuntimeError(f"run {self.phase}/{self.name} exited with status {rc}")
        return {"run": self.name, "returncode": rc}

    def checkpoint(self, *args, **kwargs):
        import submitit

        self.stop_child(timeout=100)
        return submitit.helpers.DelayedSubmission(RunJob(self.exp_dir, self.phase, self.name, self.cwd))


def run_slurm(exp: Experiment, runs: list[Run], log) -> None:
    import logging
    import shutil

    import submitit

    if not shutil.which("sbatch"):
        raise UserError("--launcher slurm needs sbatch on PATH; use --launcher local on this machine")
    sl = exp.spec.launcher["slurm"]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        res = dict(sl)
        res.pop("arms", None)
        res.update((sl.get("arms") or {}).get(run.arm, {}))
        res.update(exp.spec.arm_resources.get(run.arm, {}))
        groups.setdefault(json.dumps(res, sort_keys=True), []).append(run)
    logging.getLogger("submitit").setLevel(logging.ERROR)  # no accounting on small clusters: quiet polls
    all_jobs = []
    for gi, (key, group) in enumerate(groups.items()):
        res = json.loads(key)
        folder = exp.exp / "submitit" / f"{group[0].phase}-{gi}"
        folder.mkdir(parents=True, exist_ok=True)
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = dict(nodes=1, tasks_per_node=1, cpus_per_task=int(res.get("cpus_per_task", 1)),
                      timeout_min=int(res.get("time_min", 60)), name=f"{exp.spec.name}-{group[0].phase}",
                      slurm_signal_delay_s=120, slurm_array_parallelism=int(res.get("array_parallelism", 64)))
        if res.get("gpus_per_node"):
            params["slurm_gpus_per_node"] = int(res["gpus_per_node"])
        if res.get("partition"):
            params["slurm_partition"] = res["partition"]
        if res.get("mem_gb"):
            params["mem_gb"] = float(res["mem_gb"])
        ex.update_parameters(**params)
        jobs_ = [RunJob(str(exp.exp), r.phase, r.name, os.getcwd()) for r in group]
        try:
            with ex.batch():
                handles = [ex.submit(j) for j in jobs_]
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or [str(e).strip()]
            raise UserError(f"the SLURM array was not submitted: {lines[-1][:300]}") from None
        log(f"submitted array {handles[0].job_id.split('_')[0]} ({len(handles)} runs, {res or 'default resources'})")
        all_jobs += list(zip(group, handles))
    failed = []
    for run, h in all_jobs:
        try:
            h.results()
            log(f"{run.phase}/{run.name}: done (job {h.job_id})")
        except Exception as e:
            from mmscale.launch import _last_error_line
            failed.append(f"{run.name} (job {h.job_id}: {_last_error_line(str(e))})")
    if failed:
        raise UserError(f"{len(failed)} SLURM run(s) failed: {'; '.join(failed)[:500]}; logs under "
                        f"{exp.exp / 'submitit'}; rerun with --resume")


# ----------------------------------------------------------------------------------------------
# `mmscale experiment run`

def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "hostname": platform.node()}
    try:
        info["loadavg"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


# sections that only decide how finished runs are measured (or launched): they may change on --resume
MEASURE_SECTIONS = ("retrieval", "representation", "launcher", "description")


def _spec_hash(raw: dict, training: bool = False) -> str:
    if training:
        raw = {k: v for k, v in raw.items() if k not in MEASURE_SECTIONS}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_experiment(spec_path: str, out: str | None, resume: bool, overrides: list[str] | None = None) -> Experiment:
    import yaml

    spec = load_spec(spec_path, overrides)
    exp_dir = Path(out or Path("runs") / "experiments" / spec.name).resolve()
    saved = exp_dir / "spec.yaml"
    if saved.is_file():
        if not resume:
            raise UserError(f"experiment dir '{exp_dir}' already holds an experiment; pass --resume to continue it "
                            "or --out another directory")
        from mmscale.config import load_yaml_file

        old = load_yaml_file(saved) or {}
        if _spec_hash(old, training=True) != _spec_hash(spec.raw, training=True) and not _runs_started(exp_dir):
            # an earlier attempt failed before any run trained (bad data, a wrong key): start over with this spec;
            # what was derived from the old one (plan, configs, and the data when data changed) is made again
            _discard_derived(exp_dir, data_changed=old.get("data") != spec.raw.get("data"))
            old = spec.raw
            (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
            (exp_dir / "spec_dir.txt").write_text(str(spec.base_dir) + "\n")
        if _spec_hash(old, training=True) != _spec_hash(spec.raw, training=True):
            raise UserError(f"'{spec_path}' differs from the spec of the experiment in '{exp_dir}' (spec.yaml) outside "
                            f"{', '.join(MEASURE_SECTIONS)}; resume with the same data, arms, axes, budget, sweep and "
                            "eval, or --out a new directory")
        if _spec_hash(old) != _spec_hash(spec.raw):  # only how runs are measured changed: those measures are redone
            (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        (exp_dir / "spec_dir.txt").write_text(str(spec.base_dir) + "\n")
    return Experiment(spec, exp_dir)


def _runs_started(exp_dir: Path) -> bool:
    """Whether any run of the experiment has trained (logged a step or saved a checkpoint)."""
    runs = exp_dir / "runs"
    return runs.is_dir() and (any(runs.rglob("metrics.jsonl")) or any(runs.rglob("checkpoints")))


def _discard_derived(exp_dir: Path, data_changed: bool) -> None:
    import shutil

    (exp_dir / "plan.json").unlink(missing_ok=True)
    for name in ("configs", "runs") + (("data",) if data_changed else ()):
        if (exp_dir / name).is_dir():
            shutil.rmtree(exp_dir / name)


def reopen(exp_dir: str | Path) -> Experiment:
    exp_dir = Path(exp_dir).resolve()
    saved = exp_dir / "spec.yaml"
    if not saved.is_file():
        raise UserError(f"'{exp_dir}' is not an experiment directory (no spec.yaml); pass the --out of "
                        "`mmscale experiment run`")
    base = Path((exp_dir / "spec_dir.txt").read_text().strip()) if (exp_dir / "spec_dir.txt").is_file() else exp_dir
    spec = load_spec_from(saved, base)
    exp = Experiment(spec, exp_dir)
    plan = exp_dir / "plan.json"
    if plan.is_file():
        exp.sweep_ext = json.loads(plan.read_text()).get("sweep_extensions") or {}
        exp.data = json.loads(plan.read_text()).get("data")
        if exp.data:
            exp.data["train"] = {_nc(k): v for k, v in exp.data["train"].items()}
            exp.data["other"] = {_nc(k): v for k, v in exp.data["other"].items()}
    return exp


def _nc(k):
    return None if k in ("None", "null") else int(k)


def load_spec_from(path: Path, base_dir: Path) -> Spec:
    from mmscale.config import load_yaml_file

    return parse_spec(load_yaml_file(path) or {}, base_dir)


def next_sweep_lr(results: list[tuple[float, float | None]], factor: float, lr_min: float, lr_max: float,
                  extended: int, max_extend: int) -> tuple[float | None, str]:
    """The sweep's next learning rate (None: the sweep is done) and why, from the (lr, final val loss) pairs tried
    so far: when the best finite loss is at the top of the rates tried, try best x factor; at the bottom,
    best / factor; when every run diverged, lowest / factor. Stops when the best is interior (a diverged rate
    above or below counts as a bracket), after max_extend added rates, or when the next rate would pass
    lr_min / lr_max. A one-rate grid is not extended (nothing to bracket)."""
    lrs = sorted({lr for lr, _ in results})
    if len(lrs) < 2:
        return None, "one rate: not a sweep, not extended"
    ok = [(loss, lr) for lr, loss in results if loss is not None and math.isfinite(loss)]
    if not ok:
        new, where = lrs[0] / factor, "every rate diverged"
    else:
        best = min(ok)[1]
        if lrs[0] < best < lrs[-1]:
            return None, "best is interior"
        new, where = (best * factor, "best at the top") if best == lrs[-1] else (best / factor, "best at the bottom")
    new = float(f"{new:.12g}")
    if extended >= max_extend:
        return None, f"{where}; sweep.max_extend ({max_extend}) rates added, not extended further"
    if new > lr_max * (1 + 1e-9) or new < lr_min * (1 - 1e-9):
        return None, (f"{where}; the next rate {new:.3g} is beyond sweep.{'lr_max' if new > lr_max else 'lr_min'} "
                      f"({lr_max if new > lr_max else lr_min:g}), not extended")
    return new, where


def sweep_bracket(results: list[tuple[float, float | None]]) -> tuple[float | None, float | None, float | None]:
    """(lower neighbour, best, upper neighbour) of the best finite loss among the rates tried."""
    lrs = sorted({lr for lr, _ in results})
    ok = [(loss, lr) for lr, loss in results if loss is not None and math.isfinite(loss)]
    if not ok:
        return None, None, None
    best = min(ok)[1]
    i = lrs.index(best)
    return (lrs[i - 1] if i > 0 else None), best, (lrs[i + 1] if i + 1 < len(lrs) else None)


def extend_sweep(exp: Experiment, sweep: list[Run]) -> list[str]:
    """Add the next rate to every (point, arm) sweep whose best is at an edge (exp.sweep_ext); returns what was
    added, one line each (empty: every sweep is done)."""
    s = exp.spec.sweep
    added = []
    groups: dict = {}
    for run in sweep:
        if run.lr is not None:
            groups.setdefault((run.point, run.arm), []).append((run.lr, last_val_loss(run.dir(exp.exp))))
    for (pk, an), results in groups.items():
        ext = exp.sweep_ext.setdefault(pk, {}).setdefault(an, [])
        new, why = next_sweep_lr(results, s["extend_factor"], s["lr_min"], s["lr_max"], len(ext), s["max_extend"])
        if new is not None and new not in {lr for lr, _ in results}:
            ext.append(new)
            added.append(f"{pk}/{an}: {why}; adding lr {new:.4g}")
    return added


def choose_lrs(exp: Experiment, sweep: list[Run]) -> dict:
    """{point: {arm: {"lr", "steps", "sweep": [{lr, val_loss, tokens_per_s}]}}}."""
    choice: dict = {}
    for run in sweep:
        rd = run.dir(exp.exp)
        entry = choice.setdefault(run.point, {}).setdefault(run.arm, {"sweep": []})
        entry["sweep"].append({"lr": run.lr, "val_loss": last_val_loss(rd), "tokens_per_s": median_throughput(rd),
                               "steps": run.steps, "run": str(rd)})
    for pk, arms in choice.items():
        for an, entry in arms.items():
            ok = [s for s in entry["sweep"] if s["val_loss"] is not None and math.isfinite(s["val_loss"])]
            if not ok:
                raise UserError(f"no sweep run of arm '{an}' ({pk}) has a finite val loss; widen sweep.lr or check "
                                "the data's val split")
            best = min(ok, key=lambda s: s["val_loss"])
            entry["lr"] = best["lr"]
            entry["sweep"].sort(key=lambda s: s["lr"] or 0)
            results = [(x["lr"], x["val_loss"]) for x in entry["sweep"] if x["lr"] is not None]
            if results:
                sw = exp.spec.sweep
                ext = exp.sweep_ext.get(pk, {}).get(an, [])
                entry["bracket"] = list(sweep_bracket(results))
                entry["extended"] = list(ext)
                entry["stop"] = next_sweep_lr(results, sw["extend_factor"], sw["lr_min"], sw["lr_max"], len(ext),
                                              sw["max_extend"])[1]
            tps = best["tokens_per_s"]
            entry["steps"] = budget_steps(exp.spec, exp.numbers[pk], an, tps)
    return choice


def write_plan(exp: Experiment, choice: dict | None) -> None:
    data = dict(exp.data)
    data["train"] = {str(k): v for k, v in data["train"].items()}
    data["other"] = {str(k): v for k, v in data["other"].items()}
    plan = {"name": exp.spec.name, "budget": exp.spec.budget, "baseline": exp.spec.baseline, "data": data,
            "numbers": exp.numbers, "choice": choice, "sizing": exp.sizing, "sweep_extensions": exp.sweep_ext,
            "runs": [{"phase": r.phase, "name": r.name, "arm": r.arm, "point": r.point, "seed": r.seed,
                      "lr": r.lr, "steps": r.steps} for r in exp.sweep_runs() + exp.main_runs(choice)]}
    _atomic_json(exp.exp / "plan.json", plan)


def _log_command(exp: Path, argv: list[str]) -> None:
    line = (f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}\tcommit {git_commit()}\t"
            f"cwd {os.getcwd()}\t" + shlex.join(["mmscale", *argv]) + "\n")
    with open(exp / "commands.log", "a") as f:
        f.write(line)


def run_experiment(spec_path: str, out: str | None = None, *, launcher: str = "local", resume: bool = False,
                   jobs: int | None = None, report: bool = True, argv: list[str] | None = None,
                   log=None, overrides: list[str] | None = None) -> Path:
    log = log or (lambda m: print(m, flush=True))
    exp = open_experiment(spec_path, out, resume, overrides)
    _log_command(exp.exp, argv or ["experiment", "run", spec_path])
    jobs = jobs or exp.spec.launcher["jobs"]
    exp.data = prepare_data(exp.spec, exp.exp, exp.spec.n_ctx)
    for pk, rec in exp.sizing.items():
        for an, r in rec.items():
            if r:
                log(f"budget.match {exp.spec.budget['match']}: {pk}/{an} " + (", ".join(
                    f"model.{k} {a} -> {b}" for k, (a, b) in r["changed"].items()) or "unchanged")
                    + f" ({r['ratio']:+.2%} vs {match_reference(exp.spec)})")
    while True:  # the sweep, extended while a best rate sits at an edge of the rates tried (resumable: the
        sweep = exp.sweep_runs()  # same finished runs give the same decisions)
        for r in sweep:
            exp.write_config(r)
        write_plan(exp, None)
        log(f"experiment {exp.spec.name}: {len(sweep)} sweep run(s) in {exp.exp}")
        todo = [r for r in sweep if run_state(r.dir(exp.exp), r.steps)[0] != "finished"]
        if todo:
            (run_slurm(exp, todo, log) if launcher == "slurm" else run_local(exp, todo, False, jobs, log))
        added = extend_sweep(exp, sweep)
        if not added:
            break
        for line in added:
            log(f"sweep: {line}")
    choice = choose_lrs(exp, sweep) if sweep else {}
    if not sweep:  # no grid: the base config's learning rate for every arm
        for pk in exp.numbers:
            for an in exp.spec.arms:
                choice.setdefault(pk, {})[an] = {"lr": None, "steps": budget_steps(exp.spec, exp.numbers[pk], an),
                                                 "sweep": []}
    _atomic_json(exp.exp / "sweep.json", choice)
    main = exp.main_runs(choice)
    for r in main:
        exp.write_config(r)
    write_plan(exp, choice)
    log(f"main: {len(main)} run(s); steps per arm: " + ", ".join(
        f"{pk}/{an} {c['steps']} (lr {c['lr'] if c['lr'] is not None else 'base'})"
        for pk, arms in choice.items() for an, c in arms.items()))
    todo = [r for r in main if run_state(r.dir(exp.exp), r.steps)[0] != "finished" or not measured(exp, r)]
    if todo:
        (run_slurm(exp, todo, log) if launcher == "slurm" else run_local(exp, todo, True, jobs, log))
    if report:
        paths = write_experiment_report(exp.exp)
        log(f"report: {paths['markdown']} and {paths['html']}")
    return exp.exp


# ----------------------------------------------------------------------------------------------
# status

def status_rows(exp_dir: str | Path) -> list[dict]:
    exp = reopen(exp_dir)
    plan = json.loads((exp.exp / "plan.json").read_text()) if (exp.exp / "plan.json").is_file() else {"runs": []}
    rows = []
    for r in plan["runs"]:
        rd = exp.exp / "runs" / r["phase"] / r["name"]
        state, step = run_state(rd, r["steps"])
        done = r["phase"] == "main" and measured(exp, Run(r["name"], "main", r["arm"], r["point"], r["seed"], r["lr"],
                                                             r["steps"], {}))
        rows.append({**r, "state": state, "step": step, "measured": bool(done),
                     "val_loss": last_val_loss(rd)})
    return rows


# ----------------------------------------------------------------------------------------------
# budget views: the same runs read at equal FLOPs, equal tokens and equal wall-clock

VIEW_LABELS = {"flops": "training FLOPs", "tokens": "training tokens", "wall_clock": "training seconds"}


def training_seconds(train_rows: list[dict]) -> list[tuple[int, float]]:
    """[(step, seconds spent training up to that step)], starting at (0, 0): each logged row's step time stands
    for every step since the previous logged row (rows come every log.every steps); evaluation, checkpoint
    pauses and the gaps of a resume are not counted."""
    out, total, prev, last = [(0, 0.0)], 0.0, 0, 0.0
    for r in sorted(train_rows, key=lambda r: int(r["step"])):
        st = r.get("step_time")
        st = float(st) if isinstance(st, (int, float)) and math.isfinite(st) and st >= 0 else last
        step = int(r["step"])
        if step <= prev:
            continue
        total += (step - prev) * st
        out.append((step, total))
        prev, last = step, st
    return out


def _linear_at(points: list[tuple[float, float]], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def loss_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The val loss at budget x read off a curve [(budget, loss)] of evaluation points: linear in log(loss)
    against the budget between the two points around x (a point's own loss at a point); None when x lies before
    the first or beyond the last point (never extrapolated). x within 1e-9 (relative) of an end counts as it."""
    pts = sorted((float(b), float(v)) for b, v in curve if v is not None and v > 0 and math.isfinite(v))
    if not pts:
        return None
    eps = 1e-9 * max(abs(pts[-1][0]), 1e-300)
    if x < pts[0][0] - eps or x > pts[-1][0] + eps:
        return None
    x = min(max(x, pts[0][0]), pts[-1][0])
    y = _linear_at([(b, math.log(v)) for b, v in pts], x)
    return None if y is None else math.exp(y)


def view_axis(spec: Spec, view: str) -> str:
    return {"flops": "flops_" + spec.budget["count"], "tokens": "tokens", "wall_clock": "seconds"}[view]


def read_views(spec: Spec, runs: list[dict]) -> dict:
    """{view: {"at": the common budget, "not_read": [why, ...]}} for one axis point's main runs, and each run's
    r["views"][view] = its loss there (None: not read). The common budget of a view is the smallest budget the
    finished runs all reached (the last evaluation point of the shortest one), so no finished run is read beyond
    its curve; a run that stops short of it (unfinished, or no curve) is named instead of extrapolated."""
    out = {}
    finished = [r for r in runs if r["curve"] and r["summary"].get("status") == "finished"] or \
        [r for r in runs if r["curve"]]
    for view in spec.budget["views"]:
        axis = view_axis(spec, view)
        ends = [r["curve"][-1].get(axis) for r in finished if r["curve"][-1].get(axis) is not None]
        at = min(ends) if ends else None
        notes = []
        for r in runs:
            pts = [(c.get(axis), c["val_loss"]) for c in r["curve"] if c.get(axis) is not None]
            v = loss_at(pts, at) if at is not None and pts else None
            r.setdefault("views", {})[view] = v
            if v is None and at is not None:
                where = (f"beyond its curve, which ends at {_fmt(float(pts[-1][0]))}" if pts and at > pts[-1][0] else
                         f"before its first evaluation point, at {_fmt(float(pts[0][0]))}" if pts else
                         "outside its curve: it has no val-loss curve")
                notes.append(f"{r['arm']} seed {r['seed']}: the common budget lies {where}; not read (never "
                             "extrapolated)")
        out[view] = {"at": at, "axis": axis, "not_read": notes}
    return out


def _md_views(data: dict, pk: str) -> list[str]:
    spec = data["exp"].spec
    views = data.get("views", {}).get(pk) or {}
    if not views:
        return []
    L = ["### Held-out loss under each budget view (read off the val-loss curves)", "",
         "The same main runs, read at a common budget on each axis: the trainer's val loss (metrics.jsonl) at the "
         "smallest budget every finished run reached, interpolated linearly in log(loss) against the budget "
         "between the two evaluation points around it, never extrapolated. Training seconds: each logged step "
         "time times the steps it stands for (evaluation and checkpoint pauses excluded).", ""]
    for view, v in views.items():
        at = "–" if v["at"] is None else _fmt(float(v["at"]))
        note = "; ".join(v["not_read"])
        L += _md_claim(data, pk, f"Held-out loss at equal {view.replace('_', '-')} ({at} {VIEW_LABELS[view]})",
                       lambda r, view=view: (r.get("views") or {}).get(view), True, " nats",
                       note=(note + ".") if note else "")
    return L


# ----------------------------------------------------------------------------------------------
# report

def mean_sd(xs: list[float]) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def verdict(a: list[float], b: list[float], a_name: str, b_name: str, lower_better: bool, unit: str = "") -> str:
    """Plain verdict comparing arm a with arm b: the difference of means ± its standard error; a difference
    within two standard errors is "no difference within noise"."""
    ma, sa, na = mean_sd(a)
    mb, sb, nb = mean_sd(b)
    if ma is None or mb is None:
        return "not measured"
    diff = (mb - ma) if lower_better else (ma - mb)  # > 0: a better
    if sa is None or sb is None:
        who = a_name if diff > 0 else b_name
        return (f"{who} better by {abs(diff):.4g}{unit} (one seed: no estimate of the noise, not a verdict)"
                if diff else "equal (one seed)")
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    if abs(diff) <= 2 * se:
        return f"no difference within noise ({a_name} - {b_name}: {ma - mb:+.4g} ± {se:.2g}{unit})"
    who = a_name if diff > 0 else b_name
    return f"{who} better by {abs(diff):.4g} ± {se:.2g}{unit}"


def _fmt(v, nd=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 100 and abs(v) < 1e6:
        return f"{v:.0f}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def _ms(xs, nd=4) -> str:
    m, s, n = mean_sd(xs)
    if m is None:
        return "–"
    if abs(m) >= 100:
        nd = 0
    return f"{m:.{nd}f} ± {s:.{nd}f}" if s is not None else f"{m:.{nd}f}"


def collect(exp_dir: str | Path) -> dict:
    """Every number of the report, from the run dirs (metrics.jsonl, eval.json) and the plan."""
    from mmscale.report import load_run, summarize

    exp = reopen(exp_dir)
    if not (exp.exp / "plan.json").is_file():
        raise UserError(f"'{exp.exp}' has no plan.json yet; run `mmscale experiment run` first")
    plan = json.loads((exp.exp / "plan.json").read_text())
    choice = plan.get("choice") or {}
    runs = []
    for r in plan["runs"]:
        if r["phase"] != "main":
            continue
        rd = exp.exp / "runs" / "main" / r["name"]
        if not (rd / "metrics.jsonl").is_file():
            continue
        loaded = load_run(rd)
        summ = summarize(loaded)
        secs = training_seconds(loaded["train"])
        nums = plan["numbers"][r["point"]][r["arm"]]
        rows = _read_jsonl(rd / "metrics.jsonl")
        curve = sorted((int(x["step"]), x["val_loss"]) for x in rows if x.get("val_loss") is not None)
        tps = nums["tokens_per_step"]
        ev = json.loads((rd / "eval.json").read_text()) if (rd / "eval.json").is_file() else {}
        runs.append({**r, "dir": str(rd), "summary": summ, "numbers": nums, "eval": ev,
                     "val_loss": last_val_loss(rd), "tokens": summ["tokens"],
                     "flops_causal": (summ["tokens"] or 0) * nums["flops_causal"],
                     "flops_dense": (summ["tokens"] or 0) * nums["flops_dense"],
                     "curve": [{"step": s, "tokens": s * tps, "flops_causal": s * tps * nums["flops_causal"],
                                "flops_dense": s * tps * nums["flops_dense"], "seconds": _linear_at(secs, s),
                                "val_loss": v} for s, v in curve]})
    views = {pk: read_views(exp.spec, [r for r in runs if r["point"] == pk]) for pk in {r["point"] for r in runs}}
    return {"exp": exp, "plan": plan, "choice": choice, "runs": runs, "views": views}


def _plots(data: dict, out: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pngs = []
    points = sorted({r["point"] for r in data["runs"]})
    arms = list(data["exp"].spec.arms)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for pk in points:
        for xkey, xlabel in (("flops_causal", "training FLOPs (causal count)"), ("tokens", "training tokens")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for ai, an in enumerate(arms):
                rs = [r for r in data["runs"] if r["point"] == pk and r["arm"] == an and r["curve"]]
                for j, r in enumerate(rs):
                    ax.plot([c[xkey] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], "-",
                            color=colours[ai % len(colours)], alpha=0.35, lw=1)
                if rs:
                    n = min(len(r["curve"]) for r in rs)
                    xs = [statistics.fmean(r["curve"][i][xkey] for r in rs) for i in range(n)]
                    ys = [statistics.fmean(r["curve"][i]["val_loss"] for r in rs) for i in range(n)]
                    ax.plot(xs, ys, "o-", color=colours[ai % len(colours)], lw=2,
                            label=f"{an} (mean of {len(rs)} seed{'s' if len(rs) > 1 else ''})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (nats/token)")
            ax.set_title(f"{data['exp'].spec.name} {pk}: val loss vs {xlabel.split(' (')[0]}")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            name = f"loss_vs_{'flops' if xkey.startswith('flops') else 'tokens'}_{pk}.png"
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            pngs.append((name, f"{pk}: held-out loss against {xlabel}"))
    return pngs


def build_markdown(data: dict, pngs: list[tuple[str, str]]) -> str:
    exp, plan = data["exp"], data["plan"]
    L = _md_intro(exp)
    for pk in sorted({r["point"] for r in data["runs"]}):
        L += _md_budget_table(data, pk, plan["numbers"][pk])
        L += _md_sweep_table(data, pk)
        L += _md_claims(data, pk)
        L += _md_views(data, pk)
        L += _md_retrieval_claims(data, pk)
        L += _md_representation_claims(data, pk)
    L += _md_how_made(exp, pngs)
    return "\n".join(L)


def _md_intro(exp) -> list[str]:
    spec = exp.spec
    b = spec.budget
    amount = ({"flops": f"{budget_target(spec, next(iter(exp.numbers.values()))):.4g} training FLOPs "
                        f"({b['count']} count)",
               "tokens": f"{budget_target(spec, next(iter(exp.numbers.values()))):.4g} training tokens",
               "wall_clock": f"{b.get('seconds')} s of training"})[b["rule"]]
    L = [f"# Experiment `{spec.name}`", ""]
    if spec.raw.get("description"):
        L += [str(spec.raw["description"]).strip(), ""]
    L += [f"Budget rule: **equal {b['rule'].replace('_', '-')}** ({amount} per run; steps rounded to the nearest "
          f"whole step). Baseline arm: `{spec.baseline}`. Seeds: {', '.join(map(str, spec.seeds))}. "
          f"Held-out sets: the first {spec.eval['batches']} x {spec.eval['batch_size']} windows of each val split, "
          "unshuffled, the same for every run. Spread: mean ± sample standard deviation over seeds; verdicts compare "
          "means with the standard error of their difference (within 2 SE: no difference within noise).", ""]
    if b.get("match", "none") != "none":
        L += [f"Shapes: `budget.match: {b['match']}` sized each arm's shape to match `{match_reference(spec)}`'s "
              + ("parameter count" if b["match"] == "params" else "training FLOPs per token")
              + " (what changed: each point's budget table).", ""]
    if b.get("views"):
        L += ["Budget views: the same runs also read at equal " + ", equal ".join(
            v.replace("_", "-") for v in b["views"]) + " (one verdict per view; each point's budget views).", ""]
    return L


def _md_budget_table(data: dict, pk: str, nums: dict) -> list[str]:
    spec, runs = data["exp"].spec, data["runs"]
    base = spec.baseline
    L = [f"## Point `{pk}`", "", "### Budget and parameters", "",
         "| arm | parameters | vs baseline | FLOPs/token (causal / dense) | lr | steps | tokens | "
         "training FLOPs causal | dense | wall-clock s (mean) | tokens/s (median) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    tol = spec.budget["params_tolerance"]
    for an in spec.arms:
        n = nums[an]
        rs = [r for r in runs if r["point"] == pk and r["arm"] == an]
        ratio = n["params"] / nums[base]["params"] - 1
        match = "matched" if abs(ratio) <= tol else f"**MISMATCH** ({ratio:+.1%}, tolerance ±{tol:.0%})"
        c = data["choice"].get(pk, {}).get(an, {})
        wc = mean_sd([r["summary"]["wall_clock_s"] for r in rs])[0]
        tp = [r["summary"]["median_tokens_per_s"] for r in rs if r["summary"]["median_tokens_per_s"]]
        L.append(f"| {an} | {n['params']:,} | {ratio:+.1%} {match} | {n['flops_causal']:.4g} / "
                 f"{n['flops_dense']:.4g} | {_fmt(c.get('lr')) if c.get('lr') else 'base'} | "
                 f"{rs[0]['steps'] if rs else '–'} | {rs[0]['tokens'] if rs else '–'} | "
                 f"{_fmt(rs[0]['flops_causal']) if rs else '–'} | {_fmt(rs[0]['flops_dense']) if rs else '–'} | "
                 f"{_fmt(wc, 1)} | {_fmt(statistics.median(tp), 0) if tp else '–'} |")
    L.append("")
    sizing = (data["plan"].get("sizing") or {}).get(pk) or {}
    match = spec.budget.get("match", "none")
    if any(sizing.values()):
        what = "parameters" if match == "params" else f"training FLOPs per token ({spec.budget['count']} count)"
        L.append(f"Shapes sized by `budget.match: {match}` ({what} of each arm matched to `{match_reference(spec)}`'s, "
                 f"tolerance ±{tol:.0%}; the rule: FFN hidden size in multiples of 8 from d_model up, else d_model in "
                 "multiples of 8, "
                 "else n_layers, whichever first comes within the tolerance, counted by the models themselves; a key "
                 "an arm sets itself is never changed):")
        L.append("")
        for an, rec in sizing.items():
            if not rec:
                continue
            ch = ", ".join(f"`model.{k}` {a} -> {b}" for k, (a, b) in rec["changed"].items()) or "no change"
            L.append(f"- `{an}`: {ch}; {_fmt(rec['value'])} vs {_fmt(rec['target'])} ({rec['ratio']:+.2%}"
                     + ("" if rec["within"] else ", **not within the tolerance**") + f"); {rec['rule']}.")
        L.append("")
    if match == "flops":
        L += ["Parameters are not matched here by design (`budget.match: flops` matches FLOPs per token).", ""]
    return L


def _md_sweep_table(data: dict, pk: str) -> list[str]:
    spec = data["exp"].spec
    sweep_rows = [(an, s) for an in spec.arms for s in data["choice"].get(pk, {}).get(an, {}).get("sweep", [])]
    if not sweep_rows:
        return []
    L = ["### Learning-rate sweep (seed {}, short budget; best carried to the full budget)".format(
        spec.seeds[0]), "", "| arm | lr | steps | final val loss | tokens/s | chosen |", "|---|---|---|---|---|---|"]
    for an, s in sweep_rows:
        chosen = "**yes**" if s["lr"] == data["choice"][pk][an]["lr"] else ""
        L.append(f"| {an} | {_fmt(s['lr']) if s['lr'] else 'base'} | {s['steps']} | {_fmt(s['val_loss'])} | "
                 f"{_fmt(s['tokens_per_s'], 0)} | {chosen} |")
    L.append("")
    grid = sorted(spec.sweep["lr"])
    for an in spec.arms:
        c = data["choice"].get(pk, {}).get(an, {})
        lr = c.get("lr")
        if "bracket" in c:  # the final bracket: the best rate and its neighbours among every rate tried
            lo, best, hi = c["bracket"]
            ext = c.get("extended") or []
            L += [f"`{an}`: grid {', '.join(_fmt(x) for x in grid)}"
                  + (f", extended (x{spec.sweep['extend_factor']:g} or ÷{spec.sweep['extend_factor']:g} a step) "
                     "with " + ", ".join(_fmt(x) for x in ext) if ext else "")
                  + f"; final bracket [{_fmt(lo) if lo else 'none'}, **{_fmt(best)}**, {_fmt(hi) if hi else 'none'}]"
                  + f" ({c.get('stop', '')}).", ""]
            if lo is None or hi is None:
                L += [f"Note: `{an}`'s best learning rate {_fmt(lr)} is still at the "
                      f"{'top' if hi is None else 'bottom'} of the rates tried; a better one may lie beyond.", ""]
        elif lr is not None and len(grid) > 1 and lr in (grid[0], grid[-1]):
            L += [f"Note: `{an}`'s best learning rate {_fmt(lr)} is at the {'top' if lr == grid[-1] else 'bottom'} "
                  "of the grid; a wider grid may find a better one for this arm.", ""]
    return L


def _md_claim(data: dict, pk: str, title: str, getter, lower_better: bool, unit: str, note: str = "") -> list[str]:
    """One measured quantity: a table of arms x seeds with mean ± sd, and a verdict per arm against the baseline."""
    spec, runs = data["exp"].spec, data["runs"]
    base = spec.baseline
    rows = ["| arm | " + " | ".join(f"seed {s}" for s in spec.seeds) + " | mean ± sd |",
            "|---|" + "---|" * (len(spec.seeds) + 1)]
    vals = {}
    for an in spec.arms:
        per = {r["seed"]: getter(r) for r in runs if r["point"] == pk and r["arm"] == an}
        vals[an] = [v for v in per.values() if v is not None]
        rows.append(f"| {an} | " + " | ".join(_fmt(per.get(s)) for s in spec.seeds) + f" | {_ms(vals[an])} |")
    if not any(vals.values()):
        return []
    out = [f"### {title}", ""] + ([note, ""] if note else []) + rows + [""]
    for an in (a for a in spec.arms if a != base):
        out.append(f"**Verdict ({an} vs {base}):** {verdict(vals[an], vals[base], an, base, lower_better, unit)}")
    return out + [""]


def _md_claims(data: dict, pk: str) -> list[str]:
    runs = data["runs"]
    L = _md_claim(data, pk, "Held-out loss of the training source (nats/token, fixed eval tokens)",
                  lambda r: (r["eval"].get("heldout") or {}).get("loss"), True, " nats",
                  note=_tokens_note(runs, pk, "heldout"))
    L += _md_claim(data, pk, "Trainer's last val loss (metrics.jsonl, nats/token)", lambda r: r["val_loss"], True,
                   " nats")
    L += _md_claim(data, pk, "Loss on held-out text from another source (nats/token)",
                   lambda r: (r["eval"].get("other") or {}).get("loss"), True, " nats",
                   note=_tokens_note(runs, pk, "other"))
    L += _md_claim(data, pk, "Throughput (median tokens/s while training)",
                   lambda r: r["summary"]["median_tokens_per_s"], False, " tokens/s")
    return L


def _md_retrieval_claims(data: dict, pk: str) -> list[str]:
    spec = data["exp"].spec
    ret = [r for r in data["runs"] if r["point"] == pk and r["eval"].get("retrieval")]
    if not ret:
        return []
    first = ret[0]["eval"]["retrieval"]
    note = (f"After {spec.retrieval['steps']} InfoNCE steps from each pretrained model; "
            f"{first['n_queries']} held-out queries ranked against {first['n_corpus']} documents "
            f"(split {first['split']}), as `mmscale retrieval eval` measures. BM25 on the same queries: "
            + ", ".join(f"{k} {v:.4f}" for k, v in (first.get("baseline") or {}).get("metrics", {}).items())
            + "; " + ", ".join(f"top-1 among {x['candidates']} {x['top1']:.4f}"
                               for x in (first.get("baseline") or {}).get("results", [])) + ".")
    L = _md_claim(data, pk, "Retrieval nDCG@10 after fine-tuning",
                  lambda r: ((r["eval"].get("retrieval") or {}).get("metrics") or {}).get("ndcg@10"), False, "",
                  note=note)
    for i, n in enumerate(spec.retrieval["candidates"]):
        L += _md_claim(data, pk, f"Retrieval top-1 among {n} after fine-tuning",
                       lambda r, i=i: (((r["eval"].get("retrieval") or {}).get("results") or [{}] * (i + 1))[i]
                                       .get("top1")), False, "")
    return L


def _md_representation_claims(data: dict, pk: str) -> list[str]:
    spec = data["exp"].spec
    if not any(r["eval"].get("representation") for r in data["runs"] if r["point"] == pk):
        return []
    note = (f"Fraction of positions whose token is not recovered in the top 5 after {spec.representation['steps']} "
            f"gradient steps ({spec.representation['samples']} windows; 0 = fully recoverable, 1 = not at all).")
    L = _md_claim(data, pk, "Input-representation error before training (untrained, the run's initial weights)",
                  lambda r: ((r["eval"].get("representation") or {}).get("before") or {}).get("error"), True, "",
                  note=note)
    L += _md_claim(data, pk, "Input-representation error after training",
                   lambda r: ((r["eval"].get("representation") or {}).get("after") or {}).get("error"), True, "")
    return L


def _md_how_made(exp, pngs: list[tuple[str, str]]) -> list[str]:
    L = []
    if pngs:
        L += ["## Loss against FLOPs and tokens", ""]
        L += [f"![{cap}]({name})" for name, cap in pngs] + [""]
    L += ["## How this was made", "", "Commands (from commands.log):", "", "```"]
    L += [ln.split("\t")[-1] + f"    # {ln.split(chr(9))[0]}" for ln in
          (exp.exp / "commands.log").read_text().splitlines()] if (exp.exp / "commands.log").is_file() else []
    L += ["```", "", f"Git commit: `{git_commit()}` (at report time; each command's commit is in commands.log).", ""]
    m = machine()
    L += ["Machine: " + "; ".join(f"{k} {v}" for k, v in m.items()), "",
          "Per-run curves, configs and samples: [runs.html](runs.html) (`mmscale report` of the main runs).", ""]
    return L


def _tokens_note(runs, pk, key) -> str:
    toks = {(r["eval"].get(key) or {}).get("tokens") for r in runs if r["point"] == pk and r["eval"].get(key)}
    toks.discard(None)
    if not toks:
        return ""
    return ("Every run is evaluated on the same " + ", ".join(f"{t:,}" for t in sorted(toks)) + " tokens"
            + (" (differs between arms: check the data)" if len(toks) > 1 else "") + ".")


def _md_to_html(md: str, out: Path) -> str:
    """A small Markdown subset (headings, tables, paragraphs, code, images inlined as data URIs)."""
    import base64
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        return s

    lines, out_html, i = md.splitlines(), [], 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out_html.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            out_html.append(f"<h{level}>{inline(ln[level:].strip())}</h{level}>")
        elif ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)]
            out_html.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                            + "</table>")
            continue
        elif (m := re.match(r"!\[(.*)\]\((.+)\)", ln)):
            p = out / m.group(2)
            src = ("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()) if p.is_file() else m.group(2)
            out_html.append(f'<figure><img src="{src}" alt="{html.escape(m.group(1))}"><figcaption>'
                            f"{html.escape(m.group(1))}</figcaption></figure>")
        elif ln.strip():
            out_html.append(f"<p>{inline(ln)}</p>")
        i += 1
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}pre{background:#f6f6f6;"
             "padding:8px;overflow-x:auto}img{max-width:100%}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>mmscale experiment</title><style>"
            + style + "</style></head><body>" + "\n".join(out_html) + "</body></html>\n")


def write_experiment_report(exp_dir: str | Path, out: str | Path | None = None) -> dict:
    data = collect(exp_dir)
    if not data["runs"]:
        raise UserError(f"'{exp_dir}' has no main run with metrics yet; run `mmscale experiment run` first")
    out = Path(out) if out else data["exp"].exp / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(data, out)
    md = build_markdown(data, pngs)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_md_to_html(md, out))
    try:
        from mmscale.report import write_report

        write_report([r["dir"] for r in data["runs"]], out / "runs.html")
    except Exception as e:  # the per-run page is a convenience; the experiment report stands without it
        print(f"mmscale experiment: note: runs.html not written ({type(e).__name__}: {e})", file=sys.stderr)
    summary = {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
               "pngs": [str(out / n) for n, _ in pngs]}
    _atomic_json(out / "numbers.json", {"runs": [{k: v for k, v in r.items() if k not in ("summary",)}
                                                 | {"summary": r["summary"]} for r in data["runs"]],
                                        "choice": data["choice"]})
    return summary


# ----------------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="run (or resume) an experiment spec: sweeps, full-budget runs, measures, report")
    r.add_argument("spec", help="the experiment spec (YAML), e.g. experiments/paper-small.yaml")
    r.add_argument("spec_overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted spec overrides, e.g. data.text=stories.txt budget.reference_steps=200")
    r.add_argument("--out", default=None, help="experiment directory (default runs/experiments/NAME)")
    r.add_argument("--launcher", default="local", choices=["local", "slurm"],
                   help="local: runs on this machine (in sequence, or --jobs at a time); slurm: submitit job arrays")
    r.add_argument("--jobs", type=int, default=0, help="local launcher: runs at a time (0 = launcher.jobs of the spec)")
    r.add_argument("--resume", action="store_true", help="continue an experiment dir: skip finished runs, resume "
                                                         "partial ones")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    s = sub.add_parser("status", help="every run of an experiment: finished, partial (step) or not started")
    s.add_argument("dir", help="the experiment directory")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    p = sub.add_parser("report", help="tables with verdicts, loss-vs-FLOPs plots (markdown + HTML + PNG)")
    p.add_argument("dir", help="the experiment directory")
    p.add_argument("--out", default=None, help="report folder (default DIR/report)")
    o = sub.add_parser("run-one", help=argparse.SUPPRESS)
    o.add_argument("dir", help="the experiment directory")
    o.add_argument("phase", choices=["sweep", "main"], help="sweep or main")
    o.add_argument("name", help="the run's name (plan.json)")


def _argv_of(args) -> list[str]:
    argv = ["experiment", "run", args.spec, *args.spec_overrides]
    if args.out:
        argv += ["--out", args.out]
    argv += ["--launcher", args.launcher]
    if args.jobs:
        argv += ["--jobs", str(args.jobs)]
    if args.resume:
        argv.append("--resume")
    return argv


def run(args: argparse.Namespace) -> int:
    if args.action == "run":
        if args.jobs < 0:
            raise UserError(f"--jobs must be >= 0, got {args.jobs}", 2)
        run_experiment(args.spec, args.out, launcher=args.launcher, resume=args.resume, jobs=args.jobs or None,
                       report=not args.no_report, argv=_argv_of(args), overrides=args.spec_overrides)
        return 0
    if args.action == "status":
        rows = status_rows(args.dir)
        if getattr(args, "json", False):
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no runs planned yet")
            return 0
        w = max(len(r["phase"] + r["name"]) for r in rows) + 1
        for r in rows:
            state = {"finished": "finished", "new": "not started"}.get(r["state"], f"partial (step {r['step']})")
            extra = f"  val {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
            meas = "  measured" if r["measured"] else ""
            print(f"{r['phase'] + '/' + r['name']:<{w}}  {r['steps']:>6} steps  {state}{extra}{meas}")
        done = sum(r["state"] == "finished" for r in rows)
        print(f"{done}/{len(rows)} runs finished")
        return 0
    if args.action == "report":
        paths = write_experiment_report(args.dir, args.out)
        print(f"wrote {paths['markdown']}, {paths['html']}" + (f" and {len(paths['pngs'])} PNG(s)" if paths["pngs"]
                                                                else ""))
        return 0
    # run-one: one run of an experiment (what the parallel local launcher and SLURM tasks execute)
    exp = reopen(args.dir)
    plan = json.loads((exp.exp / "plan.json").read_text())
    choice = plan.get("choice")
    runs = exp.sweep_runs() if args.phase == "sweep" else exp.main_runs(choice)
    run_ = next((r for r in runs if r.name == args.name), None)
    if run_ is None:
        raise UserError(f"no {args.phase} run named '{args.name}' in {exp.exp}")
    print(f"{args.phase}/{args.name}: " + execute_run(exp, run_, evaluate=args.phase == "main"), flush=True)
    return 0
