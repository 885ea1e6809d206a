"""The DuckDB store: one row per scan in ``scans``, everything else keyed by ``scan_id``.

Core tables (schema also in README.md):

- ``scans``: scan_id, created_at, famfind_version, sae_path, sae_sha256, architecture, d_in,
  d_sae, model, hook_name, layer, corpus, n_tokens, seq_len, l0, dead_fraction, seconds,
  config (JSON);
- ``detector_runs``: scan_id, detector, version, origin, status, error, seconds, summary (JSON);
- ``features``: scan_id, feature, fire_count, density, mean_act, max_act, dead;
- ``heads``: scan_id, layer, head, metric, score;
- ``detections``: scan_id, detector, feature, score, passed, evidence (JSON);
- ``families``: scan_id, family, feature, confidence, detector, is_primary (the feature's
  highest-confidence family; ties go to the family named first alphabetically);
- ``validation``: scan_id, family, selected, passed, control, control_passed,
  ablation_tested, ablation_off;
- ``examples``: scan_id, feature, rank, seq, pos, act, context (active token in ``[[ ]]``),
  tokens (the window's tokens, 12 before to 3 after), acts (the feature's activation on each);
- ``activation_samples``: the same columns (rank = order by activation) for a uniform random
  sample of each feature's firing positions: examples from every activation quantile;
- ``random_contexts``: scan_id, seq, pos, context, tokens, active (features firing there):
  random corpus positions, the non-activating contexts of the detection score;
- ``activation_histogram``: scan_id, feature, bin, lo, hi, count (positive activations per
  log-spaced bin; empty bins left out);

plus each detector's extra ``tables`` (built-ins: ``head_attribution``, ``feature_logits``,
``dfa_head``, ``dfa_source``, ``clusters``, ...), and, once a ``clusters`` table exists, the
view ``cluster_family_crosstab`` (scan_id, cluster, family or ``(none)``, features).
A scan is written in one transaction: a failed or interrupted write leaves no rows.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

import famfind
from famfind.errors import FamfindError

CORE_TABLES = ("scans", "detector_runs", "features", "heads", "detections", "families",
               "validation", "examples", "activation_histogram", "activation_samples", "random_contexts")
TABLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_DB = "famfind.duckdb"

SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (scan_id INTEGER PRIMARY KEY, created_at TIMESTAMP, famfind_version VARCHAR,
  sae_path VARCHAR, sae_sha256 VARCHAR, architecture VARCHAR, d_in INTEGER, d_sae INTEGER, model VARCHAR,
  hook_name VARCHAR, layer INTEGER, corpus VARCHAR, n_tokens BIGINT, seq_len INTEGER, l0 DOUBLE,
  dead_fraction DOUBLE, seconds DOUBLE, config JSON);
CREATE TABLE IF NOT EXISTS detector_runs (scan_id INTEGER, detector VARCHAR, version VARCHAR, origin VARCHAR,
  status VARCHAR, error VARCHAR, seconds DOUBLE, summary JSON);
CREATE TABLE IF NOT EXISTS features (scan_id INTEGER, feature INTEGER, fire_count BIGINT, density DOUBLE,
  mean_act DOUBLE, max_act DOUBLE, dead BOOLEAN);
CREATE TABLE IF NOT EXISTS heads (scan_id INTEGER, layer INTEGER, head INTEGER, metric VARCHAR, score DOUBLE);
CREATE TABLE IF NOT EXISTS detections (scan_id INTEGER, detector VARCHAR, feature INTEGER, score DOUBLE,
  passed BOOLEAN, evidence JSON);
CREATE TABLE IF NOT EXISTS families (scan_id INTEGER, family VARCHAR, feature INTEGER, confidence DOUBLE,
  detector VARCHAR, is_primary BOOLEAN);
ALTER TABLE families ADD COLUMN IF NOT EXISTS is_primary BOOLEAN;
CREATE TABLE IF NOT EXISTS validation (scan_id INTEGER, family VARCHAR, selected INTEGER, passed INTEGER,
  control INTEGER, control_passed INTEGER, ablation_tested INTEGER, ablation_off INTEGER);
CREATE TABLE IF NOT EXISTS examples (scan_id INTEGER, feature INTEGER, rank INTEGER, seq INTEGER, pos INTEGER,
  act DOUBLE, context VARCHAR, tokens VARCHAR[], acts FLOAT[]);
ALTER TABLE examples ADD COLUMN IF NOT EXISTS tokens VARCHAR[];
ALTER TABLE examples ADD COLUMN IF NOT EXISTS acts FLOAT[];
CREATE TABLE IF NOT EXISTS activation_samples (scan_id INTEGER, feature INTEGER, rank INTEGER, seq INTEGER,
  pos INTEGER, act DOUBLE, context VARCHAR, tokens VARCHAR[], acts FLOAT[]);
CREATE TABLE IF NOT EXISTS random_contexts (scan_id INTEGER, seq INTEGER, pos INTEGER, context VARCHAR,
  tokens VARCHAR[], active INTEGER[]);
CREATE TABLE IF NOT EXISTS activation_histogram (scan_id INTEGER, feature INTEGER, bin INTEGER, lo DOUBLE,
  hi DOUBLE, count BIGINT);
"""


