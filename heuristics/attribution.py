"""Weights-only feature evidence: head attribution and direct-path logit effects.

- Head attribution (Kissane et al. 2024, §3 "weight-based head attribution"): split
  ``W_dec [d_sae, n_heads*d_head]`` into per-head blocks ``[d_sae, n_heads, d_head]``, take
  each block's L2 norm per feature, and normalise over heads so each feature's row sums to 1.
- Direct-path logits (the paper's "top boosted logits"): ``W_dec @ W_O @ W_U``, per feature
  ``[d_vocab]`` in logit units per unit feature activation (final LayerNorm ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.plugins import Column, Heuristic, Options, Output, Result, Table


@dataclass(frozen=True)
class HeadAttributionMatrix(Output):
    """``attribution [d_sae, n_heads]`` float: each feature's normalised per-head ``W_dec``
    block norms, rows sum to 1 (0 rows stay 0); heads of the SAE's layer."""

    attribution: torch.Tensor


@dataclass(frozen=True)
class TopBoostedTokens(Output):
    """``top_token [d_sae]`` long: the token each feature boosts most on the direct path;
    ``top_logit [d_sae]`` float: that logit, per unit feature activation."""

    top_token: torch.Tensor
    top_logit: torch.Tensor


def head_attribution(W_dec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Normalised per-head decoder norms, ``[d_sae, n_heads]``, rows sum to 1 (0 rows stay 0).

    ``W_dec``: ``[d_sae, n_heads*d_head]`` (heads concatenated as in hook_z).
    """
    norms = W_dec.reshape(W_dec.shape[0], n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def direct_logits(W_dec: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor, k: int,
                  chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` boosted and suppressed tokens per feature on the direct path.

    ``W_dec [d_sae, n_heads*d_head]``, ``W_O [n_heads, d_head, d_model]``, ``W_U [d_model, d_vocab]``.
    Returns ``(boost_vals, boost_ids, suppress_vals, suppress_ids)``, each ``[d_sae, k]``;
    computed in chunks of ``chunk`` features so a 24,576 x 50,257 matrix is never
    materialised (one chunk's logits: ``chunk * d_vocab * 4`` bytes, ~100 MB at GPT-2's vocab).
    """
    H, dh, _ = W_O.shape
    outs = ([], [], [], [])
    for s in range(0, W_dec.shape[0], chunk):
        resid = torch.einsum("fhd,hdm->fm", W_dec[s:s + chunk].reshape(-1, H, dh), W_O)
        logits = resid @ W_U
        bv, bi = logits.topk(k, dim=-1)
        sv, si = logits.topk(k, dim=-1, largest=False)
        for lst, t in zip(outs, (bv, bi, sv, si)):
            lst.append(t.cpu())
    return tuple(torch.cat(x) for x in outs)


class HeadAttribution(Heuristic):
    id = "head_attribution"
    version = "0.1"
    needs = "weights"
    produces = HeadAttributionMatrix
    tables = (Table("head_attribution", (
        Column("feature", "INTEGER", "SAE feature index"), Column("layer", "INTEGER", "layer of the head"),
        Column("head", "INTEGER", "head index"),
        Column("attribution", "FLOAT", "share of the feature's W_dec norm on this head (rows sum to 1)")),
        "per feature and head: weight-based head attribution (Kissane et al. 2024)"),)
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
        return Result(output=HeadAttributionMatrix(att), tables={"head_attribution": df})

    @classmethod
    def html_part(cls, section) -> dict:
        return {"features": section.per_feature(
            "SELECT feature, round(attribution, 3) AS a FROM head_attribution WHERE scan_id = ? AND sae = ? ORDER BY feature, head",
            lambda r, card: card.setdefault("att", []).append(r["a"]))}


@dataclass(frozen=True)
class FeatureLogitsOptions(Options):
    k: int = 10


class FeatureLogits(Heuristic):
    id = "feature_logits"
    version = "0.1"
    needs = "weights"
    produces = TopBoostedTokens
    tables = (Table("feature_logits", (
        Column("feature", "INTEGER", "SAE feature index"), Column("direction", "VARCHAR", "boost or suppress"),
        Column("rank", "INTEGER", "0 = strongest"), Column("token", "INTEGER", "token id"),
        Column("token_str", "VARCHAR", "the token's text"),
        Column("logit", "FLOAT", "direct-path logit per unit activation")),
        "top boosted / suppressed tokens per feature on the direct path W_dec W_O W_U"),)
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
        return Result(output=TopBoostedTokens(bi[:, 0].clone(), bv[:, 0].clone()), tables={"feature_logits": df})

    @classmethod
    def render_terminal(cls, section) -> None:
        rows = section.query("""
            SELECT f.family, f.feature, f.confidence, l.token_str, ft.density
            FROM families f
            LEFT JOIN feature_logits l ON l.scan_id = f.scan_id AND l.sae = f.sae AND l.feature = f.feature
                 AND l.direction = 'boost' AND l.rank = 0
            JOIN features ft ON ft.scan_id = f.scan_id AND ft.sae = f.sae AND ft.feature = f.feature
            WHERE f.scan_id = ? AND f.sae = ? ORDER BY f.family, f.confidence DESC, f.feature LIMIT 10""")
        if rows:
            section.table("Top family members (first 10)", ("family", "feature", "confidence", "top boosted token",
                                                           "density"),
                          [(fam, str(f), f"{c:.2f}", json.dumps(t) if t is not None else "-", f"{d:.2e}")
                           for fam, f, c, t, d in rows])

    @classmethod
    def html_part(cls, section) -> dict:
        def add(r, card):
            card.setdefault("logits", {"boost": [], "suppress": []})[r["direction"]].append([r["token_str"], r["l"]])
        return {"features": section.per_feature(
            "SELECT feature, direction, token_str, round(logit, 3) AS l FROM feature_logits WHERE scan_id = ? AND sae = ? "
            "AND rank < 5 ORDER BY feature, direction, rank", add)}
