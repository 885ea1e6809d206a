"""Whole-model scans (issue #11): several SAEs of one model in one pass, per-layer families,
head composition and head polysemanticity, on the planted model (answers known by
construction: a layer-0 SAE with previous-token features on head 0.0, the layer-1 SAE with
induction features on head 1.0)."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest
import torch

import planted
from famfind.errors import FamfindError
from famfind.heuristics.composition import HeadComposition
from famfind.heuristics.induction import InductionFamily
from famfind.heuristics.polysemanticity import HeadPolysemanticity, head_verdict
from famfind.heuristics.token_roles import PreviousTokenFamily
from famfind.config import ScanConfig
from famfind.runner import run_scan

L0, L1 = "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def two_layer(planted_paths, tmp_path_factory):
    from famfind.frames import write_scan

    cfg = ScanConfig(sae=(str(planted_paths["sae"]), str(planted_paths["sae_l0"])),
                     corpus=str(planted_paths["corpus"]), seq_len=64, detector_options=planted.FAST_OPTIONS)
    result = run_scan(cfg)
    db = tmp_path_factory.mktemp("two") / "two.duckdb"
    return result, db, write_scan(db, result)


def _members(out) -> set[int]:
    return set(torch.nonzero(out.members).flatten().tolist())


def test_saes_in_layer_order_each_with_its_own_rows(two_layer):
    result, db, sid = two_layer
    assert [u.id for u in result.saes] == [L0, L1]
    assert all(r.status == "ok" for r in result.runs), [(r.id, r.sae, r.error) for r in result.runs if r.status != "ok"]
    con = duckdb.connect(str(db), read_only=True)
    try:
        saes = con.execute("SELECT sae, layer, d_sae, hook_name FROM saes WHERE scan_id = ? ORDER BY layer",
                           [sid]).fetchall()
        assert saes == [(L0, 0, 32, L0), (L1, 1, 128, L1)]
        assert con.execute("SELECT sae, layer, count(*) FROM features WHERE scan_id = ? GROUP BY ALL ORDER BY layer",
                           [sid]).fetchall() == [(L0, 0, 32), (L1, 1, 128)]
        for t in ("examples", "activation_histogram", "detections", "head_attribution", "feature_logits"):
            got = {r[0] for r in con.execute(f"SELECT DISTINCT sae FROM {t} WHERE scan_id = ?", [sid]).fetchall()}
            assert got == {L0, L1}, t
        # model detectors run once, without an SAE
        runs = con.execute("SELECT detector, sae FROM detector_runs WHERE scan_id = ? AND detector IN "
                           "('head_roles', 'head_composition', 'induction_selection')", [sid]).fetchall()
        assert sorted(runs, key=str) == sorted([("head_roles", None), ("head_composition", None),
                                                ("induction_selection", L0), ("induction_selection", L1)], key=str)
    finally:
        con.close()


def test_one_pass_gives_each_sae_what_a_scan_of_it_alone_gives(two_layer, planted_scan):
    """The layer-1 SAE's statistics and families are the same with the layer-0 SAE beside it."""
    both, alone = two_layer[0].sae(L1), planted_scan[0]
    a, b = both.ctx.stats, alone.ctx.stats
    for f in ("fire_count", "top_acts", "top_seq", "top_pos", "hist", "sample_seq", "sample_pos"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.allclose(a.act_sum, b.act_sum)
    assert _members(both.ctx.output(InductionFamily)) == _members(alone.output(InductionFamily)) == set(planted.INDUCTION)


def test_layer0_previous_token_family_beside_layer1_induction(two_layer):
    result, db, sid = two_layer
    prev = result.output(PreviousTokenFamily, sae=0)
    assert prev.role_heads == ["0.0"]
    assert _members(prev) == set(planted.PREV_FEATURES)
    assert prev.n_control > 0 and prev.n_control_passed == 0
    # layer 1's SAE has no previous-token family from head 0.0 and layer 0 no induction head
    assert result.output(InductionFamily, sae=0).role_heads == []
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT layer, family, selected, passed, control_passed, ablation_tested, ablation_off "
                           "FROM validation WHERE scan_id = ? AND family IN ('previous_token', 'induction') "
                           "ORDER BY layer, family", [sid]).fetchall()
    finally:
        con.close()
    assert rows[0] == (0, "previous_token", 20, 20, 0, 20, 20)  # mean-ablating 0.0 turns every one off
    assert rows[1][:2] == (1, "induction") and rows[1][3] == len(planted.INDUCTION)
    assert all(r[0] == 1 for r in rows[1:])  # no induction row for layer 0 (no induction head there)


def test_head_composition_and_polysemanticity(two_layer):
    result, _, _ = two_layer
    comp = result.output(HeadComposition)
    k = comp.scores["K"]
    assert k.shape == (2, 4, 2, 4) and float(k[1].abs().max()) == 0.0  # only earlier -> later layers
    # the induction head 1.0 reads the previous-token dims head 0.0 writes: K-composition 0.0 -> 1.0
    assert float(k[0, 0, 1, 0]) > 0.1 and float(k[0, 1:, 1, 0].abs().max()) == 0.0  # 0.1-0.3 write nothing
    poly = result.output(HeadPolysemanticity, sae=0)
    assert poly.verdict["0.0"] == "monosemantic"
    assert poly.top_roles["0.0"] == ["previous_token"] * 10


