"""The DuckDB store: one row per scan in ``scans``, everything else keyed by ``scan_id``.

Tables are created and extended from their declarations (:mod:`famfind.schema` for the core
tables, each detector's ``tables`` for its own): a declared column an older file lacks is
added, so a detector version that adds a column writes into an older database. The file's
``schema_version`` table records which numbered migration (:data:`MIGRATIONS`) it is at; a
file from an older famfind is upgraded in one transaction when it is opened, and one from a
newer famfind is refused. A scan is written in one transaction: a failed or interrupted
write leaves no rows. ``famfind tables`` lists every declared table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

import famfind
from famfind.errors import DatabaseLocked, FamfindError, Interrupted
from famfind.schema import CORE, SCANS, Table, View

CORE_BY_NAME = {t.name: t for t in CORE}

DEFAULT_DB = "famfind.duckdb"
SCHEMA_VERSION = 3  # of the tables famfind writes; see MIGRATIONS

SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP,
  famfind_version VARCHAR)"""


def _v2(con) -> None:
    """1 -> 2: ``detector_runs.output_type`` (typed detector outputs); built-in tables whose
    integer columns were BIGINT (inferred from frames) take their declared INTEGER type; the
    column additions the first release made ad hoc."""
    con.execute("ALTER TABLE detector_runs ADD COLUMN IF NOT EXISTS output_type VARCHAR")
    con.execute("ALTER TABLE families ADD COLUMN IF NOT EXISTS is_primary BOOLEAN")
    for c, t in (("tokens", "VARCHAR[]"), ("acts", "FLOAT[]")):
        con.execute(f"ALTER TABLE examples ADD COLUMN IF NOT EXISTS {c} {t}")
    for table, cols in (("cluster_sweep", ("k",)), ("feature_prefix_curve", ("feature", "prefix_len")),
                        ("head_prefix_curve", ("layer", "head", "prefix_len")),
                        ("head_successor", ("layer", "head", "pairs"))):
        if table_exists(con, table):
            for c in cols:
                con.execute(f"ALTER TABLE {table} ALTER COLUMN {c} TYPE INTEGER")


PER_SAE_CORE = ("features", "detections", "families", "validation", "examples", "activation_samples",
                "random_contexts", "activation_histogram")


def _v3(con) -> None:
    """2 -> 3: whole-model scans. Every per-feature table gains ``sae`` and ``layer`` (old rows:
    the scan's one SAE, named by its hook); ``detector_runs``, ``heads`` and ``labels`` gain
    ``sae``; every detector table gains ``sae`` (each was written by a per-SAE detector);
    ``scans.n_saes``; a ``saes`` table with one row per old scan's SAE."""
    from famfind.schema import SAES

    con.execute("ALTER TABLE scans ADD COLUMN IF NOT EXISTS n_saes INTEGER")
    con.execute("UPDATE scans SET n_saes = 1")
    key = "(SELECT s.hook_name FROM scans s WHERE s.scan_id = t.scan_id)"
    lyr = "(SELECT s.layer FROM scans s WHERE s.scan_id = t.scan_id)"
    names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                       "WHERE table_type = 'BASE TABLE'").fetchall()]
    for name in names:
        if name in ("scans", "llm_cache", "schema_version", "saes"):
            continue
        cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                          [name]).fetchall()}
        if "scan_id" not in cols:
            continue
        con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS sae VARCHAR")
        sets = [f"sae = {key}"]
        if name in PER_SAE_CORE:
            con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS layer INTEGER")
            sets.append(f"layer = {lyr}")
        con.execute(f"UPDATE {name} AS t SET {', '.join(sets)}")
    con.execute(SAES.ddl())
    con.execute("""INSERT INTO saes (scan_id, sae, path, sha256, hook_name, layer, architecture, d_in, d_sae, l0,
                   dead_fraction, n_tokens) SELECT scan_id, hook_name, sae_path, sae_sha256, hook_name, layer,
                   architecture, d_in, d_sae, l0, dead_fraction, n_tokens FROM scans""")


MIGRATIONS = {2: _v2, 3: _v3}  # version -> the step that brings a database from version - 1 to it

