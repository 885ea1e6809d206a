"""Shared fixtures: the planted model/SAE/corpus (known answers) and one scan of them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import planted  # noqa: E402


@pytest.fixture(scope="session")
def planted_paths(tmp_path_factory) -> dict[str, Path]:
    return planted.build_all(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def planted_scan(planted_paths, tmp_path_factory):
    """(ScanResult, db path, scan_id) for a default scan of the planted SAE."""
    from famfind.frames import write_scan
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    cfg = ScanConfig(sae=str(planted_paths["sae"]), corpus=str(planted_paths["corpus"]), seq_len=64,
                     detector_options=planted.FAST_OPTIONS)
    result = run_scan(cfg)
    db = tmp_path_factory.mktemp("db") / "planted.duckdb"
    return result, db, write_scan(db, result)


@pytest.fixture(scope="session")
def default_scan_result(tmp_path_factory):
    """(ScanResult, db path, scan_id) of the one scan of the embedded default a test run makes:
    both SAEs, every built-in detector, its first 128k eval tokens (1,000 sequences; shared by
    the default, HTML, labelling and report tests; copy the file before writing to it)."""
    from famfind.config import ScanConfig
    from famfind.corpus import default_sae
    from famfind.frames import write_scan
    from famfind.runner import run_scan

    if not (default_sae(1) / "cfg.json").exists():
        pytest.skip("embedded default artefacts are not built")
    res = run_scan(ScanConfig(max_tokens=128_000))
    db = tmp_path_factory.mktemp("default_scan") / "default.duckdb"
    return res, db, write_scan(db, res)


@pytest.fixture(scope="session")
def default_scan(default_scan_result):
    """(db path, scan_id) of :func:`default_scan_result`."""
    return default_scan_result[1:]


@pytest.fixture(scope="session")
def seq64(tmp_path_factory):
    """A --config TOML setting seq_len = 64 (the planted model's n_ctx)."""
    cfg = tmp_path_factory.mktemp("cfg") / "scan.toml"
    cfg.write_text("[scan]\nseq_len = 64\n")
    return str(cfg)


@pytest.fixture(scope="session")
def seq64_fast(tmp_path_factory):
    """:func:`seq64` plus a [detectors.<id>] section: long_prefix_features with 4 prompts per
    (prefix length, token) instead of 16 (its 9 x 16 x n_tokens prompts were half of a
    full planted scan)."""
    cfg = tmp_path_factory.mktemp("cfg") / "fast.toml"
    cfg.write_text("[scan]\nseq_len = 64\n\n[detectors.long_prefix_features]\nn_seqs = 4\n")
    return str(cfg)
