"""The plan of an experiment: each arm's numbers (parameters, FLOPs per token, tokens per step, counted by the
models themselves on the meta device), the budget rule turned into steps, budget.match (an arm sized to the
reference's parameters or FLOPs per token), and the runs (sweep and main) at every axis point."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmscale.config import ConfigError, config_from_dict
from mmscale.errors import UserError
from mmscale.experiment.spec import Spec, arm_overrides, override_list
from mmscale.fsutil import atomic_write
from mmscale.models import build_model


def model_numbers(overrides: dict) -> dict:
    cfg = config_from_dict({}, override_list(overrides))
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    fl = model.flops_per_token()
    return {"params": int(n), "flops_dense": float(fl["dense"]), "flops_causal": float(fl["causal"]),
            "tokens_per_step": samples_per_step(cfg.train) * cfg.model.n_ctx,
            "n_ctx": cfg.model.n_ctx, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
            "kind": cfg.model.kind, "warmup_steps": cfg.train.warmup_steps, "lr": cfg.train.lr}


def samples_per_step(train_cfg) -> int:
    """Samples per optimizer step of one experiment run (one process): the global batch when it is set (always,
    with train.micro_batch_size=auto, whose probe keeps it through grad_accum), else micro-batch x grad_accum."""
    if train_cfg.global_batch_size:
        return int(train_cfg.global_batch_size)
    return int(train_cfg.micro_batch_size) * int(train_cfg.grad_accum)


def point_key(n_ctx, shape) -> str:
    parts = []
    if n_ctx is not None:
        parts.append(f"ctx{n_ctx}")
    if shape:
        parts.append(f"d{shape.get('d_model', '')}x{shape.get('n_layers', '')}")
    return "-".join(parts) or "base"


def lr_tag(lr: float) -> str:
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
    try:
        n = model_numbers(overrides)
    except (ConfigError, ValueError):
        return None
    return float(n["params"] if match == "params" else n["flops_" + count])


def _valid_shape(ov: dict) -> bool:
    try:
        config_from_dict({}, override_list(ov))
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
    cfg = config_from_dict({}, override_list(ov)).model
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
            pk = point_key(nc, sh)
            ovs = {an: arm_overrides(spec, an, nc, sh) for an in spec.arms}
            self.sizing[pk] = match_arms(spec, ovs)
            self.arm_ovs[pk] = ovs
            self.numbers[pk] = {an: model_numbers(ovs[an]) for an in spec.arms}

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
            pk = point_key(nc, sh)
            for an in self.spec.arms:
                steps = self.sweep_steps(pk, an)
                lrs = sorted(set(self.spec.sweep["lr"]) | set(self.sweep_ext.get(pk, {}).get(an, []))) or [None]
                for lr in lrs:
                    if lr is None and self.spec.budget["rule"] != "wall_clock":
                        continue  # no grid: nothing to sweep
                    name = f"{an}-{pk}-{lr_tag(lr) if lr else 'lr-base'}"
                    ov = dict(self.arm_ovs[pk][an])
                    ov.update(self._common(self.exp / "runs" / "sweep" / name, steps, self.spec.seeds[0], lr,
                                           self.data["train"][nc] if self.data else ""))
                    runs.append(Run(name, "sweep", an, pk, self.spec.seeds[0], lr, steps, ov))
        return runs

    def main_runs(self, choice: dict | None = None) -> list[Run]:
        runs = []
        for nc, sh in self.points:
            pk = point_key(nc, sh)
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
        cfg = config_from_dict({}, override_list(run.overrides))
        p = self.config_path(run)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, cfg.to_yaml())
        return p
