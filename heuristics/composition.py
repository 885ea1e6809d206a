"""Head composition: Q-, K- and V-composition scores between every pair of heads in different
layers (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits", §"Virtual
attention heads"; TransformerLens ``HookedTransformer.all_composition_scores``).

For an earlier head ``h1`` (OV circuit ``W_OV = W_V W_O``, ``[d_model, d_model]``) and a later
head ``h2`` (QK circuit ``W_QK = W_Q W_K^T``), the score is
``||left @ right||_F / (||left||_F ||right||_F)`` with ``left = W_OV(h1)`` and ``right`` =
``W_QK(h2)`` (Q), ``W_QK(h2)^T`` (K) or ``W_OV(h2)`` (V), on the weights as
``from_pretrained`` processes them (:meth:`famfind.models.base.AttnModel.circuit_weights`). The
Frobenius norms are computed in the factored form (``d_head x d_head`` Gram matrices), so
GPT-2 small's 144 x 144 head pairs cost a few GFLOP, never a ``d_model^2`` matrix per pair.
An induction head is expected to K-compose with a previous-token head of an earlier layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from famfind.heuristics.head_roles import HeadRoleScores
from famfind.plugins import Column, Heuristic, Output, Result, Table

MODES = ("Q", "K", "V")


def _gram(W: torch.Tensor) -> torch.Tensor:
    """``W^T W`` per head: ``[H, d_model, d_head]`` -> ``[H, d_head, d_head]``."""
    return W.transpose(-1, -2) @ W


@torch.no_grad()
def composition_scores(model) -> dict[str, torch.Tensor]:
    """``{mode: [n_layers, n_heads, n_layers, n_heads]}`` for mode Q, K, V: entry
    ``[l1, h1, l2, h2]`` is the composition of head ``l1.h1`` into ``l2.h2`` (0 unless
    ``l1 < l2``), in [0, 1], equal to TransformerLens's ``all_composition_scores(mode)``
    (where that is 0/0, a head with all-zero weights, the score is 0 here).

    ``||A M B^T||_F^2 = sum(M * (A^T A) M (B^T B))`` with ``M = W_O(h1) @ W_Q(h2)`` (Q),
    ``W_O(h1) @ W_K(h2)`` (K) or ``W_O(h1) @ W_V(h2)`` (V)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    w = [tuple(x.double() for x in model.circuit_weights(lyr)) for lyr in range(L)]  # (W_Q, W_K, W_V, W_O)
    out = {m: torch.zeros(L, H, L, H, dtype=torch.float64) for m in MODES}
    g = [{"Q": _gram(q), "K": _gram(k), "V": _gram(v), "O": o @ o.transpose(-1, -2)} for q, k, v, o in w]
    ov_norm = [torch.einsum("hij,hji->h", gi["V"], gi["O"]).clamp_min(0).sqrt() for gi in g]  # ||W_V W_O||_F
    qk_norm = [torch.einsum("hij,hji->h", gi["Q"], gi["K"]).clamp_min(0).sqrt() for gi in g]  # ||W_Q W_K^T||_F
    for l1 in range(L):
        WO1, GV1 = w[l1][3], g[l1]["V"]
        for l2 in range(l1 + 1, L):
            q2, k2, v2, _ = w[l2]
            for mode, W2, G2, n2 in (("Q", q2, g[l2]["K"], qk_norm[l2]), ("K", k2, g[l2]["Q"], qk_norm[l2]),
                                     ("V", v2, g[l2]["O"], ov_norm[l2])):
                M = torch.einsum("ide,jef->ijdf", WO1, W2)  # [H1, H2, d_head, d_head]
                sq = (M * (GV1[:, None] @ M @ G2[None])).sum((-1, -2))
                den = ov_norm[l1][:, None] * n2[None, :]
                out[mode][l1, :, l2, :] = torch.where(den > 0, sq.clamp_min(0).sqrt() / den.clamp_min(1e-300), 0.0)
    return {m: v.float() for m, v in out.items()}


@dataclass(frozen=True)
class HeadComposition(Output):
    """``scores``: mode (Q, K, V) -> ``[n_layers, n_heads, n_layers, n_heads]`` composition
    scores in [0, 1] (see the module doc); ``strongest_k_into_induction``: for each induction
    head ``"l.h"``, the earlier head with the highest K-composition into it and the score."""

    scores: dict[str, torch.Tensor]
    strongest_k_into_induction: dict[str, list]


class HeadCompositionScores(Heuristic):
    id = "head_composition"
    version = "0.1"
    needs = "weights"
    scope = "model"
    produces = HeadComposition
    requires = (HeadRoleScores,)
    tables = (Table("head_composition", (
        Column("layer_from", "INTEGER", "layer of the earlier head (writes into the residual stream)"),
        Column("head_from", "INTEGER", "earlier head"),
        Column("layer_to", "INTEGER", "layer of the later head (reads it)"),
        Column("head_to", "INTEGER", "later head"),
        Column("mode", "VARCHAR", "Q, K or V composition"),
        Column("score", "DOUBLE", "composition score in [0, 1] (Elhage et al. 2021)"),
    ), "Q/K/V-composition of every pair of heads in different layers"),)
    description = "Q/K/V-composition scores between heads of different layers (Elhage et al. 2021)"

    def run(self, ctx) -> Result:
        scores = composition_scores(ctx.model)
        L, H = ctx.model.cfg.n_layers, ctx.model.cfg.n_heads
        rows = {c: [] for c in ("layer_from", "head_from", "layer_to", "head_to", "mode", "score")}
        for mode, s in scores.items():
            for l1 in range(L):
                for l2 in range(l1 + 1, L):
                    for h1 in range(H):
                        for h2 in range(H):
                            for c, v in zip(rows, (l1, h1, l2, h2, mode, float(s[l1, h1, l2, h2]))):
                                rows[c].append(v)
        strongest = {}
        for name in ctx.output(HeadRoleScores).induction_heads:
            l2, h2 = map(int, name.split("."))
            if l2 == 0:
                continue
            k = scores["K"][:l2, :, l2, h2]
            best = int(k.argmax())
            strongest[name] = [f"{best // H}.{best % H}", round(float(k.flatten()[best]), 4)]
        return Result(output=HeadComposition(scores, strongest), tables={"head_composition": pl.DataFrame(rows)})

    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary.get("strongest_k_into_induction", {})
        rows = section.query("""SELECT layer_to || '.' || head_to AS into, layer_from || '.' || head_from AS head,
            round(score, 3) FROM head_composition WHERE scan_id = ? AND mode = 'K'
            QUALIFY row_number() OVER (PARTITION BY layer_to, head_to ORDER BY score DESC) <= 2
            ORDER BY layer_to, head_to, score DESC""")
        ind = set(s)
        rows = [r for r in rows if r[0] in ind]
        if rows:
            section.table("K-composition into each induction head (Elhage et al. 2021; induction heads K-compose "
                          "with a previous-token head)", ("induction head", "earlier head", "K-composition"), rows)