# clusters x families, over every scan: which clusters the families explain ("(none)" = no family)
CROSSTAB_VIEW = """
CREATE OR REPLACE VIEW cluster_family_crosstab AS
SELECT c.scan_id, c.cluster, coalesce(f.family, '(none)') AS family, count(*) AS features
FROM clusters c LEFT JOIN families f ON f.scan_id = c.scan_id AND f.feature = c.feature
GROUP BY ALL
"""


def table_exists(con, name: str) -> bool:
    """Does the open DuckDB connection hold a table or view called ``name``?"""
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [name]).fetchone()[0])


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a famfind DuckDB file; raises ``FamfindError`` naming it if it cannot be opened."""
    p = Path(path)
    if read_only and not p.exists():
        raise FamfindError(p, "database not found (run `famfind scan` first, or pass --db)")
    try:
        return duckdb.connect(str(p), read_only=read_only)
    except (duckdb.Error, OSError) as e:
        raise FamfindError(p, f"cannot open as a DuckDB database ({str(e).splitlines()[0][:160]})") from None


class _Pieces:
    """Token id -> its text (decoded alone, cached); ids as strings without a tokenizer."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = str(i) + " " if self.tok is None else self.tok.decode([i])
        return s


def _window(pieces: _Pieces, toks: np.ndarray, pos: int) -> tuple[str, list[str], int]:
    """``(context with the token at pos in [[ ]], window tokens, index of pos in them)``,
    over offsets :data:`famfind.activations.WINDOW` clipped to the sequence."""
    from famfind.activations import WINDOW

    lo, hi = max(0, pos + WINDOW[0]), min(len(toks), pos + WINDOW[1])
    words = [pieces(int(t)) for t in toks[lo:hi]]
    j = pos - lo
    return "".join(words[:j]) + f"[[{words[j]}]]" + "".join(words[j + 1:]), words, j


def _example_rows(pieces, toks, acts, seqs, poss, wins, live) -> list[dict]:
    """One row per (rank, live feature) with seq >= 0: context, tokens, acts of the window."""
    from famfind.activations import WINDOW

    rows = []
    for f in live:
        for r in range(acts.shape[0]):
            s, p = int(seqs[r, f]), int(poss[r, f])
            if s < 0:
                continue
            ctx, words, j = _window(pieces, toks[s], p)
            a0 = -j - WINDOW[0]  # window slot of its first token (the window starts at p - j)
            w = None if wins is None else wins[r, f, a0:a0 + len(words)]
            rows.append({"feature": int(f), "rank": r, "seq": s, "pos": p, "act": float(acts[r, f]),
                         "context": ctx, "tokens": words,
                         "acts": None if w is None else [round(float(x), 4) for x in w]})
    return rows


