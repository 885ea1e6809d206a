"""Candidate families: what no detector explains, grouped and tested against the proxies.

The live features in no family are clustered (k-means, :mod:`famfind.kmeans`) on a *signature* of four
equally weighted blocks, each a distribution over a few bins:

- head loading: head attribution over the layer's heads (``head_attribution``);
- DFA source-distance profile: the share-weighted distance from each top example to its top
  DFA sources (``dfa_source``), in bins 0, 1, 2-3, 4-7, 8-15, 16+ tokens;
- proxy precision: activation-mass precision for every proxy, on the even documents only
  (``proxy_scores``), so that the odd documents stay held out;
- token classes of the tokens it fires on (top examples) and of the token it boosts most
  (``feature_logits``): newline/space, punctuation, digits, lowercase word, capitalised word,
  other.

``k = clamp(round(n / features_per_cluster), 2, max_clusters)`` clusters; every cluster of at
least ``min_size`` features becomes a *candidate family*: its best proxy (among proxies marking
at most ``max_base_rate`` of the corpus, the one whose pooled activation-mass precision over
the cluster on the even documents most exceeds its base rate), that proxy's pooled precision
on the held-out odd documents,
and a control (as many random live features outside the cluster, same proxy, same half). A
candidate is *validated* only on held-out numbers: odd-document precision >=
``min_precision`` and >= ``control_ratio`` x the control's. ``famfind label`` (or ``scan
--label``) names each candidate and scores the name by detection. Table
``candidate_families``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from famfind.heuristics.attribution import HeadAttributionMatrix, TopBoostedTokens
from famfind.kmeans import kmeans
from famfind.heuristics.context import ContextFamilies
from famfind.heuristics.dfa import DFASourceStats
from famfind.heuristics.polysemanticity import FAMILY_TYPES, family_outcomes
from famfind.heuristics.proxy_scores import ProxyMarks, ProxyScores
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table
from famfind.proxies import token_strings

TOKEN_CLASSES = ("space", "punctuation", "digits", "lowercase", "capitalised", "other")
DISTANCE_BINS = (0, 1, 2, 4, 8, 16)  # lower edges, tokens
BIN_DISTANCE = torch.tensor([0, 1, 2.5, 5.5, 11.5, 24.0])  # a typical distance in each bin (16+: 24)


def token_class(s: str) -> int:
    """Index into :data:`TOKEN_CLASSES` of a token's text."""
    t = s.strip()
    if not t:
        return 0
    if all(not c.isalnum() and c != "_" for c in t):
        return 1
    if t.isdigit():
        return 2
    if t[0].islower() or (t[0] == "_" and t.strip("_")[:1].islower()):
        return 3
    if t[0].isupper():
        return 4
    return 5


def distance_profile(src: DFASourceStats, d_sae: int) -> torch.Tensor:
    """``[d_sae, 6]``: per feature, its top sources' DFA share in each distance bin
    (:data:`DISTANCE_BINS`), averaged over its top examples (rows sum to 1 or are 0)."""
    out = torch.zeros(d_sae, len(DISTANCE_BINS))
    if src.ex_feature is None or src.ex_feature.numel() == 0:
        return out
    sh = src.src_share.clamp_min(0)
    sh = sh / sh.sum(1, keepdim=True).clamp_min(1e-9)
    dist = (src.ex_pos[:, None] - src.src_pos).abs()
    b = torch.bucketize(dist, torch.tensor(DISTANCE_BINS[1:]), right=True)  # [n, k]
    per = torch.zeros(sh.shape[0], len(DISTANCE_BINS)).scatter_add_(1, b, sh.float())
    out.index_add_(0, src.ex_feature, per)
    return out / out.sum(1, keepdim=True).clamp_min(1e-9)


@dataclass(frozen=True)
class CandidateOptions(Options):
    min_size: int = 10  # features per cluster to become a candidate
    features_per_cluster: int = 40  # k = n_unexplained / this (clamped)
    max_clusters: int = 30
    max_base_rate: float = 0.5
    min_precision: float = 0.8
    control_ratio: float = 2.0


