"""Name-mover heads and name-mover features (Wang et al. 2022, "Interpretability in the Wild:
a Circuit for Indirect Object Identification in GPT-2 small", §3; the attention-SAE family of
Kissane et al. 2024).

``name_mover_heads``: IOI prompts from :data:`famfind.prompts.IOI_TEMPLATES` with random
single-token names (ABBA and BABA). Per head of the SAE's layer: ``name_mover_attention``,
the mean attention from END (the last token) to the indirect object (IO), and
``name_mover_logit_diff``, the head's direct logit difference ``z[END, h] W_O[h] (W_U[:, IO]
- W_U[:, S])`` (final LayerNorm ignored). A name-mover head has attention >=
``attention_threshold`` and a positive logit difference. A vocabulary without two
single-token names yields no prompts and no heads (said in the summary).

``name_mover_features``: selected = >= 0.6 attribution on one name-mover head; control =
< 0.1 on all. Per IOI prompt where the feature fires at END, the prompt passes when the
feature's own direct effect (``W_dec[f] W_O W_U``) raises IO above S. Pass rate = passing /
firing prompts, with at least ``min_fires`` firing prompts; > 0.6 passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.families import FamilyOutcome, attribution_groups, encode_last, family_result, head_names
from famfind.heuristics.attribution import HeadAttributionMatrix
from famfind.plugins import HeadScore, Heuristic, Options, Output, Result
from famfind.prompts import ioi_prompts


@dataclass(frozen=True)
class NameMoverHeadSet(Output):
    """``heads``: name-mover heads of the SAE's layer (``name_mover_heads``: ``"layer.head"``);
    ``batches``: the IOI prompts (:class:`famfind.prompts.IOIBatch`); ``prompts``: how many."""

    heads: list[int]
    name_mover_heads: list[str]
    batches: list
    prompts: int
    note: str = ""


@dataclass(frozen=True)
class NameMoverFamily(FamilyOutcome):
    """Name-mover features (``score``: share of firing IOI prompts where the feature raises IO over S)."""


@dataclass(frozen=True)
class NameMoverHeadsOptions(Options):
    n_per_template: int = 32
    attention_threshold: float = 0.3
    min_logit_diff: float = 0.0


class NameMoverHeads(Heuristic):
    id = "name_mover_heads"
    version = "0.1"
    needs = "model"
    produces = NameMoverHeadSet
    description = "Per-head attention END->IO and direct logit diff IO-S on IOI prompts (Wang et al. 2022)"
    Options = NameMoverHeadsOptions

    def run(self, ctx) -> Result:
        o, m, L = self.options, ctx.model, ctx.layer
        H = m.cfg.n_heads
        batches = ioi_prompts(m.tokenizer, o.n_per_template, ctx.generator)
        if not batches:
            return Result(output=NameMoverHeadSet([], [], [], 0, "fewer than 2 IOI names are single tokens in this vocab"))
        W_O, W_U = m.W_O(L), m.W_U()
        att_sum, ld_sum, n = torch.zeros(H), torch.zeros(H), 0
        for b in batches:
            toks = b.tokens.to(ctx.config.device)
            pat = m.patterns(toks, [L])[L][:, :, -1, :].cpu()  # [n, H, key]
            att_sum += pat[torch.arange(len(toks)), :, b.io_pos].sum(0)
            z = m.run_hook_z(toks, L)[:, -1]  # [n, H, d_head]
            diff = b.io_minus_s(W_U)  # [n, d_model]
            ld_sum += torch.einsum("nhd,hdm,nm->h", z, W_O, diff).cpu()
            n += len(toks)
        att, ld = att_sum / n, ld_sum / n
        heads = [h for h in range(H) if att[h] >= o.attention_threshold and ld[h] > o.min_logit_diff]
        rows = [HeadScore(L, h, "name_mover_attention", float(att[h])) for h in range(H)] + \
               [HeadScore(L, h, "name_mover_logit_diff", float(ld[h])) for h in range(H)]
        return Result(output=NameMoverHeadSet(heads, head_names(L, heads), batches, n), head_scores=rows)


@dataclass(frozen=True)
class NameMoverFeaturesOptions(Options):
    selection_threshold: float = 0.6
    control_max_attribution: float = 0.1
    control_size: int = 500
    min_fires: int = 3
    pass_threshold: float = 0.6


class NameMoverFeatures(Heuristic):
    id = "name_mover_features"
    version = "0.1"
    needs = "activations"
    produces = NameMoverFamily
    requires = (NameMoverHeadSet, HeadAttributionMatrix)
    description = "Features on name-mover heads that fire at END of IOI prompts and boost the IO name"
    Options = NameMoverFeaturesOptions

    def run(self, ctx) -> Result:
        o, m, L, sae = self.options, ctx.model, ctx.layer, ctx.sae
        nm = ctx.output(NameMoverHeadSet)
        att = ctx.output(HeadAttributionMatrix).attribution
        g = attribution_groups(att, nm.heads, ~ctx.stats.dead, o.selection_threshold,
                               o.control_max_attribution, o.control_size, ctx.generator)
        F = att.shape[0]
        fires, good = torch.zeros(F), torch.zeros(F)
        feats = torch.nonzero(g.selected | g.control).flatten()
        if feats.numel() and nm.batches:
            H, dh = m.cfg.n_heads, m.cfg.d_head
            resid = torch.einsum("fhd,hdm->fm", sae.W_dec[feats.to(sae.W_dec.device)].reshape(-1, H, dh), m.W_O(L))
            W_U = m.W_U()
            for b in nm.batches:
                acts = encode_last(m, sae, b.tokens, device=ctx.config.device)[:, feats]  # [n, nf]
                diff = (b.io_minus_s(W_U) @ resid.T).cpu()  # [n, nf]
                fired = acts > 0
                fires[feats] += fired.sum(0).float()
                good[feats] += (fired & (diff > 0)).sum(0).float()
        rate = good / fires.clamp_min(1)
        passed = (fires >= o.min_fires) & (rate > o.pass_threshold)
        return family_result(NameMoverFamily, "name_mover", g, rate, passed, {"firing_prompts": fires.long()},
                             nm.name_mover_heads)