def scan_frames(result) -> dict[str, pl.DataFrame]:
    """All rows of a :class:`famfind.scan.ScanResult`, as DataFrames without ``scan_id``."""
    ctx, st = result.ctx, result.ctx.stats
    F = ctx.sae.d_sae
    frames: dict[str, pl.DataFrame] = {}
    frames["scans"] = pl.DataFrame([{
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None), "famfind_version": famfind.__version__,
        "sae_path": str(Path(ctx.sae.path).resolve()), "sae_sha256": result.sae_sha256,
        "architecture": ctx.sae.architecture, "d_in": ctx.sae.d_in, "d_sae": F, "model": ctx.model.cfg.name,
        "hook_name": ctx.sae.hook_name, "layer": ctx.layer, "corpus": ctx.corpus.source,
        "n_tokens": st.n_tokens, "seq_len": ctx.config.seq_len, "l0": st.l0,
        "dead_fraction": float(st.dead.float().mean()), "seconds": result.seconds,
        "config": json.dumps(ctx.config.to_dict()),
    }])
    frames["detector_runs"] = pl.DataFrame(
        [{"detector": r.id, "version": r.version, "origin": r.origin, "status": r.status,
          "error": r.error, "seconds": r.seconds,
          "summary": json.dumps(ctx.results[r.id].summary if r.id in ctx.results else {})} for r in result.runs],
        schema={"detector": pl.Utf8, "version": pl.Utf8, "origin": pl.Utf8, "status": pl.Utf8,
                "error": pl.Utf8, "seconds": pl.Float64, "summary": pl.Utf8})
    fc = st.fire_count.numpy()
    frames["features"] = pl.DataFrame({
        "feature": np.arange(F, dtype=np.int32), "fire_count": fc, "density": st.density.numpy(),
        "mean_act": (st.act_sum.numpy() / np.maximum(fc, 1)), "max_act": st.act_max.double().numpy(),
        "dead": st.dead.numpy()})
    heads, dets, fams, vals = [], [], [], {}
    extra: dict[str, list[pl.DataFrame]] = {}
    for hid, res in ctx.results.items():
        heads += [{"layer": h.layer, "head": h.head, "metric": h.metric, "score": h.score} for h in res.head_scores]
        dets += [{"detector": hid, "feature": d.feature, "score": d.score, "passed": d.passed,
                  "evidence": json.dumps(d.evidence)} for d in res.detections]
        fams += [{"family": m.family, "feature": m.feature, "confidence": m.confidence, "detector": hid}
                 for m in res.families]
        for v in res.validation:
            row = vals.setdefault(v.family, {"family": v.family})
            for k, val in vars(v).items():
                if val is not None:
                    row[k] = val
        for name, df in res.tables.items():
            if not TABLE_RE.match(name) or name in CORE_TABLES:
                raise FamfindError(f"detector {hid!r}", f"table name {name!r} is invalid or reserved")
            if not isinstance(df, pl.DataFrame):
                raise FamfindError(f"detector {hid!r}", f"table {name!r} is not a polars.DataFrame")
            extra.setdefault(name, []).append(df)
    frames["heads"] = pl.DataFrame(heads, schema={"layer": pl.Int32, "head": pl.Int32, "metric": pl.Utf8,
                                                  "score": pl.Float64})
    frames["detections"] = pl.DataFrame(dets, schema={"detector": pl.Utf8, "feature": pl.Int32,
                                                      "score": pl.Float64, "passed": pl.Boolean,
                                                      "evidence": pl.Utf8})
    primary: dict[int, int] = {}  # feature -> its row of highest confidence (ties: family name, then first)
    for i, r in enumerate(fams):
        j = primary.get(r["feature"])
        if j is None or (-r["confidence"], r["family"]) < (-fams[j]["confidence"], fams[j]["family"]):
            primary[r["feature"]] = i
    for i, r in enumerate(fams):
        r["is_primary"] = primary[r["feature"]] == i
    frames["families"] = pl.DataFrame(fams, schema={"family": pl.Utf8, "feature": pl.Int32,
                                                    "confidence": pl.Float64, "detector": pl.Utf8,
                                                    "is_primary": pl.Boolean})
    vcols = ["family", "selected", "passed", "control", "control_passed", "ablation_tested", "ablation_off"]
    frames["validation"] = pl.DataFrame([{c: r.get(c) for c in vcols} for r in vals.values()],
                                        schema={c: (pl.Utf8 if c == "family" else pl.Int32) for c in vcols})
    toks = ctx.corpus.tokens.numpy()
    pieces = _Pieces(ctx.model.tokenizer)
    live = np.nonzero(fc > 0)[0]
    ex_schema = {"feature": pl.Int32, "rank": pl.Int32, "seq": pl.Int32, "pos": pl.Int32, "act": pl.Float64,
                 "context": pl.Utf8, "tokens": pl.List(pl.Utf8), "acts": pl.List(pl.Float32)}
    win = lambda w: None if w is None else w.float().numpy()  # noqa: E731
    frames["examples"] = pl.DataFrame(_example_rows(pieces, toks, st.top_acts.numpy(), st.top_seq.numpy(),
                                                    st.top_pos.numpy(), win(st.top_win), live), schema=ex_schema)
    if st.sample_acts is not None:
        frames["activation_samples"] = pl.DataFrame(
            _example_rows(pieces, toks, st.sample_acts.numpy(), st.sample_seq.numpy(), st.sample_pos.numpy(),
                          win(st.sample_win), live), schema=ex_schema)
    if st.random_seq is not None:
        rc = []
        for s_, p_, a_ in zip(st.random_seq.tolist(), st.random_pos.tolist(), st.random_active):
            c, words, _ = _window(pieces, toks[s_], p_)
            rc.append({"seq": s_, "pos": p_, "context": c, "tokens": words, "active": a_})
        frames["random_contexts"] = pl.DataFrame(rc, schema={"seq": pl.Int32, "pos": pl.Int32, "context": pl.Utf8,
                                                             "tokens": pl.List(pl.Utf8),
                                                             "active": pl.List(pl.Int32)})
    if st.hist is not None:
        from famfind.activations import HIST_EDGES

        e = [0.0] + HIST_EDGES.tolist() + [float("inf")]
        f_idx, b_idx = np.nonzero(st.hist.numpy())
        frames["activation_histogram"] = pl.DataFrame({
            "feature": f_idx.astype(np.int32), "bin": b_idx.astype(np.int32),
            "lo": np.array(e)[b_idx], "hi": np.array(e)[b_idx + 1], "count": st.hist.numpy()[f_idx, b_idx]})
    for name, dfs in extra.items():
        frames[name] = pl.concat(dfs, how="diagonal_relaxed")
    return frames