def test_head_verdict_rule():
    assert head_verdict(["induction"] * 8 + [None] * 2) == "monosemantic"
    assert head_verdict(["induction"] * 4 + ["successor"] * 3 + [None] * 3) == "polysemantic"
    assert head_verdict(["induction"] * 7 + ["successor"] * 1 + [None] * 2) == "unresolved"
    assert head_verdict(["previous_token"] * 6 + ["induction", "successor", "long_range", "mixed"]) == "polysemantic"
    assert head_verdict([None] * 10) == "unresolved"
    assert head_verdict([]) == "unresolved"


def test_a_release_folder_is_every_sae_in_it(planted_paths, tmp_path):
    rel = tmp_path / "release"
    for key, hook in (("sae_l0", L0), ("sae", L1)):
        shutil.copytree(planted_paths[key], rel / hook)
        cfg = json.loads((rel / hook / "cfg.json").read_text())
        cfg["metadata"]["model_name"] = str(planted_paths["model"])
        (rel / hook / "cfg.json").write_text(json.dumps(cfg))
    res = run_scan(ScanConfig(sae=str(rel), corpus=str(planted_paths["corpus"]), seq_len=64, max_tokens=64 * 40,
                              select=("head_attribution",)))
    assert [u.id for u in res.saes] == [L0, L1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FamfindError, match="no SAE here"):
        run_scan(ScanConfig(sae=str(tmp_path / "empty")))


def test_saes_of_different_models_are_refused(planted_paths, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(planted_paths["sae_l0"], other)
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = "gpt2"
    (other / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FamfindError) as e:
        run_scan(ScanConfig(sae=(str(planted_paths["sae"]), str(other)), corpus=str(planted_paths["corpus"])))
    assert str(other) in str(e.value) and "share a model" in str(e.value)


def test_rdfa_finds_the_planted_upstream_feature(planted_paths, tmp_path):
    """Head 1.3 reads what head 0.0 wrote: the layer-1 feature for "previous token t" traces back,
    through the residual stream, to the layer-0 SAE's previous-token feature for t."""
    from famfind.heuristics.rdfa import RecursiveDFA

    planted.build_model(tmp_path / "model", rdfa_head=True)
    planted.build_sae_layer0(tmp_path / "sae_l0")
    planted.build_sae_rdfa(tmp_path / "sae_l1")
    res = run_scan(ScanConfig(sae=(str(tmp_path / "sae_l0"), str(tmp_path / "sae_l1")),
                              corpus=str(planted_paths["corpus"]), seq_len=64, max_tokens=64 * 200,
                              select=("rdfa",), detector_options={"rdfa": {"features": "all"}}))
    u = res.sae(1)
    assert u.runs["rdfa"].status == "ok", u.runs["rdfa"].error
    out = u.ctx.output(RecursiveDFA)
    assert out.features == 8 and out.upstream_layers == [0] and out.whole_layers == []
    df = u.results["rdfa"].tables["rdfa"]
    top = (df.filter(df["src_pos"] == df["pos"]).sort("contribution", descending=True)
           .group_by(["feature", "example_rank"], maintain_order=True).first())
    assert top.height >= 8 * 2
    assert (top["component"] == "attn_feature").all()
    assert (top["upstream_layer"] == 0).all()
    assert (top["upstream_feature"] == top["feature"]).all()  # PREV_FEATURES[i] = i reads token i + 1


def test_rdfa_parts_sum_to_dfa_on_the_default():
    """On the embedded default's layer-1 SAE, the rows of each (feature, example, source) sum
    to that source's DFA (famfind.dfa.dfa_by_source) within 1e-4 relative."""
    import polars as pl

    from famfind.corpus import default_sae
    from famfind.dfa import dfa_by_source

    if not (default_sae(0) / "cfg.json").exists():
        pytest.skip("embedded default artefacts are not built")
    res = run_scan(ScanConfig(max_tokens=128 * 120, select=("rdfa",),
                              detector_options={"rdfa": {"features": "all", "max_features": 40}}))
    u = res.sae(1)
    df = u.results["rdfa"].tables["rdfa"]
    assert set(df["component"]) >= {"embed", "pos", "mlp", "attn_feature", "attn_feature_rest", "attn_error",
                                     "attn_bias", "bias"}
    g = df.group_by(["feature", "example_rank", "src_pos"]).agg(pl.col("contribution").sum(), pl.col("seq").first(),
                                                                 pl.col("pos").first())
    assert g.height >= 100
    m, sae, toks = res.model_ctx.model, u.sae, res.model_ctx.corpus.tokens
    got, want, parts = [], [], {}
    for r in g.iter_rows(named=True):
        if r["seq"] not in parts:  # one forward per sequence
            parts[r["seq"]] = m.attn_parts(toks[r["seq"]][None], 1)
        pat, v = parts[r["seq"]]
        c = dfa_by_source(pat[0], v[0], sae.W_enc, sae.b_dec, torch.tensor([r["feature"]]), torch.tensor([r["pos"]]))
        got.append(r["contribution"])
        want.append(float(c.sum(1)[0, r["src_pos"]]))
    got, want = torch.tensor(got), torch.tensor(want)
    assert float(((got - want).abs() / want.abs().clamp_min(1e-3)).max()) <= 1e-4
