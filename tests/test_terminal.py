"""Terminal output fits the width it is given (issue #27): the default scan's report, ``famfind
tables`` and ``famfind sql`` at 80 and 120 columns (80 is what rich assumes in a pipe): no line
is longer, nothing carries a truncation mark, and hostile stored text is printed literally."""

from __future__ import annotations

import re
import shutil

import duckdb
import pytest
from typer.testing import CliRunner

from famfind.cli import app

HOSTILE = ["[bold red]x[/]", "<script>alert(1)</script>", "\x1b[31mred", "tab\tand\nnewline",
           "a" * 90, "famfind_version_with_a_very_long_name_that_cannot_wrap_anywhere"]


@pytest.fixture(scope="module")
def hostile_db(default_scan, tmp_path_factory):
    from famfind.db import ensure_table
    from famfind.schema import LABELS

    db, sid = default_scan
    d = tmp_path_factory.mktemp("term") / "h.duckdb"
    shutil.copy(db, d)
    con = duckdb.connect(str(d))
    ensure_table(con, LABELS)
    sae = con.execute("SELECT sae FROM saes ORDER BY layer LIMIT 1").fetchone()[0]
    for i, text in enumerate(HOSTILE):
        con.execute("INSERT INTO labels (scan_id, sae, kind, target, label, description, status, score, n_pos, n_neg) "
                    "VALUES (?, ?, 'family', ?, ?, ?, 'ok', 0.75, 10, 10)", [sid, sae, f"fam{i}", text, text * 2])
    con.execute("UPDATE feature_logits SET token_str = ? WHERE rank = 0", [HOSTILE[0] + HOSTILE[2]])
    con.close()
    return d


def compact(out: str) -> str:
    """The output without whitespace and table borders: wrapped and folded cells read whole."""
    return re.sub(r"[\s│┃]", "", out)


def check(out: str, width: int) -> None:
    lines = out.splitlines()
    assert max(len(x) for x in lines) <= width, max(lines, key=len)
    assert "…" not in out  # no header, number or text cut short
    assert "\x1b" not in out  # stored escape codes are not passed to the terminal


@pytest.mark.parametrize("width", [80, 120])
def test_report_fits_the_width_with_hostile_text(hostile_db, width):
    r = CliRunner().invoke(app, ["report", "--db", str(hostile_db)], env={"COLUMNS": str(width)})
    assert r.exit_code == 0, r.output
    check(r.stdout, width)
    assert "[boldred]x[/]" in compact(r.stdout) and "<script>alert(1)</script>" in compact(r.stdout)  # literal
    for title in ("Head scores", "Family validation", "family coverage", "Mechanism families", "LLM labels"):
        assert title in r.stdout, title
    if width == 80:  # the validation table is stacked: its row names repeat, every column is there
        assert "Family validation: behaviour and proxy families" in r.stdout and "(2/2)" in r.stdout
        assert "turned" in r.stdout and "ablation" in r.stdout


def test_report_wide_and_columns(hostile_db):
    r = CliRunner().invoke(app, ["report", "--db", str(hostile_db), "--wide"])
    assert r.exit_code == 0 and "(1/2)" not in r.stdout and "…" not in r.stdout
    r = CliRunner().invoke(app, ["report", "--db", str(hostile_db), "--columns", "100"], env={"COLUMNS": "300"})
    assert r.exit_code == 0
    check(r.stdout, 100)


@pytest.mark.parametrize("width", [80, 120])
def test_tables_and_sql_fit_the_width(hostile_db, width):
    env = {"COLUMNS": str(width)}
    r = CliRunner().invoke(app, ["tables"], env=env)
    assert r.exit_code == 0
    check(r.stdout, width)
    assert "feature_mechanism  (declared by feature_mechanism)" in r.stdout and "famfind_version VARCHAR" in r.stdout
    r = CliRunner().invoke(app, ["sql", "SELECT * FROM labels ORDER BY target", "--db", str(hostile_db)], env=env)
    assert r.exit_code == 0, r.output
    check(r.stdout, width)
    assert "[boldred]x[/]" in compact(r.stdout) and "\\x1b[31mred" in compact(r.stdout)  # shown, not sent
    r = CliRunner().invoke(app, ["heuristics", "list"], env=env)
    assert r.exit_code == 0
    check(r.stdout, width)
