"""Successor heads and successor features (Gould et al. 2024, "Successor Heads: Recurring,
Interpretable Attention Heads In The Wild"; the attention-SAE family of Kissane et al. 2024).

``successor_heads`` (weights + one-token runs): for each head of the SAE's layer, the
effective OV circuit ``E_eff @ W_V[h] @ W_O[h] @ W_U`` on the ordinal tasks of
:data:`famfind.prompts.ORDINAL_TASKS` (items that are single tokens only), where ``E_eff``
is each item token alone at position 0, through the layers below and the head's LayerNorm
(Gould et al. use the token after MLP0). Successor score = fraction of (item, next item)
pairs whose next item ranks top among that task's tokens (final LayerNorm ignored).

``successor_features``: selected = live features with >= 0.6 attribution on one successor
head; control = random features with < 0.1 on all of them. Test: a feature's top boosted
token ``t`` (``feature_logits``) must be an ordinal item with a predecessor ``p``; prompts
are a short corpus snippet followed by 1-4 consecutive task items ending at ``p``
(in-sequence), and the same with those items shuffled so the prompt does not end at ``p``
(control). A prompt pair passes when the feature fires at the last position of the
in-sequence prompt and not of the shuffled one; pass rate > 0.6 passes. A feature whose top
token is no ordinal item cannot pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from famfind.families import FamilyOutcome, attribution_groups, encode_last, family_result, head_names, role_heads
from famfind.heuristics.attribution import HeadAttributionMatrix, TopBoostedTokens
from famfind.plugins import Column, HeadScore, Heuristic, Options, Output, Result, Table
from famfind.prompts import ordinal_tasks, successor_map


@dataclass(frozen=True)
class SuccessorHeadSet(Output):
    """``heads``: successor heads of the SAE's layer (``successor_heads``: as ``"layer.head"``);
    ``scores [n_heads]``: successor score in [0, 1]; ``tasks``: the ordinal tasks used
    (:class:`famfind.prompts.OrdinalTask`; ``task_names``); ``pairs`` scored."""

    heads: list[int]
    successor_heads: list[str]
    scores: torch.Tensor
    tasks: list
    task_names: list[str]
    pairs: int
    note: str = ""


@dataclass(frozen=True)
class SuccessorFamily(FamilyOutcome):
    """Successor features (``score``: pass rate of the in-sequence vs shuffled prompts)."""


@dataclass(frozen=True)
class SuccessorHeadsOptions(Options):
    successor_head_threshold: float = 0.5  # successor score from which a head is a successor head


class SuccessorHeads(Heuristic):
    id = "successor_heads"
    version = "0.1"
    needs = "model"
    produces = SuccessorHeadSet
    tables = (Table("head_successor", (
        Column("layer", "INTEGER", "layer of the head"), Column("head", "INTEGER", "head index"),
        Column("task", "VARCHAR", "ordinal task"), Column("pairs", "INTEGER", "(item, next item) pairs"),
        Column("score", "DOUBLE", "fraction of pairs whose next item ranks top")),
        "per head and ordinal task: successor score of the effective OV circuit"),)
    description = "Per-head successor score of the effective OV circuit on ordinal tasks (Gould et al. 2024)"
    Options = SuccessorHeadsOptions

    def run(self, ctx) -> Result:
        m, L = ctx.model, ctx.layer
        tasks = ordinal_tasks(m.tokenizer)
        H = m.cfg.n_heads
        if not tasks:
            return Result(output=SuccessorHeadSet([], [], torch.zeros(H), [], [], 0,
                                                  "no ordinal task has 2 single-token pairs"))
        W_U = m.W_U()
        rows, hits, n_pairs = [], torch.zeros(H), 0
        for t in tasks:
            ids = torch.tensor(t.token_ids, device=ctx.config.device)
            E = m.normalized_resid(ids[:, None], L)[:, 0]  # [n_items, d_model]
            col = {tok: i for i, tok in enumerate(t.token_ids)}
            src = torch.tensor([col[a] for a, _ in t.pairs()])
            dst = torch.tensor([col[b] for _, b in t.pairs()])
            for h in range(H):
                logits = (E @ m.W_V(L)[h] @ m.W_O(L)[h] @ W_U[:, ids]).cpu()  # [n_items, n_items]
                ok = logits[src].argmax(-1) == dst
                hits[h] += ok.sum()
                rows.append({"layer": L, "head": h, "task": t.name, "pairs": len(src),
                             "score": float(ok.float().mean())})
            n_pairs += len(src)
        scores = hits / n_pairs
        heads = role_heads(scores, self.options.successor_head_threshold)
        return Result(output=SuccessorHeadSet(heads, head_names(L, heads), scores, tasks, [t.name for t in tasks],
                                              n_pairs),
                      head_scores=[HeadScore(L, h, "successor", float(scores[h])) for h in range(H)],
                      tables={"head_successor": pl.DataFrame(rows)})


@dataclass(frozen=True)
class SuccessorFeaturesOptions(Options):
    selection_threshold: float = 0.6
    control_max_attribution: float = 0.1
    control_size: int = 500
    n_prompts: int = 16  # prompt pairs per predecessor token
    snippet_len: int = 8  # corpus tokens before the task items
    pass_threshold: float = 0.6


class SuccessorFeatures(Heuristic):
    id = "successor_features"
    version = "0.1"
    needs = "activations"
    produces = SuccessorFamily
    requires = (SuccessorHeadSet, HeadAttributionMatrix, TopBoostedTokens)
    description = "Features on successor heads that fire before the next ordinal item, not on shuffled lists"
    Options = SuccessorFeaturesOptions

    def run(self, ctx) -> Result:
        o = self.options
        sh = ctx.output(SuccessorHeadSet)
        att = ctx.output(HeadAttributionMatrix).attribution
        top = ctx.output(TopBoostedTokens).top_token
        g = attribution_groups(att, sh.heads, ~ctx.stats.dead, o.selection_threshold,
                               o.control_max_attribution, o.control_size, ctx.generator)
        F = att.shape[0]
        rate, n_tested = torch.zeros(F), torch.zeros(F, dtype=torch.long)
        succ = successor_map(sh.tasks)
        feats = torch.nonzero(g.selected | g.control).flatten()
        preds = {int(p) for f in feats.tolist() for _, p in succ.get(int(top[f]), [])}
        fires = {p: self._fires(ctx, p, sh.tasks) for p in sorted(preds)}  # p -> ([n, F], [n, F])
        for f in feats.tolist():
            pairs = [fires[p] for _, p in succ.get(int(top[f]), [])]
            if not pairs:
                continue
            ins = torch.cat([a[:, f] for a, _ in pairs])
            shf = torch.cat([b[:, f] for _, b in pairs])
            rate[f] = (ins & ~shf).float().mean()
            n_tested[f] = ins.numel()
        passed = (n_tested > 0) & (rate > o.pass_threshold)
        return family_result(SuccessorFamily, "successor", g, rate, passed, {"n_prompts": n_tested, "top_token": top},
                             sh.successor_heads)

    def _fires(self, ctx, p: int, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """In-sequence and shuffled prompts ending at predecessor ``p``: fired ``[n, d_sae]`` each."""
        o, gen = self.options, ctx.generator
        runs, pool = [], []
        for t in tasks:
            if p in t.ids:
                pool += [x for x in t.token_ids if x != p]
                i = t.ids.index(p)
                j = i
                while j > 0 and t.ids[j - 1] is not None and i - j < 3:
                    j -= 1
                runs.append(t.ids[j:i + 1])
        toks = ctx.corpus.tokens
        ins, shf = [], []
        for n in range(o.n_prompts):
            run = runs[n % len(runs)]
            k = 1 + n % len(run)  # 1..len(run) items ending at p
            items = run[len(run) - k:]
            s = int(torch.randint(0, toks.shape[0], (1,), generator=gen))
            w = o.snippet_len + 4 - k  # every prompt is snippet_len + 4 tokens long
            q = int(torch.randint(0, toks.shape[1] - w + 1, (1,), generator=gen))
            snip = toks[s, q:q + w].tolist()
            perm = [items[i] for i in torch.randperm(k, generator=gen).tolist()]
            if perm[-1] == p:  # the shuffled prompt must not end at p
                perm = perm[-1:] + perm[:-1] if k > 1 else [pool[n % len(pool)]]
            ins.append(snip + items)
            shf.append(snip + perm)
        a = encode_last(ctx.model, ctx.sae, torch.tensor(ins), device=ctx.config.device) > 0
        b = encode_last(ctx.model, ctx.sae, torch.tensor(shf), device=ctx.config.device) > 0
        return a, b
