"""Scans sharded over Ray workers (``--ray``) equal a one-process scan: the planted model's
two SAEs on a local Ray cluster of 2 CPU workers give the same families, validation rows and
top-k examples exactly (float sums to 1e-6), also when a worker is killed mid-pass (Ray
re-runs its shard); ``--ray`` without ray installed is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from cli_util import one_line

pytestmark = pytest.mark.heavy  # a local Ray cluster per test: .ci/run runs these after the README's command

ray = pytest.importorskip("ray", reason="ray is in the test extra: pip install -e '.[test]'")
KILLER = Path(__file__).parent / "ray_kill_plugin.py"
ROWS = {"families": "sae, family, feature", "validation": "sae, family",
        "examples": "sae, feature, rank", "features": "sae, feature"}


def _kw(paths) -> dict:
    return dict(sae=(str(paths["sae"]), str(paths["sae_l0"])), corpus=str(paths["corpus"]), seq_len=64)


@pytest.fixture(scope="module")
def one_process(planted_paths, tmp_path_factory):
    """The two planted SAEs scanned in one process, one shard: (ScanResult, db, scan_id)."""
    from famfind.frames import write_scan
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    res = run_scan(ScanConfig(**_kw(planted_paths)))
    db = tmp_path_factory.mktemp("ray") / "one.duckdb"
    return res, db, write_scan(db, res)


def _rows(res, attr) -> list[str]:
    return sorted(repr((u.id, *vars(x).values())) for u in res.saes for r in u.results.values()
                  for x in getattr(r, attr))


def _table(db, table: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT * EXCLUDE (scan_id) FROM {table} ORDER BY {ROWS[table]}").fetchall()
    finally:
        con.close()


def test_ray_scan_equals_one_process_scan(planted_paths, one_process):
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = run_scan(ScanConfig(**_kw(planted_paths), ray="auto"))
        cpus = ray.cluster_resources()["CPU"]  # 2 workers: the corpus ran as 2 shards
    finally:
        ray.shutdown()
    assert cpus == 2
    one = one_process[0]
    for layer in (0, 1):
        a, b = one.sae(layer).ctx.stats, res.sae(layer).ctx.stats
        for name in ("fire_count", "act_max", "hist", "top_acts", "top_seq", "top_pos", "top_win",
                     "sample_acts", "sample_seq", "sample_pos", "sample_win", "random_seq", "random_pos"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (layer, name)
        assert (a.l0_sum, a.n_tokens, a.random_active) == (b.l0_sum, b.n_tokens, b.random_active)
        assert torch.allclose(a.act_sum, b.act_sum, rtol=1e-6, atol=0)
        assert torch.allclose(a.mean_z, b.mean_z, rtol=1e-6, atol=1e-7)
        assert (a.top_seq >= 0).sum() > 100
    assert _rows(one, "families") == _rows(res, "families") and _rows(one, "families")
    assert _rows(one, "validation") == _rows(res, "validation")
    assert [(r.id, r.sae, r.status) for r in one.runs] == [(r.id, r.sae, r.status) for r in res.runs]
    assert all(r.status == "ok" for r in res.runs)


def test_killed_worker_is_retried_and_the_scan_equals_one_process(planted_paths, one_process, seq64, tmp_path):
    """``famfind scan --ray auto`` (its own local cluster, 2 CPU workers) with a plugin that
    SIGKILLs the first worker to reach its second batch: Ray re-runs that shard, the scan
    exits 0 and its tables equal the one-process scan's."""
    marker, db = tmp_path / "killed", tmp_path / "ray.duckdb"
    env = {**os.environ, "RAY_ADDRESS": "", "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-m", "famfind", "scan", str(planted_paths["sae"]), str(planted_paths["sae_l0"]),
                        "--corpus", str(planted_paths["corpus"]), "--config", seq64, "--db", str(db), "-q",
                        "--ray", "auto", "--plugin", str(KILLER), "--set", f"kill_once.marker={marker}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker was killed
    for table in ROWS:
        assert _table(db, table) == _table(one_process[1], table), table
    con = duckdb.connect(str(db), read_only=True)
    try:
        cfg, = con.execute("SELECT config->>'ray' FROM scans").fetchone()
        status = dict(con.execute("SELECT detector, min(status) FROM detector_runs GROUP BY detector").fetchall())
    finally:
        con.close()
    assert cfg == "auto" and status["kill_once"] == "ok" and set(status.values()) == {"ok"}


def test_ray_flag_without_ray_installed_is_one_line(planted_paths, seq64, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from famfind.cli import run; "
            f"sys.argv = ['famfind', 'scan', {str(planted_paths['sae'])!r}, '--corpus', {str(planted_paths['corpus'])!r}, "
            f"'--config', {seq64!r}, '--db', {str(tmp_path / 'x.duckdb')!r}, '--ray', 'auto']; run()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    one_line(r.stderr, r.stdout, "--ray", "pip install 'famfind[ray]'")
    assert not (tmp_path / "x.duckdb").exists()