@dataclass(frozen=True)
class CandidateFamilies(Output):
    """``cluster [d_sae]`` long: each unexplained live feature's cluster (-1: in a family,
    dead, or not clustered); ``n_unexplained``; ``n_candidates``; ``n_validated``."""

    cluster: torch.Tensor
    n_unexplained: int
    n_candidates: int
    n_validated: int


class CandidateFamiliesDetector(Heuristic):
    """Candidate families from the live features in no family (see the module docstring)."""

    id = "candidate_families"
    version = "0.2"
    needs = "activations"
    produces = CandidateFamilies
    requires = (HeadAttributionMatrix, TopBoostedTokens, DFASourceStats, ProxyMarks, ProxyScores, ContextFamilies,
                *FAMILY_TYPES)
    tables = (Table("candidate_families", (
        Column("candidate", "INTEGER", "candidate id (k-means cluster)"), Column("size", "INTEGER", "features"),
        Column("features", "INTEGER[]", "its features, nearest the centroid first"),
        Column("top_head", "VARCHAR", "the head its features load on most (mean head attribution)"),
        Column("source_distance", "DOUBLE", "mean DFA source distance, tokens"),
        Column("active_token_class", "VARCHAR", "commonest class of the tokens it fires on"),
        Column("boosted_token_class", "VARCHAR", "commonest class of the tokens it boosts"),
        Column("proxy", "VARCHAR", "its best proxy (even documents)"),
        Column("proxy_base_rate", "DOUBLE", "share of corpus positions the proxy marks"),
        Column("mass_precision_a", "DOUBLE", "the cluster's pooled activation-mass precision, even documents"),
        Column("mass_precision_b", "DOUBLE", "the same on odd documents (held out)"),
        Column("control_mass_precision_b", "DOUBLE", "a same-size random control's, odd documents"),
        Column("validated", "BOOLEAN", "held-out precision >= min_precision and >= control_ratio x control's")),
        "clusters of live features in no family, each with its best proxy and a held-out test"),)
    description = "Clusters the features no family explains; each becomes a candidate family with a held-out proxy test"
    Options = CandidateOptions

    def run(self, ctx) -> Result:
        o = self.options
        st = ctx.stats
        F = ctx.sae.d_sae
        in_family = torch.zeros(F, dtype=torch.bool)
        for out in family_outcomes(ctx):
            in_family |= out.members
        pool = torch.nonzero(~st.dead & ~in_family).flatten()
        cluster = torch.full((F,), -1, dtype=torch.long)
        n = pool.numel()
        if n < max(o.min_size, 2):
            return Result(output=CandidateFamilies(cluster, n, 0, 0))
        att = ctx.output(HeadAttributionMatrix).attribution
        H = att.shape[1]
        src = ctx.output(DFASourceStats)
        pm, ps = ctx.output(ProxyMarks), ctx.output(ProxyScores)
        tok = ctx.model.tokenizer
        strs, _ = token_strings(tok, ctx.model.cfg.d_vocab)
        vocab_class = torch.tensor([token_class(x) if tok is not None else 5 for x in strs])  # [d_vocab]
        C = len(TOKEN_CLASSES)
        seq, pos = st.top_seq, st.top_pos  # [k, d_sae]
        r, f = torch.nonzero(seq >= 0, as_tuple=True)
        active = torch.zeros(F * C).index_add_(0, f * C + vocab_class[ctx.corpus.tokens[seq[r, f], pos[r, f]]],
                                               torch.ones(f.numel())).view(F, C)
        active = active / active.sum(1, keepdim=True).clamp_min(1)
        boosted = torch.zeros(F, C)
        boosted[torch.arange(F), vocab_class[ctx.output(TopBoostedTokens).top_token]] = 1
        mpa = ps.mass_precision(0).T.float()  # [d_sae, P]
        dprof = distance_profile(src, F)
        blocks = [att.float(), dprof, mpa, active, boosted]
        weights = [1.0, 1.0, 1.0, 0.5, 0.5]  # four signature parts; the token-class part has two halves
        X = torch.cat([b[pool] * w / max(b.shape[1], 1) ** 0.5 for b, w in zip(blocks, weights)], 1).numpy()
        k = int(min(max(round(n / o.features_per_cluster), 2), o.max_clusters, n))
        fit = kmeans(torch.from_numpy(X.astype(np.float64)).to(ctx.config.device), k, 4, ctx.config.seed)
        lab = fit.labels.cpu()
        centers = fit.centers.cpu().numpy()
        dist = torch.from_numpy(np.linalg.norm(X - centers[lab.numpy()], axis=1))
        cluster[pool] = lab
        base = torch.tensor(pm.base_rate, dtype=torch.float64)
        usable = (base > 0) & (base <= o.max_base_rate)
        live_idx = torch.nonzero(~st.dead).flatten()
        rows, n_val = [], 0
        mass_in, mass = ps.mass_in, ps.mass  # [2, P, F], [2, F]
        for c in range(k):
            m = pool[lab == c]
            if m.numel() < o.min_size:
                continue
            order = m[dist[lab == c].argsort(stable=True)]
            pa = mass_in[0][:, m].sum(1) / mass[0][m].sum().clamp_min(1e-30)  # [P]
            pb = mass_in[1][:, m].sum(1) / mass[1][m].sum().clamp_min(1e-30)
            if usable.any():
                p = int(torch.where(usable, pa - base, torch.tensor(-2.0, dtype=torch.float64)).argmax())
                others = live_idx[~torch.isin(live_idx, m)]
                ctrl = others[torch.randperm(others.numel(), generator=ctx.generator)[:m.numel()]]
                cb = float(mass_in[1][p, ctrl].sum() / mass[1][ctrl].sum().clamp_min(1e-30))
                valid = bool(pb[p] >= o.min_precision and pb[p] >= o.control_ratio * cb)
                proxy, ba, pa_p, pb_p = pm.proxies[p], float(base[p]), float(pa[p]), float(pb[p])
            else:
                proxy, ba, pa_p, pb_p, cb, valid = None, None, None, None, None, False
            n_val += valid
            heads = att[m].mean(0)
            rows.append({
                "candidate": c, "size": int(m.numel()), "features": order.tolist(),
                "top_head": f"{ctx.layer}.{int(heads.argmax())}" if H else None,
                "source_distance": float((dprof[m] * BIN_DISTANCE).sum(1).mean()),
                "active_token_class": TOKEN_CLASSES[int(active[m].sum(0).argmax())],
                "boosted_token_class": TOKEN_CLASSES[int(boosted[m].sum(0).argmax())],
                "proxy": proxy, "proxy_base_rate": ba, "mass_precision_a": pa_p, "mass_precision_b": pb_p,
                "control_mass_precision_b": cb, "validated": valid})
        return Result(output=CandidateFamilies(cluster, n, len(rows), n_val),
                      tables={"candidate_families": self.tables[0].frame(rows)})

    @classmethod
    def render_terminal(cls, section) -> None:
        rows = section.query("SELECT candidate, size, top_head, round(source_distance, 1), active_token_class, "
                             "boosted_token_class, proxy, round(proxy_base_rate, 3), round(mass_precision_a, 3), "
                             "round(mass_precision_b, 3), round(control_mass_precision_b, 3), validated "
                             "FROM candidate_families WHERE scan_id = ? AND sae = ? ORDER BY validated DESC, "
                             "mass_precision_b DESC NULLS LAST, size DESC")
        s = section.summary
        section.line(f"candidate families: {s.get('n_candidates', 0)} clusters of >= min_size among "
                     f"{s.get('n_unexplained', 0)} live features in no family; {s.get('n_validated', 0)} validated on "
                     "held-out documents")
        if rows:
            section.table("Candidate families (validated only on held-out numbers)",
                          ("candidate", "size", "top head", "source dist", "fires on", "boosts", "best proxy",
                           "base rate", "precision even", "precision odd (held out)", "control odd", "validated"),
                          [["-" if v is None else v for v in r] for r in rows])

    @classmethod
    def html_part(cls, section) -> dict:
        return {"candidates": section.rows(
            "SELECT candidate, size, top_head, round(source_distance, 1) AS source_distance, active_token_class, "
            "boosted_token_class, proxy, round(proxy_base_rate, 3) AS base_rate, round(mass_precision_a, 3) AS "
            "precision_even, round(mass_precision_b, 3) AS precision_odd_held_out, round(control_mass_precision_b, 3) "
            "AS control_odd, validated FROM candidate_families WHERE scan_id = ? AND sae = ? ORDER BY candidate")}
