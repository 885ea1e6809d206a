"""``famfind export``: one stored scan's tables as Parquet files, with their schema beside them."""

from __future__ import annotations

from pathlib import Path

from famfind.errors import FamfindError


def _docs(plugins=()) -> dict[str, tuple[str, dict[str, str]]]:
    """Table name -> (its doc, column -> doc), from the declarations (core, installed and
    ``plugins`` detectors, labels)."""
    from famfind.registry import default_registry
    from famfind.schema import CORE, LABELS, LLM_CACHE

    det_tables, _ = default_registry(plugins).declared_tables()
    out = {}
    for t in (*CORE, *det_tables, LABELS, LLM_CACHE):
        out[t.name] = (t.doc, {"scan_id": "the scan (scans.scan_id)", **{c.name: c.doc for c in t.columns}})
    return out


def export_parquet(db_path: str | Path, out_dir: str | Path, scan_id: int | None = None,
                   plugins=()) -> list[Path]:
    """Write every table of scan ``scan_id`` (default: the latest) stored in ``db_path`` to
    ``out_dir/<table>.parquet`` (DuckDB ``COPY (SELECT * FROM t WHERE scan_id = ?)``, zstd;
    tables that hold no row of the scan are left out) and ``out_dir/SCHEMA.md``: per table,
    its rows and each column's DuckDB type and doc (from the declarations; a column no
    installed detector declares says so). Returns the Parquet paths.

    Raises ``FamfindError`` naming the database when it is missing or holds no such scan,
    or naming ``out_dir`` when it exists and is not an empty folder, or cannot be made."""
    from famfind.db import connect, resolve_scan_id

    db_path, out = Path(db_path), Path(out_dir)
    if not db_path.exists():
        raise FamfindError(db_path, "database not found")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FamfindError(out, "exists and is not an empty folder (exports never overwrite)")
    con = connect(db_path, read_only=True)
    try:
        sid = resolve_scan_id(con, db_path, scan_id)
        tables = [r[0] for r in con.execute(
            "SELECT DISTINCT c.table_name FROM information_schema.columns c JOIN information_schema.tables t "
            "USING (table_name) WHERE c.column_name = 'scan_id' AND t.table_type = 'BASE TABLE' "
            "ORDER BY c.table_name").fetchall()]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}" WHERE scan_id = ?', [sid]).fetchall()[0][0] for t in tables}
        tables = [t for t in tables if counts[t]]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FamfindError(out, f"cannot make the folder ({e.strerror})") from None
        docs = _docs(plugins)
        lines = [f"# famfind scan {sid} from {db_path.name}", "",
                 f"One Parquet file per table (rows of scan {sid}; DuckDB `COPY`). Columns, DuckDB types and docs:", ""]
        written = []
        for t in tables:
            path = out / f"{t}.parquet"
            con.execute(f"COPY (SELECT * FROM \"{t}\" WHERE scan_id = {int(sid)}) TO '{_sql_str(path)}' "
                        "(FORMAT parquet, COMPRESSION zstd)")
            written.append(path)
            doc, cols = docs.get(t, ("(not declared by an installed detector)", {}))
            lines += [f"## `{t}.parquet`: {counts[t]:,} rows", "", doc, "", "| column | type | doc |", "|---|---|---|"]
            for name, typ in con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                         "WHERE table_name = ? ORDER BY ordinal_position", [t]).fetchall():
                lines.append(f"| `{name}` | {typ} | {cols.get(name, '(undeclared)')} |")
            lines.append("")
        (out / "SCHEMA.md").write_text("\n".join(lines), encoding="utf-8")
        return written
    finally:
        con.close()


def _sql_str(p: Path) -> str:
    return str(p).replace("'", "''")
