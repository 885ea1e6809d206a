"""Report rendering for famfind scans: the terminal report (:mod:`famfind.reports.terminal`)
and the self-contained HTML report (:mod:`famfind.reports.html`, templates beside this file).

The core sections (scan, head scores, validation, coverage, labels) come from the core
tables; each detector that ran adds its own section through its class's
``render_terminal(section)`` / ``html_part(section)``, given a :class:`Section`: the
detector's stored summary and read access to the scan's rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
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

    def table(self, title: str, columns: Iterable[str], rows: Iterable[Iterable[str]], keys: int = 1) -> None:
        """Print a table that fits the console (:func:`fit_table`; the first ``keys`` columns
        name a row and repeat in every part when it is stacked)."""
        fit_table(self.console, title, columns, rows, keys)

    def line(self, text: str) -> None:
        self.console.print(Text(visible(text)))


def visible(s: str) -> str:
    """Stored text on one terminal line, literally: newline -> ``↵``, tab -> ``→``, any other
    control character (an escape code, a carriage return) as ``\\xNN``, so no stored string can
    move the cursor, colour the terminal or break a table's layout."""
    out = s.replace("\n", "↵").replace("\t", "→")
    return "".join(c if c.isprintable() or c in "↵→" else f"\\x{ord(c):02x}" for c in out)


NUMBER_RE = re.compile(r"^[-+]?(\d[\d,]*(\.\d+)?([eE][-+]?\d+)?%?|nan|inf|-|NULL)$")
TEXT_MIN = 12  # narrowest a text column gets; longer words fold onto the next line
KEY_MIN = 24  # a key column (what names a row: a family, a head) folds only words longer than this


def _width(cells: list[str], header: str, key: bool = False) -> tuple[int, bool]:
    """``(the narrowest width that cuts nothing, numeric)`` of a column: numbers and header words
    never break; text may wrap at word boundaries and fold words longer than :data:`TEXT_MIN`
    (:data:`KEY_MIN` in a key column, which names the row and should read in one piece)."""
    numeric = all(NUMBER_RE.match(c.strip()) for c in cells if c.strip())
    head = max((len(w) for w in header.split()), default=1)
    if numeric:
        return max([head, *(len(c) for c in cells)]), True
    longest = max((len(w) for c in cells for line in c.splitlines() for w in line.split()), default=1)
    return max(head, min(longest, KEY_MIN if key else TEXT_MIN)), False


def fit_table(console: Console, title: str, columns: Iterable[str], rows: Iterable[Iterable], keys: int = 1) -> None:
    """Print ``rows`` under ``columns`` within ``console.width`` (80 in a pipe) without cutting a
    header or a number: every column is at least as wide as its longest header word and, if it
    holds numbers, its longest number (text wraps at word boundaries and folds longer words).
    When the columns do not fit side by side the table is *stacked*: printed in parts, each
    repeating the first ``keys`` columns (what names a row) and taking the next columns that
    fit, so no column is dropped. Cells are printed literally (never as rich markup)."""
    cols = [visible(str(c)) for c in columns]
    body = [["" if v is None else visible(str(v)) for v in r] for r in rows]
    keys = min(keys, len(cols))
    widths = [_width([r[i] for r in body], c, i < keys) for i, c in enumerate(cols)]
    room = console.width - 1  # the left border; each column adds 1 padding on each side and a border
    parts, cur = [], []
    used = sum(widths[i][0] + 3 for i in range(keys))
    for i in range(keys, len(cols)):
        w = widths[i][0] + 3
        if cur and used + w > room:
            parts.append(cur)
            cur, used = [], sum(widths[j][0] + 3 for j in range(keys))
        cur.append(i)
        used += w
    parts.append(cur)
    for n, part in enumerate(parts):
        idx = [*range(keys), *part]
        fixed = {i: widths[i][0] for i in idx}
        spare = room - sum(w + 3 for w in fixed.values())
        for i in idx:  # text columns take what is left, up to their longest line
            if not widths[i][1] and spare > 0:
                natural = max([len(cols[i]), *(len(line) for r in body for line in r[i].splitlines())])
                extra = min(spare, max(0, natural - fixed[i]))
                fixed[i] += extra
                spare -= extra
        console.print(Text(title + (f" ({n + 1}/{len(parts)})" if len(parts) > 1 else ""), style="bold"))
        t = Table()
        for i in idx:
            t.add_column(Text(cols[i]), width=fixed[i], overflow="fold", justify="right" if widths[i][1] else "left")
        for r in body:
            t.add_row(*[Text(r[i], overflow="fold") for i in idx])
        console.print(t)


def display_path(path: str) -> str:
    """A path as a report shows it: inside the embedded default as ``famfind/data/default/...``,
    under the working directory relative to it, else as stored."""
    from famfind.corpus import default_dir

    p = Path(path)
    for base, shown in ((default_dir(), Path("famfind/data/default")), (Path.cwd(), Path("."))):
        try:
            return str(shown / p.resolve().relative_to(base.resolve()))
        except (ValueError, OSError):
            continue
    return path


@dataclass
class Coverage:
    """Family coverage of one SAE's ``live`` features: ``families`` ``[(family, test, features,
    primary family of)]`` (behaviour and proxy families), the ``n_mechanism`` mechanism families
    as one row (``mechanism_features``, ``mechanism_primary``), and features in a behaviour or
    proxy family, in a mechanism family, in any family."""

    live: int
    families: list[tuple[str, str, int, int]]
    n_mechanism: int
    mechanism_features: int
    mechanism_primary: int
    behaviour_or_proxy: int
    any_family: int

    def rows(self) -> list[tuple[str, str, int, int | None]]:
        """The coverage table as every report shows it: ``(family, test, features, primary
        family of)``, the behaviour and proxy families, the mechanism families as one row, then
        the totals (primary ``None``)."""
        out = list(self.families)
        if self.n_mechanism:
            out.append((f"({self.n_mechanism} mechanism families)", "necessity", self.mechanism_features,
                        self.mechanism_primary))
        return out + [(k, "-", n, None) for k, n in (
            ("(in a behaviour or proxy family)", self.behaviour_or_proxy),
            ("(in a mechanism family)", self.mechanism_features),
            ("(in any family)", self.any_family), ("(no family)", self.live - self.any_family))]


def coverage(con, scan_id: int, sae: str) -> Coverage:
    """:class:`Coverage` of SAE ``sae`` of the scan, from the core tables."""
    def one(sql: str) -> int:
        return con.execute(sql, [scan_id, sae]).fetchone()[0] or 0

    where = "FROM families WHERE scan_id = ? AND sae = ?"
    fams = con.execute(f"SELECT family, any_value(test), count(DISTINCT feature), count(*) FILTER (WHERE is_primary) "
                       f"{where} AND test <> 'necessity' GROUP BY family ORDER BY 3 DESC, 1", [scan_id, sae]).fetchall()
    return Coverage(one("SELECT count(*) FROM features WHERE scan_id = ? AND sae = ? AND NOT dead"),
                    [(f, t or "-", n, p) for f, t, n, p in fams],
                    one(f"SELECT count(DISTINCT family) {where} AND test = 'necessity'"),
                    one(f"SELECT count(DISTINCT feature) {where} AND test = 'necessity'"),
                    one(f"SELECT count(*) {where} AND test = 'necessity' AND is_primary"),
                    one(f"SELECT count(DISTINCT feature) {where} AND test <> 'necessity'"),
                    one(f"SELECT count(DISTINCT feature) {where}"))


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
