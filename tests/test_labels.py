"""LLM labelling through the real ``openai`` client against a scripted OpenAI-compatible
server on 127.0.0.1 (tests/llm_server.py): faults, retries, cache, spend cap, scoring."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from famfind.cli import app
from famfind.db import connect
from famfind.labels import balanced_accuracy
from famfind.llm import strict_json
from tests.llm_server import ScriptedLLM

runner = CliRunner()


def _labels(db):
    con = connect(db, read_only=True)
    try:
        cur = con.execute("SELECT * FROM labels ORDER BY kind, target")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


def _label(db, srv, *extra):
    return runner.invoke(app, ["label", "--db", str(db), "--llm-base-url", srv.base_url, "--llm-timeout", "0.5",
                               *extra])


@pytest.fixture
def default_db(default_scan, tmp_path):
    db, sid = default_scan
    shutil.copy(db, tmp_path / "d.duckdb")
    return tmp_path / "d.duckdb", sid


def test_balanced_accuracy_and_strict_parsing():
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == (0.75, 1, 2)
    assert balanced_accuracy([True, False, False, False], [True, True, True, True])[0] == 0.5
    with pytest.raises(ValueError):
        balanced_accuracy([True, False], [True])
    assert strict_json('{"label": "a", "description": "b"}', {"label": str, "description": str})
    for bad in ('{"label": "a"}', '{"label": "a", "description": "b", "x": 1}', '{"label": 1, "description": "b"}',
                '["a"]', "label: a", None):
        with pytest.raises(ValueError):
            strict_json(bad, {"label": str, "description": str})
    with pytest.raises(ValueError):  # 1 is not a boolean, though Python's bool is an int
        strict_json('{"a": 1}', {"a": bool})


def test_every_cluster_labelled_through_faults_then_second_run_makes_no_calls(default_db):
    db, sid = default_db
    with ScriptedLLM(faults=["slow", "slow", "slow", "429", "500", None, "429"], slow_seconds=0.3) as srv:
        r = _label(db, srv, "--llm-concurrency", "2")
        assert r.exit_code == 0, r.output
        n_first = len(srv.requests)
        rows = _labels(db)
        con = connect(db, read_only=True)
        k = con.execute("SELECT count(DISTINCT cluster) FROM clusters WHERE scan_id = ?", [sid]).fetchone()[0]
        fams = {f for (f,) in con.execute("SELECT DISTINCT family FROM families WHERE scan_id = ?", [sid]).fetchall()}
        cands = {str(c) for (c,) in con.execute("SELECT candidate FROM candidate_families WHERE scan_id = ?",
                                                [sid]).fetchall()}
        retries = con.execute("SELECT sum(retries) FROM llm_cache").fetchone()[0]
        cached = con.execute("SELECT count(*) FROM llm_cache").fetchone()[0]
        con.close()
        assert {r_["target"] for r_ in rows if r_["kind"] == "cluster"} == {str(c) for c in range(k)}
        assert {r_["target"] for r_ in rows if r_["kind"] == "family"} == fams
        assert cands and {r_["target"] for r_ in rows if r_["kind"] == "candidate"} == cands
        assert all(r_["status"] == "ok" and r_["label"].startswith("tokens like") for r_ in rows)
        assert all(r_["score_status"] == "ok" and 0 <= r_["score"] <= 1 and r_["n_pos"] > 0 and r_["n_neg"] > 0
                   for r_ in rows)
        # 429 and 500 were retried and then answered; slow replies came back within the timeout
        assert srv.statuses["429"] == 2 and srv.statuses["500"] == 1 and srv.statuses["slow"] == 3
        assert srv.max_inflight == 2  # bounded concurrency: the three slow replies overlapped in pairs
        assert retries == 3 and n_first == cached + 3 == 2 * len(rows) + 3
        assert f"{cached} LLM calls, 0 cached replies" in r.output
        r2 = _label(db, srv)
        assert r2.exit_code == 0 and len(srv.requests) == n_first  # all from the cache
        assert f"0 LLM calls, {cached} cached replies" in r2.output
        assert _labels(db) == rows


def test_a_reply_slower_than_the_timeout_is_retried(default_db):
    db, _ = default_db
    with ScriptedLLM(faults=["slow"], slow_seconds=1.5) as srv:
        r = _label(db, srv, "--features", "5", "--only-features")  # the default scan has two SAEs: say which
        assert r.exit_code == 1 and "--features: the scan has several SAEs: name one as LAYER:FEATURE" in r.output
        r = _label(db, srv, "--features", "1:5", "--only-features")
        assert r.exit_code == 0, r.output
        (row,) = _labels(db)
        assert row["status"] == "ok" and srv.statuses["slow"] == 1 and row["sae"] == "blocks.1.attn.hook_z"
        con = connect(db, read_only=True)
        assert con.execute("SELECT max(retries) FROM llm_cache").fetchone()[0] == 1  # timed out at 0.5 s, retried
        con.close()


def test_malformed_reply_is_recorded_and_the_run_completes(default_db):
    db, _ = default_db
    with ScriptedLLM(rules={"feature 3.": ["malformed"]}) as srv:
        r = _label(db, srv, "--features", "1:3,1:4", "--only-features")
        assert r.exit_code == 0, r.output
        rows = {x["target"]: x for x in _labels(db)}
        assert set(rows) == {"3", "4"}
        assert rows["3"]["status"] == "malformed" and rows["3"]["label"] is None
        assert "raw reply: 'Sure!" in rows["3"]["error"] and rows["3"]["score"] is None
        assert rows["4"]["status"] == "ok" and rows["4"]["score"] is not None
        assert "1 malformed, 1 ok" in r.output


def test_max_calls_caps_spend_and_failures_are_not_cached(default_db):
    db, _ = default_db
    with ScriptedLLM(faults=["500"] * 6) as srv:
        r = _label(db, srv, "--llm-max-calls", "2", "--llm-retries", "1", "--llm-concurrency", "1")
        assert r.exit_code == 0, r.output
        rows = _labels(db)
        assert len(srv.requests) == 4  # 2 calls x (1 try + 1 retry), all answered 500
        assert sorted(x["status"] for x in rows).count("error") == 2
        assert all(x["status"] == "skipped" for x in rows if x["status"] != "error")
        assert all("InternalServerError" in x["error"] for x in rows if x["status"] == "error")
        con = connect(db, read_only=True)
        assert con.execute("SELECT count(*) FROM llm_cache").fetchone()[0] == 0
        con.close()
        r2 = _label(db, srv, "--llm-max-calls", "100")  # the failed ones are asked again
        assert r2.exit_code == 0 and all(x["status"] == "ok" for x in _labels(db))


def test_no_key_and_no_base_url_is_a_one_line_error(default_db, monkeypatch):
    db, _ = default_db
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    r = runner.invoke(app, ["label", "--db", str(db)])
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.output and "Traceback" not in r.output
    out = db.parent / "new.duckdb"
    r = runner.invoke(app, ["scan", "--label", "--db", str(out)])  # refused before any scanning
    assert r.exit_code == 1 and "OPENAI_API_KEY" in r.output and not out.exists()


def test_scan_label_labels_every_family_and_cluster(planted_paths, tmp_path, seq64_fast):
    """`famfind scan --label` on the planted SAE: the induction family and every cluster get a
    label and a score; the labels reach the HTML report."""
    db = tmp_path / "p.duckdb"
    args = ["scan", str(planted_paths["sae"]), "--corpus", str(planted_paths["corpus"]), "--db", str(db), "-q",
            "--skip", "induction_ablation", "--config", seq64_fast]
    with ScriptedLLM() as srv:
        r = runner.invoke(app, [*args, "--label", "--llm-base-url", srv.base_url, "--label-features", "0"])
        assert r.exit_code == 0, r.output
        rows = _labels(db)
        con = connect(db, read_only=True)
        fams = {f for (f,) in con.execute("SELECT DISTINCT family FROM families").fetchall()}
        k = con.execute("SELECT count(DISTINCT cluster) FROM clusters").fetchone()[0]
        con.close()
        assert fams and {x["target"] for x in rows if x["kind"] == "family"} == fams
        assert len([x for x in rows if x["kind"] == "cluster"]) == k
        assert all(x["status"] == "ok" and 0 <= x["score"] <= 1 and x["tp"] + x["tn"] <= x["n_pos"] + x["n_neg"]
                   for x in rows)
        assert {x["target"] for x in rows if x["kind"] == "feature"} == {"0"}
    out = tmp_path / "r.html"
    assert runner.invoke(app, ["report", "--db", str(db), "--html", str(out)]).exit_code == 0
    from famfind.reports.html import load_cards, page_data

    assert any(f.get("label") for f in load_cards(out))
    assert any(label for _, _, label, _ in page_data(out)["index"])  # searchable from the page
