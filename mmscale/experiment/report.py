"""`mmscale experiment report`: every number from the run dirs (metrics.jsonl, eval.json) and the plan, the
loss-vs-FLOPs plots, report.md, report.html (on `mmscale report`'s page) and runs.html (`mmscale report`)."""
from __future__ import annotations

import base64
import html
import json
import re
import statistics
import sys
from pathlib import Path

from mmscale.errors import UserError
from mmscale.experiment.expdir import reopen
from mmscale.experiment.document import Code, Heading, Image, Table, build_document, points_in_order, to_markdown
from mmscale.experiment.measure import last_val_loss, write_json
from mmscale.experiment.stats import linear_at, read_views, training_seconds
from mmscale.report import CSS, PAGE_END, load_run, page_head, summarize, write_report
from mmscale.run.metrics import read_jsonl


def collect(exp_dir: str | Path) -> dict:
    """Every number of the report, from the run dirs (metrics.jsonl, eval.json) and the plan."""
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
        rows = read_jsonl(rd / "metrics.jsonl")[0]
        curve = sorted((int(x["step"]), x["val_loss"]) for x in rows if x.get("val_loss") is not None)
        tps = nums["tokens_per_step"]
        ev = json.loads((rd / "eval.json").read_text()) if (rd / "eval.json").is_file() else {}
        runs.append({**r, "dir": str(rd), "summary": summ, "numbers": nums, "eval": ev,
                     "val_loss": last_val_loss(rd), "tokens": summ["tokens"],
                     "flops_causal": (summ["tokens"] or 0) * nums["flops_causal"],
                     "flops_dense": (summ["tokens"] or 0) * nums["flops_dense"],
                     "curve": [{"step": s, "tokens": s * tps, "flops_causal": s * tps * nums["flops_causal"],
                                "flops_dense": s * tps * nums["flops_dense"], "seconds": linear_at(secs, s),
                                "val_loss": v} for s, v in curve]})
    views = {pk: read_views(exp.spec, [r for r in runs if r["point"] == pk]) for pk in {r["point"] for r in runs}}
    return {"exp": exp, "plan": plan, "choice": choice, "runs": runs, "views": views}


def _plots(data: dict, out: Path) -> list[tuple[str, str]]:
    try:  # matplotlib is optional (plots are left out without it) and slow to import: only when a report is made
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pngs = []
    points = points_in_order(data)
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


EXTRA_CSS = ("table{margin:0.5em 0}td{text-align:right}td:first-child{text-align:left}"
             "pre{background:#f6f6f6;padding:8px;overflow-x:auto}img{max-width:100%}figure{margin:1em 0}")


def _inline(s: str) -> str:  # the marks the document's text uses: **bold**, `code`, [text](link)
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)


def html_body(blocks: list, out: Path) -> list[str]:
    """The document's blocks as HTML; the images (PNGs under `out`) inlined as data URIs (a self-contained page)."""
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Table):
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in b.head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                        + "</table>")
        elif isinstance(b, Code):
            body.append("<pre>" + html.escape("\n".join(b.lines)) + "</pre>")
        elif isinstance(b, Image):
            p = out / b.name
            src = ("data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()) if p.is_file() else b.name
            body.append(f'<figure><img src="{src}" alt="{html.escape(b.caption)}"><figcaption>'
                        f"{html.escape(b.caption)}</figcaption></figure>")
        elif b.strip():
            body.append(f"<p>{_inline(b)}</p>")
    return body


def html_page(blocks: list, name: str, out: Path) -> str:
    """report.html: the report's document on `mmscale report`'s page (its style and header), self-contained."""
    if blocks and isinstance(blocks[0], Heading) and blocks[0].level == 1:  # the title is the page header's
        blocks = blocks[1:]
    return "\n".join(page_head(f"Experiment {name}", "mmscale experiment report: the same numbers as report.md; "
                                "self-contained: opens without a network", css=CSS + EXTRA_CSS)
                     + html_body(blocks, out) + [PAGE_END]) + "\n"


def write_experiment_report(exp_dir: str | Path, out: str | Path | None = None) -> dict:
    data = collect(exp_dir)
    if not data["runs"]:
        raise UserError(f"'{exp_dir}' has no main run with metrics yet; run `mmscale experiment run` first")
    out = Path(out) if out else data["exp"].exp / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(data, out)
    doc = build_document(data, pngs)
    (out / "report.md").write_text(to_markdown(doc))
    (out / "report.html").write_text(html_page(doc, data["exp"].spec.name, out))
    try:
        write_report([r["dir"] for r in data["runs"]], out / "runs.html")
    except Exception as e:  # the per-run page is a convenience; the experiment report stands without it
        print(f"mmscale experiment: note: runs.html not written ({type(e).__name__}: {e})", file=sys.stderr)
    summary = {"markdown": str(out / "report.md"), "html": str(out / "report.html"),
               "pngs": [str(out / n) for n, _ in pngs]}
    write_json(out / "numbers.json", {"runs": [{k: v for k, v in r.items() if k not in ("summary",)}
                                                 | {"summary": r["summary"]} for r in data["runs"]],
                                        "choice": data["choice"]})
    return summary
