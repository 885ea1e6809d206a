"""Compare two stored scans table by table, row for row (a refactor must not change them).

Every table with a ``scan_id`` column that either scan has rows in is read for each scan
(without ``scan_id``), its rows sorted by every column, and compared: equal, or the number of
rows on each side, the columns that differ and, for float columns, the largest difference.
Columns that record the run rather than the result are left out: wall times (``seconds``),
``created_at``, ``famfind_version``, and what names the machine's paths (``sae_path``, ``path``,
``model``, ``corpus``, ``config``).

Run: ``python benchmarks/compare_scans.py A.duckdb B.duckdb [--scan-a N] [--scan-b N]
[--tolerance 0]``; exit status 1 when a table differs beyond ``--tolerance`` (absolute,
floats only).
"""

from __future__ import annotations

import argparse
import math
import sys

import duckdb

RUN_COLUMNS = {"seconds", "created_at", "famfind_version", "sae_path", "path", "model", "corpus", "config",
               "origin", "version"}


def scan_tables(con) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT DISTINCT table_name FROM information_schema.columns WHERE column_name = 'scan_id' AND table_name IN "
        "(SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE') ORDER BY 1").fetchall()]


def read(con, table: str, scan_id: int) -> tuple[list[str], list[tuple]]:
    cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                      "ORDER BY ordinal_position", [table]).fetchall()]
    keep = [c for c in cols if c != "scan_id" and c not in RUN_COLUMNS]
    sel = ", ".join(f'"{c}"' for c in keep)
    rows = con.execute(f'SELECT {sel} FROM "{table}" WHERE scan_id = ?', [scan_id]).fetchall()
    return keep, sorted(rows, key=lambda r: tuple((v is None, str(v)) for v in r))


def diff(a, b, tol: float) -> float | None:
    """0 when equal; the largest float difference when only floats differ (within or beyond
    ``tol``); None when something other than a float differs."""
    if a == b:
        return 0.0
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(a - b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        ds = [diff(x, y, tol) for x, y in zip(a, b)]
        return None if any(d is None for d in ds) else max(ds, default=0.0)
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--scan-a", type=int, default=None)
    ap.add_argument("--scan-b", type=int, default=None)
    ap.add_argument("--tolerance", type=float, default=0.0)
    args = ap.parse_args()
    ca, cb = duckdb.connect(args.a, read_only=True), duckdb.connect(args.b, read_only=True)
    sa = args.scan_a or ca.execute("SELECT max(scan_id) FROM scans").fetchone()[0]
    sb = args.scan_b or cb.execute("SELECT max(scan_id) FROM scans").fetchone()[0]
    bad = 0
    for t in sorted(set(scan_tables(ca)) | set(scan_tables(cb))):
        if t not in scan_tables(ca) or t not in scan_tables(cb):
            side = args.b if t not in scan_tables(ca) else args.a
            print(f"{t}: only in {side}")
            bad += 1
            continue
        cols_a, ra = read(ca, t, sa)
        cols_b, rb = read(cb, t, sb)
        if cols_a != cols_b:
            print(f"{t}: columns differ: {sorted(set(cols_a) ^ set(cols_b))}")
            bad += 1
            continue
        if len(ra) != len(rb):
            print(f"{t}: {len(ra)} rows vs {len(rb)}")
            bad += 1
            continue
        worst, cols = 0.0, set()
        for x, y in zip(ra, rb):
            for c, u, v in zip(cols_a, x, y):
                d = diff(u, v, args.tolerance)
                if d is None or d > 0:
                    cols.add(c)
                    worst = float("inf") if d is None else max(worst, d)
        if not cols:
            print(f"{t}: {len(ra)} rows equal")
        elif worst <= args.tolerance:
            print(f"{t}: {len(ra)} rows equal within {args.tolerance:g} (max float difference {worst:.3g} in "
                  f"{', '.join(sorted(cols))})")
        else:
            print(f"{t}: {len(ra)} rows, columns differ: {', '.join(sorted(cols))}"
                  + (f" (max float difference {worst:.3g})" if worst != float("inf") else ""))
            bad += 1
    print("equal" if not bad else f"{bad} table(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
