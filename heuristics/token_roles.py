"""Previous-token and duplicate-token features (Kissane et al. 2024 list both among the
attention-SAE families; head roles as in Olsson et al. 2022 / :mod:`famfind.roles`).

Role heads are the heads of the SAE's layer whose ``head_roles`` score (previous_token or
duplicate_token) reaches ``head_threshold``. Selected = >= 0.6 attribution on one role head;
control = a random sample with < 0.1 on all of them. Each tested feature gets a *trigger*
token ``X``, the most common token among its top-activating examples at the position that
role reads: the previous token (``pos - 1``) for previous-token features, the current token
for duplicate-token features. Synthetic prompts are ``seq_len`` tokens drawn from the
corpus's unigram distribution (``X`` removed) with ``X`` planted:

- previous-token: ``X`` at 3 random positions; the feature must fire at every position right
  after an ``X`` and at no more than ``max_off_target`` of the other positions;
- duplicate-token: ``X`` at two positions; the feature must not fire at the first and must
  fire at the second.

The prompts of many trigger tokens share one forward (as many positions as one batch of the
activation pass); each feature is read only on its own trigger's prompts.

Pass rate = passing prompts / ``n_prompts``; > 0.6 passes. A layer with no role head has no
selected feature and no validation row, so its control prompts are not run (500 controls x 16
prompts x 32 tokens: ~85 s per detector on a 2-core CPU for the random-init GPT-2-small-shaped
benchmark model). ``previous_token_ablation`` then mean-ablates the previous-token heads, as the
paper does for induction heads (:func:`famfind.families.mean_ablation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.families import (FamilyOutcome, Groups, attribution_groups, encode_all, family_result, head_names,
                               mode_per_feature, role_heads)
from famfind.heuristics.attribution import HeadAttributionMatrix
from famfind.heuristics.head_roles import HeadRoleScores
from famfind.heuristics.induction import AblationCounts, FamilyAblation
from famfind.plugins import Heuristic, Options, Result


@dataclass(frozen=True)
class PreviousTokenFamily(FamilyOutcome):
    """Previous-token features (``score``: pass rate of the planted-trigger prompts)."""


@dataclass(frozen=True)
class DuplicateTokenFamily(FamilyOutcome):
    """Duplicate-token features (``score``: pass rate of the planted-repeat prompts)."""


@dataclass(frozen=True)
class TokenRoleOptions(Options):
    head_threshold: float = 0.4
    selection_threshold: float = 0.6
    control_max_attribution: float = 0.1
    control_size: int = 500
    n_prompts: int = 16
    seq_len: int = 32
    max_off_target: float = 0.05
    pass_threshold: float = 0.6


def trigger_tokens(stats, tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """Most common token at ``pos + offset`` over each feature's top examples, ``[d_sae]`` (-1: none)."""
    seq, pos = stats.top_seq, stats.top_pos + offset  # [k, d_sae]
    ok = (seq >= 0) & (pos >= 0)
    f_idx = torch.arange(seq.shape[1]).expand_as(seq)
    mode, _ = mode_per_feature(f_idx[ok], tokens[seq[ok], pos[ok]], seq.shape[1])
    return mode