def table_exists(con, name: str) -> bool:
    """Does the open DuckDB connection hold a table or view called ``name``?"""
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [name]).fetchall()[0][0])


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a famfind DuckDB file, upgraded to :data:`SCHEMA_VERSION` first if an older famfind
    wrote it. Raises ``FamfindError`` naming the file if it cannot be opened, was written by a
    newer famfind, or (``read_only``) does not exist."""
    p = Path(path)
    if read_only and not p.exists():
        raise FamfindError(p, "database not found (run `famfind scan` first, or pass --db)")
    con = _open(p, read_only)
    try:
        version = schema_version(con)
        _refuse_newer(p, version)
        if 0 < version < SCHEMA_VERSION:
            if read_only:  # upgrade through a writable connection, then reopen read-only
                con.close()
                connect(p).close()
                return _open(p, True)
            with transaction(con, p, f"upgrade it from schema version {version}"):
                migrate(con)
    except BaseException:
        con.close()
        raise
    return con


def _refuse_newer(p: Path, version: int) -> None:
    """Raise ``FamfindError`` naming ``p`` when a newer famfind wrote it (schema ``version``)."""
    if version > SCHEMA_VERSION:
        raise FamfindError(p, f"written by a newer famfind (schema version {version}; this famfind "
                           f"{famfind.__version__} reads up to {SCHEMA_VERSION}): upgrade famfind")


def _open(p: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(p), read_only=read_only)
    except (duckdb.Error, OSError) as e:
        msg = str(e).splitlines()[0]
        if "Could not set lock" in msg:
            pid = re.search(r"\(PID (\d+)\)", msg)
            raise DatabaseLocked(p, "locked by another process" + (f" (PID {pid.group(1)})" if pid else "") +
                                 ": DuckDB allows one writer at a time") from None
        raise FamfindError(p, f"cannot open as a DuckDB database ({msg[:160]})") from None


class transaction:
    """``with transaction(con, path):`` BEGIN ... COMMIT, ROLLBACK on any error (a DuckDB
    error becomes ``FamfindError`` naming ``path``)."""

    def __init__(self, con, path, what: str = "write"):
        self.con, self.path, self.what = con, path, what

    def __enter__(self):
        self.con.execute("BEGIN TRANSACTION")
        return self.con

    def __exit__(self, typ, e, tb):
        if typ is None:
            self.con.execute("COMMIT")
            return False
        try:
            self.con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        if isinstance(e, duckdb.Error):
            raise FamfindError(self.path, f"could not {self.what} ({str(e).splitlines()[0][:200]})") from None
        return False


def schema_version(con) -> int:
    """The file's schema version: from ``schema_version``; 1 for a file of the first release
    (a ``scans`` table, no version table); 0 for an empty file."""
    if table_exists(con, "schema_version"):
        v = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        return int(v or 0)
    return 1 if table_exists(con, "scans") else 0


def migrate(con) -> int:
    """Bring an open database (inside the caller's transaction) to :data:`SCHEMA_VERSION`:
    every migration above its version, in order; an empty file is stamped current. Returns the
    version it started from."""
    start = schema_version(con)
    con.execute(SCHEMA_VERSION_TABLE)
    if start:  # an empty file has nothing to migrate: its tables are created current
        for v in range(start + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[v](con)
    if start < SCHEMA_VERSION:
        con.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                    [SCHEMA_VERSION, datetime.now(timezone.utc).replace(tzinfo=None), famfind.__version__])
    return start


def ensure_table(con, table: Table) -> None:
    """Create ``table`` from its declaration, or add the declared columns an existing one lacks."""
    con.execute(table.ddl())
    have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                      [table.name]).fetchall()}
    for c in table.columns:
        if c.name not in have:
            con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{c.name}" {c.type}')


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


def _example_frame(table, key: dict, pieces: _Pieces, toks: np.ndarray, acts: np.ndarray, seqs: np.ndarray,
                   poss: np.ndarray, wins: np.ndarray | None, live: np.ndarray) -> pl.DataFrame:
    """``table``'s rows (examples or activation samples), one per (live feature, rank) with
    seq >= 0, ordered by feature then rank: the window (offsets :data:`famfind.activations.WINDOW`
    clipped to the sequence) as text with the position's token in [[ ]], its tokens, and the
    feature's activation on each. ``toks [n_seq, T]``; ``acts/seqs/poss [k, d_sae]``; ``wins
    [k, d_sae, 16]``. Vectorised: each distinct token is decoded once, the list columns are
    built from offsets (no Python object per row but the context string)."""
    import pyarrow as pa

    from famfind.activations import WINDOW

    sub = seqs[:, live] >= 0  # [k, n_live]
    f_i, r_i = np.nonzero(sub.T)  # ordered by feature, then rank
    f, r = live[f_i], r_i
    s, p = seqs[r, f].astype(np.int64), poss[r, f].astype(np.int64)
    T, Wn = toks.shape[1], WINDOW[1] - WINDOW[0]
    lo, hi = np.maximum(0, p + WINDOW[0]), np.minimum(T, p + WINDOW[1])
    n, j = hi - lo, p - np.maximum(0, p + WINDOW[0])
    slot = np.arange(Wn)
    valid = slot[None, :] < n[:, None]  # [rows, 16]
    ids = toks[s[:, None], np.minimum(lo[:, None] + slot[None, :], T - 1)][valid]
    uniq, inv = np.unique(ids, return_inverse=True)
    words = np.array([pieces(int(t)) for t in uniq], dtype=object)[inv]  # flat, row after row
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    wl = words.tolist()
    ctx = ["".join(wl[o:o + jj]) + "[[" + wl[o + jj] + "]]" + "".join(wl[o + jj + 1:o + nn])
           for o, jj, nn in zip(offsets[:-1].tolist(), j.tolist(), n.tolist())]
    a0 = -j - WINDOW[0]  # window slot of each row's first token
    cols = {**{k: [v] * len(f) for k, v in key.items()},
            "feature": f.astype(np.int32), "rank": r.astype(np.int32), "seq": s.astype(np.int32),
            "pos": p.astype(np.int32), "act": acts[r, f].astype(np.float64), "context": ctx,
            "tokens": pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets), pa.array(wl, pa.string())))}
    if wins is not None:
        w = wins[r[:, None], f[:, None], np.clip(a0[:, None] + slot[None, :], 0, Wn - 1)][valid]
        cols["acts"] = pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets),
                                                              pa.array(np.round(w.astype(np.float64), 4), pa.float32())))
    else:
        cols["acts"] = [None] * len(f)
    return table.frame(cols)


def _sae_frames(u, tokens: np.ndarray, pieces: _Pieces) -> dict[str, list[pl.DataFrame]]:
    """One SAE's rows (:class:`famfind.scan.SAEScan` ``u``): features, examples, samples,
    random contexts, histogram, and its detectors' rows, each with ``sae`` and ``layer``."""
    st, F, layer = u.ctx.stats, u.sae.d_sae, u.sae.layer
    key = {"sae": u.id, "layer": layer}
    out: dict[str, list[pl.DataFrame]] = {}

    def add(name, df):
        out.setdefault(name, []).append(df)

    fc = st.fire_count.numpy()
    add("features", CORE_BY_NAME["features"].frame({
        "sae": [u.id] * F, "layer": np.full(F, layer, dtype=np.int32),
        "feature": np.arange(F, dtype=np.int32), "fire_count": fc, "density": st.density.numpy(),
        "mean_act": (st.act_sum.numpy() / np.maximum(fc, 1)), "max_act": st.act_max.double().numpy(),
        "dead": st.dead.numpy()}))
    live = np.nonzero(fc > 0)[0]
    for name, acts, seqs, poss, wins in (("examples", st.top_acts, st.top_seq, st.top_pos, st.top_win),
                                          ("activation_samples", st.sample_acts, st.sample_seq, st.sample_pos,
                                           st.sample_win)):
        add(name, _example_frame(CORE_BY_NAME[name], key, pieces, tokens, acts.numpy(), seqs.numpy(), poss.numpy(),
                                 wins.float().numpy(), live))
    rc = []
    for s_, p_, a_ in zip(st.random_seq.tolist(), st.random_pos.tolist(), st.random_active):
        c, words, _ = _window(pieces, tokens[s_], p_)
        rc.append({**key, "seq": s_, "pos": p_, "context": c, "tokens": words, "active": a_})
    add("random_contexts", CORE_BY_NAME["random_contexts"].frame(rc))
    e = [0.0] + st.hist_edges.tolist() + [float("inf")]
    f_idx, b_idx = np.nonzero(st.hist.numpy())
    add("activation_histogram", CORE_BY_NAME["activation_histogram"].frame({
        "sae": [u.id] * len(f_idx), "layer": np.full(len(f_idx), layer, dtype=np.int32),
        "feature": f_idx, "bin": b_idx, "lo": np.array(e)[b_idx], "hi": np.array(e)[b_idx + 1],
        "count": st.hist.numpy()[f_idx, b_idx]}))
    _result_frames(u.results, u.id, layer, add)
    return out


def _result_frames(results: dict, sae: str | None, layer: int | None, add) -> None:
    """Detector rows (heads, detections, families, validation, declared tables) of one unit of
    a scan: an SAE (``sae``, ``layer``; its detectors' own tables gain ``sae``, see
    :func:`famfind.plugins.stored_tables`) or the model detectors (``sae=None``)."""
    heads, dets, fams, vals = [], [], [], {}
    key = {"sae": sae, "layer": layer}
    for hid, res in results.items():
        heads += [{"sae": sae, "layer": h.layer, "head": h.head, "metric": h.metric, "score": h.score}
                  for h in res.head_scores]
        dets += [{**key, "detector": hid, "feature": d.feature, "score": d.score, "passed": d.passed,
                  "evidence": json.dumps(d.evidence)} for d in res.detections]
        fams += [{**key, "family": m.family, "feature": m.feature, "confidence": m.confidence, "detector": hid}
                 for m in res.families]
        for v in res.validation:
            row = vals.setdefault(v.family, {**key, "family": v.family})
            for k, val in vars(v).items():
                if val is not None:
                    row[k] = val
        for name, df in res.tables.items():  # declared and conformed when the detector returned
            add(name, df if sae is None else df.with_columns(pl.lit(sae, dtype=pl.Utf8).alias("sae")))
    add("heads", CORE_BY_NAME["heads"].frame(heads))
    add("detections", CORE_BY_NAME["detections"].frame(dets))
    primary: dict[int, int] = {}  # feature -> its row of highest confidence (ties: family name, then first)
    for i, r in enumerate(fams):
        j = primary.get(r["feature"])
        if j is None or (-r["confidence"], r["family"]) < (-fams[j]["confidence"], fams[j]["family"]):
            primary[r["feature"]] = i
    for i, r in enumerate(fams):
        r["is_primary"] = primary[r["feature"]] == i
    add("families", CORE_BY_NAME["families"].frame(fams))
    vt = CORE_BY_NAME["validation"]
    add("validation", vt.frame([{c.name: r.get(c.name) for c in vt.columns} for r in vals.values()]))


def scan_frames(result) -> dict[str, pl.DataFrame]:
    """All rows of a :class:`famfind.scan.ScanResult` (every SAE's), as DataFrames without
    ``scan_id``."""
    first, cfg, model = result.saes[0], result.model_ctx.config, result.model_ctx.model
    corpus = result.model_ctx.corpus
    st0 = first.ctx.stats
    frames: dict[str, list[pl.DataFrame]] = {}

    def add(name, df):
        frames.setdefault(name, []).append(df)

    add("scans", SCANS.frame([{
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None), "famfind_version": famfind.__version__,
        "sae_path": str(Path(first.path).resolve()), "sae_sha256": first.sha256,
        "architecture": first.sae.architecture, "d_in": first.sae.d_in, "d_sae": first.sae.d_sae,
        "model": model.cfg.name, "hook_name": first.sae.hook_name, "layer": first.sae.layer,
        "corpus": corpus.source, "n_tokens": st0.n_tokens, "seq_len": cfg.seq_len, "l0": st0.l0,
        "dead_fraction": float(st0.dead.float().mean()), "n_saes": len(result.saes), "seconds": result.seconds,
        "config": json.dumps(cfg.to_dict()),
    }]))
    add("saes", CORE_BY_NAME["saes"].frame([{
        "sae": u.id, "path": str(Path(u.path).resolve()), "sha256": u.sha256, "hook_name": u.sae.hook_name,
        "layer": u.sae.layer, "architecture": u.sae.architecture, "d_in": u.sae.d_in, "d_sae": u.sae.d_sae,
        "l0": u.ctx.stats.l0, "dead_fraction": float(u.ctx.stats.dead.float().mean()),
        "n_tokens": u.ctx.stats.n_tokens} for u in result.saes]))
    outputs = {("", h): r.output for h, r in result.model_results.items()}
    outputs.update({(u.id, h): r.output for u in result.saes for h, r in u.results.items()})
    add("detector_runs", CORE_BY_NAME["detector_runs"].frame(
        [{"sae": r.sae or None, "detector": r.id, "version": r.version, "origin": r.origin, "status": r.status,
          "error": r.error, "seconds": r.seconds, "output_type": r.output_type,
          "summary": json.dumps(o.summary() if (o := outputs.get((r.sae, r.id))) is not None else {})}
         for r in result.runs]))
    _result_frames(result.model_results, None, None, add)
    toks = corpus.tokens.numpy()
    pieces = _Pieces(model.tokenizer)
    for u in result.saes:
        for name, dfs in _sae_frames(u, toks, pieces).items():
            frames.setdefault(name, []).extend(dfs)
    return {name: pl.concat(dfs, how="diagonal_relaxed") if len(dfs) > 1 else dfs[0] for name, dfs in frames.items()}


