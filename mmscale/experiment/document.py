"""The report of an experiment as a document, section by section: the budget and parameters, the sweep, one table
per claim (arms x seeds, mean ± sd, a verdict against the baseline), budget views, retrieval, representation,
provenance. A document is a list of blocks: a str is a paragraph ("" a blank line), Heading, Table, Code, Image;
to_markdown writes report.md from it and report.py the HTML page (no Markdown is parsed back)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from mmscale.experiment.plan import budget_target, match_reference
from mmscale.experiment.provenance import git_commit, machine
from mmscale.experiment.stats import VIEW_LABELS, fmt, mean_sd, ms, verdict


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    lines: list[str]


@dataclass
class Image:
    name: str
    caption: str


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Table):
            out += ["| " + " | ".join(b.head) + " |", "|" + "---|" * len(b.head)]
            out += ["| " + " | ".join(row) + " |" for row in b.rows]
        elif isinstance(b, Code):
            out += ["```", *b.lines, "```"]
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.name})")
        else:
            out.append(b)
    return "\n".join(out)


def _md_views(data: dict, pk: str) -> list:
    spec = data["exp"].spec
    views = data.get("views", {}).get(pk) or {}
    if not views:
        return []
    L = [Heading(3, "Held-out loss under each budget view (read off the val-loss curves)"), "",
         "The same main runs, read at a common budget on each axis: the trainer's val loss (metrics.jsonl) at the "
         "smallest budget every finished run reached, interpolated linearly in log(loss) against the budget "
         "between the two evaluation points around it, never extrapolated. Training seconds: each logged step "
         "time times the steps it stands for (evaluation and checkpoint pauses excluded).", ""]
    if "wall_clock" in views:
        L += _wall_clock_conditions(data, pk)
    for view, v in views.items():
        at = "–" if v["at"] is None else fmt(float(v["at"]))
        note = "; ".join(v["not_read"])
        L += _md_claim(data, pk, f"Held-out loss at equal {view.replace('_', '-')} ({at} {VIEW_LABELS[view]})",
                       lambda r, view=view: (r.get("views") or {}).get(view), True, " nats",
                       note=(note + ".") if note else "")
    return L


def _wall_clock_conditions(data: dict, pk: str) -> list:
    """Training seconds compare arms only when they ran under the same conditions: each arm's intra-op threads and
    the 1-minute load average when its runs started (metrics.jsonl start events), with a warning where they differ."""
    rows, threads = [], set()
    for an in data["exp"].spec.arms:
        rs = [r for r in data["runs"] if r["point"] == pk and r["arm"] == an]
        th = sorted({r["summary"].get("threads") for r in rs if r["summary"].get("threads")})
        loads = [x for r in rs for x in (r["summary"].get("load_avg_start") or [])]
        threads.update(th)
        rows.append(f"{an}: {'/'.join(map(str, th)) or 'unrecorded'} thread(s)"
                    + (f", load {min(loads):.1f}–{max(loads):.1f} at start" if loads else ""))
    L = ["Conditions of the training seconds: " + "; ".join(rows) + "."]
    if len(threads) > 1:
        L[0] += " **The arms ran with different thread counts: the equal-time view is not a fair comparison.**"
    return L + [""]


def points_in_order(data: dict) -> list[str]:
    """The points that have runs, in the spec's axis order (ctx32 before ctx128, as planned), not string order."""
    present = {r["point"] for r in data["runs"]}
    planned = [pk for pk in data["plan"].get("numbers", {}) if pk in present]
    return planned + sorted(present - set(planned))


def build_document(data: dict, pngs: list[tuple[str, str]]) -> list:
    exp, plan = data["exp"], data["plan"]
    L = _md_intro(exp)
    for pk in points_in_order(data):
        L += _md_budget_table(data, pk, plan["numbers"][pk])
        L += _md_sweep_table(data, pk)
        L += _md_claims(data, pk)
        L += _md_views(data, pk)
        L += _md_retrieval_claims(data, pk)
        L += _md_representation_claims(data, pk)
    L += _md_how_made(exp, pngs)
    return L


