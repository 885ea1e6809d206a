"""Recursive direct feature attribution (RDFA; Kissane et al. 2024, arXiv 2406.17759, §3,
"recursive DFA"): trace an attention-SAE feature back through the residual stream into the
upstream layers' attention-SAE features.

For a layer-L feature ``f`` firing at ``dest`` on one of its top examples, DFA by source
(:func:`famfind.dfa.dfa_by_source`) gives each source position's part of the
pre-activation: ``sum_h pattern[h, dest, src] * (v[src, h] - b_dec_h) . w_f[h]`` with
``v = ln1(x) @ W_V + b_V``. With ln1's scale frozen from the forward (as Kissane et al. do),
``ln1(x) = gamma * (x - mean(x)) / scale + beta`` is linear in the residual stream ``x`` at
``src``, so the part splits exactly over ``x``'s components: the token and position
embeddings (``embed``, ``pos``), each earlier layer's MLP output (``mlp``) and attention output.
An earlier layer's attention output ``z @ W_O + b_O`` is split further with that layer's SAE
in the same scan, ``z = sum_g a_g W_dec[g] + b_dec + error``: one row per upstream feature
(``attn_feature``: the ``n_upstream`` largest by |contribution|; the rest summed in
``attn_feature_rest``), ``attn_error`` and ``attn_bias`` (``b_dec @ W_O + b_O``); a layer
without an SAE in the scan stays whole (``attn``). ``bias`` is the constant part
(``beta @ W_V + b_V - b_dec``). The rows of one (feature, example, source) sum to its DFA.

Features traced: every family member of the SAE (``features="families"``), or every live
feature (``"all"``), at most ``max_features``; ``n_examples`` top examples each, the
``n_sources`` sources with the largest DFA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.errors import FamfindError
from famfind.heuristics.context import ContextFamilies
from famfind.heuristics.polysemanticity import FAMILY_TYPES, family_outcomes
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table


@dataclass(frozen=True)
class RDFAOptions(Options):
    features: str = "families"  # "families": family members; "all": every live feature
    max_features: int = 4096
    n_examples: int = 3  # top-activating examples per feature
    n_sources: int = 3  # source positions per example (largest DFA)
    n_upstream: int = 5  # upstream SAE features kept per (example, source, layer)
    batch_size: int = 16  # sequences per model run


@dataclass(frozen=True)
class RecursiveDFA(Output):
    """``features``: features traced; ``examples``: (feature, example) pairs; ``rows``: rows
    of table ``rdfa``; ``upstream_layers``: earlier layers decomposed into SAE features;
    ``whole_layers``: earlier layers without an SAE in the scan."""

    features: int
    examples: int
    rows: int
    upstream_layers: list[int]
    whole_layers: list[int]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


class RDFA(Heuristic):
    id = "rdfa"
    version = "0.1"
    needs = "activations"
    produces = RecursiveDFA
    requires = (ContextFamilies, *FAMILY_TYPES)
    tables = (Table("rdfa", (
        Column("feature", "INTEGER", "SAE feature index (this SAE)"),
        Column("example_rank", "INTEGER", "rank of the top example"),
        Column("seq", "INTEGER", "corpus sequence"), Column("pos", "INTEGER", "firing position"),
        Column("src_pos", "INTEGER", "source position the layer's attention reads"),
        Column("component", "VARCHAR", "embed, pos, mlp, attn, attn_feature, attn_feature_rest, attn_error, "
                                       "attn_bias or bias"),
        Column("upstream_layer", "INTEGER", "layer of the mlp/attn component (NULL: embed, pos, bias)"),
        Column("upstream_feature", "INTEGER", "the upstream SAE's feature (attn_feature only)"),
        Column("contribution", "FLOAT", "part of the feature's pre-activation (rows of a source sum to its DFA)"),
    ), "recursive DFA: each traced feature's top sources split into embeddings, MLPs and upstream SAE features"),)
    description = "Recursive DFA into upstream attention-SAE features (Kissane et al. 2024)"
    Options = RDFAOptions

    def _targets(self, ctx) -> torch.Tensor:
        live = ~ctx.stats.dead
        if self.options.features == "all":
            sel = live
        elif self.options.features == "families":
            sel = torch.zeros_like(live)
            for o in family_outcomes(ctx):
                sel |= o.members
        else:
            raise ValueError(f"features must be 'families' or 'all', not {self.options.features!r}")
        return torch.nonzero(sel & live).flatten()[: self.options.max_features]

    @torch.no_grad()
    def run(self, ctx) -> Result:
        o, sae, L, dev = self.options, ctx.sae, ctx.layer, ctx.config.device
        feats = self._targets(ctx)
        up = {}  # layer -> the first SAE of the scan at that layer (upstream of this one)
        for s in ctx.saes.values():
            if s.layer < L and s.layer not in up:
                up[s.layer] = s
        whole = [lyr for lyr in range(L) if lyr not in up]
        st = ctx.stats
        k = min(o.n_examples, st.top_seq.shape[0])
        seq, pos = st.top_seq[:k][:, feats], st.top_pos[:k][:, feats]  # [k, n_feat]
        rank, fi = torch.nonzero(seq >= 0, as_tuple=True)
        ex_f, ex_seq, ex_pos = feats[fi], seq[rank, fi], pos[rank, fi]
        order = torch.argsort(ex_seq, stable=True)
        rank, ex_f, ex_seq, ex_pos = rank[order], ex_f[order], ex_seq[order], ex_pos[order]
        H = ctx.model.cfg.n_heads
        W_enc = sae.W_enc.view(H, -1, sae.d_sae)  # [H, dh, d_sae]
        b_dec = sae.b_dec.view(H, -1) if sae.apply_b_dec_to_input else torch.zeros(H, W_enc.shape[1], device=dev)
        D = {}  # layer -> upstream W_dec @ W_O [d_sae_l, d_model]
        rows: dict[str, list] = {c: [] for c in ("feature", "example_rank", "seq", "pos", "src_pos", "component",
                                                   "upstream_layer", "upstream_feature", "contribution")}

        def add(i_ex, src, comp, layer, feat, val):
            n = val.numel()
            for c, v in (("feature", ex_f[i_ex]), ("example_rank", rank[i_ex]), ("seq", ex_seq[i_ex]),
                         ("pos", ex_pos[i_ex]), ("src_pos", src)):
                rows[c].append(v.cpu().numpy().astype(np.int64))
            rows["component"].append(np.full(n, comp, dtype=object))
            rows["upstream_layer"].append(np.full(n, -1 if layer is None else layer, dtype=np.int64))
            rows["upstream_feature"].append(np.full(n, -1, dtype=np.int64) if feat is None else feat.cpu().numpy())
            rows["contribution"].append(val.float().cpu().numpy())

        uniq = torch.unique_consecutive(ex_seq)
        for b in range(0, uniq.numel(), o.batch_size):
            ids = uniq[b:b + o.batch_size]
            try:
                P = ctx.model.resid_parts(ctx.corpus.tokens[ids].to(dev), L)
            except FamfindError as e:  # a model without the decomposition: this detector fails, the scan goes on
                raise FamfindError(f"detector {self.id!r}", f"{e.where}: {e.problem}") from None
            sel = torch.nonzero((ex_seq[:, None] == ids[None, :]).any(1)).flatten()
            j = torch.searchsorted(ids, ex_seq[sel])  # row of each example in this batch
            w = W_enc[:, :, ex_f[sel]].permute(2, 0, 1)  # [n, H, dh]
            pat = P.pattern[j, :, ex_pos[sel], :]  # [n, H, src]
            x = self._resid(P)
            ln = P.gamma * (x - x.mean(-1, keepdim=True)) / P.scale + P.beta
            vv = torch.einsum("bpe,hed->bphd", ln, P.W_V) + P.b_V - b_dec  # [b, pos, H, dh]
            dfa = (pat * torch.einsum("nkhd,nhd->nhk", vv[j], w)).sum(1)  # [n, src]
            ns = min(o.n_sources, dfa.shape[1])
            src = dfa.topk(ns, dim=-1).indices  # [n, ns]
            ex = sel[:, None].expand(-1, ns).reshape(-1)  # example index of each (example, source)
            n_i = torch.arange(sel.numel(), device=src.device)[:, None].expand(-1, ns).reshape(-1)
            s_k = src.reshape(-1)
            jj = j[n_i]
            p = pat[n_i, :, s_k]  # [m, H]
            r = torch.einsum("mh,hed,mhd->me", p, P.W_V, w[n_i])  # sum_h p_h W_V[h] w_h  [m, d_model]
            s = P.gamma * r / P.scale[jj, s_k]  # [m, d_model]
            s = s - s.mean(-1, keepdim=True)
            const = torch.einsum("e,hed->hd", P.beta, P.W_V) + P.b_V - b_dec  # [H, dh]
            bias = torch.einsum("mh,hd,mhd->m", p, const, w[n_i])
            add(ex, s_k, "bias", None, None, bias)
            add(ex, s_k, "embed", None, None, _dot(P.embed[jj, s_k], s))
            add(ex, s_k, "pos", None, None, _dot(P.pos[jj, s_k], s))
            for lyr in range(L):
                add(ex, s_k, "mlp", lyr, None, _dot(P.mlp[lyr][jj, s_k], s))
                WO = P.W_O[lyr].reshape(-1, P.W_O[lyr].shape[-1])  # [H*dh, d_model]
                z = P.z[lyr][jj, s_k].flatten(-2)  # [m, H*dh]
                if lyr not in up:
                    add(ex, s_k, "attn", lyr, None, _dot(z @ WO + P.b_O[lyr], s))
                    continue
                u = up[lyr]
                if lyr not in D:
                    D[lyr] = u.W_dec @ WO  # [d_sae_l, d_model]
                a = u.encode(z)  # [m, d_sae_l]
                fc = a * (s @ D[lyr].T)  # [m, d_sae_l]
                err = z - u.decode(a)
                nu = min(o.n_upstream, fc.shape[1])
                top = fc.abs().topk(nu, dim=-1).indices  # [m, nu]
                topv = fc.gather(1, top)
                keep = topv != 0
                mi = torch.arange(fc.shape[0], device=fc.device)[:, None].expand(-1, nu)
                add(ex[mi[keep]], s_k[mi[keep]], "attn_feature", lyr, top[keep], topv[keep])
                add(ex, s_k, "attn_feature_rest", lyr, None, fc.sum(-1) - topv.sum(-1))
                add(ex, s_k, "attn_error", lyr, None, _dot(err @ WO, s))
                add(ex, s_k, "attn_bias", lyr, None, _dot(u.b_dec @ WO + P.b_O[lyr], s))
        cols = {c: (np.concatenate(v) if v else np.zeros(0, dtype=object if c == "component" else np.int64))
                for c, v in rows.items()}
        df = pl.DataFrame({
            **{c: cols[c].astype(np.int32) for c in ("feature", "example_rank", "seq", "pos", "src_pos")},
            "component": cols["component"].astype(str),
            "upstream_layer": pl.Series(cols["upstream_layer"].astype(np.int32)).set(
                pl.Series(cols["upstream_layer"] < 0), None) if len(cols["upstream_layer"]) else pl.Series([], dtype=pl.Int32),
            "upstream_feature": pl.Series(cols["upstream_feature"].astype(np.int32)).set(
                pl.Series(cols["upstream_feature"] < 0), None) if len(cols["upstream_feature"]) else pl.Series([], dtype=pl.Int32),
            "contribution": cols["contribution"].astype(np.float32),
        })
        return Result(output=RecursiveDFA(int(feats.numel()), int(ex_f.numel()), df.height, sorted(up), whole),
                      tables={"rdfa": df})

    @staticmethod
    def _resid(P) -> torch.Tensor:
        x = P.embed + P.pos
        for lyr in P.z:
            x = x + torch.einsum("bphd,hde->bpe", P.z[lyr], P.W_O[lyr]) + P.b_O[lyr] + P.mlp[lyr]
        return x

    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary
        if not s or not s.get("upstream_layers"):
            return
        rows = section.query("""
            SELECT feature, upstream_layer || ':' || upstream_feature AS upstream, round(sum(contribution), 3) AS c
            FROM rdfa WHERE scan_id = ? AND sae = ? AND component = 'attn_feature'
            GROUP BY feature, upstream_layer, upstream_feature
            QUALIFY row_number() OVER (PARTITION BY feature ORDER BY c DESC) = 1 ORDER BY c DESC LIMIT 10""")
        if rows:
            section.table(f"RDFA: each traced feature's top upstream SAE feature ({s['features']} features, "
                          f"{s['examples']} examples; summed over examples and sources)",
                          ("feature", "upstream layer:feature", "contribution"), rows)
        parts = section.query("""SELECT component, round(sum(contribution) / sum(sum(abs(contribution))) OVER (), 3)
            FROM rdfa WHERE scan_id = ? AND sae = ? GROUP BY component ORDER BY 2 DESC""")
        section.line("RDFA parts (share of the summed |contribution|): "
                     + ", ".join(f"{c} {v}" for c, v in parts))

    @classmethod
    def html_part(cls, section) -> dict:
        def add(r, card):
            card.setdefault("upstream", []).append([r["layer"], r["up"], r["c"]])
        return {"features": section.per_feature("""
            SELECT feature, upstream_layer AS layer, upstream_feature AS up, round(sum(contribution), 3) AS c
            FROM rdfa WHERE scan_id = ? AND sae = ? AND component = 'attn_feature'
            GROUP BY feature, upstream_layer, upstream_feature
            QUALIFY row_number() OVER (PARTITION BY feature ORDER BY c DESC) <= 5 ORDER BY feature, c DESC""", add)}
