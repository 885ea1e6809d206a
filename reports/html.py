"""The HTML report of one scan: one page per SAE (no CDN, works offline from ``file://``),
each linking the scan's other SAEs' pages, and beside it a folder of its feature cards.

Everything is read back from the DuckDB file. The page embeds one JSON blob (summary tables,
the head-attribution heatmap as bytes, an index of the live features); its own JavaScript
(``reports/templates/report.js``) draws the head x feature heatmap (canvas), the
cluster-size distribution and the feature cards, 50 per page, loading each page's cards from
its own file only when shown, so the page stays small (<= 5 MB) at 24,576 features per SAE.
A search box finds features by id, family or label; ``page.html#p=N`` opens card page N,
``page.html#F`` feature F.

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
from famfind.reports import coverage, display_path, rows as _rows, scan_saes, sections

TEMPLATES = Path(__file__).parent / "templates"


def report_data(con, scan_id: int, max_features: int | None = None, sae: str | None = None) -> dict:
    """The report's JSON for SAE ``sae`` of the scan (default: its first): scan (with that
    SAE's hook, d_sae, L0, dead fraction), family coverage of its live features, validation
    (every SAE's behaviour and proxy families, this SAE's mechanism families), heads, labels, one entry
    per live feature of the SAE (card), and what each detector that ran on it adds (its
    ``html_part``: card fields and top-level keys). Raises ``KeyError`` for an unknown SAE."""
    scan = _rows(con, "SELECT * EXCLUDE (config) FROM scans WHERE scan_id = ?", scan_id)[0]
    scan = {k: (str(v) if k == "created_at" else v) for k, v in scan.items()}
    scan["model"], scan["corpus"] = display_path(scan["model"]), display_path(scan["corpus"])
    saes = scan_saes(con, scan_id)
    unit = saes[0] if sae is None else next((u for u in saes if u["sae"] == sae), None)
    if unit is None:
        raise KeyError(f"scan {scan_id} has no SAE {sae!r}; it has {[u['sae'] for u in saes]}")
    sae = unit["sae"]
    scan.update({"sae": sae, "sae_path": display_path(unit["path"]), "hook_name": unit["hook_name"], "layer": unit["layer"],
                 "architecture": unit["architecture"], "d_sae": unit["d_sae"], "l0": unit["l0"],
                 "dead_fraction": unit["dead_fraction"]})
    feats = {r["feature"]: {**r, **_card_defaults()}
             for r in _rows(con, "SELECT feature, density, max_act, mean_act FROM features "
                                 "WHERE scan_id = ? AND sae = ? AND NOT dead ORDER BY feature", scan_id, sae)}
    if max_features is not None:
        feats = dict(list(feats.items())[:max_features])

    def each(sql, fn):
        for r in _rows(con, sql, scan_id, sae):
            f = feats.get(r["feature"])
            if f is not None:
                fn(f, r)

    each("SELECT feature, family, round(confidence, 3) AS c, is_primary FROM families WHERE scan_id = ? AND sae = ?",
         lambda f, r: f["families"].append([r["family"], r["c"], bool(r["is_primary"])]))

    def ex(r):
        if r["tokens"] is None:
            return [r["a"], r["context"], None, None]
        return [r["a"], None, r["tokens"], [round(x, 3) if x else 0 for x in r["acts"]]]
    each("SELECT feature, round(act, 3) AS a, context, tokens, acts FROM examples WHERE scan_id = ? AND sae = ? "
         "ORDER BY feature, rank", lambda f, r: f["examples"].append(ex(r)))
    # 3 examples from the sample: near its quartiles
    each("SELECT feature, round(act, 3) AS a, context, tokens, acts "
         "FROM (SELECT *, count(*) OVER (PARTITION BY feature) AS n FROM activation_samples WHERE scan_id = ? AND sae = ?) "
         "WHERE rank IN (n // 4, n // 2, (3 * n) // 4) ORDER BY feature, rank",
         lambda f, r: f["quantiles"].append(ex(r)))
    each("SELECT feature, bin, count FROM activation_histogram WHERE scan_id = ? AND sae = ? ORDER BY feature, bin",
         lambda f, r: f["hist"].append([r["bin"], r["count"]]))
    bins = [list(r) for r in con.execute("SELECT DISTINCT bin, lo, hi FROM activation_histogram WHERE scan_id = ? "
                                         "AND sae = ? ORDER BY bin", [scan_id, sae]).fetchall()]  # [bin, lo, hi]
    top: dict = {}  # the detectors' own top-level parts (each html_part), e.g. the cluster sizes
    for cls, sec in [*sections(con, scan_id), *sections(con, scan_id, sae=sae)]:
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
             "AND sae = ? AND feature IS NOT NULL AND status = 'ok'",
             lambda f, r: f.__setitem__("label", [r["label"], r["description"], r["score"]]))
        labels = _rows(con, "SELECT kind, target, label, description, round(score, 3) AS score, status, llm_model "
                            "FROM labels WHERE scan_id = ? AND sae = ? ORDER BY kind = 'feature', kind, target",
                        scan_id, sae)
        cl = {r["target"]: r["label"] for r in labels if r["kind"] == "cluster" and r["label"]}
        for f in feats.values():
            if str(f.get("cluster")) in cl:
                f["cluster_label"] = cl[str(f["cluster"])]
    heads = _rows(con, "SELECT layer, head, metric, round(any_value(score), 3) AS score FROM heads WHERE scan_id = ? "
                       "GROUP BY ALL ORDER BY layer, head, metric", scan_id)
    cov = coverage(con, scan_id, sae)
    pct = lambda n: round(n / max(cov.live, 1), 4)  # noqa: E731
    coverage_rows = [{"family": f, "test": t, "features": n, "share of live": pct(n),
                      "primary family of": "-" if p is None else p} for f, t, n, p in cov.rows()]
    return {
        "scan": scan,
        "coverage": coverage_rows,
        "live": cov.live,
        # every SAE's behaviour and proxy families, then this SAE's mechanism families
        "validation": _rows(con, "SELECT * EXCLUDE (scan_id) FROM validation WHERE scan_id = ? AND (test IS DISTINCT "
                                 "FROM 'necessity' OR sae = ?) ORDER BY test = 'necessity', layer, sae, family",
                            scan_id, sae),
        "saes": [u["sae"] for u in saes],
        "heads": heads,
        "n_heads": max((len(f["att"]) for f in feats.values()), default=0),
        "layer": unit["layer"],
        **top,
        "hist_bins": [[b, round(lo, 6), None if hi == float("inf") else round(hi, 6)] for b, lo, hi in bins],
        "hist_centres": hist_centres(),
        "labels": labels,
        "features": list(feats.values()),
    }


def hist_centres() -> list[float]:
    """A representative activation of each histogram bin (:data:`famfind.activations.HIST_EDGES`
    plus a bin below and above): geometric bin centres, half the first edge, twice the last."""
    from famfind.activations import HIST_EDGES

    e = HIST_EDGES.tolist()
    return [e[0] / 2] + [round((a * b) ** 0.5, 6) for a, b in zip(e, e[1:])] + [e[-1] * 2]


def _card_defaults() -> dict:
    """Every key the card template (report.js) reads, empty until a detector fills it."""
    return {"families": [], "logits": {"boost": [], "suppress": []}, "att": [], "dfa": [], "sources": [],
            "examples": [], "quantiles": [], "hist": []}


def page_paths(out: str | Path, saes: list[str]) -> dict[str, Path]:
    """Where each SAE's page goes: ``out`` for the first, ``<stem>.<sae><suffix>`` beside it
    for the others (a one-SAE scan: ``out`` alone)."""
    p = Path(out)
    return {s: p if i == 0 else p.with_name(f"{p.stem}.{s.replace('/', '_')}{p.suffix}") for i, s in enumerate(saes)}


CARDS_PER_FILE = 50  # feature cards per lazily loaded file (= one page of cards)


def cards_dir(page: str | Path) -> Path:
    """The folder of a page's card files: ``<stem>_cards`` beside the page."""
    p = Path(page)
    return p.with_name(f"{p.stem}_cards")


