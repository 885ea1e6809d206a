"""Weights-only feature evidence: head attribution and direct-path logit effects.

- Head attribution (Kissane et al. 2024, §3 "weight-based head attribution"): split
  ``W_dec [d_sae, n_heads*d_head]`` into per-head blocks ``[d_sae, n_heads, d_head]``, take
  each block's L2 norm per feature, and normalise over heads so each feature's row sums to 1.
- Direct-path logits (the paper's "top boosted logits"): ``W_dec @ W_O @ W_U``, per feature
  ``[d_vocab]`` in logit units per unit feature activation (final LayerNorm ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.plugins import Heuristic, Options, Result


def head_attribution(W_dec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Normalised per-head decoder norms, ``[d_sae, n_heads]``, rows sum to 1 (0 rows stay 0).

    ``W_dec``: ``[d_sae, n_heads*d_head]`` (heads concatenated as in hook_z).
    """
    norms = W_dec.reshape(W_dec.shape[0], n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def direct_logits(W_dec: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor, k: int,
                  chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` boosted and suppressed tokens per feature on the direct path.

    ``W_dec [d_sae, n_heads*d_head]``, ``W_O [n_heads, d_head, d_model]``, ``W_U [d_model, d_vocab]``.
    Returns ``(boost_vals, boost_ids, suppress_vals, suppress_ids)``, each ``[d_sae, k]``;
    computed in chunks of features so a 24,576 x 50,257 matrix is never materialised.
    """
    H, dh, _ = W_O.shape
    outs = ([], [], [], [])
    for s in range(0, W_dec.shape[0], chunk):
        resid = torch.einsum("fhd,hdm->fm", W_dec[s:s + chunk].reshape(-1, H, dh), W_O)
        logits = resid @ W_U
        bv, bi = logits.topk(k, dim=-1)
        sv, si = (-logits).topk(k, dim=-1)
        for lst, t in zip(outs, (bv, bi, -sv, si)):
            lst.append(t.cpu())
    return tuple(torch.cat(x) for x in outs)


class HeadAttribution(Heuristic):
    id = "head_attribution"
    version = "0.1"
    needs = "weights"
    description = "Per feature, normalised per-head W_dec norms (Kissane et al. 2024)"

    def run(self, ctx) -> Result:
        att = head_attribution(ctx.sae.W_dec, ctx.model.cfg.n_heads).cpu()  # [d_sae, n_heads]
        F, H = att.shape
        df = pl.DataFrame({
            "feature": np.repeat(np.arange(F), H).astype(np.int32),
            "layer": np.full(F * H, ctx.layer, dtype=np.int32),
            "head": np.tile(np.arange(H), F).astype(np.int32),
            "attribution": att.reshape(-1).numpy().astype(np.float32),
        })
        return Result(tables={"head_attribution": df}, data={"attribution": att})


@dataclass(frozen=True)
class FeatureLogitsOptions(Options):
    k: int = 10


class FeatureLogits(Heuristic):
    id = "feature_logits"
    version = "0.1"
    needs = "weights"
    description = "Top boosted / suppressed tokens per feature on the direct path W_dec W_O W_U"
    Options = FeatureLogitsOptions

    def run(self, ctx) -> Result:
        m, k = ctx.model, self.options.k
        bv, bi, sv, si = direct_logits(ctx.sae.W_dec, m.W_O(ctx.layer), m.W_U(), k)
        F = bv.shape[0]
        tok = m.tokenizer
        ids = torch.cat([bi, si], 1).reshape(-1).numpy()
        strs = {int(t): tok.token_str(int(t)) if tok is not None else str(int(t)) for t in np.unique(ids)}
        df = pl.DataFrame({
            "feature": np.repeat(np.arange(F), 2 * k).astype(np.int32),
            "direction": np.tile(np.repeat(np.array(["boost", "suppress"]), k), F),
            "rank": np.tile(np.arange(2 * k) % k, F).astype(np.int32),
            "token": ids.astype(np.int32),
            "token_str": [strs[int(t)] for t in ids],
            "logit": torch.cat([bv, sv], 1).reshape(-1).numpy().astype(np.float32),
        })
        return Result(tables={"feature_logits": df}, data={"top_token": bi[:, 0].clone(), "top_logit": bv[:, 0].clone()})
