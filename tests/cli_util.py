"""Helpers shared by the CLI tests: the one-line error contract and scan counts."""

from __future__ import annotations

from pathlib import Path

import duckdb


def n_scans(db) -> int:
    """Scans stored in ``db`` (0 when the file does not exist)."""
    if not Path(db).exists():
        return 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM scans").fetchall()[0][0]
    finally:
        con.close()


def one_line(stderr: str, output: str, *needles: str) -> str:
    """One stderr line (warnings aside) holding each needle, and no traceback; returns it."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "warning:" not in ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in output + stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def check(r, code: int, *needles: str) -> str:
    """A CliRunner result exited ``code`` with :func:`one_line`'s contract."""
    assert r.exit_code == code, (r.exit_code, r.output)
    return one_line(r.stderr, r.output, *needles)