def write_scan(db_path: str | Path, result) -> int:
    """Store a scan in one transaction; returns its ``scan_id``.

    On any error the transaction is rolled back (and a database file this call created is
    removed), so no partial rows remain. Raises ``FamfindError`` naming the file.
    """
    p = Path(db_path)
    existed = p.exists()
    frames = scan_frames(result)  # everything computed before the database is touched
    con = connect(p)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(SCHEMA)
        scan_id = con.execute("SELECT coalesce(max(scan_id), 0) + 1 FROM scans").fetchall()[0][0]
        for name, df in frames.items():
            df = df.with_columns(pl.lit(scan_id, dtype=pl.Int32).alias("scan_id")).select(
                ["scan_id", *[c for c in df.columns if c != "scan_id"]])
            con.register("_famfind_rows", df)
            if name in CORE_TABLES:
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _famfind_rows")
            else:
                con.execute(f"CREATE TABLE IF NOT EXISTS {name} AS SELECT * FROM _famfind_rows LIMIT 0")
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _famfind_rows")
            con.unregister("_famfind_rows")
        if "clusters" in frames or table_exists(con, "clusters"):
            con.execute(CROSSTAB_VIEW)
        con.execute("COMMIT")
        return int(scan_id)
    except BaseException as e:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        con.close()
        if not existed:
            for q in (p, p.with_name(p.name + ".wal")):
                q.unlink(missing_ok=True)
        if isinstance(e, duckdb.Error):
            raise FamfindError(p, f"could not write the scan ({str(e).splitlines()[0][:200]})") from None
        raise
    finally:
        try:
            con.close()
        except duckdb.Error:
            pass


def resolve_scan_id(con, db_path, scan_id: int | None) -> int:
    """``scan_id`` if the database holds it, else (``None``) the latest scan; raises
    ``FamfindError`` naming ``db_path`` otherwise."""
    sid = scan_id if scan_id is not None else latest_scan_id(con)
    if not con.execute("SELECT count(*) FROM scans WHERE scan_id = ?", [sid]).fetchone()[0]:
        raise FamfindError(db_path, f"no scan with scan_id {sid}")
    return sid


def latest_scan_id(con) -> int:
    try:
        row = con.execute("SELECT max(scan_id) FROM scans").fetchall()[0]
    except duckdb.CatalogException:
        row = (None,)
    if row[0] is None:
        raise FamfindError("database", "holds no scans")
    return int(row[0])