class _TokenRoleFeatures(Heuristic):
    needs = "activations"
    requires = (HeadRoleScores, HeadAttributionMatrix)
    Options = TokenRoleOptions
    metric: str
    family: str
    offset: int  # where the trigger sits relative to the firing position

    def run(self, ctx) -> Result:
        o = self.options
        scores = ctx.output(HeadRoleScores).scores[self.metric][ctx.layer]
        heads = role_heads(scores, o.head_threshold)
        att = ctx.output(HeadAttributionMatrix).attribution
        F = att.shape[0]
        if not heads:  # no head of this layer has the role: an empty family with no validation row, nothing to test
            none = torch.zeros(F, dtype=torch.bool)
            return family_result(self.produces, self.family, Groups(none, none, torch.zeros(F)), torch.zeros(F),
                                 none, role_heads=[])
        g = attribution_groups(att, heads, ~ctx.stats.dead, o.selection_threshold,
                               o.control_max_attribution, o.control_size, ctx.generator)
        trig = trigger_tokens(ctx.stats, ctx.corpus.tokens, self.offset)
        rate = torch.zeros(F)
        feats = torch.nonzero((g.selected | g.control) & (trig >= 0)).flatten()
        unigram = ctx.corpus.tokens.reshape(-1)
        Xs = trig[feats].unique().tolist()
        prompts = [self._prompts(X, unigram, ctx.generator) for X in Xs]  # the generator's draws in trigger order
        # many trigger tokens' prompts per forward (as many positions as a pass batch), each
        # feature read only on its own trigger's prompts
        rows = max(o.n_prompts, ctx.config.batch_size * ctx.config.seq_len // o.seq_len)
        per = max(1, rows // o.n_prompts)
        for g0 in range(0, len(Xs), per):
            group = range(g0, min(g0 + per, len(Xs)))
            fs_of = [feats[trig[feats] == Xs[i]] for i in group]
            union = torch.unique(torch.cat(fs_of))
            toks = torch.cat([prompts[i][0] for i in group])
            acts = encode_all(ctx.model, ctx.sae, toks, union, batch_size=toks.shape[0],
                              device=ctx.config.device) > 0  # [n triggers * n_prompts, seq_len, n union]
            for j, (i, fs) in enumerate(zip(group, fs_of)):
                a = acts[j * o.n_prompts:(j + 1) * o.n_prompts][:, :, torch.searchsorted(union, fs)]
                rate[fs] = self._passes(a, prompts[i][1]).float().mean(0)
        passed = rate > o.pass_threshold
        return family_result(self.produces, self.family, g, rate, passed, {"trigger_token": trig},
                             head_names(ctx.layer, heads))

    def _background(self, X: int, unigram: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        o = self.options
        t = unigram[torch.randint(0, unigram.numel(), (o.n_prompts, o.seq_len), generator=gen)]
        while bool((t == X).any()):
            bad = t == X
            t[bad] = unigram[torch.randint(0, unigram.numel(), (int(bad.sum()),), generator=gen)]
        return t


class PreviousTokenFeatures(_TokenRoleFeatures):
    id = "previous_token_features"
    version = "0.1"
    description = "Features on previous-token heads that fire right after their trigger token"
    metric, family, offset = "previous_token", "previous_token", -1
    produces = PreviousTokenFamily

    def _prompts(self, X, unigram, gen):
        o = self.options
        t = self._background(X, unigram, gen)
        after = torch.zeros(t.shape, dtype=torch.bool)
        for i in range(o.n_prompts):
            # 3 positions in [1, seq_len - 2], at least 2 apart
            slots = torch.randperm((o.seq_len - 2) // 2, generator=gen)[:3] * 2 + 1
            t[i, slots] = X
            after[i, slots + 1] = True
        return t, after

    def _passes(self, fired, after):
        n, T, nf = fired.shape
        a = after[:, :, None].expand_as(fired)
        hit_all = ~(a & ~fired).any(1)
        other = (~a).sum(1).clamp_min(1)
        off = (fired & ~a).sum(1).float() / other
        return hit_all & (off <= self.options.max_off_target)  # [n, nf]


class DuplicateTokenFeatures(_TokenRoleFeatures):
    id = "duplicate_token_features"
    version = "0.1"
    description = "Features on duplicate-token heads that fire on a token's repeat, not its first occurrence"
    metric, family, offset = "duplicate_token", "duplicate_token", 0
    produces = DuplicateTokenFamily

    def _prompts(self, X, unigram, gen):
        o = self.options
        t = self._background(X, unigram, gen)
        where = torch.zeros(o.n_prompts, 2, dtype=torch.long)
        for i in range(o.n_prompts):
            p1 = int(torch.randint(1, o.seq_len // 2, (1,), generator=gen))
            p2 = int(torch.randint(p1 + 3, o.seq_len, (1,), generator=gen))
            t[i, [p1, p2]] = X
            where[i] = torch.tensor([p1, p2])
        return t, where

    def _passes(self, fired, where):
        i = torch.arange(fired.shape[0])
        return ~fired[i, where[:, 0]] & fired[i, where[:, 1]]  # [n, nf]


@dataclass(frozen=True)
class PreviousTokenAblationCounts(AblationCounts):
    """:class:`AblationCounts` of the previous-token family (heads: the previous-token heads)."""


class PreviousTokenAblation(FamilyAblation):
    id = "previous_token_ablation"
    version = "0.1"
    produces = PreviousTokenAblationCounts
    requires = (PreviousTokenFamily,)
    family_output = PreviousTokenFamily
    description = "Mean-ablate the previous-token head(s); which family features turn off"
