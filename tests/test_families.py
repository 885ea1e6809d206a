"""The detector suite recovers every family planted by construction (tests/planted_families.py),
DFA is exact, run statistics match a plain loop, and clustering recovers planted clusters."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

import planted_families as pf
from famfind.heuristics.attribution import HeadAttributionMatrix
from famfind.heuristics.context import ContextFamilies
from famfind.heuristics.dfa import DFAHeadShares, DFASourceStats
from famfind.heuristics.head_roles import HeadRoleScores
from famfind.heuristics.long_prefix import LongPrefixHeadSet
from famfind.heuristics.name_mover import NameMoverHeadSet
from famfind.heuristics.successor import SuccessorHeadSet

TRUTH = {
    "successor": pf.F_SUCC, "name_mover": pf.F_NM, "previous_token": pf.F_PREV,
    "duplicate_token": pf.F_DUP, "long_prefix_induction": pf.F_LONG,
    "local_context": pf.F_LOCAL, "high_level_context": pf.F_HIGH,
}
DETECTOR = {"successor": "successor_features", "name_mover": "name_mover_features",
            "previous_token": "previous_token_features", "duplicate_token": "duplicate_token_features",
            "long_prefix_induction": "long_prefix_features"}


@pytest.fixture(scope="session")
def families_scan(tmp_path_factory):
    from famfind.frames import write_scan
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    paths = pf.build_all(tmp_path_factory.mktemp("planted_families"))
    # smaller synthetic samples than the defaults, to keep CI fast on 2 cores
    opts = {"long_prefix_features": {"control_size": 40, "n_seqs": 4, "filler": 10, "max_prefix": 6},
            "long_prefix_heads": {"n_seqs": 32, "filler": 10, "max_prefix": 6},
            "induction_ablation": {"n_sequences": 128},
            "previous_token_features": {"control_size": 60, "n_prompts": 12},
            "duplicate_token_features": {"control_size": 60, "n_prompts": 12},
            "name_mover_heads": {"n_per_template": 8},
            "previous_token_ablation": {"n_sequences": 128},
            "rdfa": {"n_examples": 1, "n_sources": 2},
            "source_samples": {"n_uniform": 4, "n_held_out": 4},
            "feature_mechanism": {"n_windows": 2, "n_pool": 8}}
    # the high-level planted features' hypothesis comes as a user's proxy file (--proxy)
    proxies = (str(Path(__file__).parent / "planted_proxies.py"),)
    result = run_scan(ScanConfig(sae=str(paths["sae"]), corpus=str(paths["corpus"]), seq_len=64,
                                 detector_options=opts, proxies=proxies))
    db = tmp_path_factory.mktemp("db") / "families.duckdb"
    return result, db, write_scan(db, result)


def _outcome(result, family):
    """The family's typed outcome (a context family is a field of ContextFamilies)."""
    if family in ("local_context", "high_level_context"):
        return getattr(result.output(ContextFamilies), family)
    return result.results[DETECTOR[family]].output


def _members(result, family):
    return {m.feature for r in result.results.values() for m in r.families if m.family == family}


def test_every_detector_ran(families_scan):
    result, _, _ = families_scan
    bad = [(r.id, r.status, r.error) for r in result.runs if r.status != "ok"]
    assert not bad


def test_head_roles_of_the_wired_heads(families_scan):
    out = families_scan[0].output
    assert out(SuccessorHeadSet).heads == [0]
    assert out(NameMoverHeadSet).heads == [1]
    assert out(LongPrefixHeadSet).heads == [4]
    assert out(HeadRoleScores).induction_heads == ["2.4", "2.5"]
    curve = out(LongPrefixHeadSet).curve  # [prefix_len, n_heads]
    assert curve[0, 4] < 0.5 < curve[4:, 4].min()  # 2.4 needs a long prefix
    assert curve[0, 5] > 0.5  # 2.5 does not
    s = out(HeadRoleScores).scores
    assert s["previous_token"][2].argmax() == 2 and s["duplicate_token"][2].argmax() == 3


@pytest.mark.parametrize("family", sorted(TRUTH))
def test_family_precision_recall_and_control(families_scan, family):
    result, _, _ = families_scan
    truth, found = set(TRUTH[family]), _members(result, family)
    tp = len(found & truth)
    precision, recall = tp / max(len(found), 1), tp / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (family, sorted(found))
    out = _outcome(result, family)
    ctl = out.control
    assert ctl.sum() > 0
    assert (ctl & out.passed).float().sum() / ctl.sum() <= 0.05


