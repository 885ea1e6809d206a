"""DFA-by-source samples kept in the pass (famfind.sources, detector ``source_samples``): the
slots equal a brute-force recomputation, follow their sampling rules, and shards merge to one
pass's answer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def sampled(planted_paths):
    from famfind.config import ScanConfig
    from famfind.heuristics.dfa import SourceSamples
    from famfind.runner import run_scan

    def scan(shards):
        cfg = ScanConfig(sae=str(planted_paths["sae"]), corpus=str(planted_paths["corpus"]), seq_len=64,
                         select=("source_samples",), shards=shards)
        res = run_scan(cfg)
        return res, res.output(SourceSamples)

    return scan(1), scan(3)


def test_slots_equal_dfa_by_source_recomputed(sampled):
    from famfind.dfa import dfa_by_source

    (res, samp), _ = sampled
    ctx = res.ctx
    sae, model, tokens = ctx.sae, ctx.model, ctx.corpus.tokens
    checked = 0
    for part in (samp.top, samp.uniform, samp.held_out):
        kk, ff = torch.nonzero(part.seq >= 0, as_tuple=True)
        pick = torch.randperm(kk.numel(), generator=torch.Generator().manual_seed(0))[:40]
        for k, f in zip(kk[pick].tolist(), ff[pick].tolist()):
            s, p = int(part.seq[k, f]), int(part.pos[k, f])
            pat, v = model.attn_parts(tokens[s:s + 1], sae.layer)
            c = dfa_by_source(pat[0], v[0], sae.W_enc, sae.b_dec, torch.tensor([f]), torch.tensor([p]))[0]  # [H, src]
            src = c.sum(0)
            assert torch.allclose(part.total[k, f], src.sum(), atol=1e-4)
            assert torch.allclose(part.pos_total[k, f], src.clamp_min(0).sum(), atol=1e-4)
            assert torch.allclose(part.head_val[k, f], c.sum(1), atol=1e-4)
            val, pos = src.topk(part.src_pos.shape[-1])
            assert torch.allclose(part.src_val[k, f], val, atol=1e-4)
            assert int(part.src_pos[k, f, 0]) == int(pos[0])
            # the activation is the SAE's at that position
            z = model.run_hook_z(tokens[s:s + 1], sae.layer)[0, p].flatten()
            assert torch.allclose(part.act[k, f], sae.encode(z)[f], atol=1e-4)
            checked += 1
    assert checked >= 100


def test_sampling_rules(sampled):
    (res, samp), _ = sampled
    st = res.ctx.stats
    top = samp.top
    assert torch.equal(top.seq, st.top_seq) and torch.equal(top.pos, st.top_pos)  # the same top examples
    u, h = samp.uniform, samp.held_out
    assert bool(((u.seq < 0) | (u.seq % 2 == 0)).all()) and bool(((h.seq < 0) | (h.seq % 2 == 1)).all())
    live = ~st.dead
    assert bool((u.seq[0, live] >= 0).any()) and bool((h.seq[0, live] >= 0).any())
    for f in torch.nonzero(live).flatten().tolist():  # at most per_seq held-out positions of one sequence
        s = h.seq[:, f]
        s = s[s >= 0]
        if s.numel():
            assert int(torch.unique(s, return_counts=True)[1].max()) <= samp.per_seq
            pairs = set(zip(h.seq[:, f].tolist(), h.pos[:, f].tolist())) - {(-1, -1)}
            assert len(pairs) == s.numel()  # no position twice


def test_three_shards_merge_to_one_pass(sampled):
    (_, one), (_, three) = sampled
    for a, b in ((one.top, three.top), (one.uniform, three.uniform), (one.held_out, three.held_out)):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.pos, b.pos) and torch.equal(a.src_pos, b.src_pos)
        for name in ("act", "src_val", "total", "pos_total", "head_val"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5), name


def test_sample_keys_take_any_seed():
    """A seed past 2^32 (``--seed`` is any int) gave an OverflowError in the int64 key
    arithmetic; keys are now a function of the seed mod 2^32, unchanged below it."""
    from famfind.activations import _mix32, position_keys
    from famfind.sources import sequence_keys

    seq, pos, feat = torch.arange(50), torch.arange(50) % 7, torch.arange(50) * 13
    for seed in (0, 12345, 2**32 - 1):  # the formulas as they were, for seeds that fit
        old_seq = (_mix32(_mix32((seq * 0x2545F491 + seed * 0x9E3779B1 + 0x51ED27) & 0xFFFFFFFF)) >> 1).long()
        assert torch.equal(sequence_keys(seed, seq), old_seq)
        h = _mix32(_mix32((seq * 0x9E3779B1 + seed) & 0xFFFFFFFF) ^ pos)
        h1 = _mix32(h ^ feat)
        old_pos = ((h1 << 20) | (_mix32(h1 ^ 0x5BD1E995) >> 12)).double() / float(1 << 52)
        assert torch.equal(position_keys(seed, seq, pos, feat), old_pos)
    big = 2**40 + 12345
    assert torch.equal(sequence_keys(big, seq), sequence_keys(12345, seq))
    assert torch.equal(position_keys(big, seq, pos, feat), position_keys(12345, seq, pos, feat))