def write_scan(db_path: str | Path, result, lock_timeout: float = 0.0) -> int:
    """Store a scan in one transaction; returns its ``scan_id``.

    Everything is computed (:func:`scan_frames`) before the database is touched; then
    :func:`write_frames` stores it. Raises ``FamfindError`` naming the file,
    :class:`~famfind.errors.Interrupted` on Ctrl-C (saying whether the scan was stored).
    """
    tables, views = scan_declarations(result)
    return write_frames(db_path, scan_frames(result), tables, views, lock_timeout)


def scan_declarations(result) -> tuple[list[Table], list[View]]:
    """The tables (core, and those of the detectors that ran, as stored) and views a scan
    writes."""
    from famfind.plugins import stored_tables

    ran = {r.id: result.registry.get(r.id).cls for r in result.runs}.values()
    tables = {t.name: t for t in (*CORE, *(t for c in ran for t in stored_tables(c)))}
    return list(tables.values()), list({v.name: v for c in ran for v in c.views}.values())


def check_writable(db_path: str | Path) -> None:
    """Fail fast, before a scan computes anything, when its result could not be stored: the
    database is locked by another writer, is not a DuckDB file, was written by a newer
    famfind, or (a new file) its folder does not exist or cannot be written. Raises
    ``FamfindError`` (:class:`~famfind.errors.DatabaseLocked` for a lock) naming the file."""
    p = Path(db_path)
    if p.exists():
        con = _open(p, False)
        try:
            version = schema_version(con)
        finally:
            con.close()
        _refuse_newer(p, version)
        return
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FamfindError(p, f"folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FamfindError(p, f"folder {parent} is not writable")


def write_frames(db_path: str | Path, frames: dict[str, pl.DataFrame], tables: list[Table], views: list[View],
                 lock_timeout: float = 0.0, save_if_locked: bool = True) -> int:
    """Store one scan's rows (``frames``: table name -> rows without ``scan_id``) in one
    transaction under a new ``scan_id``; returns it.

    The file is upgraded to :data:`SCHEMA_VERSION` and the declared ``tables`` created or
    extended in the same transaction. A new database file is built beside its path and
    appears there only once the scan is committed in it (a killed scan leaves no file at the
    path). While the file is locked by another writer, it retries for ``lock_timeout``
    seconds; then (``save_if_locked``) the rows are saved beside the database
    (:func:`save_pending`) and the ``FamfindError`` says how to import them. Ctrl-C during
    the write is held until the transaction ends: before the commit it rolls back and raises
    :class:`~famfind.errors.Interrupted` ("nothing was written"); after it, ``Interrupted``
    names the stored scan. Any other error rolls back. Raises ``FamfindError`` naming the file.
    """
    p = Path(db_path)
    deadline = time.monotonic() + lock_timeout
    while True:
        try:
            return _write_once(p, frames, tables, views)
        except DatabaseLocked as e:
            if time.monotonic() < deadline:
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            if not save_if_locked:
                raise
            d = save_pending(p, frames, tables, views)
            raise FamfindError(p, f"{e.problem}; still locked after {lock_timeout:g} s, so the scan was saved to "
                               f"{d} (import it with: famfind import {d} --db {p})") from None


@contextmanager
def _sigint_held():
    """Hold Ctrl-C (SIGINT) while a write runs; yields a function that says whether one came.
    Only the main thread can install a handler; elsewhere nothing is held."""
    hits: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    old = signal.signal(signal.SIGINT, lambda sig, frame: hits.append(sig))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, old)


