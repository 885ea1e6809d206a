"""The rich terminal report of one scan, read back from the DuckDB file.

Shows the scan summary, the head roles, each family's validation row (the paper's
induction table, with gelu-2l's published numbers for comparison), family coverage of
live features (with each feature's primary family), the head-loading clusters with how many
of their features a family explains, the top family members, and any detector that failed.
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from famfind.db import table_exists

# Kissane et al. (2024), automated induction-feature analysis on gelu-2l's L1 attention SAE
PAPER_INDUCTION = {"selected": 586, "passed": 450, "control": 500, "control_passed": 3,
                   "ablation_tested": 450, "ablation_off": 443}


def _q(con, sql, *args):
    return con.execute(sql, list(args)).fetchall()


def render(con, scan_id: int, console: Console, top: int = 10) -> None:
    """Print the report of ``scan_id`` from an open DuckDB connection."""
    (sae_path, model, hook, d_sae, n_tok, l0, dead, secs, corpus, arch) = _q(
        con, "SELECT sae_path, model, hook_name, d_sae, n_tokens, l0, dead_fraction, seconds, corpus, "
             "architecture FROM scans WHERE scan_id = ?", scan_id)[0]
    console.print(Panel.fit(
        f"[bold]scan {scan_id}[/]  {sae_path}\nmodel {model}  hook [cyan]{hook}[/]  {arch} SAE, d_sae {d_sae}\n"
        f"corpus {corpus}: {n_tok:,} tokens  L0 {l0:.1f}  dead {dead:.1%}  ({secs:.1f}s)",
        title="famfind scan"))

    heads = _q(con, "SELECT layer, head, metric, score FROM heads WHERE scan_id = ? ORDER BY layer, head", scan_id)
    if heads:
        metrics = sorted({m for _, _, m, _ in heads})
        t = Table(title="Head roles (induction / duplicate / previous token: mean attention on repeated random "
                        "tokens; successor, name mover, long prefix: see `famfind heuristics list`)")
        t.add_column("head")
        for m in metrics:
            t.add_column(m, justify="right")
        by = {}
        for lyr, h, m, s in heads:
            by.setdefault((lyr, h), {})[m] = s
        for (lyr, h), ms in by.items():
            t.add_row(f"{lyr}.{h}", *[f"{ms.get(m, float('nan')):.3f}" for m in metrics])
        console.print(t)

    vals = _q(con, "SELECT family, selected, passed, control, control_passed, ablation_tested, ablation_off "
                   "FROM validation WHERE scan_id = ? ORDER BY family", scan_id)
    if vals:
        t = Table(title="Family validation (paper: gelu-2l, Kissane et al. 2024)")
        for c in ("family", "selected", "passed behaviour", "control", "control passed",
                  "ablation tested", "turned off by ablation"):
            t.add_column(c, justify="right" if c != "family" else "left")
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        for row in vals:
            t.add_row(*[fmt(v) for v in row])
            if row[0] == "induction":
                p = PAPER_INDUCTION
                t.add_row("[dim]induction (paper)[/]", *[f"[dim]{p[k]}[/]" for k in
                          ("selected", "passed", "control", "control_passed", "ablation_tested", "ablation_off")])
        console.print(t)
        sel = _q(con, "SELECT summary FROM detector_runs WHERE scan_id = ? AND detector = 'induction_selection'",
                 scan_id)
        if sel and sel[0][0]:
            heads = json.loads(sel[0][0]).get("induction_heads")
            console.print("induction heads used for selection: " + (", ".join(heads) if heads else
                          "none reached --induction-head-threshold, so no feature can be selected"))

    live = _q(con, "SELECT count(*) FROM features WHERE scan_id = ? AND NOT dead", scan_id)[0][0]
    fams = _q(con, "SELECT family, count(DISTINCT feature) FROM families WHERE scan_id = ? GROUP BY family "
                   "ORDER BY 2 DESC", scan_id)
    covered = _q(con, "SELECT count(DISTINCT feature) FROM families WHERE scan_id = ?", scan_id)[0][0]
    primary = dict(_q(con, "SELECT family, count(*) FROM families WHERE scan_id = ? AND is_primary GROUP BY 1",
                      scan_id))
    t = Table(title=f"Family coverage of {live:,} live features (paper: induction ~5% of live features in gelu-2l)")
    t.add_column("family")
    t.add_column("features", justify="right")
    t.add_column("share of live", justify="right")
    t.add_column("primary family of", justify="right")
    for fam, n in fams:
        t.add_row(fam, str(n), f"{n / max(live, 1):.1%}", str(primary.get(fam, 0)))
    t.add_row("[dim](no family)[/]", str(live - covered), f"{(live - covered) / max(live, 1):.1%}", "-")
    console.print(t)

    if table_exists(con, "clusters") and _q(con, "SELECT count(*) FROM clusters WHERE scan_id = ?", scan_id)[0][0]:
        summ = _q(con, "SELECT summary FROM detector_runs WHERE scan_id = ? AND detector = 'clusters'", scan_id)
        sm = json.loads(summ[0][0]) if summ and summ[0][0] else {}
        rows = _q(con, """
            SELECT c.cluster, count(*) AS size, any_value(z.top_head), any_value(z.top_head_loading),
                   count(*) FILTER (WHERE p.family IS NOT NULL) AS explained,
                   mode(p.family) AS top_family
            FROM clusters c
            JOIN cluster_sizes z ON z.scan_id = c.scan_id AND z.cluster = c.cluster
            LEFT JOIN families p ON p.scan_id = c.scan_id AND p.feature = c.feature AND p.is_primary
            WHERE c.scan_id = ? GROUP BY c.cluster ORDER BY size DESC""", scan_id)
        sil = sm.get("silhouette")
        t = Table(title=f"Head-loading clusters: k = {sm.get('k')} by silhouette "
                        f"({sil:.3f}); size ~ rank^-alpha, alpha = {sm.get('power_law_alpha', float('nan')):.2f} "
                        f"(r2 {sm.get('power_law_r2', float('nan')):.2f})" if sil is not None else "Head-loading clusters")
        for c in ("cluster", "size", "top head", "loading", "in a family", "main family", "unexplained"):
            t.add_column(c, justify="left" if c in ("top head", "main family") else "right")
        for cl, size, head, load, expl, fam in rows:
            t.add_row(str(cl), str(size), head, f"{load:.2f}", str(expl), fam or "-", str(size - expl))
        console.print(t)

    members = _q(con, """
        SELECT f.family, f.feature, f.confidence, l.token_str, ft.density
        FROM families f
        LEFT JOIN feature_logits l ON l.scan_id = f.scan_id AND l.feature = f.feature
             AND l.direction = 'boost' AND l.rank = 0
        JOIN features ft ON ft.scan_id = f.scan_id AND ft.feature = f.feature
        WHERE f.scan_id = ? ORDER BY f.family, f.confidence DESC, f.feature LIMIT ?""", scan_id, top) \
        if table_exists(con, "feature_logits") else []
    if members:
        t = Table(title=f"Top family members (first {top})")
        for c in ("family", "feature", "confidence", "top boosted token", "density"):
            t.add_column(c)
        for fam, f, conf, tok, dens in members:
            t.add_row(fam, str(f), f"{conf:.2f}", json.dumps(tok) if tok is not None else "-", f"{dens:.2e}")
        console.print(t)

    if table_exists(con, "labels"):
        labs = _q(con, "SELECT kind, target, label, description, score, status, n_pos, n_neg FROM labels "
                       "WHERE scan_id = ? ORDER BY kind = 'feature', kind, target", scan_id)
        if labs:
            t = Table(title="LLM labels (score: balanced accuracy of detection on held-out contexts, 0.5 = chance)")
            for c in ("kind", "target", "label", "description", "score", "contexts"):
                t.add_column(c, justify="right" if c in ("score", "contexts") else "left")
            for kind, target, lab, desc, score, status, npos, nneg in labs:
                t.add_row(kind, target, lab if lab is not None else f"[red]{status}[/]", desc or "",
                          "-" if score is None else f"{score:.2f}", "-" if npos is None else f"{npos}+{nneg}")
            console.print(t)

    bad = _q(con, "SELECT detector, origin, status, error FROM detector_runs WHERE scan_id = ? AND status <> 'ok'",
             scan_id)
    for det, origin, status, err in bad:
        console.print(f"[yellow]detector {det} ({origin}) {status}: {err}[/]")
