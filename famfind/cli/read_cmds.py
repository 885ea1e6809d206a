"""The commands that read: ``famfind sql``, ``report``, ``feature``, ``heuristics list``,
``inspect``, ``export`` and ``tables``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from famfind.cli.app import DbOpt, HookOpt, _line, app, guarded, heur_app
from famfind.errors import FamfindError


@app.command()
@guarded
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run, or - to read it from stdin.")],
    db: DbOpt = Path("famfind.duckdb"),
    as_json: Annotated[bool, typer.Option("--json", help="Output a JSON array of objects.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Output CSV.")] = False,
):
    """Query the scan tables (read-only), like `sqlite-utils query`.

    Example: famfind sql "SELECT family, count(*) FROM families GROUP BY family"
    """
    import duckdb

    from famfind.db import connect

    if as_json and as_csv:
        _line("famfind: usage error: --json and --csv are exclusive")
        raise typer.Exit(2)
    q = sys.stdin.read() if query == "-" else query
    con = connect(db, read_only=True)
    try:
        try:
            rel = con.sql(q)
        except duckdb.Error as e:
            raise FamfindError(db, f"SQL error: {str(e).splitlines()[0]}") from None
        if rel is None:
            return
        cols, rows = rel.columns, rel.fetchall()
    finally:
        con.close()
    if as_json:
        typer.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1))
    elif as_csv:
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    else:
        from rich.table import Table
        from rich.text import Text

        t = Table()  # stored text (and column names) printed literally, never as markup
        for c in cols:
            t.add_column(Text(c))
        for r in rows:
            t.add_row(*[Text("NULL" if v is None else str(v)) for v in r])
        Console().print(t)


@app.command()
@guarded
def report(
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to report (default: the latest).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML report here.")] = None,
):
    """Print the terminal report of a stored scan (and, with --html, write the HTML one).

    Example: famfind report --db famfind.duckdb --scan-id 1 --html report.html
    """
    from famfind.db import connect, resolve_scan_id
    from famfind.reports.terminal import render

    con = connect(db, read_only=True)
    try:
        sid = resolve_scan_id(con, db, scan_id)
        render(con, sid, Console())
        if html is not None:
            from famfind.reports.html import render_html

            try:
                written = render_html(con, sid, html)
            except OSError as e:
                raise FamfindError(html, f"cannot write the HTML report ({e.strerror})") from None
            typer.echo(f"famfind: wrote {', '.join(map(str, written))}", err=True)
    finally:
        con.close()


@app.command()
@guarded
def feature(
    sae: Annotated[str, typer.Argument(help="The SAE: its name (blocks.1.attn.hook_z) or its layer (1).")],
    feature: Annotated[int, typer.Argument(help="The feature index.", min=0)],
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to read (default: the latest).")] = None,
):
    """One feature's page: mechanism record and causal tests, families, head attribution, DFA by
    source on its top examples, boosted and suppressed tokens, top contexts.

    Example: famfind feature 1 84 --db famfind.duckdb
    """
    from famfind.db import connect, resolve_scan_id
    from famfind.reports.feature import render_feature

    con = connect(db, read_only=True)
    try:
        render_feature(con, resolve_scan_id(con, db, scan_id), sae, feature, Console())
    finally:
        con.close()


@heur_app.command("list")
@guarded
def heuristics_list(
    plugin: Annotated[Optional[list[Path]], typer.Option(help="Also load this local plugin file.")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(help="Show these ids as disabled.")] = None,
):
    """List installed detectors: id, version, needs, what they produce and require (typed
    outputs), their tables, origin, enabled.

    Example: famfind heuristics list --plugin my_detector.py
    """
    from rich.table import Table
    from rich.text import Text

    from famfind.registry import default_registry

    reg = default_registry(plugin or ())
    t = Table()
    t.add_column("id", no_wrap=True)
    for c in ("version", "needs", "produces", "requires", "tables"):
        t.add_column(c)
    t.add_column("origin", overflow="fold")
    t.add_column("enabled")
    t.add_column("description", ratio=1)
    for hid in reg.ids():
        e = reg.get(hid)
        c = e.cls
        t.add_row(hid, c.version, c.needs if c.scope == "sae" else f"{c.needs} (once per model)",
                  c.produces.__name__ if c.produces else "-",
                  ", ".join(r.__name__ for r in c.requires) or "-",
                  ", ".join(x.name for x in (*c.tables, *c.views)) or "-", Text(e.origin),
                  "no" if hid in (skip or ()) else "yes", Text(c.description))
    for e in reg.errors:
        t.add_row("?", "-", "-", "-", "-", "-", Text(e.origin), Text("failed to load", style="red"), Text(e.error))
    Console().print(t)


@app.command()
@guarded
def inspect(
    sae: Annotated[list[str], typer.Argument(help="SAE paths or folders of SAE folders, as `famfind scan` takes.")],
    hook: HookOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Output a JSON array of objects.")] = False,
):
    """Print what famfind detects in SAEs: format, architecture, hook, d_in, d_sae, dtype, and the model each names.

    Example: famfind inspect gemma-scope/layer_5/params.npz --hook blocks.5.attn.hook_z
    """
    import json

    from famfind.sae import detect_format, load_sae, sae_paths

    rows = []
    for spec in sae:
        for p in sae_paths(spec):
            fmt = detect_format(p)
            s = load_sae(p, hook)
            rows.append({"path": str(p), "format": fmt, "architecture": s.architecture,
                         "k": s.k, "hook": s.hook_name, "layer": s.layer, "d_in": s.d_in, "d_sae": s.d_sae,
                         "dtype": str(s.W_enc.dtype).removeprefix("torch."), "apply_b_dec_to_input": s.apply_b_dec_to_input,
                         "model": s.model_name})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table as RTable
    from rich.text import Text

    for r in rows:
        t = RTable(title=Text(r["path"]), show_header=False)
        t.add_column("field")
        t.add_column("value", overflow="fold")
        for k, v in list(r.items())[1:]:
            t.add_row(k, Text("-" if v is None else str(v)))
        Console().print(t)


@app.command()
@guarded
def export(
    parquet: Annotated[Path, typer.Option("--parquet", help="Folder to write (new or empty): one <table>.parquet "
                                          "per table of the scan, and SCHEMA.md.")],
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to export (default: the latest).")] = None,
    plugin: Annotated[Optional[list[Path]], typer.Option(help="A local plugin file whose tables' docs to use.")] = None,
):
    """Export every table of one stored scan as Parquet (DuckDB COPY), with the schema beside it.

    Example: famfind export --db famfind.duckdb --parquet scan_1/ --scan-id 1
    """
    from famfind.export import export_parquet

    written = export_parquet(db, parquet, scan_id, tuple(str(p) for p in plugin or ()))
    _line(f"famfind: wrote {len(written)} tables and SCHEMA.md to {parquet}")


@app.command()
@guarded
def tables(
    plugin: Annotated[Optional[list[Path]], typer.Option(help="Also load this local plugin file.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's table section.")] = False,
):
    """List every table famfind writes, from the declarations: core tables and those of each
    installed detector (with its columns, types and docs).

    Example: famfind tables --plugin my_detector.py
    """
    from famfind.registry import default_registry
    from famfind.schema import CORE, LABELS, LLM_CACHE, markdown as md

    reg = default_registry(plugin or ())
    det_tables, views = reg.declared_tables()
    all_tables = [*CORE, *det_tables, LABELS, LLM_CACHE]
    if markdown:
        typer.echo(md(all_tables, views))
        return
    from rich.table import Table as RTable
    from rich.text import Text

    t = RTable()
    for c in ("table", "declared by", "column", "type", "doc"):
        t.add_column(c)
    for tab in all_tables:
        cols = ([] if not tab.per_scan else [("scan_id", "INTEGER", "the scan (scans.scan_id)")]) + \
            [(c.name, c.type, c.doc) for c in tab.columns]
        for i, (n, ty, doc) in enumerate(cols):
            t.add_row(Text(tab.name if i == 0 else ""), Text((reg.table_owner(tab.name) or "core") if i == 0 else ""),
                      Text(n), Text(ty), Text(doc))
    for v in views:
        t.add_row(Text(v.name + " (view)"), Text(reg.table_owner(v.name) or ""), Text("-"), Text("-"), Text(v.doc))
    Console().print(t)

