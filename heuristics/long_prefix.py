"""Long-prefix induction (Kissane et al. 2024, §4.2: in GPT-2 small, head 5.1 does induction
only on long matching prefixes and 5.5 on short ones; their SAE separates the two).

``long_prefix_heads``: per head of the SAE's layer, the induction score as a function of the
matching prefix length ``k = 1..max_prefix``: mean attention from the second copy's last
prefix token to the token after the first copy, on ``F1 p_1..p_k B F2 p_1..p_k`` random
tokens (:func:`famfind.prompts.long_prefix_prompts`); table ``head_prefix_curve``. Head
metric ``long_prefix`` = mean score at ``k >= long_from`` minus the score at ``k = 1``; a
long-prefix head has that >= ``head_threshold`` and a long-prefix score >= ``min_score``.

``long_prefix_features``: among the features selected for induction (>= 0.6 attribution on
an induction head; the paper's behaviour test is not required, since a long-prefix feature
stays silent at the start of a repeat and so fails its "every later occurrence" rule), those
whose firing needs a long prefix: with ``B`` the feature's top boosted token, the same
prompts with ``B`` planted; score = firing rate at ``k >= long_from`` minus firing rate at
``k = 1``; > 0.5 passes. Control: ``control_size`` of the induction control group.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from famfind.families import FamilyOutcome, Groups, encode_last, family_result, head_names, random_control
from famfind.heuristics.attribution import TopBoostedTokens
from famfind.heuristics.induction import InductionFamily
from famfind.plugins import Column, HeadScore, Heuristic, Options, Output, Result, Table
from famfind.prompts import bos_id, long_prefix_prompts


@dataclass(frozen=True)
class LongPrefixHeadSet(Output):
    """``heads``: long-prefix heads of the SAE's layer (``long_prefix_heads``: ``"layer.head"``);
    ``curve [max_prefix, n_heads]``: induction score (mean attention, [0, 1]) by prefix length."""

    heads: list[int]
    long_prefix_heads: list[str]
    curve: torch.Tensor


@dataclass(frozen=True)
class LongPrefixFamily(FamilyOutcome):
    """Long-prefix induction features (``score``: firing rate at long prefixes minus at k = 1)."""


@dataclass(frozen=True)
class LongPrefixHeadsOptions(Options):
    max_prefix: int = 9
    long_from: int = 5
    n_seqs: int = 64
    filler: int = 20
    head_threshold: float = 0.2
    min_score: float = 0.3


def _prompts(model, o, k: int, n: int, gen: torch.Generator):
    """Long-prefix prompts for prefix length ``k``; the filler shrinks so the longest prompt
    (BOS + 2 fillers + 2 * max_prefix + 1) fits the model's context."""
    filler = min(o.filler, (model.cfg.n_ctx - 2 * o.max_prefix - 2) // 2)
    return long_prefix_prompts(model.cfg.d_vocab, k, n, gen, filler, bos=bos_id(model.tokenizer))


class LongPrefixHeads(Heuristic):
    id = "long_prefix_heads"
    version = "0.1"
    needs = "model"
    produces = LongPrefixHeadSet
    tables = (Table("head_prefix_curve", (
        Column("layer", "INTEGER", "layer of the head"), Column("head", "INTEGER", "head index"),
        Column("prefix_len", "INTEGER", "matching prefix length k"),
        Column("score", "DOUBLE", "induction score (mean attention) at k")),
        "per head: induction score by matching prefix length"),)
    description = "Per-head induction score vs matching prefix length 1..9 (Kissane et al. 2024)"
    Options = LongPrefixHeadsOptions

    def run(self, ctx) -> Result:
        o, m, L = self.options, ctx.model, ctx.layer
        H = m.cfg.n_heads
        curve = torch.zeros(o.max_prefix, H)
        for k in range(1, o.max_prefix + 1):
            toks, dest, src = _prompts(m, o, k, o.n_seqs, ctx.generator)
            pat = m.patterns(toks.to(ctx.config.device), [L])[L]
            curve[k - 1] = pat[:, :, dest, src].mean(0).cpu()
        long = curve[o.long_from - 1:].mean(0)
        metric = long - curve[0]
        heads = [h for h in range(H) if metric[h] >= o.head_threshold and long[h] >= o.min_score]
        df = pl.DataFrame({"layer": [L] * (o.max_prefix * H), "head": list(range(H)) * o.max_prefix,
                           "prefix_len": [k for k in range(1, o.max_prefix + 1) for _ in range(H)],
                           "score": curve.reshape(-1).tolist()})
        return Result(output=LongPrefixHeadSet(heads, head_names(L, heads), curve),
                      head_scores=[HeadScore(L, h, "long_prefix", float(metric[h])) for h in range(H)],
                      tables={"head_prefix_curve": df})


@dataclass(frozen=True)
class LongPrefixFeaturesOptions(Options):
    max_prefix: int = 9
    long_from: int = 5
    n_seqs: int = 16
    filler: int = 20
    pass_threshold: float = 0.5
    control_size: int = 100  # a random subset of the induction control group


class LongPrefixFeatures(Heuristic):
    id = "long_prefix_features"
    version = "0.1"
    needs = "activations"
    produces = LongPrefixFamily
    requires = (InductionFamily, TopBoostedTokens)
    tables = (Table("feature_prefix_curve", (
        Column("feature", "INTEGER", "SAE feature index"), Column("prefix_len", "INTEGER", "matching prefix length k"),
        Column("fire_rate", "DOUBLE", "share of prompts where it fires at k")),
        "per tested feature: firing rate by matching prefix length"),)
    description = "Induction features whose firing depends on the length of the matching prefix"
    Options = LongPrefixFeaturesOptions

    def run(self, ctx) -> Result:
        o, m = self.options, ctx.model
        ind = ctx.output(InductionFamily)
        top = ctx.output(TopBoostedTokens).top_token
        ctl = random_control(ind.control, self.options.control_size, ctx.generator)
        g = Groups(ind.selected, ctl, torch.zeros(ind.selected.shape[0]))
        F = top.shape[0]
        if not ind.role_heads:  # no induction head in this SAE's layer: nothing to test
            res = family_result(LongPrefixFamily, "long_prefix_induction", g, torch.zeros(F),
                                torch.zeros(F, dtype=torch.bool), role_heads=[])
            res.tables["feature_prefix_curve"] = pl.DataFrame(schema={"feature": pl.Int32, "prefix_len": pl.Int32,
                                                                      "fire_rate": pl.Float64})
            return res
        feats = torch.nonzero(g.selected | g.control).flatten()
        rate = torch.zeros(o.max_prefix, F)
        Bs = top[feats].unique()
        block = torch.searchsorted(Bs, top[feats])  # each tested feature's block of prompts
        for k in range(1, o.max_prefix + 1):
            toks, dest, src = _prompts(m, o, k, o.n_seqs * Bs.numel(), ctx.generator)
            toks[:, src] = Bs.repeat_interleave(o.n_seqs)
            per = max(1, ctx.config.batch_size * ctx.corpus.tokens.shape[1] // (dest + 1))  # the pass's tokens per forward
            acts = encode_last(m, ctx.sae, toks[:, :dest + 1], batch_size=per,
                               device=ctx.config.device)[:, feats] > 0  # [nB * n_seqs, n_tested]
            fired = acts.view(Bs.numel(), o.n_seqs, -1).float().mean(1)  # [nB, n_tested]
            rate[k - 1, feats] = fired[block, torch.arange(feats.numel())]
        score = rate[o.long_from - 1:].mean(0) - rate[0]
        passed = score > o.pass_threshold
        res = family_result(LongPrefixFamily, "long_prefix_induction", g, score, passed,
                            {"fire_rate_k1": rate[0], "fire_rate_long": rate[o.long_from - 1:].mean(0)}, ind.role_heads)
        res.tables["feature_prefix_curve"] = pl.DataFrame({
            "feature": [f for f in feats.tolist() for _ in range(o.max_prefix)],
            "prefix_len": list(range(1, o.max_prefix + 1)) * feats.numel(),
            "fire_rate": rate[:, feats].T.reshape(-1).tolist()})
        return res
