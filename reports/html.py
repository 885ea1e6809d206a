"""The HTML report of one scan: a single self-contained file (no CDN, works offline).

Everything is read back from the DuckDB file and embedded as one JSON blob; the page's own
JavaScript (``reports/templates/report.js``) draws the head x feature head-attribution
heatmap (canvas), the cluster-size distribution and the feature cards, 50 per page, so a
report for 10k+ features stays usable. A search box finds features by id, family or label.

Each feature card: density, max activation, families, cluster, label (when the labels table
exists), an activation histogram, top boosted and suppressed tokens, head attribution and
DFA-by-head bars, DFA by source (top sources of its top example), its top-activating contexts
and examples from lower activation quantiles, each token shaded by the feature's activation on
it. LLM labels of families and clusters (table ``labels``, from ``famfind label``) are listed
with their detection scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from famfind.db import table_exists
from famfind.reports import sections

TEMPLATES = Path(__file__).parent / "templates"


def _rows(con, sql: str, *args) -> list[dict]:
    cur = con.execute(sql, list(args))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def report_data(con, scan_id: int, max_features: int | None = None) -> dict:
    """The report's JSON: scan, validation, heads, labels, one entry per live feature (card),
    and what each detector that ran adds (its ``html_part``: card fields and top-level keys)."""
    scan = _rows(con, "SELECT * EXCLUDE (config) FROM scans WHERE scan_id = ?", scan_id)[0]
    scan = {k: (str(v) if k == "created_at" else v) for k, v in scan.items()}
    feats = {r["feature"]: {**r, **_card_defaults()}
             for r in _rows(con, "SELECT feature, density, max_act, mean_act FROM features "
                                 "WHERE scan_id = ? AND NOT dead ORDER BY feature", scan_id)}
    if max_features is not None:
        feats = dict(list(feats.items())[:max_features])

    def each(sql, fn):
        for r in _rows(con, sql, scan_id):
            f = feats.get(r["feature"])
            if f is not None:
                fn(f, r)

    each("SELECT feature, family, round(confidence, 3) AS c, is_primary FROM families WHERE scan_id = ?",
         lambda f, r: f["families"].append([r["family"], r["c"], bool(r["is_primary"])]))

    def ex(r):
        if r["tokens"] is None:
            return [r["a"], r["context"], None, None]
        return [r["a"], None, r["tokens"], [round(x, 3) if x else 0 for x in r["acts"]]]
    each("SELECT feature, round(act, 3) AS a, context, tokens, acts FROM examples WHERE scan_id = ? "
         "ORDER BY feature, rank", lambda f, r: f["examples"].append(ex(r)))
    # 3 examples from the sample: near its quartiles
    each("SELECT feature, round(act, 3) AS a, context, tokens, acts "
         "FROM (SELECT *, count(*) OVER (PARTITION BY feature) AS n FROM activation_samples WHERE scan_id = ?) "
         "WHERE rank IN (n // 4, n // 2, (3 * n) // 4) ORDER BY feature, rank",
         lambda f, r: f["quantiles"].append(ex(r)))
    each("SELECT feature, bin, count FROM activation_histogram WHERE scan_id = ? ORDER BY feature, bin",
         lambda f, r: f["hist"].append([r["bin"], r["count"]]))
    bins = [list(r) for r in con.execute("SELECT DISTINCT bin, lo, hi FROM activation_histogram WHERE scan_id = ? "
                                         "ORDER BY bin", [scan_id]).fetchall()]  # [bin, lo, hi] as stored
    top: dict = {"clusters": []}
    for cls, sec in sections(con, scan_id):
        if cls is None:
            continue
        part = dict(cls.html_part(sec))
        for f, card in part.pop("features", {}).items():
            if f in feats:
                feats[f].update(card)
        top.update(part)
    labels = []
    if table_exists(con, "labels"):
        each("SELECT feature, label, description, round(score, 3) AS score FROM labels WHERE scan_id = ? "
             "AND feature IS NOT NULL AND status = 'ok'",
             lambda f, r: f.__setitem__("label", [r["label"], r["description"], r["score"]]))
        labels = _rows(con, "SELECT kind, target, label, description, round(score, 3) AS score, status, llm_model "
                            "FROM labels WHERE scan_id = ? ORDER BY kind = 'feature', kind, target", scan_id)
        cl = {r["target"]: r["label"] for r in labels if r["kind"] == "cluster" and r["label"]}
        for f in feats.values():
            if str(f.get("cluster")) in cl:
                f["cluster_label"] = cl[str(f["cluster"])]
    heads = _rows(con, "SELECT layer, head, metric, round(score, 3) AS score FROM heads WHERE scan_id = ? "
                       "ORDER BY layer, head, metric", scan_id)
    return {
        "scan": scan,
        "validation": _rows(con, "SELECT * EXCLUDE (scan_id) FROM validation WHERE scan_id = ? ORDER BY family", scan_id),
        "heads": heads,
        "n_heads": max((len(f["att"]) for f in feats.values()), default=0),
        "layer": scan["layer"],
        **top,
        "hist_bins": [[b, round(lo, 6), None if hi == float("inf") else round(hi, 6)] for b, lo, hi in bins],
        "labels": labels,
        "features": list(feats.values()),
    }


def _card_defaults() -> dict:
    """Every key the card template (report.js) reads, empty until a detector fills it."""
    return {"families": [], "logits": {"boost": [], "suppress": []}, "att": [], "dfa": [], "sources": [],
            "examples": [], "quantiles": [], "hist": []}


def render_html(con, scan_id: int, out: str | Path, max_features: int | None = None) -> Path:
    """Write the report of ``scan_id`` to ``out`` (one file); returns its path."""
    data = json.dumps(report_data(con, scan_id, max_features), separators=(",", ":"), default=str)
    data = data.replace("</", "<\\/")  # never close the <script> early
    page = (TEMPLATES / "report.html").read_text()
    page = page.replace("/*__CSS__*/", (TEMPLATES / "report.css").read_text())
    page = page.replace("/*__JS__*/", (TEMPLATES / "report.js").read_text())
    page = page.replace("/*__DATA__*/null", data)
    p = Path(out)
    p.write_text(page, encoding="utf-8")
    return p
