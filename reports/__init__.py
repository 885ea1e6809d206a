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
    ``sae``: the SAE this section is about (``None`` for a ``scope="model"`` detector);
    ``query(sql)`` / ``rows(sql)``: SQL whose ``?`` placeholders are, in turn, the scan id and
    the SAE name (``WHERE scan_id = ? AND sae = ?``; one ``?`` is the scan id alone), as tuples / dicts;
    ``table``/``line``: print to the terminal (stored text is printed literally, never as markup);
    ``per_feature(sql, add)``: ``{feature: card}`` built by ``add(row, card)`` for the HTML cards.
    """

    con: Any
    scan_id: int
    detector: str
    summary: dict
    console: Console | None = None
    sae: str | None = None

    def _params(self, sql: str) -> list:
        n = sql.count("?")
        return ([self.scan_id, self.sae] * n)[:n]

    def query(self, sql: str) -> list[tuple]:
        return self.con.execute(sql, self._params(sql)).fetchall()

    def rows(self, sql: str) -> list[dict]:
        return rows(self.con, sql, *self._params(sql))

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


def sections(con, scan_id: int, console: Console | None = None, sae: str | None = None):
    """``(detector class or None, Section)`` for each detector that ran ok in the scan on SAE
    ``sae`` (``None``: the ``scope="model"`` detectors), in run order; the class is ``None``
    when the detector is not installed here any more."""
    from famfind.registry import default_registry

    reg = default_registry()
    rows = con.execute("SELECT detector, summary FROM detector_runs WHERE scan_id = ? AND status = 'ok' AND "
                       + ("sae IS NULL" if sae is None else "sae = ?"),
                       [scan_id] if sae is None else [scan_id, sae]).fetchall()
    for det, summ in rows:
        cls = reg.get(det).cls if det in reg else None
        yield cls, Section(con, scan_id, det, json.loads(summ) if summ else {}, console, sae)


def rows(con, sql: str, *args) -> list[dict]:
    """The rows of ``sql`` (``?`` bound to ``args``) as dicts by column name."""
    cur = con.execute(sql, list(args))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def scan_saes(con, scan_id: int) -> list[dict]:
    """The scan's SAEs (rows of ``saes``), in layer order."""
    return rows(con, "SELECT * EXCLUDE (scan_id) FROM saes WHERE scan_id = ? ORDER BY layer, sae", scan_id)