def _heat(feats: list[dict], n_heads: int) -> str:
    """Head attribution of every live feature for the heatmap: ``[n_features, n_heads]``
    quantised to bytes (``round(255 * att)``), row-major, base64."""
    import base64

    import numpy as np

    a = np.zeros((len(feats), n_heads), dtype=np.uint8)
    for i, f in enumerate(feats):
        if f["att"]:
            a[i] = np.clip(np.round(np.asarray(f["att"], dtype=np.float64) * 255), 0, 255)
    return base64.b64encode(a.tobytes()).decode()


def _json(d) -> str:
    # No string can end the <script> element or open a comment in it: JSON needs no literal
    # < > & outside strings, and inside them \u escapes read back the same.
    data = json.dumps(d, separators=(",", ":"), default=str)
    return data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(con, scan_id: int, out: str | Path, max_features: int | None = None,
                sae: str | None = None) -> list[Path]:
    """Write the report of ``scan_id``: one page per SAE (:func:`page_paths`; ``sae``: that
    SAE's page only, at ``out``), each linking the others, and beside each page its feature
    cards, :data:`CARDS_PER_FILE` per file (``<stem>_cards/NNNNN.js``, loaded by the page when
    a page of cards is shown; ``<script>`` files, so the report works from ``file://`` with no
    server and nothing fetched from the network). The page itself holds the summary tables,
    the heatmap (bytes) and a small index per live feature (id, families, labels, cluster),
    so its size grows by ~30 bytes per feature: a 24,576-feature SAE's page stays ~1-2 MB.
    Returns the pages' paths."""
    layers = {u["sae"]: u["layer"] for u in scan_saes(con, scan_id)}
    links = page_paths(out, list(layers)) if sae is None else {}
    pages = links or {sae: Path(out)}
    page_t = (TEMPLATES / "report.html").read_text()
    page_t = page_t.replace("/*__CSS__*/", (TEMPLATES / "report.css").read_text())
    page_t = page_t.replace("/*__JS__*/", (TEMPLATES / "report.js").read_text())
    for name, path in pages.items():
        d = report_data(con, scan_id, max_features, name)
        d["pages"] = [[s, q.name, layers[s]] for s, q in links.items()]
        feats = d.pop("features")
        d["heat"] = _heat(feats, d["n_heads"])
        d["index"] = [[f["feature"], f["families"], f["label"][0] if f.get("label") else None,
                       f.get("cluster_label")] for f in feats]
        d["cards_dir"] = cards_dir(path).name
        d["cards_per_file"] = CARDS_PER_FILE
        folder = cards_dir(path)
        if folder.exists():
            for old in folder.glob("*.js"):
                old.unlink()
        folder.mkdir(exist_ok=True)  # the page's folder must exist: never created here
        for i in range(0, len(feats), CARDS_PER_FILE):
            (folder / f"{i // CARDS_PER_FILE:05d}.js").write_text(
                f"famfindCards({i // CARDS_PER_FILE},{_json(feats[i:i + CARDS_PER_FILE])});\n", encoding="utf-8")
        path.write_text(page_t.replace("/*__DATA__*/null", _json(d)), encoding="utf-8")
    return list(pages.values())


def page_data(page: str | Path) -> dict:
    """The JSON embedded in a written report page (its summary and feature index)."""
    import re

    text = Path(page).read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="famfind-data" type="application/json">(.*?)</script>', text, re.S).group(1))


def load_cards(page: str | Path) -> list[dict]:
    """Every feature card written beside a report ``page``, in feature order (for tests and
    scripts; the page loads them itself)."""
    cards = []
    for f in sorted(cards_dir(page).glob("*.js")):
        text = f.read_text(encoding="utf-8")
        cards += json.loads(text[text.index(",") + 1: text.rindex(")")])
    return cards
