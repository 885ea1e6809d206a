"""The rich terminal report of one scan, read back from the DuckDB file.

Core sections: the scan summary, the head scores, each family's validation row, family
coverage of live features (with each feature's primary family), LLM labels and any detector
that failed; then each detector's own section (its ``render_terminal``), in run order.
Stored text (token strings, contexts, labels) is printed literally, never as rich markup.
"""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from famfind.db import table_exists
from famfind.reports import Section, sections


def _q(con, sql, *args):
    return con.execute(sql, list(args)).fetchall()


def render(con, scan_id: int, console: Console) -> None:
    """Print the report of ``scan_id`` from an open DuckDB connection."""
    (sae_path, model, hook, d_sae, n_tok, l0, dead, secs, corpus, arch) = _q(
        con, "SELECT sae_path, model, hook_name, d_sae, n_tokens, l0, dead_fraction, seconds, corpus, "
             "architecture FROM scans WHERE scan_id = ?", scan_id)[0]
    console.print(Panel.fit(Text(
        f"scan {scan_id}  {sae_path}\nmodel {model}  hook {hook}  {arch} SAE, d_sae {d_sae}\n"
        f"corpus {corpus}: {n_tok:,} tokens  L0 {l0:.1f}  dead {dead:.1%}  ({secs:.1f}s)"), title="famfind scan"))
    out = Section(con, scan_id, "", {}, console)

    heads = _q(con, "SELECT layer, head, metric, score FROM heads WHERE scan_id = ? ORDER BY layer, head", scan_id)
    if heads:
        metrics = sorted({m for _, _, m, _ in heads})
        by = {}
        for lyr, h, m, sc in heads:
            by.setdefault((lyr, h), {})[m] = sc
        out.table("Head scores (each metric's detector says what it measures: `famfind heuristics list`)",
                  ("head", *metrics),
                  [(f"{lyr}.{h}", *[f"{ms.get(m, float('nan')):.3f}" for m in metrics]) for (lyr, h), ms in by.items()])

    vals = _q(con, "SELECT family, selected, passed, control, control_passed, ablation_tested, ablation_off "
                   "FROM validation WHERE scan_id = ? ORDER BY family", scan_id)
    if vals:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        out.table("Family validation", ("family", "selected", "passed behaviour", "control", "control passed",
                                        "ablation tested", "turned off by ablation"),
                  [[fmt(v) for v in row] for row in vals])

    live = _q(con, "SELECT count(*) FROM features WHERE scan_id = ? AND NOT dead", scan_id)[0][0]
    fams = _q(con, "SELECT family, count(DISTINCT feature) FROM families WHERE scan_id = ? GROUP BY family "
                   "ORDER BY 2 DESC", scan_id)
    covered = _q(con, "SELECT count(DISTINCT feature) FROM families WHERE scan_id = ?", scan_id)[0][0]
    primary = dict(_q(con, "SELECT family, count(*) FROM families WHERE scan_id = ? AND is_primary GROUP BY 1",
                      scan_id))
    out.table(f"Family coverage of {live:,} live features (paper: induction ~5% of live features in gelu-2l)",
              ("family", "features", "share of live", "primary family of"),
              [(fam, str(n), f"{n / max(live, 1):.1%}", str(primary.get(fam, 0))) for fam, n in fams]
              + [("(no family)", str(live - covered), f"{(live - covered) / max(live, 1):.1%}", "-")])

    for cls, sec in sections(con, scan_id, console):
        if cls is not None:
            cls.render_terminal(sec)

    if table_exists(con, "labels"):
        labs = _q(con, "SELECT kind, target, label, description, score, status, n_pos, n_neg FROM labels "
                       "WHERE scan_id = ? ORDER BY kind = 'feature', kind, target", scan_id)
        if labs:
            out.table("LLM labels (score: balanced accuracy of detection on held-out contexts, 0.5 = chance)",
                      ("kind", "target", "label", "description", "score", "contexts"),
                      [(kind, target, lab if lab is not None else status, desc or "",
                        "-" if score is None else f"{score:.2f}", "-" if npos is None else f"{npos}+{nneg}")
                       for kind, target, lab, desc, score, status, npos, nneg in labs])

    bad = _q(con, "SELECT detector, origin, status, error FROM detector_runs WHERE scan_id = ? AND status <> 'ok'",
             scan_id)
    for det, origin, status, err in bad:
        console.print(Text(f"detector {det} ({origin}) {status}: {err}", style="yellow"))