def _md_intro(exp) -> list:
    spec = exp.spec
    b = spec.budget
    amount = ({"flops": f"{budget_target(spec, next(iter(exp.numbers.values()))):.4g} training FLOPs "
                        f"({b['count']} count)",
               "tokens": f"{budget_target(spec, next(iter(exp.numbers.values()))):.4g} training tokens",
               "wall_clock": f"{b.get('seconds')} s of training"})[b["rule"]]
    L = [Heading(1, f"Experiment `{spec.name}`"), ""]
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


def _md_budget_table(data: dict, pk: str, nums: dict) -> list:
    spec, runs = data["exp"].spec, data["runs"]
    base = spec.baseline
    table = Table(["arm", "parameters", "vs baseline", "FLOPs/token (causal / dense)", "lr", "steps", "tokens",
                   "training FLOPs causal", "dense", "wall-clock s (mean)", "tokens/s (median)"], [])
    L = [Heading(2, f"Point `{pk}`"), "", Heading(3, "Budget and parameters"), "", table]
    tol = spec.budget["params_tolerance"]
    for an in spec.arms:
        n = nums[an]
        rs = [r for r in runs if r["point"] == pk and r["arm"] == an]
        ratio = n["params"] / nums[base]["params"] - 1
        match = "matched" if abs(ratio) <= tol else f"**MISMATCH** ({ratio:+.1%}, tolerance ±{tol:.0%})"
        c = data["choice"].get(pk, {}).get(an, {})
        wc = mean_sd([r["summary"]["wall_clock_s"] for r in rs])[0]
        tp = [r["summary"]["median_tokens_per_s"] for r in rs if r["summary"]["median_tokens_per_s"]]
        table.rows.append([an, f"{n['params']:,}", f"{ratio:+.1%} {match}",
                           f"{n['flops_causal']:.4g} / {n['flops_dense']:.4g}",
                           fmt(c.get('lr')) if c.get('lr') else 'base', str(rs[0]['steps']) if rs else '–',
                           str(rs[0]['tokens']) if rs else '–', fmt(rs[0]['flops_causal']) if rs else '–',
                           fmt(rs[0]['flops_dense']) if rs else '–', fmt(wc, 1),
                           fmt(statistics.median(tp), 0) if tp else '–'])
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
            L.append(f"- `{an}`: {ch}; {fmt(rec['value'])} vs {fmt(rec['target'])} ({rec['ratio']:+.2%}"
                     + ("" if rec["within"] else ", **not within the tolerance**") + f"); {rec['rule']}.")
        L.append("")
    if match == "flops":
        L += ["Parameters are not matched here by design (`budget.match: flops` matches FLOPs per token).", ""]
    return L


def _md_sweep_table(data: dict, pk: str) -> list:
    spec = data["exp"].spec
    sweep_rows = [(an, s) for an in spec.arms for s in data["choice"].get(pk, {}).get(an, {}).get("sweep", [])]
    if not sweep_rows:
        return []
    table = Table(["arm", "lr", "steps", "final val loss", "tokens/s", "chosen"], [])
    L = [Heading(3, f"Learning-rate sweep (seed {spec.seeds[0]}, short budget; best carried to the full budget)"), "",
         table]
    for an, s in sweep_rows:
        chosen = "**yes**" if s["lr"] == data["choice"][pk][an]["lr"] else ""
        table.rows.append([an, fmt(s['lr']) if s['lr'] else 'base', str(s['steps']), fmt(s['val_loss']),
                           fmt(s['tokens_per_s'], 0), chosen])
    L.append("")
    grid = sorted(spec.sweep["lr"])
    for an in spec.arms:
        c = data["choice"].get(pk, {}).get(an, {})
        lr = c.get("lr")
        if "bracket" in c:  # the final bracket: the best rate and its neighbours among every rate tried
            lo, best, hi = c["bracket"]
            ext = c.get("extended") or []
            L += [f"`{an}`: grid {', '.join(fmt(x) for x in grid)}"
                  + (f", extended (x{spec.sweep['extend_factor']:g} or ÷{spec.sweep['extend_factor']:g} a step) "
                     "with " + ", ".join(fmt(x) for x in ext) if ext else "")
                  + f"; final bracket [{fmt(lo) if lo else 'none'}, **{fmt(best)}**, {fmt(hi) if hi else 'none'}]"
                  + f" ({c.get('stop', '')}).", ""]
            if lo is None or hi is None:
                L += [f"Note: `{an}`'s best learning rate {fmt(lr)} is still at the "
                      f"{'top' if hi is None else 'bottom'} of the rates tried; a better one may lie beyond.", ""]
        elif lr is not None and len(grid) > 1 and lr in (grid[0], grid[-1]):
            L += [f"Note: `{an}`'s best learning rate {fmt(lr)} is at the {'top' if lr == grid[-1] else 'bottom'} "
                  "of the grid; a wider grid may find a better one for this arm.", ""]
    return L


