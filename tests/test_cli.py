"""Every CLI command through typer's CliRunner, with exit codes, and the bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli_util import check, n_scans
from famfind.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture()
def runner():
    return CliRunner()


def scan_args(p, db, *extra):
    return ["scan", str(p["sae"]), "--corpus", str(p["corpus"]), "--db", str(db), *extra]


def test_scan_report_sql_roundtrip(runner, planted_paths, tmp_path, seq64, seq64_fast):
    db = tmp_path / "f.duckdb"
    r = runner.invoke(app, scan_args(planted_paths, db, "--config", seq64_fast))
    assert r.exit_code == 0, r.output
    assert "Family validation" in r.stdout and "induction" in r.stdout
    r = runner.invoke(app, ["sql", "SELECT family, selected, passed FROM validation WHERE family = 'induction'",
                            "--db", str(db), "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert rows[0]["family"] == "induction" and rows[0]["selected"] == 40
    r = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM features", "--db", str(db), "--csv"])
    assert r.exit_code == 0 and r.stdout.splitlines() == ["n", "128"]
    r = runner.invoke(app, ["sql", "-", "--db", str(db)], input="SELECT 41 + 1 AS answer")
    assert r.exit_code == 0 and "42" in r.stdout
    r = runner.invoke(app, ["report", "--db", str(db)])
    assert r.exit_code == 0 and "Head scores" in r.stdout
    r = runner.invoke(app, ["report", "--db", str(db), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and '<script id="famfind-data"' in (tmp_path / "r.html").read_text()
    r = runner.invoke(app, ["report", "--db", str(db), "--html", str(tmp_path / "no" / "such" / "r.html")])
    assert r.exit_code == 1 and "cannot write the HTML report" in r.output
    r = runner.invoke(app, ["report", "--db", str(db), "--scan-id", "7"])
    assert r.exit_code == 1 and "no scan with scan_id 7" in r.stderr
    r = runner.invoke(app, scan_args(planted_paths, db, "--config", seq64, "-q", "--select", "head_roles"))
    assert r.exit_code == 0 and r.stdout.strip() == "2"
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT detector FROM detector_runs WHERE scan_id = 2").fetchall()
    con.close()
    assert runs == [("head_roles",)]
    con = duckdb.connect(str(db), read_only=True)
    n_seqs, = con.execute("SELECT config->'detector_options'->'long_prefix_features'->>'n_seqs' FROM scans "
                          "WHERE scan_id = 1").fetchone()
    n_prompts, = con.execute("SELECT count(*) FROM feature_prefix_curve WHERE scan_id = 1").fetchone()
    con.close()
    assert n_seqs == "4" and n_prompts > 0  # the --config file's [detectors.<id>] section reached the detector


def test_help_and_usage_errors(runner):
    r = runner.invoke(app, ["-h"])
    assert r.exit_code == 0 and "scan" in r.stdout
    for cmd in ("scan", "sql", "report", "build-default"):
        r = runner.invoke(app, [cmd, "-h"])
        assert r.exit_code == 0 and "Example: famfind" in r.stdout
    r = runner.invoke(app, ["scan", "--no-such-option"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["sql", "SELECT 1", "--json", "--csv"])
    assert r.exit_code == 2


def _one_line_error(r, *needles):
    assert check(r, 1, *needles).startswith("famfind: error:")


def test_bad_inputs_exit_1_with_one_line(runner, planted_paths, tmp_path, seq64):
    db = tmp_path / "bad.duckdb"
    _one_line_error(runner.invoke(app, ["scan", str(tmp_path / "missing"), "--db", str(db)]), "missing", "not found")
    wrong_hook = tmp_path / "hook"
    wrong_hook.mkdir()
    for f in ("cfg.json", "sae_weights.safetensors"):
        (wrong_hook / f).write_bytes((planted_paths["sae"] / f).read_bytes())
    cfg = json.loads((wrong_hook / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_post"
    (wrong_hook / "cfg.json").write_text(json.dumps(cfg))
    _one_line_error(runner.invoke(app, ["scan", str(wrong_hook), "--db", str(db)]), "cfg.json", "hook_z")
    cfg["metadata"]["hook_name"] = "blocks.5.attn.hook_z"
    (wrong_hook / "cfg.json").write_text(json.dumps(cfg))
    _one_line_error(runner.invoke(app, ["scan", str(wrong_hook), "--model", str(planted_paths["model"]),
                                        "--db", str(db)]), "beyond the model's 2 layers")
    _one_line_error(runner.invoke(app, scan_args(planted_paths, db, "--corpus", str(tmp_path / "nope.txt"),
                                                 "--config", seq64)), "nope.txt", "not found")
    import numpy as np
    np.save(tmp_path / "big.npy", np.full(200, 9999, dtype=np.uint16))
    _one_line_error(runner.invoke(app, scan_args(planted_paths, db, "--corpus", str(tmp_path / "big.npy"),
                                                 "--config", seq64)), "big.npy", "token ids must lie in [0, 64)")
    _one_line_error(runner.invoke(app, scan_args(planted_paths, db, "--select", "no_such")),
                    "unknown; known:", "induction_behaviour")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[scan]\nbogus = 1\n")
    _one_line_error(runner.invoke(app, scan_args(planted_paths, db, "--config", str(bad_toml))),
                    "unknown key 'bogus'")
    bad_toml.write_text("[detectors.induction_behaviour]\nn_sequencez = 3\n")
    _one_line_error(runner.invoke(app, scan_args(planted_paths, db, "--config", str(bad_toml))),
                    "unknown key 'n_sequencez'", "n_sequences")
    _one_line_error(runner.invoke(app, ["sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb")]),
                    "none.duckdb", "database not found")
    assert not db.exists()  # nothing was written by any failed scan


def test_d_in_mismatch(runner, planted_paths, tmp_path):
    import torch

    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    save_saelens(SAE(torch.zeros(128, 8), torch.zeros(8, 128), torch.zeros(8), torch.zeros(128),
                     hook_name="blocks.1.attn.hook_z", model_name=str(planted_paths["model"])), tmp_path / "s")
    _one_line_error(runner.invoke(app, ["scan", str(tmp_path / "s"), "--db", str(tmp_path / "x.duckdb")]),
                    "d_in=128", "n_heads*d_head = 4*64 = 256")


def test_sql_error_is_one_line(runner, planted_scan):
    _, db, _ = planted_scan
    _one_line_error(runner.invoke(app, ["sql", "SELECT nope FROM features", "--db", str(db)]), "SQL error")


def readme_plugin(tmp_path) -> Path:
    code = re.search(r"```python\n# single_head.py\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 45  # short: options, a typed output, a declared table, run()
    p = tmp_path / "single_head.py"
    p.write_text(code)
    return p


def test_readme_plugin_runs(runner, planted_paths, tmp_path, seq64):
    import planted

    plugin = readme_plugin(tmp_path)
    r = runner.invoke(app, ["heuristics", "list", "--plugin", str(plugin)])
    assert r.exit_code == 0 and "single_head" in r.stdout
    db = tmp_path / "p.duckdb"
    r = runner.invoke(app, scan_args(planted_paths, db, "--config", seq64, "--plugin", str(plugin), "-q",
                                     "--select", "single_head"))
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(db), read_only=True)
    got = {f for (f,) in con.execute("SELECT feature FROM families WHERE family = 'single_head'").fetchall()}
    in_table = {f for (f,) in con.execute("SELECT feature FROM single_head").fetchall()}
    summary = json.loads(con.execute("SELECT summary FROM detector_runs WHERE detector = 'single_head'").fetchone()[0])
    con.close()
    assert in_table == got and summary == {"n_found": len(got)}
    # by construction: induction features with attribution 1.0, all decoys, all controls
    want = {f for i, f in enumerate(planted.INDUCTION) if i % 4 == 3} | set(planted.DECOYS) | set(planted.CONTROLS)
    assert got == want


BROKEN = '''
from dataclasses import dataclass

from famfind.plugins import Heuristic, Output, Result

@dataclass(frozen=True)
class BrokenOutput(Output):
    x: int

class Broken(Heuristic):
    id = "broken"
    needs = "weights"
    produces = BrokenOutput

    def run(self, ctx):
        raise RuntimeError("boom")

class Leaf(Heuristic):
    id = "after_broken"
    needs = "weights"
    requires = (BrokenOutput,)

    def run(self, ctx):
        return Result()
'''


def test_broken_plugin_is_recorded_and_skipped(runner, planted_paths, tmp_path, seq64):
    p = tmp_path / "broken.py"
    p.write_text(BROKEN)
    db = tmp_path / "b.duckdb"
    r = runner.invoke(app, scan_args(planted_paths, db, "--config", seq64, "--plugin", str(p),
                                     "--select", "broken", "--select", "after_broken", "--select", "head_roles"))
    assert r.exit_code == 0, r.output
    assert "detector broken" in r.stderr and "boom" in r.stderr
    con = duckdb.connect(str(db), read_only=True)
    st = dict(con.execute("SELECT detector, status FROM detector_runs").fetchall())
    con.close()
    assert st == {"broken": "failed", "after_broken": "skipped", "head_roles": "ok"}
    r = runner.invoke(app, scan_args(planted_paths, db, "--config", seq64, "--plugin", str(p),
                                     "--select", "broken", "--strict-plugins"))
    _one_line_error(r, "broken", "boom")
    assert n_scans(db) == 1  # the strict failure wrote nothing


def test_failed_write_leaves_no_rows(planted_scan, tmp_path):
    """A write that fails half-way (the last table's rows do not fit its column types) is rolled back."""
    import polars as pl

    from famfind.frames import write_scan
    from famfind.errors import FamfindError

    result, _, _ = planted_scan
    db = tmp_path / "t.duckdb"
    assert write_scan(db, result) == 1
    tables = result.results["head_attribution"].tables
    good = tables["head_attribution"]
    tables["head_attribution"] = pl.DataFrame({"feature": ["not an int"], "layer": [1], "head": [0],
                                               "attribution": [0.5]})  # bypasses the check at return
    try:
        with pytest.raises(FamfindError, match="could not write the scan"):
            write_scan(db, result)
    finally:
        tables["head_attribution"] = good
    con = duckdb.connect(str(db), read_only=True)
    counts = [con.execute(f"SELECT count(DISTINCT scan_id), max(scan_id) FROM {t}").fetchall()[0]
              for t in ("scans", "features", "heads", "examples", "head_attribution")]
    con.close()
    assert all(c == (1, 1) for c in counts), counts


def test_help_and_flags_work_under_the_installed_typer_and_click(runner, tmp_path):
    """CI runs this file twice: with the resolved typer, and with typer 0.12.5 (sae-dashboard's
    pin) beside click >= 8.2, where :mod:`famfind._typer_compat` must make both work."""
    from importlib.metadata import version

    from typer.core import TyperOption

    print("typer", version("typer"), "click", version("click"), "patched:", getattr(TyperOption, "_famfind_patched", False))
    r = runner.invoke(app, ["scan", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    flag = next(ln for ln in r.output.splitlines() if "--strict-plugins" in ln)
    assert "TEXT" not in flag, flag  # a boolean flag, not a string option
    text = " ".join(r.output.replace("│", " ").split())  # help shown as written (typer 0.15+ reads rich markup)
    for needle in ("needs famfind[tl])", "Needs famfind[ray].", "TOML with [scan] keys and [detectors.<id>] options."):
        assert needle in text, needle
    assert runner.invoke(app, ["--help"]).exit_code == 0
    # an option with a value takes it; a bad one is a one-line usage error
    r = runner.invoke(app, ["sql", "SELECT 1 AS one", "--db", str(tmp_path / "none.duckdb")])
    check(r, 1, "none.duckdb")
    r = runner.invoke(app, ["scan", "--device", "tpu", "--db", str(tmp_path / "x.duckdb")])
    check(r, 1, "device", "'tpu'")


def test_cli_choices_are_the_scan_configs():
    """--autocast and --model-backend are typer choices (a usage error otherwise); their values
    are written out in the CLI module so that `famfind -h` need not import the config's
    dependencies: they must stay those ScanConfig and load_model accept."""
    from typing import get_args, get_type_hints

    from famfind.cli.scan_cmds import Autocast, Backend
    from famfind.config import ScanConfig
    from famfind.models import BACKENDS

    hints = get_type_hints(ScanConfig)
    assert [a.value for a in Autocast] == list(get_args(hints["autocast"]))
    assert [b.value for b in Backend] == list(get_args(hints["model_backend"])) == list(BACKENDS)