@pytest.mark.parametrize("family,decoys", [("successor", pf.F_SUCC_DECOY), ("name_mover", pf.F_NM_DECOY),
                                           ("previous_token", pf.F_PREV_DECOY),
                                           ("duplicate_token", pf.F_DUP_DECOY)])
def test_decoys_are_selected_but_fail_behaviour(families_scan, family, decoys):
    out = _outcome(families_scan[0], family)
    assert out.selected[decoys].all() and not out.members[decoys].any()


def test_dfa_by_head_reads_the_encoder_side(families_scan):
    share = families_scan[0].output(DFAHeadShares).share
    att = families_scan[0].output(HeadAttributionMatrix).attribution
    assert torch.allclose(share[pf.F_SUCC, 0], torch.ones(len(pf.F_SUCC)), atol=1e-3)
    # decoys: decoder (attribution) on the successor head, encoder (DFA) on head 2.6
    assert (att[pf.F_SUCC_DECOY, 0] > 0.99).all() and (share[pf.F_SUCC_DECOY, 6] > 0.99).all()


def test_dfa_by_source_finds_the_attended_token(families_scan):
    d = families_scan[0].output(DFASourceStats)
    assert (d.mode_offset[pf.F_PREV] == 1).all()
    assert d.mode_token[pf.F_LOCAL].tolist() == pf.OPENERS
    assert (d.top_share_mean[pf.F_HIGH] < 0.5).all()


def test_dfa_sums_to_the_pre_activation():
    from famfind.dfa import dfa_by_head_at, dfa_by_source

    g = torch.Generator().manual_seed(0)
    B, T, H, dh, F = 2, 7, 3, 4, 5
    z = torch.randn(B, T, H, dh, generator=g)
    W_enc, b_enc, b_dec = torch.randn(H * dh, F, generator=g), torch.randn(F, generator=g), torch.randn(H * dh, generator=g)
    pre = (z.flatten(-2) - b_dec) @ W_enc + b_enc
    row, feat, dfa = dfa_by_head_at(z, pre.relu(), W_enc.T.contiguous(), b_dec)
    assert torch.allclose(dfa.sum(-1) + b_enc[feat], pre.reshape(-1, F)[row, feat], atol=1e-5)
    pat = torch.rand(H, T, T, generator=g).tril()
    pat = pat / pat.sum(-1, keepdim=True)
    v = torch.randn(T, H, dh, generator=g)
    z0 = torch.einsum("hqk,khd->qhd", pat, v)
    c = dfa_by_source(pat, v, W_enc, b_dec, torch.tensor([1, 4]), torch.tensor([6, 3]))
    want = (z0.flatten(-2) - b_dec) @ W_enc
    assert torch.allclose(c.sum((1, 2)), torch.stack([want[6, 1], want[3, 4]]), atol=1e-5)


def test_run_stats_match_a_plain_loop():
    from famfind.heuristics.context import run_stats

    g = torch.Generator().manual_seed(1)
    B, T, F = 3, 20, 4
    acts = (torch.rand(B, T, F, generator=g) > 0.5).float()
    delim = torch.rand(B, T, generator=g) > 0.7
    got = run_stats(acts, delim, long_len=4)
    want = {k: [0] * F for k in got}
    for b in range(B):
        for f in range(F):
            t = 0
            while t < T:
                if acts[b, t, f] > 0:
                    s = t
                    while t + 1 < T and acts[b, t + 1, f] > 0:
                        t += 1
                    n = t - s + 1
                    want["runs"][f] += 1
                    if t < T - 1:
                        want["ends_inside"][f] += 1
                        want["ends_delim"][f] += int(bool(delim[b, t + 1] or delim[b, t]))
                    want["long_runs"][f] += int(n >= 4)
                    want["long_positions"][f] += n * int(n >= 4)
                t += 1
    assert {k: v.tolist() for k, v in got.items()} == want