def _md_claim(data: dict, pk: str, title: str, getter, lower_better: bool, unit: str, note: str = "") -> list:
    """One measured quantity: a table of arms x seeds with mean ± sd, and a verdict per arm against the baseline."""
    spec, runs = data["exp"].spec, data["runs"]
    base = spec.baseline
    table = Table(["arm", *(f"seed {s}" for s in spec.seeds), "mean ± sd"], [])
    vals = {}
    for an in spec.arms:
        per = {r["seed"]: getter(r) for r in runs if r["point"] == pk and r["arm"] == an}
        vals[an] = [v for v in per.values() if v is not None]
        table.rows.append([an, *(fmt(per.get(s)) for s in spec.seeds), ms(vals[an])])
    if not any(vals.values()):
        return []
    out = [Heading(3, title), ""] + ([note, ""] if note else []) + [table, ""]
    for an in (a for a in spec.arms if a != base):
        out.append(f"**Verdict ({an} vs {base}):** {verdict(vals[an], vals[base], an, base, lower_better, unit)}")
    return out + [""]


def _md_claims(data: dict, pk: str) -> list:
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


def _md_retrieval_claims(data: dict, pk: str) -> list:
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
    hyb = [r for r in ret if (r["eval"]["retrieval"].get("hybrid") or {}).get("metrics")]
    if hyb:
        paired = "; ".join(
            f"{r['arm']} seed {r['seed']} {p['mean']:+.4f} ± {p['se']:.4f}" for r in hyb
            for p in [((r["eval"]["retrieval"].get("paired_ndcg@10") or {}).get("hybrid - bm25"))] if p)
        L += _md_claim(data, pk, "Retrieval nDCG@10 of the hybrid row (BM25 + the fine-tuned model)",
                       lambda r: (((r["eval"].get("retrieval") or {}).get("hybrid") or {}).get("metrics") or {})
                       .get("ndcg@10"), False, "",
                       note=(f"As `mmscale retrieval eval` fuses them (seed {hyb[0]['seed']} of {hyb[0]['arm']}: "
                             f"{hyb[0]['eval']['retrieval']['hybrid']['name']}; each run's eval.json names its "
                             f"own). Paired per query against BM25 (hybrid − BM25, mean ± SE): {paired}.")
                       if paired else "")
    for i, n in enumerate(spec.retrieval["candidates"]):
        L += _md_claim(data, pk, f"Retrieval top-1 among {n} after fine-tuning",
                       lambda r, i=i: (((r["eval"].get("retrieval") or {}).get("results") or [{}] * (i + 1))[i]
                                       .get("top1")), False, "")
    return L


def _md_representation_claims(data: dict, pk: str) -> list:
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


def _md_how_made(exp, pngs: list[tuple[str, str]]) -> list:
    L = []
    if pngs:
        L += [Heading(2, "Loss against FLOPs and tokens"), ""]
        L += [Image(name, cap) for name, cap in pngs] + [""]
    log = exp.exp / "commands.log"
    L += [Heading(2, "How this was made"), "", "Commands (from commands.log):", "",
          Code([ln.split("\t")[-1] + f"    # {ln.split(chr(9))[0]}" for ln in log.read_text().splitlines()]
               if log.is_file() else [])]
    L += ["", f"Git commit: `{git_commit()}` (at report time; each command's commit is in commands.log).", ""]
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
