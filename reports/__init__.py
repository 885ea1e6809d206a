"""Report rendering for famfind scans: the terminal report (:mod:`famfind.reports.terminal`)
and the self-contained HTML report (:mod:`famfind.reports.html`, templates beside this file).

The core sections (scan, head scores, validation, coverage, labels) come from the core
tables; each detector that ran adds its own section through its class's
``render_terminal(section)`` / ``html_part(section)``, given a :class:`Section`: the
detector's stored summary and read access to the scan's rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text


@dataclass
class Section:
    """One detector's view of a stored scan, for its report section.

    ``summary``: its typed output's stored serialisation (``detector_runs.summary``);
    ``query(sql)`` / ``rows(sql)``: SQL whose one ``?`` is the scan id (tuples / dicts);
    ``table``/``line``: print to the terminal (stored text is printed literally, never as markup);
    ``per_feature(sql, add)``: ``{feature: card}`` built by ``add(row, card)`` for the HTML cards.
    """

    con: Any
    scan_id: int
    detector: str
    summary: dict
    console: Console | None = None

    def query(self, sql: str) -> list[tuple]:
        return self.con.execute(sql, [self.scan_id]).fetchall()

    def rows(self, sql: str) -> list[dict]:
        cur = self.con.execute(sql, [self.scan_id])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def per_feature(self, sql: str, add: Callable[[dict, dict], None]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for r in self.rows(sql):
            add(r, out.setdefault(r["feature"], {}))
        return out

    def table(self, title: str, columns: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
        t = Table(title=Text(title))
        for c in columns:
            t.add_column(Text(c))
        for r in rows:
            t.add_row(*[Text(str(v)) for v in r])
        self.console.print(t)

    def line(self, text: str) -> None:
        self.console.print(Text(text))


def sections(con, scan_id: int, console: Console | None = None):
    """``(detector class or None, Section)`` for each detector that ran ok in the scan, in run
    order; the class is ``None`` when the detector is not installed here any more."""
    from famfind.plugins import default_registry

    reg = default_registry()
    for det, summ in con.execute("SELECT detector, summary FROM detector_runs WHERE scan_id = ? AND status = 'ok'",
                                 [scan_id]).fetchall():
        cls = reg.get(det).cls if det in reg else None
        yield cls, Section(con, scan_id, det, json.loads(summ) if summ else {}, console)
