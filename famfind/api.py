"""The notebook API: ``famfind.scan(...)`` and ``famfind.open(db)``.

``famfind.scan(sae, model=..., corpus=..., **options)`` runs a scan in this process (the
same :func:`famfind.runner.run_scan` as ``famfind scan``; ``options`` are
:class:`famfind.config.ScanConfig` keys) and returns a :class:`ScanTables`: every table of the
scan as a polars DataFrame (``result["families"]``), the typed outputs (``result.result``),
and ``result.to_duckdb(path)`` to store it afterwards. ``famfind.open(db)`` returns a
:class:`Database` whose stored scans give their tables the same way, read lazily (one
``SELECT`` per table asked for), and ``db.sql(query)`` for anything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from famfind.config import ScanConfig
from famfind.db import check_writable, connect, resolve_scan_id, write_frames
from famfind.errors import FamfindError
from famfind.frames import scan_declarations, scan_frames
from famfind.runner import run_scan


class _Tables:
    """Tables by name (``t["families"]``, ``t.families``): polars DataFrames."""

    names: list[str]

    def __getitem__(self, name: str) -> pl.DataFrame:
        return self.table(name)

    def __getattr__(self, name: str) -> pl.DataFrame:
        if name.startswith("_") or name not in self.names:
            raise AttributeError(name)
        return self.table(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __dir__(self):
        return [*super().__dir__(), *self.names]


class ScanTables(_Tables):
    """A scan run in this process: ``names`` (its tables), ``table(name)`` / ``[name]`` (a
    polars DataFrame, without ``scan_id``), ``result`` (the
    :class:`famfind.runner.ScanResult`: typed outputs, ``result.output(T, layer)``), and
    :meth:`to_duckdb`. Tables are built once, on first access."""

    def __init__(self, result):
        self.result = result
        self._frames: dict[str, pl.DataFrame] | None = None

    @property
    def frames(self) -> dict[str, pl.DataFrame]:
        if self._frames is None:
            order = {t.name: [c.name for c in t.columns] for t in scan_declarations(self.result)[0]}
            self._frames = {n: df.select([c for c in order.get(n, []) if c in df.columns]
                                         + [c for c in df.columns if c not in order.get(n, [])])
                            for n, df in scan_frames(self.result).items()}  # columns in the stored order
        return self._frames

    @property
    def names(self) -> list[str]:
        """The tables holding rows of this scan (``table`` also gives the empty ones)."""
        return sorted(n for n, df in self.frames.items() if df.height)

    def table(self, name: str) -> pl.DataFrame:
        """Table ``name``; ``KeyError`` naming the tables there are."""
        if name not in self.frames:
            raise KeyError(f"no table {name!r}; this scan has {', '.join(self.names)}")
        return self.frames[name]

    def to_duckdb(self, path: str | Path, lock_timeout: float = 0.0) -> int:
        """Store the scan in the DuckDB file ``path`` (created if new) in one transaction,
        exactly as ``famfind scan --db path`` does; returns its ``scan_id``. Raises
        ``FamfindError`` naming the file."""
        check_writable(path)
        tables, views = scan_declarations(self.result)
        return write_frames(path, self.frames, tables, views, lock_timeout)

    def __repr__(self) -> str:
        fams = self.frames.get("families")
        n = 0 if fams is None else fams.height
        return f"<famfind scan of {len(self.result.saes)} SAE(s): {n} family rows, tables {', '.join(self.names)}>"


class StoredScan(_Tables):
    """One scan stored in a :class:`Database`: ``id``, ``names`` (its tables: every table
    with a ``scan_id`` column that holds rows of it), ``table(name)`` / ``[name]`` (read
    when asked, without ``scan_id``)."""

    def __init__(self, db: "Database", scan_id: int):
        self.db, self.id = db, scan_id

    @property
    def names(self) -> list[str]:
        return [t for t in self.db._scan_tables()
                if self.db._cur().execute(f'SELECT 1 FROM "{t}" WHERE scan_id = ? LIMIT 1', [self.id]).fetchall()]

    def table(self, name: str) -> pl.DataFrame:
        """Table ``name``'s rows of this scan; ``KeyError`` naming the tables there are."""
        if name not in self.db._scan_tables():
            raise KeyError(f"no table {name!r} with scans in {self.db.path}; there are "
                           f"{', '.join(self.db._scan_tables())}")
        return self.db._cur().sql(f'SELECT * EXCLUDE (scan_id) FROM "{name}" WHERE scan_id = ?', params=[self.id]).pl()

    def __repr__(self) -> str:
        return f"<famfind scan {self.id} in {self.db.path}>"


class Database:
    """A famfind DuckDB file opened read-only: ``scans`` (one row per scan),
    ``scan(scan_id=None)`` (a :class:`StoredScan`; default the latest), ``sql(query,
    *params)`` (any read-only query, as a polars DataFrame), ``close()``; also a context
    manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FamfindError(self.path, "database not found")
        self._con = connect(self.path, read_only=True)

    def _cur(self):
        """A cursor of its own per statement: DuckDB 2 refuses a statement on a connection
        whose previous result was not read to the end."""
        return self._con.cursor()

    def _scan_tables(self) -> list[str]:
        return [r[0] for r in self._cur().execute(
            "SELECT DISTINCT table_name FROM information_schema.columns WHERE column_name = 'scan_id' "
            "AND table_name IN (SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE') "
            "ORDER BY table_name").fetchall()]

    @property
    def scans(self) -> pl.DataFrame:
        return self._cur().sql("SELECT * FROM scans ORDER BY scan_id").pl()

    def scan(self, scan_id: int | None = None) -> StoredScan:
        """Scan ``scan_id`` (default: the latest); ``FamfindError`` naming the file when
        there is none."""
        return StoredScan(self, resolve_scan_id(self._cur(), self.path, scan_id))

    def sql(self, query: str, *params: Any) -> pl.DataFrame:
        return self._cur().sql(query, params=list(params) or None).pl()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<famfind database {self.path}>"


def scan(sae: str | Path | list | tuple | None = None, model: str | Path | None = None,
         corpus: str | Path | None = None, *, progress: bool = False, **options: Any) -> ScanTables:
    """Run a scan in this process and return its tables (:class:`ScanTables`).

    ``sae``: one SAE path or folder, or a list (default: the embedded default's SAEs);
    ``model``, ``corpus``: as ``famfind scan --model/--corpus``; ``options``: any
    :class:`famfind.config.ScanConfig` key (``max_tokens=100_000``, ``device="cuda"``,
    ``select=["induction_selection"]``, ``detector_options={"clusters": {"k_max": 10}}``).
    ``progress``: rich progress bars on stderr. Raises ``FamfindError`` for bad input, with
    the same one-line messages as the CLI.
    """
    saes = () if sae is None else tuple(str(s) for s in sae) if isinstance(sae, (list, tuple)) else (str(sae),)
    cfg = ScanConfig.from_dict({**options, "sae": saes, "model": None if model is None else str(model),
                                "corpus": None if corpus is None else str(corpus)})
    if not progress:
        return ScanTables(run_scan(cfg))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
        def factory(desc, total):
            task = bar.add_task(desc, total=total)
            return lambda n: bar.update(task, completed=n)
        return ScanTables(run_scan(cfg, progress_factory=factory))


def open(db: str | Path) -> Database:  # noqa: A001 - famfind.open(db), by design
    """Open a famfind DuckDB file read-only (:class:`Database`); ``FamfindError`` naming the
    file when it does not exist or is not a famfind database."""
    return Database(db)
