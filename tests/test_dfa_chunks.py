"""Chunked computations equal their one-shot definitions (memory bounds must not change numbers)."""

from __future__ import annotations

import torch

from famfind.dfa import HeadDFAAccumulator
from famfind.heuristics.attribution import direct_logits


def test_head_dfa_chunks_equal_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, T, H, dh, F = 3, 16, 4, 8, 40
    z = torch.randn(B, T, H, dh, generator=g)
    W_enc = torch.randn(H * dh, F, generator=g)
    b_dec = torch.randn(H * dh, generator=g)
    acts = torch.relu((z.reshape(B, T, -1) - b_dec) @ W_enc - 2.0)
    assert (acts > 0).sum() > 100
    one = HeadDFAAccumulator(F, H)
    one.update(z, acts, W_enc.T.contiguous(), b_dec)
    monkeypatch.setattr(HeadDFAAccumulator, "CHUNK", 7)
    many = HeadDFAAccumulator(F, H)
    many.update(z, acts, W_enc.T.contiguous(), b_dec)
    torch.testing.assert_close(many.num, one.num, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(many.den, one.den, rtol=1e-12, atol=1e-9)
    # by definition: sum over firing positions of dfa_h * a / sum a^2
    b, t, f = torch.nonzero(acts > 0, as_tuple=True)
    dfa = ((z[b, t] - b_dec.view(H, dh)) * W_enc.T[f].view(-1, H, dh)).sum(-1)
    a = dfa.sum(-1)
    num = torch.zeros(F, H, dtype=torch.float64).index_add_(0, f, (dfa * a[:, None]).double())
    torch.testing.assert_close(one.num, num, rtol=1e-6, atol=1e-6)


def test_direct_logits_chunks_equal_dense_topk():
    g = torch.Generator().manual_seed(1)
    F, H, dh, dm, V, k = 37, 3, 4, 10, 50, 5
    W_dec, W_O, W_U = torch.randn(F, H * dh, generator=g), torch.randn(H, dh, dm, generator=g), torch.randn(dm, V, generator=g)
    dense = W_dec @ W_O.reshape(H * dh, dm) @ W_U
    bv, bi, sv, si = direct_logits(W_dec, W_O, W_U, k, chunk=8)
    assert bi.tolist() == dense.topk(k).indices.tolist()
    assert si.tolist() == (-dense).topk(k).indices.tolist()
    torch.testing.assert_close(sv, dense.gather(1, si))
    assert (sv[:, :-1] <= sv[:, 1:]).all()  # most suppressed first
    torch.testing.assert_close(bv, dense.gather(1, bi))
