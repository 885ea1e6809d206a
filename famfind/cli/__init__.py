"""famfind's command line (typer): ``famfind scan``, ``sql``, ``report``, ``tables``, ...

The app and its error handling are in :mod:`famfind.cli.app`; the commands register on it
when their modules are imported here (:mod:`famfind.cli.scan_cmds`: scan, import, label,
build-default; :mod:`famfind.cli.read_cmds`: sql, report, heuristics list, inspect, export,
tables). Exit codes: 0 ok; 1 bad input or runtime error (one line, no traceback unless
``--debug``); 2 usage error.
"""

from __future__ import annotations

from famfind.cli import scan_cmds  # noqa: F401,I001  (registers scan, import, label, build-default first)
from famfind.cli import read_cmds  # noqa: F401  (then sql, report, heuristics list, inspect, export, tables)
from famfind.cli.app import app

__all__ = ["app", "run"]


def run() -> None:
    app()
