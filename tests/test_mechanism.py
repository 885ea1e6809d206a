"""Mechanism records (``feature_mechanism``, issue #25) on a model whose answers are known by
construction (tests/planted_mechanism.py): heads reading distances 0, 1, 5 and 40, features
reading token sets through them, and positional features that read no token."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import planted_mechanism as PM  # noqa: E402


@pytest.fixture(scope="module")
def mech(tmp_path_factory):
    from famfind.config import ScanConfig
    from famfind.frames import write_scan
    from famfind.runner import run_scan

    paths = PM.build_all(tmp_path_factory.mktemp("mech"))

    def scan(shards):
        return run_scan(ScanConfig(sae=str(paths["sae"]), corpus=str(paths["corpus"]), seq_len=PM.CTX, shards=shards,
                                   select=("feature_mechanism", "head_polysemanticity")))

    one = scan(1)
    db = tmp_path_factory.mktemp("mechdb") / "mech.duckdb"
    write_scan(db, one)
    return paths, one, scan(3), db


def table(res):
    return res.sae().results["feature_mechanism"].tables["feature_mechanism"]


def test_planted_mechanisms_are_recovered_with_class_distance_head_and_source_set(mech):
    _, res, _, _ = mech
    rows = {r["feature"]: r for r in table(res).iter_rows(named=True)}
    dist, _ = PM.features()
    for c in set(PM.CLASS_OF.values()):
        truth = {f for f, (d, _) in dist.items() if PM.CLASS_OF[d] == c}
        found = {f for f, r in rows.items() if r["validated"] and r["mechanism"] == c}
        hit = truth & found
        assert len(hit) / max(len(found), 1) >= 0.95 and len(hit) / len(truth) >= 0.95, (c, truth, found)
    for f, (d, toks) in dist.items():
        r = rows[f]
        assert r["top_distance"] == d and r["top_head"] == f"0.{PM.DISTANCES.index(d)}", r
        assert set(r["source_tokens"]) <= set(toks) and r["source_tokens"][0] in toks
        assert r["necessity"] >= 0.9 and r["necessity_control"] <= 0.1
        assert r["sufficiency"] >= 0.9  # a single token through one head: planting it is enough


def test_a_positional_feature_is_not_validated(mech):
    _, res, _, _ = mech
    rows = {r["feature"]: r for r in table(res).iter_rows(named=True)}
    _, positional = PM.features()
    for f in positional:
        assert rows[f]["n_tested"] >= 4 and not rows[f]["validated"] and rows[f]["necessity"] <= 0.1, rows[f]


def test_families_carry_their_test_and_gate(mech):
    _, res, _, db = mech
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    vals = con.execute("SELECT family, selected, passed, control, control_passed, test FROM validation "
                       "WHERE test = 'necessity' ORDER BY family").fetchall()
    names = {v[0] for v in vals}
    assert {"previous_token_via_0.1", "short_range_via_0.2", "long_range_via_0.3"} <= names
    for fam, sel, passed, ctl, ctl_passed, _ in vals:
        assert ctl == sel and ctl_passed <= 0.1 * passed or passed == 0, fam
    members = {r[0]: r[1:] for r in con.execute(
        "SELECT family, any_value(test), count(*), bool_and(is_primary), bool_or(is_primary) FROM families "
        "GROUP BY family").fetchall()}
    # head 0.1 is also a previous-token head: its features' behaviour family takes precedence
    assert members["previous_token"] == ("behaviour", 6, True, True)
    assert members["previous_token_via_0.1"] == ("necessity", 6, False, False)
    assert all(members[f"{c}_via_0.{h}"] == ("necessity", 6, True, True)
               for h, c in ((0, "current_token"), (2, "short_range"), (3, "long_range")))
    poly = {h: (v, roles) for h, v, roles in con.execute(
        "SELECT head, verdict, top_roles FROM head_polysemanticity ORDER BY head").fetchall()}
    # a head's most attributed features take their behaviour family, else their mechanism family; the
    # positional features of head 0.4 have neither (not validated), so that head stays unresolved
    assert poly[2][1][:6] == ["short_range"] * 6 and poly[1][1][:6] == ["previous_token"] * 6
    assert poly[4][1][:4] == [""] * 4 and poly[4][0] == "unresolved"
    con.close()


def test_three_shards_give_the_same_records(mech):
    _, one, three, _ = mech
    a, b = table(one), table(three)
    assert a.drop("head_share", "top_source_share").equals(b.drop("head_share", "top_source_share"))
    assert all(abs(x - y) < 1e-5 for ra, rb in zip(a["head_share"], b["head_share"]) for x, y in zip(ra, rb))


def test_run_edits_equals_a_forward_per_edit(mech):
    """Both paths of famfind.substitution (prefix cache; whole forward) against one forward per read."""
    from famfind.models.gpt2 import HFGPT2Model
    from famfind.sae import load_sae
    from famfind.substitution import run_edits

    paths, res, _, _ = mech
    m, sae = HFGPT2Model(paths["model"]), load_sae(paths["sae"])
    toks = res.ctx.corpus.tokens
    g = torch.Generator().manual_seed(0)
    E, R = 60, 800
    es, ep = torch.randint(0, toks.shape[0], (E,), generator=g), torch.randint(-1, PM.CTX, (E,), generator=g)
    et = torch.randint(1, PM.V, (E,), generator=g)
    re_, rp, rf = (torch.randint(0, E, (R,), generator=g), torch.randint(0, PM.CTX, (R,), generator=g),
                   torch.randint(0, 28, (R,), generator=g))

    class WholeForward:
        cfg = m.cfg

        def run_hook_z(self, t, layer):
            return m.run_hook_z(t, layer)

    want = torch.zeros(R)
    for i in range(R):
        t = toks[es[re_[i]]].clone()
        if ep[re_[i]] >= 0:
            t[ep[re_[i]]] = et[re_[i]]
        want[i] = sae.encode(m.run_hook_z(t[None], 0)[0, rp[i]].flatten())[rf[i]]
    assert int((want > 0).sum()) > 10
    for model in (m, WholeForward()):
        got = run_edits(model, sae, toks, es, ep, et, re_, rp, rf, token_budget=500)
        assert torch.allclose(got, want, atol=1e-4)


def test_run_edits_at_layer_1_equals_a_forward_per_read():
    """The layer-1 path of famfind.substitution on the embedded default (two layers): spans
    re-run from the edit with layer 0 updated through the edited key only (the top key removed
    from its kept sums, or a smaller key subtracted), against one whole forward per read; edits
    at, before and after their reads, clean runs, previous-token edits (head 0.0's top key)."""
    from famfind.corpus import default_dir, load_corpus
    from famfind.models.gpt2 import HFGPT2Model
    from famfind.sae import load_sae
    from famfind.substitution import run_edits

    m = HFGPT2Model(default_dir() / "model")
    sae = load_sae(default_dir() / "saes" / "blocks.1.attn.hook_z")
    toks = load_corpus(None, m.tokenizer, 128).tokens[:40]
    g = torch.Generator().manual_seed(0)
    E, R = 80, 600
    es = torch.randint(0, toks.shape[0], (E,), generator=g)
    ep = torch.randint(-1, 128, (E,), generator=g)
    et = torch.randint(0, m.cfg.d_vocab, (E,), generator=g)
    re_ = torch.randint(0, E, (R,), generator=g)
    rp = torch.randint(0, 128, (R,), generator=g)
    near = torch.rand(R, generator=g) < 0.5  # half the reads at or just after their edit (distance 0-2)
    rp = torch.where(near & (ep[re_] >= 0), (ep[re_] + torch.randint(0, 3, (R,), generator=g)).clamp_max(127), rp)
    z_all = {}
    for i in range(E):
        t = toks[es[i]].clone()
        if ep[i] >= 0:
            t[ep[i]] = et[i]
        z_all[i] = m.run_hook_z(t[None], 1)[0].flatten(-2)  # [128, d_in]
    acts = torch.stack([sae.encode(z_all[int(re_[i])][rp[i]]) for i in range(R)])  # [R, d_sae]
    rf = torch.where(torch.rand(R, generator=g) < 0.7, acts.argmax(-1), torch.randint(0, sae.d_sae, (R,), generator=g))
    want = acts[torch.arange(R), rf]
    assert int((want > 0).sum()) > 100
    got = run_edits(m, sae, toks, es, ep, et, re_, rp, rf, token_budget=700)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


def test_weighted_median_token_sets_and_group_median_against_a_loop():
    from famfind.heuristics.mechanism import group_median, token_sets, weighted_median

    g = torch.Generator().manual_seed(1)
    n, F = 400, 7
    f, v, w = torch.randint(0, F, (n,), generator=g), torch.randint(0, 20, (n,), generator=g), torch.rand(n, generator=g)
    med, sets, gm = weighted_median(f, v, w, F), token_sets(f, v, w, F, 0.8), group_median(f, w, F)
    for x in range(F):
        m = f == x
        vs, ws = v[m], w[m].double()
        o = torch.argsort(vs, stable=True)
        cum = ws[o].cumsum(0)
        assert int(med[x]) == int(vs[o][torch.nonzero(cum >= ws.sum() / 2)[0, 0]])
        tot = {}
        for t, ww in zip(vs.tolist(), ws.tolist()):
            tot[t] = tot.get(t, 0.0) + ww
        ranked = sorted(tot, key=lambda t: -tot[t])
        keep, acc = [], 0.0
        for t in ranked:
            if acc >= 0.8 * sum(tot.values()):
                break
            keep.append(t)
            acc += tot[t]
        assert sets[0][x] == keep and int(sets[2][x]) == len(keep)
        assert float(gm[x]) == float(w[m].sort().values[(int(m.sum()) - 1) // 2])


def test_feature_page_fits_80_columns_with_hostile_tokens(mech, tmp_path):
    """``famfind feature`` at 80 columns: no line longer, nothing cut, stored text literal."""
    import shutil

    import duckdb
    from typer.testing import CliRunner

    from famfind.cli import app

    _, _, _, db = mech
    d = tmp_path / "h.duckdb"
    shutil.copy(db, d)
    evil = ["[bold red]x[/]", "\x1b[31mred", "<script>", "a" * 120, "\n\t", "…"]
    con = duckdb.connect(str(d))
    con.execute("UPDATE feature_mechanism SET source_token_strs = ?, current_token_strs = ?", [evil, evil])
    con.execute("UPDATE dfa_source SET token_str = ?", [evil[0]])
    con.execute("UPDATE feature_logits SET token_str = ?", [evil[3]])
    for key in con.execute("SELECT feature, rank, len(tokens) FROM examples").fetchall():
        con.execute("UPDATE examples SET tokens = ? WHERE feature = ? AND rank = ?", [[evil[0]] * key[2], *key[:2]])
    con.close()
    env = {**os.environ, "COLUMNS": "80"}
    out = CliRunner().invoke(app, ["feature", "0", "13", "--db", str(d)], env=env)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert max(len(x) for x in lines) <= 80
    assert "[bold red]x[/]" in out.output and "\x1b[31m" not in out.output
    assert not [x for x in lines if re.search(r"\d…|…\d", x)]  # no number cut
    for head in ("Mechanism record", "Families", "Head attribution", "DFA by source", "Top-activating contexts"):
        assert any(x.startswith(head) for x in lines), head
    assert "necessity 1.00" in out.output and "short_range via head 0.2" in out.output
    bad = CliRunner().invoke(app, ["feature", "3", "1", "--db", str(d)], env=env)
    assert bad.exit_code == 1 and "is not in scan 1" in bad.output


def test_max_tested_runs_the_causal_tests_on_a_seeded_sample(mech, tmp_path):
    """``max_tested`` (scans at users' scale): the records are formed for every live feature as
    before, the causal tests run on exactly the seeded sample, the planted features in it are
    still validated, and the report says the tests were sampled."""
    from famfind.config import ScanConfig
    from famfind.errors import FamfindError
    from famfind.heuristics.mechanism import MechanismOptions, tested_sample
    from famfind.runner import run_scan

    paths, full, _, _ = mech
    whole = {r["feature"]: r for r in table(full).iter_rows(named=True)}
    eligible = torch.zeros(full.saes[0].ctx.sae.d_sae, dtype=torch.bool)
    eligible[[f for f, r in whole.items() if r["mechanism"] is not None]] = True
    n = int(eligible.sum()) // 2
    res = run_scan(ScanConfig(sae=str(paths["sae"]), corpus=str(paths["corpus"]), seq_len=PM.CTX,
                              select=("feature_mechanism",), detector_options={"feature_mechanism": {"max_tested": n}}))
    rows = {r["feature"]: r for r in table(res).iter_rows(named=True)}
    chosen = set(torch.nonzero(tested_sample(eligible, n, 0)).flatten().tolist())
    assert len(chosen) == n and chosen <= set(rows)
    tested = {f for f, r in rows.items() if r["n_tested"] > 0}
    assert tested <= chosen and len(tested) >= 0.9 * n
    for f, r in rows.items():  # the records themselves do not depend on the sample
        for col in ("mechanism", "top_head", "top_distance", "source_tokens", "n_formed"):
            assert r[col] == whole[f][col], (f, col)
        if f not in chosen:
            assert r["necessity"] is None and r["sufficiency"] is None and not r["validated"]
    dist, _ = PM.features()
    planted = chosen & set(dist)
    assert planted and all(rows[f]["validated"] and rows[f]["necessity"] >= 0.9 for f in planted)
    out = res.sae().results["feature_mechanism"].output
    assert out.n_chosen == n < out.n_records
    # the terminal report and the feature page say the tests were sampled
    from typer.testing import CliRunner

    from famfind.cli import app
    from famfind.frames import write_scan

    db = tmp_path / "sampled.duckdb"
    write_scan(db, res)
    env = {**os.environ, "COLUMNS": "200"}
    rep = CliRunner().invoke(app, ["report", "--db", str(db)], env=env)
    assert rep.exit_code == 0 and f"random sample of {n:,} of the {out.n_records:,} records" in rep.output, rep.output
    skipped = min(set(rows) - chosen - {f for f, r in rows.items() if r["mechanism"] is None})
    page = CliRunner().invoke(app, ["feature", "0", str(skipped), "--db", str(db)], env=env)
    assert page.exit_code == 0 and "tested a random sample of the records" in page.output, page.output
    assert tested_sample(eligible, 0, 0).equal(eligible) and tested_sample(eligible, 10 ** 6, 0).equal(eligible)
    with pytest.raises(FamfindError, match="max_tested"):
        MechanismOptions.from_dict({"max_tested": "-1"})
