"""The HTML report: one self-contained file for the embedded default, checked in headless
Chromium (Debian's ``chromium``; the test is skipped, with the reason, when it is missing)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest



@pytest.fixture(scope="module")
def report(default_scan, tmp_path_factory):
    from famfind.db import connect
    from famfind.reports.html import render_html

    d = tmp_path_factory.mktemp("html")
    db, sid = default_scan
    con = connect(db, read_only=True)
    try:
        return render_html(con, sid, d / "report.html")[0]
    finally:
        con.close()


def test_report_is_offline_with_every_live_feature(report):
    from famfind.reports.html import cards_dir, load_cards, page_data

    page = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN, nothing fetched
    data = page_data(report)
    live = round(data["scan"]["d_sae"] * (1 - data["scan"]["dead_fraction"]))
    cards = load_cards(report)
    assert len(cards) == len(data["index"]) == live > 1000 and data["validation"] and data["n_heads"] == 4
    assert [c["feature"] for c in cards] == [i[0] for i in data["index"]]
    assert len(list(cards_dir(report).glob("*.js"))) == -(-live // data["cards_per_file"])
    assert len(base64.b64decode(data["heat"])) == live * 4  # the heatmap: one byte per feature and head
    f = cards[0]
    assert len(f["att"]) == 4 and f["examples"] and f["logits"]["boost"] and f["hist"]


def test_report_renders_in_chromium(report, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not found (.ci/run installs Debian's chromium when it can)")
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            "--window-size=1200,2400"]
    dom = subprocess.run(args + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console  # no console messages at all: no errors, no uncaught exceptions
    assert len(re.findall(r'class="card" data-feature="\d+"', dom.stdout)) == 50  # first page of cards
    assert re.search(r"page 1 / \d+ \(\d{4} features\)", dom.stdout)
    for el in ('id="validation"', 'id="heatmap"', 'id="cluster-sizes"', 'id="search"', 'id="context-families"',
               'id="candidates"'):
        assert el in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run(args + [f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_readme_cross_layer_query_runs_on_the_default(default_scan):
    """The README's cross-layer SQL (layer-1 induction features and their top upstream layer-0
    feature, from rdfa) runs on a scan of the embedded default and names layer-0 features."""
    import re
    from pathlib import Path

    from famfind.db import connect

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sql = re.search(r"<!-- xlayer:start -->\n```sql\n(.*?);\n```", readme, re.S).group(1)
    db, _ = default_scan
    con = connect(db, read_only=True)
    try:
        rows = con.execute(sql).fetchall()
        layer0 = {r[0] for r in con.execute("SELECT feature FROM features WHERE layer = 0").fetchall()}
    finally:
        con.close()
    assert rows and all(r[1] in layer0 for r in rows)


@pytest.mark.heavy  # slow end-to-end: .ci/run runs it after the README's command (-m heavy)
def test_24k_feature_report_stays_small_and_opens_far_pages(planted_paths, tmp_path):
    """A GPT-2-small-width SAE (24,576 live features) on the planted model: the main page
    stays far under 5 MB, every card is in its page file, and Chromium opens the first and a
    far page of cards (loaded lazily from file://) with no console message."""
    import sys
    from pathlib import Path

    from famfind.db import connect
    from famfind.frames import write_scan
    from famfind.reports.html import cards_dir, load_cards, page_data, render_html
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    sys.path.insert(0, str(Path(__file__).parent))
    import planted

    sae = planted.build_wide_sae(planted_paths["sae"].parent / "wide")
    res = run_scan(ScanConfig(sae=str(sae), corpus=str(planted_paths["corpus"]), seq_len=64, max_tokens=12_800,
                              select=("head_attribution", "feature_logits")))
    db = tmp_path / "wide.duckdb"
    sid = write_scan(db, res)
    con = connect(db, read_only=True)
    try:
        page = render_html(con, sid, tmp_path / "wide.html")[0]
    finally:
        con.close()
    data = page_data(page)
    assert len(data["index"]) == 24_576 and page.stat().st_size < 2_000_000  # the bar is 5 MB
    assert len(list(cards_dir(page).glob("*.js"))) == 492
    assert [c["feature"] for c in load_cards(page)] == list(range(24_576))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not found (.ci/run installs Debian's chromium when it can)")
    for frag, first, info in (("", 0, "page 1 / 492 (24576 features)"), ("#p=450", 22_450, "page 450 / 492")):
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                              "--dump-dom", page.as_uri() + frag], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0 and not [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln]
        shown = [int(x) for x in re.findall(r'class="card" data-feature="(\d+)"', dom.stdout)]
        assert shown == list(range(first, first + 50)) and info in dom.stdout, (frag, shown[:3])