def _temp_path(p: Path, pid: int) -> Path:
    return p.with_name(f".{p.name}.{pid}.famfind-tmp")


def _remove_stale_temps(p: Path) -> None:
    """Remove temp files of scans that were killed while building a new database at ``p``."""
    for q in p.parent.glob(f".{p.name}.*.famfind-tmp"):
        try:
            pid = int(q.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # still running: leave it
        except (ValueError, ProcessLookupError):
            _remove(q)
        except PermissionError:
            pass


def _write_once(p: Path, frames, tables, views) -> int:
    with _sigint_held() as interrupted:
        if p.exists():
            scan_id = _insert(p, frames, tables, views, interrupted)
        else:
            _remove_stale_temps(p)
            tmp = _temp_path(p, os.getpid())
            _remove(tmp)
            try:
                scan_id = _insert(tmp, frames, tables, views, interrupted)
                if interrupted():
                    raise Interrupted("nothing was written")
                try:
                    os.link(tmp, p)  # atomic, and never replaces a database another scan created meanwhile
                except FileExistsError:
                    scan_id = None
                except OSError:  # a file system without hard links
                    if p.exists():
                        scan_id = None
                    else:
                        os.replace(tmp, p)
            finally:
                _remove(tmp)
            if scan_id is None:  # another scan created the file first: add this scan to it
                scan_id = _insert(p, frames, tables, views, interrupted)
        if interrupted():
            raise Interrupted(f"scan {scan_id} was written to {p}")
    return scan_id


def _insert(p: Path, frames, tables, views, interrupted) -> int:
    con = connect(p)
    try:
        with transaction(con, p, "write the scan"):
            migrate(con)
            for t in tables:
                ensure_table(con, t)
            scan_id = con.execute("SELECT coalesce(max(scan_id), 0) + 1 FROM scans").fetchall()[0][0]
            for name, df in frames.items():
                df = df.with_columns(pl.lit(scan_id, dtype=pl.Int32).alias("scan_id"))
                con.register("_famfind_rows", df)
                con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _famfind_rows")
                con.unregister("_famfind_rows")
            for v in views:
                if all(table_exists(con, t) for t in v.needs):
                    con.execute(f"CREATE OR REPLACE VIEW {v.name} AS {v.sql}")
            if interrupted():
                raise Interrupted("nothing was written")
        return int(scan_id)
    finally:
        try:
            con.close()
        except duckdb.Error:
            pass


PENDING_MANIFEST = "famfind_scan.json"


def save_pending(p: Path, frames: dict[str, pl.DataFrame], tables: list[Table], views: list[View]) -> Path:
    """Save a scan that could not be stored in ``p`` beside it, as ``<p>.pending-<time>/``: one
    Parquet file per table and :data:`PENDING_MANIFEST` (the table declarations and views);
    ``famfind import`` (:func:`import_pending`) stores it later. Returns the folder."""
    d = p.with_name(f"{p.name}.pending-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    d.mkdir()
    for name, df in frames.items():
        df.write_parquet(d / f"{name}.parquet")
    manifest = {"famfind_version": famfind.__version__, "schema_version": SCHEMA_VERSION,
                "tables": [{"name": t.name, "doc": t.doc, "per_scan": t.per_scan, "primary_key": t.primary_key,
                            "columns": [[c.name, c.type, c.doc] for c in t.columns]} for t in tables],
                "views": [{"name": v.name, "sql": v.sql, "doc": v.doc, "needs": list(v.needs)} for v in views],
                "frames": sorted(frames)}
    (d / PENDING_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return d


def import_pending(folder: str | Path, db_path: str | Path, lock_timeout: float = 0.0) -> int:
    """Store a scan saved by :func:`save_pending` in ``db_path`` (one transaction, a new
    ``scan_id``); returns it. Raises ``FamfindError`` naming the folder when it is not such
    a save, and as :func:`write_frames` does."""
    from famfind.schema import Column

    d = Path(folder)
    mpath = d / PENDING_MANIFEST
    if not mpath.is_file():
        raise FamfindError(d, f"not a saved famfind scan (no {PENDING_MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
        if m["schema_version"] > SCHEMA_VERSION:
            raise FamfindError(d, f"saved by a newer famfind (schema version {m['schema_version']}): upgrade famfind")
        tables = [Table(t["name"], tuple(Column(*c) for c in t["columns"]), t["doc"], t["per_scan"],
                        t["primary_key"]) for t in m["tables"]]
        views = [View(v["name"], v["sql"], v["doc"], tuple(v["needs"])) for v in m["views"]]
        names = {t.name for t in tables}
        frames = {}
        for name in m["frames"]:
            if name not in names:
                raise FamfindError(d, f"table {name!r} has rows but no declaration in {PENDING_MANIFEST}")
            frames[name] = pl.read_parquet(d / f"{name}.parquet")
    except (KeyError, TypeError, ValueError, OSError, pl.exceptions.PolarsError) as e:
        raise FamfindError(d, f"unreadable saved scan ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return write_frames(db_path, frames, tables, views, lock_timeout, save_if_locked=False)


def _remove(p: Path) -> None:
    for q in (p, p.with_name(p.name + ".wal")):
        q.unlink(missing_ok=True)


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
