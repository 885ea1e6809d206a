"""The notebook API (``famfind.scan``, ``famfind.open``) and ``famfind export --parquet``: the
README's example runs; a scan's in-memory tables equal what is stored and exported."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from cli_util import check
from famfind.cli import app
from famfind.errors import FamfindError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_notebook_example_runs(tmp_path, monkeypatch):
    from famfind.corpus import default_sae

    if not (default_sae(1) / "cfg.json").exists():
        pytest.skip("embedded default artefacts are not built")
    section = README.read_text().split("## Notebook API and exports", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    res, stored = env["res"], env["stored"]
    assert res["families"].height > 0 and set(res["families"]["family"]) == {"induction"}
    assert stored.id == env["scan_id"] and (tmp_path / "notebook.duckdb").exists()


@pytest.fixture()
def stored(planted_scan):
    import famfind
    from famfind.api import ScanTables

    result, db, sid = planted_scan
    with famfind.open(db) as d:
        yield ScanTables(result), d, sid


def test_scan_tables_equal_the_stored_scan(stored):
    mem, db, sid = stored
    s = db.scan(sid)
    assert db.scan().id == db.scans["scan_id"].max()
    assert {"families", "examples", "features", "validation", "scans"} <= set(mem.names)
    assert set(s.names) == set(mem.names)
    for t in ("families", "examples", "features", "validation", "head_attribution", "activation_samples"):
        assert s[t].equals(mem[t]), t
    assert s.families.equals(s["families"]) and "families" in s
    with pytest.raises(KeyError, match="no table 'nope'"):
        s["nope"]
    with pytest.raises(FamfindError, match="no scan with scan_id 99"):
        db.scan(99)
    n = db.sql("SELECT count(*) AS n FROM families WHERE scan_id = ?", sid)["n"][0]
    assert n == mem["families"].height > 0


def test_to_duckdb_stores_what_the_cli_stores(stored, tmp_path):
    import famfind

    mem, db, sid = stored
    new = tmp_path / "nb.duckdb"
    assert mem.to_duckdb(new) == 1 and mem.to_duckdb(new) == 2
    with famfind.open(new) as d:
        for t in ("families", "examples", "detector_runs"):
            a, b = d.scan(2)[t], db.scan(sid)[t]
            if t == "detector_runs":
                a, b = a.drop("seconds"), b.drop("seconds")
            assert a.equals(b), t


def test_open_refuses_a_missing_database(tmp_path):
    import famfind

    with pytest.raises(FamfindError, match="database not found"):
        famfind.open(tmp_path / "none.duckdb")


def test_export_parquet_writes_every_table_and_its_schema(planted_scan, tmp_path):
    _, db, sid = planted_scan
    out = tmp_path / "exp"
    r = CliRunner().invoke(app, ["export", "--db", str(db), "--parquet", str(out), "--scan-id", str(sid)])
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [t for (t,) in con.execute("SELECT DISTINCT table_name FROM information_schema.columns "
                                            "WHERE column_name = 'scan_id'").fetchall()
                  if t != "cluster_family_crosstab" and con.execute(f'SELECT count(*) FROM "{t}" WHERE scan_id = ?',
                                                                    [sid]).fetchall()[0][0]]
        assert sorted(p.stem for p in out.glob("*.parquet")) == sorted(tables) and "families" in tables
        for t in tables:
            want = con.sql(f'SELECT * FROM "{t}" WHERE scan_id = ?', params=[sid]).pl()
            got = pl.read_parquet(out / f"{t}.parquet")
            assert got.columns == want.columns and got.height == want.height, t
            assert got.equals(want.cast(got.schema)), t  # COPY keeps the SELECT's row order
    finally:
        con.close()
    schema = (out / "SCHEMA.md").read_text()
    for t in tables:
        assert f"## `{t}.parquet`" in schema
    assert "| `family` | VARCHAR | family name |" in schema and "(undeclared)" not in schema
    check(CliRunner().invoke(app, ["export", "--db", str(db), "--parquet", str(out)]), 1, str(out), "not an empty folder")
    check(CliRunner().invoke(app, ["export", "--db", str(tmp_path / "no.duckdb"), "--parquet", str(tmp_path / "e")]),
          1, "no.duckdb", "database not found")
    assert not (tmp_path / "e").exists()
