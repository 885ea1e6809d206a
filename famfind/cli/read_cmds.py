"""The commands that read: ``famfind sql``, ``report``, ``feature``, ``heuristics list``,
``inspect``, ``export`` and ``tables``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table as RTable
from rich.text import Text

from famfind.cli.app import DbOpt, HookOpt, _line, app, guarded, heur_app
from famfind.errors import FamfindError, first_line

WIDE = 240  # columns of `famfind report --wide`: the widest built-in table fits side by side


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
            raise FamfindError(db, f"SQL error: {first_line(e, None)}") from None
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
        from famfind.reports import fit_table

        # printed literally, never as markup; a table wider than the terminal is stacked, not cut
        fit_table(Console(), f"{len(rows):,} row{'s' * (len(rows) != 1)}", cols,
                  [["NULL" if v is None else v for v in r] for r in rows])


@app.command()
@guarded
def report(
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to report (default: the latest).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML report here.")] = None,
    wide: Annotated[bool, typer.Option("--wide", help=f"Print at {WIDE} columns: no table is stacked.")] = False,
    columns: Annotated[Optional[int], typer.Option(min=40, help="Print at this width (default: the terminal's, "
                                                   "80 in a pipe); a table wider than it is stacked in parts.")] = None,
):
    """Print the terminal report of a stored scan (and, with --html, write the HTML one).

    Tables fit the width: one whose columns do not fit side by side is printed in parts, each
    repeating the columns that name a row; no header or number is cut.

    Example: famfind report --db famfind.duckdb --scan-id 1 --html report.html
    Example: famfind report --wide | less -S
    """
    from famfind.db import connect, resolve_scan_id
    from famfind.reports.terminal import render

    con = connect(db, read_only=True)
    try:
        sid = resolve_scan_id(con, db, scan_id)
        render(con, sid, Console(width=WIDE if wide else columns))
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
    """List installed detectors, one block each: id, version, needs, enabled, origin, then what
    they produce and require (typed outputs), their tables and what they do.

    Example: famfind heuristics list --plugin my_detector.py
    """
    from famfind.registry import default_registry

    reg = default_registry(plugin or ())
    console = Console()
    for hid in reg.ids():
        e = reg.get(hid)
        c = e.cls
        line = Text(hid, style="bold")
        line.append(f" {c.version}  needs {c.needs}{' (once per model)' if c.scope == 'model' else ''}  "
                    f"{'disabled (--skip)' if hid in (skip or ()) else 'enabled'}  from ")
        line.append(e.origin)
        console.print(line)
        grid = RTable.grid(padding=(0, 1))  # values wrap in their own column
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for label, value in (("produces", c.produces.__name__ if c.produces else "-"),
                             ("requires", ", ".join(r.__name__ for r in c.requires) or "-"),
                             ("tables", ", ".join(x.name for x in (*c.tables, *c.views)) or "-"),
                             ("what", c.description or "-")):
            grid.add_row(Text(f"  {label}"), Text(value))
        console.print(grid)
    for e in reg.errors:
        line = Text("? ", style="bold")
        line.append(e.origin)
        line.append(" failed to load: ", style="red")
        line.append(e.error)
        console.print(line)


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
    console = Console()

    def head(name: str, label: str, doc: str) -> None:
        line = Text(label, style="bold")
        line.append(f"  (declared by {reg.table_owner(name) or 'core'}): ")
        line.append(doc)
        console.print(line)

    for tab in all_tables:
        head(tab.name, tab.name, tab.doc)
        cols = ([] if not tab.per_scan else [("scan_id", "INTEGER", "the scan (scans.scan_id)")]) + \
            [(c.name, c.type, c.doc) for c in tab.columns]
        grid = RTable.grid(padding=(0, 1))  # the doc wraps in its own column, under itself
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for n, ty, doc in cols:
            grid.add_row(Text(f"  {n} {ty}"), Text(doc))
        console.print(grid)
    for v in views:
        head(v.name, f"{v.name} (view)", v.doc)


