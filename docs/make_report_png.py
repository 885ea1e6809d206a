"""Regenerate the README's picture (docs/report.png) from a scan of the embedded default.

Scans the default (or reads ``--db``), writes the HTML report (one page per SAE), and shows in
one picture, side by side: the layer-0 SAE's page and the layer-1 SAE's page (scan summary,
family coverage, validation), and one layer-1 feature's card (its mechanism line, DFA by
source, contexts), rendered in headless Chromium. Paths in the pages are the default's own
(``famfind/data/default/...``), never the machine's.

Run: ``python docs/make_report_png.py [--db famfind.duckdb] [--max-tokens N] [--feature 84]
[--out docs/report.png]``; needs Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--allow-file-access-from-files"]
PANEL_W, PANEL_H, SCALE = 1100, 1500, 0.6  # each page is laid out this wide, then shown at SCALE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", default=None, help="a DuckDB file with a scan of the default (default: scan it now)")
    ap.add_argument("--max-tokens", type=int, default=None, help="scan only the first N tokens (default: all)")
    ap.add_argument("--feature", type=int, default=84, help="the layer-1 feature whose card is shown")
    ap.add_argument("--out", default=str(Path(__file__).parent / "report.png"))
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    from famfind.db import connect
    from famfind.reports.html import page_paths, render_html
    from famfind.reports import scan_saes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = Path(args.db) if args.db else tmp / "default.duckdb"
        if args.db is None:
            from famfind.config import ScanConfig
            from famfind.frames import write_scan
            from famfind.runner import run_scan

            write_scan(db, run_scan(ScanConfig(max_tokens=args.max_tokens)))
        con = connect(db, read_only=True)
        sid = con.execute("SELECT max(scan_id) FROM scans").fetchone()[0]
        saes = [u["sae"] for u in scan_saes(con, sid)]
        render_html(con, sid, tmp / "report.html")
        con.close()
        pages = page_paths(tmp / "report.html", saes)
        frames = [pages[saes[0]].name, pages[saes[-1]].name, f"{pages[saes[-1]].name}#{args.feature}"]
        w, h = int(PANEL_W * SCALE), int(PANEL_H * SCALE)
        cells = "".join(f'<div class="cell"><iframe src="{f}"></iframe></div>' for f in frames)
        (tmp / "picture.html").write_text(f"""<!doctype html><html><head><style>
body {{ margin: 0; display: flex; gap: 8px; background: #ccc; }}
.cell {{ width: {w}px; height: {h}px; overflow: hidden; background: white; }}
iframe {{ width: {PANEL_W}px; height: {PANEL_H}px; border: 0; transform: scale({SCALE}); transform-origin: 0 0; }}
</style></head><body>{cells}</body></html>""")
        out = Path(args.out).resolve()
        shot = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--screenshot={out}",
                               f"--window-size={3 * w + 16},{h}", "--virtual-time-budget=5000",
                               (tmp / "picture.html").as_uri()], capture_output=True, text=True, timeout=120)
        if shot.returncode != 0 or not out.exists():
            sys.exit(f"chromium failed: {shot.stderr[-500:]}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
