"""Print famfind's declared minimum versions as pins (``name==min``), one per line, for a
lowest-versions test environment (issue #15). Every runtime requirement must be declared as
``name>=version``; anything else is an error. ``--except NAME...`` leaves packages out (torch:
its PyPI wheels for Linux are CUDA builds of several GB, so CI keeps the CPU build on disk)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

skip = {a.lower() for a in sys.argv[2:]} if sys.argv[1:2] == ["--except"] else set()
deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for d in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", d.replace(" ", ""))
    if not m:
        sys.exit(f"pyproject.toml: dependency {d!r} is not of the form name>=version")
    if m[1].lower() not in skip:
        print(f"{m[1]}=={m[2]}")
