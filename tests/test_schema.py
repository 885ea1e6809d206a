"""One table schema: declarations -> DDL, README and `famfind tables`; schema versions and
migrations (a database written by the first release opens, upgrades and reads the same);
a third-party plugin package installed through the entry-point group."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from famfind.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "db_v1_planted.duckdb.gz"


def test_readme_tables_come_from_the_declarations():
    r = CliRunner().invoke(app, ["tables", "--markdown"])
    assert r.exit_code == 0
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- tables:start -->\n(.*?)\n<!-- tables:end -->", readme, re.S).group(1)
    assert section == r.stdout.rstrip("\n"), "README's table section is stale: paste `famfind tables --markdown`"
    r = CliRunner().invoke(app, ["tables"], env={"COLUMNS": "300"})
    assert r.exit_code == 0 and "activation_histogram" in r.stdout and "head_attribution" in r.stdout


def test_scan_tables_match_their_declarations(planted_scan):
    """Every table a scan wrote has exactly the declared columns and types (plus scan_id)."""
    from famfind.plugins import stored_tables
    from famfind.schema import CORE

    result, db, _ = planted_scan
    decl = {t.name: t for t in CORE}
    for r in result.runs:
        for t in stored_tables(result.registry.get(r.id).cls):
            decl[t.name] = t
    con = duckdb.connect(str(db), read_only=True)
    try:
        for name, t in decl.items():
            cols = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                               "ORDER BY ordinal_position", [name]).fetchall()
            assert cols == [("scan_id", "INTEGER")] + [(c.name, c.type) for c in t.columns], name
        keys = con.execute("SELECT table_name FROM information_schema.table_constraints "
                           "WHERE constraint_type = 'PRIMARY KEY'").fetchall()
        assert keys == [("scans",)]  # scan_id, as in the first release
    finally:
        con.close()


def _snapshot(path: Path, columns: dict[str, list[str]] | None = None) -> dict[str, list]:
    """Every table's rows (as sorted reprs), over ``columns[table]`` when given."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [n for (n,) in con.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        out = {}
        for n in names:
            cols = ", ".join(f'"{c}"' for c in columns[n]) if columns and n in columns else "*"
            out[n] = sorted(map(repr, con.execute(f"SELECT {cols} FROM {n}").fetchall()))
        return out
    finally:
        con.close()


def _columns(path: Path) -> dict[str, list[str]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                           "ORDER BY table_name, ordinal_position").fetchall()
    finally:
        con.close()
    out: dict[str, list[str]] = {}
    for t, c in rows:
        out.setdefault(t, []).append(c)
    return out


def test_first_release_database_upgrades_and_reads_the_same(tmp_path):
    from famfind.db import SCHEMA_VERSION, connect, schema_version

    db = tmp_path / "v1.duckdb"
    db.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    before, cols = _snapshot(db), _columns(db)
    con = duckdb.connect(str(db), read_only=True)
    assert schema_version(con) == 1
    con.close()
    con = connect(db, read_only=True)  # upgrades through a writable connection, then reads
    try:
        assert schema_version(con) == SCHEMA_VERSION
        hook = con.execute("SELECT hook_name FROM scans").fetchall()[0][0]
        # v3: the one SAE of the old scan is named by its hook in every per-SAE row and in saes
        assert con.execute("SELECT DISTINCT sae, layer FROM features").fetchall() == [(hook, 1)]
        assert con.execute("SELECT DISTINCT sae FROM head_attribution").fetchall() == [(hook,)]
        assert con.execute("SELECT sae, d_sae FROM saes").fetchall() == [(hook, 128)]
        assert con.execute("SELECT count(*) FROM detector_runs WHERE sae IS DISTINCT FROM ?", [hook]).fetchall() == [(0,)]
    finally:
        con.close()
    after = _snapshot(db, cols)  # the old columns read the same
    assert set(before) <= set(after)
    for name, rows in before.items():
        assert after[name] == rows, name
    r = CliRunner().invoke(app, ["report", "--db", str(db)])
    assert r.exit_code == 0 and "Family validation" in r.stdout


def test_upgrade_then_a_new_scan_writes_into_it(planted_scan, tmp_path):
    from famfind.frames import write_scan

    result, _, _ = planted_scan
    db = tmp_path / "v1.duckdb"
    db.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    assert write_scan(db, result) == 2
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(DISTINCT scan_id) FROM head_prefix_curve").fetchone()[0] >= 1
    assert con.execute("SELECT data_type FROM information_schema.columns WHERE table_name = 'head_prefix_curve' "
                       "AND column_name = 'layer'").fetchone()[0] == "INTEGER"
    con.close()


def test_newer_database_is_refused(tmp_path):
    from famfind.db import SCHEMA_VERSION

    db = tmp_path / "future.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP, famfind_version VARCHAR)")
    con.execute("INSERT INTO schema_version VALUES (99, now(), '9.9')")
    con.close()
    r = CliRunner().invoke(app, ["sql", "SELECT 1", "--db", str(db)])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"famfind: error: {db}: written by a newer famfind (schema version 99; "
                                             f"this famfind 0.1.0 reads up to {SCHEMA_VERSION}): upgrade famfind"]


def test_a_new_detector_column_extends_an_older_table(tmp_path):
    from famfind.db import ensure_table
    from famfind.schema import Column, Table

    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    v1 = Table("plug", (Column("feature", "INTEGER", "f"),), "doc")
    ensure_table(con, v1)
    con.execute("INSERT INTO plug VALUES (1, 3)")
    ensure_table(con, Table("plug", (*v1.columns, Column("score", "DOUBLE", "new in v2")), "doc"))
    con.execute("INSERT INTO plug BY NAME SELECT 2 AS scan_id, 4 AS feature, 0.5 AS score")
    assert con.execute("SELECT * FROM plug ORDER BY scan_id").fetchall() == [(1, 3, None), (2, 4, 0.5)]
    con.close()


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin package pip-installed into a directory put on the path."""
    site, src = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / "example_plugin"
    shutil.copytree(Path(__file__).parent / "example_plugin", src)  # pip builds in the source tree
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"pip could not install the example plugin: {r.stderr[-500:]}")
    return site


def test_third_party_plugin_package(plugin_site, planted_paths, tmp_path):
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "famfind", *a], capture_output=True, text=True,  # noqa
                                    env=env, cwd=tmp_path)
    r = run("heuristics", "list")
    assert r.returncode == 0 and "induction_tokens" in r.stdout and "famfind-example-plugin" in r.stdout
    r = run("tables")
    assert r.returncode == 0 and "induction_tokens" in r.stdout
    db = tmp_path / "p.duckdb"
    (tmp_path / "seq.toml").write_text("[scan]\nseq_len = 64\n")
    r = run("scan", "--config", str(tmp_path / "seq.toml"), str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--db", str(db), "-q",
            "--select", "induction_tokens", "--skip", "induction_ablation")
    assert r.returncode == 0, r.stderr
    con = duckdb.connect(str(db), read_only=True)
    members = {f for (f,) in con.execute("SELECT feature FROM families WHERE family = 'induction'").fetchall()}
    rows = dict(con.execute("SELECT feature, token FROM induction_tokens").fetchall())
    summary = json.loads(con.execute("SELECT summary FROM detector_runs WHERE detector = 'induction_tokens'")
                         .fetchone()[0])
    con.close()
    assert members and set(rows) == members
    assert all(rows[f] == f + 1 for f in members)  # planted: induction feature f predicts token f + 1
    assert summary == {"n_members": len(members), "n_tokens": len(members)}
