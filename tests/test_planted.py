"""Detectors recover families planted by construction (see tests/planted.py)."""

from __future__ import annotations

import duckdb
import torch

import planted
from famfind.heuristics.head_roles import HeadRoleScores
from famfind.heuristics.induction import InductionBehaviourRates, InductionFamily


def _family(result) -> set[int]:
    return set(torch.nonzero(result.output(InductionFamily).members).flatten().tolist())


def test_head_roles_find_the_wired_heads(planted_scan):
    result, _, _ = planted_scan
    hr = result.output(HeadRoleScores)
    assert hr.induction_heads == ["1.0"]  # only head 1.0 is wired for induction
    s = hr.scores
    assert s["induction"][1, 0] > 0.6 and s["induction"][1, 1:].max() < 0.1
    assert s["previous_token"][0, 0] > 0.9 and s["previous_token"][1, 2] > 0.9


def test_induction_family_precision_recall(planted_scan):
    result, _, _ = planted_scan
    truth = set(planted.INDUCTION)
    found = _family(result)
    tp = len(found & truth)
    precision, recall = tp / max(len(found), 1), tp / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, sorted(found))


def test_selection_takes_decoys_and_behaviour_rejects_them(planted_scan):
    result, _, _ = planted_scan
    sel = result.output(InductionFamily).selected
    assert set(torch.nonzero(sel).flatten().tolist()) == set(planted.INDUCTION) | set(planted.DECOYS)
    passed = result.output(InductionBehaviourRates).passed
    assert not passed[planted.DECOYS].any()


def test_control_group_rarely_passes(planted_scan):
    result, _, _ = planted_scan
    ctrl = result.output(InductionFamily).control
    assert set(torch.nonzero(ctrl).flatten().tolist()) == set(planted.CONTROLS)  # live, < 0.1 attribution
    passed = result.output(InductionBehaviourRates).passed
    assert passed[ctrl].float().mean() <= 0.05


def test_ablating_the_induction_head_turns_the_family_off(planted_scan):
    result, db, sid = planted_scan
    con = duckdb.connect(str(db), read_only=True)
    row = con.execute("SELECT selected, passed, control, control_passed, ablation_tested, ablation_off "
                      "FROM validation WHERE scan_id = ? AND family = 'induction'", [sid]).fetchall()
    con.close()
    sel, passed, ctrl, ctrl_passed, tested, off = row[0]
    assert (sel, ctrl) == (40, 60)
    assert passed >= 19 and ctrl_passed <= 3
    assert tested >= 15 and off == tested


def test_dead_features_are_flagged(planted_scan):
    result, _, _ = planted_scan
    dead = result.ctx.stats.dead
    assert set(torch.nonzero(dead).flatten().tolist()) == set(planted.DEAD)


def test_behaviour_vectorised_matches_per_feature_loop(planted_paths):
    """The vectorised checks equal a plain per-sequence, per-position Python loop."""
    import numpy as np

    from famfind.models.gpt2 import HFGPT2Model
    from famfind.sae import load_sae
    from famfind.heuristics.induction import behaviour_checks

    m, sae = HFGPT2Model(planted_paths["model"]), load_sae(planted_paths["sae"])
    toks = torch.from_numpy(np.load(planted_paths["corpus"]).astype(np.int64).reshape(-1, 64))[:40]
    acts = sae.encode(m.run_hook_z(toks, 1).flatten(-2))
    top = torch.arange(128) % 64
    elig, passed = behaviour_checks(toks, acts, top)
    for b in range(toks.shape[0]):
        s = toks[b].tolist()
        for f in range(0, 128, 7):
            seen, ok, any_later = set(), True, False
            for p in range(63):
                big = (s[p], s[p + 1])
                if s[p + 1] == int(top[f]):
                    fires = bool(acts[b, p, f] > 0)
                    if big in seen:
                        any_later = True
                        ok &= fires
                    else:
                        ok &= not fires
                seen.add(big)
            assert bool(elig[b, f]) == any_later
            assert bool(passed[b, f]) == (any_later and ok)


def test_examples_samples_and_random_contexts_match_recomputed_activations(planted_scan):
    """The pass's top-example windows, its uniform firing sample (activation quantiles) and the
    random non-activating positions agree with activations recomputed from scratch."""
    from famfind.activations import WINDOW

    result, _, _ = planted_scan
    ctx, st = result.ctx, result.ctx.stats
    toks = ctx.corpus.tokens
    with torch.no_grad():
        acts = torch.cat([ctx.sae.encode(ctx.model.run_hook_z(toks[i:i + 64], 1).flatten(-2))
                          for i in range(0, toks.shape[0], 64)])  # [n_seq, pos, d_sae]
    T = toks.shape[1]
    live = torch.nonzero(~st.dead).flatten()
    assert live.numel() > 10
    for f in live[:: max(1, live.numel() // 12)].tolist():
        n_fire = int((acts[..., f] > 0).sum())
        got = st.sample_seq[:, f] >= 0
        assert int(got.sum()) == min(n_fire, st.sample_seq.shape[0])  # a full sample, no duplicates
        pairs = {(int(s), int(p)) for s, p in zip(st.sample_seq[got, f], st.sample_pos[got, f])}
        assert len(pairs) == int(got.sum())
        assert (st.sample_acts[got, f][:-1] >= st.sample_acts[got, f][1:]).all()  # sorted by act
        for seqs, poss, vals, wins in ((st.sample_seq, st.sample_pos, st.sample_acts, st.sample_win),
                                       (st.top_seq, st.top_pos, st.top_acts, st.top_win)):
            for r in range(seqs.shape[0]):
                s, p = int(seqs[r, f]), int(poss[r, f])
                if s < 0:
                    continue
                assert acts[s, p, f] > 0
                torch.testing.assert_close(vals[r, f], acts[s, p, f], rtol=1e-4, atol=1e-5)
                for j, o in enumerate(range(*WINDOW)):
                    want = acts[s, p + o, f] if 0 <= p + o < T else torch.tensor(0.0)
                    torch.testing.assert_close(wins[r, f, j].float(), want.half().float(), rtol=2e-3, atol=1e-3)
    for s, p, active in zip(st.random_seq.tolist(), st.random_pos.tolist(), st.random_active):
        assert active == torch.nonzero(acts[s, p] > 0).flatten().tolist()


def test_random_contexts_are_distinct_uniform_and_need_no_corpus_sized_memory():
    from famfind.activations import RandomContexts

    # 10^12 positions: a permutation of them (the old sampler) cannot be allocated at all
    big = RandomContexts(256, n_seq=10**10, T=100, seed=3)
    flat = big.seq * 100 + big.pos
    assert flat.numel() == 256 and flat.unique().numel() == 256 and (flat[1:] > flat[:-1]).all()
    assert 0 <= int(flat.min()) and int(flat.max()) < 10**12
    assert (flat < 5 * 10**11).sum() not in (0, 256)  # spread over the corpus, not its start
    again = RandomContexts(256, n_seq=10**10, T=100, seed=3)
    assert torch.equal(again.seq, big.seq) and torch.equal(again.pos, big.pos)  # from the seed
    small = RandomContexts(256, n_seq=3, T=10, seed=0)  # fewer positions than asked: all of them
    assert sorted((small.seq * 10 + small.pos).tolist()) == list(range(30))
