"""The retrieval section of `mmscale report` (mmscale/report.py calls report_section)."""
from __future__ import annotations

from html import escape

from mmscale.retrieval.stats import COLLAPSE_COS, COLLAPSE_QUERIES, first_collapse

REPORT_COLUMNS = (("inbatch_acc", "in-batch accuracy"), ("inbatch_chance", "chance"),
                  ("doc_cos", "documents' mean cosine"), ("alignment", "alignment"), ("uniformity", "uniformity"))



def report_section(runs: list[dict], names: list[str]) -> list[str]:
    """HTML lines for `mmscale report`: per retrieval run (rows with inbatch_acc), its retrieval statistics at
    the first, best-accuracy and last log step, and the collapse warning `retrieval train` printed (recomputed
    from the rows with the same rule); nothing when no run is a retrieval run."""
    rows_of = [(n, [r for r in run["train"] if r.get("inbatch_acc") is not None]) for n, run in zip(names, runs)]
    rows_of = [(n, rows) for n, rows in rows_of if rows]
    if not rows_of:
        return []
    out = ['<h2 id="retrieval">Retrieval training</h2><table id="retrieval-table"><tr><th>run</th><th>step</th>'
           + "".join(f"<th>{escape(h)}</th>" for _, h in REPORT_COLUMNS) + "</tr>"]
    notes = []
    for n, rows in rows_of:
        best = max(rows, key=lambda r: r["inbatch_acc"])
        for label, r in (("first", rows[0]), ("best accuracy", best), ("last", rows[-1])):
            out.append(f'<tr data-run="{escape(n)}"><td>{escape(n)} ({label})</td><td class="num">{r["step"]}</td>'
                       + "".join(f'<td class="num" data-key="{k}">'
                                 + ("" if r.get(k) is None else f"{r[k]:.3f}") + "</td>" for k, _ in REPORT_COLUMNS)
                       + "</tr>")
        hit = first_collapse(rows)
        if hit is not None:
            bad, w = hit
            notes.append(f"{n}: warning: step {bad['step']}: the embeddings collapsed: over the last {w['queries']} "
                         f"queries documents' mean cosine {w['doc_cos']:.3f} (step {rows[0]['step']}: "
                         f"{rows[0]['doc_cos']:.3f}), in-batch accuracy {w['inbatch_acc']:.3f} (chance "
                         f"{w['inbatch_chance']:.3f}); see docs/retrieval-collapse.md")
    out.append("</table>")
    out.append('<p class="muted">in-batch accuracy: the share of queries whose positive scores highest among the '
               "batch's candidates (chance: 1 / candidates); alignment: mean squared distance query-positive; "
               "uniformity: log mean exp(-2 squared distance) over the batch's documents (lower: more spread); "
               f"collapse: documents' cosine >= {COLLAPSE_COS} with accuracy below twice chance, both averaged over "
               f"the last {COLLAPSE_QUERIES} or more queries.</p>")
    if notes:
        out.append('<ul class="warn" id="retrieval-warnings">' + "".join(f"<li>{escape(x)}</li>" for x in notes)
                   + "</ul>")
    return out