def test_kmeans_recovers_planted_head_loading_clusters():
    from sklearn.metrics import adjusted_rand_score

    from famfind.heuristics.clustering import sweep_kmeans

    rng = np.random.default_rng(0)
    centres = np.eye(6)[[0, 1, 2, 3, 4]] * 0.8 + 0.2 / 6  # 5 clusters, each on one head of 6
    centres[4] = np.array([0.45, 0.45, 0.025, 0.025, 0.025, 0.025])  # a two-head cluster
    truth = rng.integers(0, 5, size=600)
    X = np.abs(centres[truth] + rng.normal(0, 0.03, size=(600, 6)))
    X /= X.sum(1, keepdims=True)
    rows, labels, centers = sweep_kmeans(X, 2, 10, seed=0, sample=5000)
    assert centers.shape[0] == 5 and len(rows) == 9
    assert adjusted_rand_score(truth, labels) >= 0.9


def test_power_law_fit():
    from famfind.heuristics.clustering import power_law_fit

    sizes = 1000 * np.arange(1, 21, dtype=float) ** -1.5
    alpha, r2 = power_law_fit(sizes)
    assert abs(alpha - 1.5) < 1e-6 and r2 > 0.999


def test_tables_coverage_and_the_unexplained_by_cluster(families_scan):
    from typer.testing import CliRunner

    from famfind.cli import app

    _, db, sid = families_scan
    con = duckdb.connect(str(db), read_only=True)
    prim = con.execute("SELECT feature, count(*) FROM families WHERE scan_id = ? AND is_primary GROUP BY 1 "
                       "HAVING count(*) > 1", [sid]).fetchall()
    n_members = con.execute("SELECT count(DISTINCT feature) FROM families WHERE scan_id = ?", [sid]).fetchone()[0]
    n_primary = con.execute("SELECT count(*) FROM families WHERE scan_id = ? AND is_primary", [sid]).fetchone()[0]
    for t in ("dfa_head", "dfa_source", "head_successor", "head_prefix_curve", "context_runs", "clusters",
              "cluster_sweep", "cluster_sizes", "feature_prefix_curve"):
        assert con.execute(f"SELECT count(*) FROM {t} WHERE scan_id = ?", [sid]).fetchone()[0] > 0, t
    cross = dict(con.execute("SELECT family, sum(features) FROM cluster_family_crosstab WHERE scan_id = ? "
                             "GROUP BY 1", [sid]).fetchall())
    con.close()
    assert not prim and n_primary == n_members
    assert cross["successor"] == len(pf.F_SUCC)  # each feature counted once, under its primary family
    assert sum(cross.values()) == 160 - len(pf.F_DEAD)
    q = ("SELECT c.cluster, count(*) AS n FROM clusters c WHERE c.scan_id = (SELECT max(scan_id) FROM scans) "
         "AND c.feature NOT IN (SELECT feature FROM families f WHERE f.scan_id = c.scan_id) GROUP BY 1 ORDER BY 1")
    out = CliRunner().invoke(app, ["sql", q, "--db", str(db), "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    live = 160 - len(pf.F_DEAD)
    assert sum(r["n"] for r in rows) == live - n_members


@pytest.mark.parametrize("detector", ["previous_token_features", "duplicate_token_features"])
def test_a_layer_without_the_role_head_runs_no_prompts(detector):
    """No head of the SAE's layer reaches the role threshold: the family is empty with no
    validation row, and the detector returns before it samples controls or runs a prompt (the
    ctx below has no stats, corpus, model or SAE: any use of them raises)."""
    from types import SimpleNamespace

    from famfind.heuristics.token_roles import DuplicateTokenFeatures, PreviousTokenFeatures

    cls = {"previous_token_features": PreviousTokenFeatures, "duplicate_token_features": DuplicateTokenFeatures}[detector]
    F, H = 64, 4
    scores = {m: torch.full((2, H), 0.3) for m in ("previous_token", "duplicate_token", "induction")}
    scores[cls.metric][0, 1] = 0.9  # a role head in layer 0, none in the SAE's layer 1
    outs = {HeadRoleScores: HeadRoleScores(scores, 0.4, [], "0.0", 0.3),
            HeadAttributionMatrix: HeadAttributionMatrix(torch.full((F, H), 1 / H))}
    ctx = SimpleNamespace(layer=1, output=outs.__getitem__)
    res = cls().run(ctx)
    assert res.validation == [] and res.families == [] and res.detections == []
    assert not res.output.selected.any() and not res.output.control.any() and res.output.role_heads == []
