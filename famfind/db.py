"""The DuckDB store: one row per scan in ``scans``, everything else keyed by ``scan_id``.

Tables are created and extended from their declarations (:mod:`famfind.schema` for the core
tables, each detector's ``tables`` for its own): a declared column an older file lacks is
added, so a detector version that adds a column writes into an older database. The file's
``schema_version`` table records which numbered migration (:data:`MIGRATIONS`) it is at; a
file from an older famfind is upgraded in one transaction when it is opened, and one from a
newer famfind is refused. A scan is written in one transaction: a failed or interrupted
write leaves no rows (:func:`write_frames`; a scan's rows come from :mod:`famfind.frames`).
``famfind tables`` lists every declared table.
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
import polars as pl

from famfind.errors import DatabaseLocked, FamfindError, Interrupted
from famfind.schema import Table, View
from famfind.version import __version__

DEFAULT_DB = "famfind.duckdb"
SCHEMA_VERSION = 4  # of the tables famfind writes; see MIGRATIONS

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


def _v4(con) -> None:
    """3 -> 4: mechanism families. ``families.test`` and ``validation.test`` say what a family
    tested: older rows are the context families' ``proxy`` tests and every other family's
    ``behaviour`` test."""
    for table in ("families", "validation"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS test VARCHAR")
        con.execute(f"UPDATE {table} SET test = CASE WHEN family IN ('local_context', 'high_level_context') "
                    "THEN 'proxy' ELSE 'behaviour' END WHERE test IS NULL")


MIGRATIONS = {2: _v2, 3: _v3, 4: _v4}  # version -> the step that brings a database from version - 1 to it

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
                           f"{__version__} reads up to {SCHEMA_VERSION}): upgrade famfind")


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
                    [SCHEMA_VERSION, datetime.now(timezone.utc).replace(tzinfo=None), __version__])
    return start


def ensure_table(con, table: Table) -> None:
    """Create ``table`` from its declaration, or add the declared columns an existing one lacks."""
    con.execute(table.ddl())
    have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                      [table.name]).fetchall()}
    for c in table.columns:
        if c.name not in have:
            con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{c.name}" {c.type}')



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
    manifest = {"famfind_version": __version__, "schema_version": SCHEMA_VERSION,
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
