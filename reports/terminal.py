"""The rich terminal report of one scan, read back from the DuckDB file.

Core sections: the scan summary (one line per SAE), the head scores, each SAE's families'
validation rows, family coverage of each SAE's live features (with each feature's primary
family); then each detector's own section (its ``render_terminal``), the model detectors'
first, then each SAE's in layer order; LLM labels and any detector that failed.
Stored text (token strings, contexts, labels) is printed literally, never as rich markup.
"""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from famfind.db import table_exists
from famfind.reports import Section, coverage, display_path, scan_saes, sections


def _q(con, sql, *args):
    return con.execute(sql, list(args)).fetchall()


def render(con, scan_id: int, console: Console) -> None:
    """Print the report of ``scan_id`` from an open DuckDB connection: the scan and its SAEs,
    head scores, the validation table of every SAE's families, family coverage per SAE, then the
    model detectors' sections and each SAE's detector sections (layer by layer)."""
    (model, n_tok, secs, corpus) = _q(con, "SELECT model, n_tokens, seconds, corpus FROM scans WHERE scan_id = ?",
                                      scan_id)[0]
    saes = scan_saes(con, scan_id)
    lines = [f"scan {scan_id}  model {display_path(model)}",
             f"corpus {display_path(corpus)}: {n_tok:,} tokens  ({secs:.1f}s)"]
    lines += [f"{u['sae']}  {u['architecture']} SAE, d_sae {u['d_sae']}  L0 {u['l0']:.1f}  "
              f"dead {u['dead_fraction']:.1%}  {display_path(u['path'])}" for u in saes]
    console.print(Panel.fit(Text("\n".join(lines)), title="famfind scan"))
    out = Section(con, scan_id, "", {}, console)

    heads = _q(con, "SELECT layer, head, metric, any_value(score) FROM heads WHERE scan_id = ? "
                    "GROUP BY ALL ORDER BY layer, head", scan_id)
    if heads:
        metrics = sorted({m for _, _, m, _ in heads})
        by = {}
        for lyr, h, m, sc in heads:
            by.setdefault((lyr, h), {})[m] = sc
        out.table("Head scores (each metric's detector says what it measures: `famfind heuristics list`)",
                  ("head", *metrics),
                  [(f"{lyr}.{h}", *[f"{ms.get(m, float('nan')):.3f}" for m in metrics]) for (lyr, h), ms in by.items()])

    vals = _q(con, "SELECT layer, family, test, selected, passed, control, control_passed, ablation_tested, "
                   "ablation_off FROM validation WHERE scan_id = ? AND test <> 'necessity' ORDER BY layer, sae, family",
              scan_id)
    if vals:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        out.table("Family validation: behaviour and proxy families (per SAE layer; a head-role family is tested "
                  "where its layer has such a head)",
                  ("layer", "family", "test", "selected", "passed", "control", "control passed",
                   "ablation tested", "turned off by ablation"),
                  [[fmt(v) for v in row] for row in vals], keys=2)
    mech = _q(con, "SELECT layer, count(*) FILTER (WHERE passed > 0 AND control_passed <= 0.1 * passed), sum(selected), "
                   "sum(passed), sum(control_passed) FROM validation WHERE scan_id = ? AND test = 'necessity' "
                   "GROUP BY layer ORDER BY layer", scan_id)
    for lyr, n, sel, passed, ctl in mech:
        out.line(f"layer {lyr}: {n} mechanism families (necessity tests, by class and head): {passed:,} of {sel:,} "
                 f"tested records validated, control passed by {ctl:,} (the mechanism section below lists them)")

    for u in saes:
        c = coverage(con, scan_id, u["sae"])
        pct = lambda n: f"{n / max(c.live, 1):.1%}"  # noqa: E731
        rows = [(fam, test, str(n), pct(n), "-" if p is None else str(p)) for fam, test, n, p in c.rows()]
        out.table(f"{u['sae']}: family coverage of {c.live:,} live features "
                  "(paper: induction ~5% of live features in gelu-2l)",
                  ("family", "test", "features", "share of live", "primary family of"), rows)

    for cls, sec in sections(con, scan_id, console):
        if cls is not None:
            cls.render_terminal(sec)
    for u in saes:
        secs_u = [(cls, sec) for cls, sec in sections(con, scan_id, console, u["sae"]) if cls is not None]
        if len(saes) > 1 and secs_u:
            console.rule(Text(f"{u['sae']} (layer {u['layer']})"))
        for cls, sec in secs_u:
            cls.render_terminal(sec)

    if table_exists(con, "labels"):
        labs = _q(con, "SELECT sae, kind, target, label, description, score, status, n_pos, n_neg FROM labels "
                       "WHERE scan_id = ? ORDER BY sae, kind = 'feature', kind, target", scan_id)
        if labs:
            out.table("LLM labels (score: balanced accuracy of detection on held-out contexts, 0.5 = chance)",
                      ("sae", "kind", "target", "label", "description", "score", "contexts"),
                      [(sae or "", kind, target, lab if lab is not None else status, desc or "",
                        "-" if score is None else f"{score:.2f}", "-" if npos is None else f"{npos}+{nneg}")
                       for sae, kind, target, lab, desc, score, status, npos, nneg in labs])

    bad = _q(con, "SELECT detector, origin, status, error, sae FROM detector_runs WHERE scan_id = ? AND status <> 'ok'",
             scan_id)
    for det, origin, status, err, sae in bad:
        on = f" on {sae}" if sae else ""
        console.print(Text(f"detector {det} ({origin}) {status}{on}: {err}", style="yellow"))
