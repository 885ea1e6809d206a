"""The "{token} is next by induction" family (Kissane et al. 2024, §4.2 and App. "Automated
induction feature detection"): selection by head attribution, a behavioural test with a
control group, and confirmation by mean-ablating the induction head(s).

Behaviour (vectorised over all features at once, one streaming pass):
for feature ``f`` let ``t_f`` be its top boosted token on the direct path
(``feature_logits``). In a corpus sequence, each position ``p`` whose next token is ``t_f``
is a check: if the bigram ``(tokens[p], t_f)`` has *not* occurred earlier in the sequence
(first occurrence), ``f`` must not fire at ``p``; if it has (a later occurrence, where
induction can predict ``t_f``), ``f`` must fire at ``p``. A sequence is *eligible* for ``f``
when it holds at least one later occurrence (otherwise a silent feature would pass
trivially), and it *passes* when every check in it holds (``later_rule="all"``; ``"any"``
requires firing at one later occurrence only). A feature's pass rate is the fraction of its
first ``n_sequences`` (default 200) eligible sequences that pass; pass rate > 0.6 passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.families import attribution_groups
from famfind.plugins import Detection, FamilyMember, Heuristic, Options, Result, Validation


@dataclass(frozen=True)
class BehaviourOptions(Options):
    n_sequences: int = 200  # per feature, as in the paper
    pass_threshold: float = 0.6  # pass rate strictly above this passes
    later_rule: str = "all"  # "all": fire at every later occurrence; "any": at one
    min_sequences: int = 5  # fewer eligible sequences: untested, not failed
    feature_chunk: int = 4096  # features per vectorised block (bounds memory for large d_sae)


def first_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """For each position ``p < pos-1``: is the bigram ``(tokens[p], tokens[p+1])`` new in its
    sequence? ``tokens [batch, pos]`` -> bool ``[batch, pos-1]``."""
    B, T = tokens.shape
    V = int(tokens.max()) + 1
    big = tokens[:, :-1] * V + tokens[:, 1:]  # [batch, pos-1]
    key = big + torch.arange(B, device=tokens.device)[:, None] * (V * V)
    flat = key.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    s = flat[order]
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    out = torch.empty_like(new)
    out[order] = new
    return out.view(B, T - 1)


def behaviour_checks(tokens: torch.Tensor, acts: torch.Tensor, top_token: torch.Tensor,
                     later_rule: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sequence, feature): ``(eligible, passed)``, both bool ``[batch, n_features]``.

    ``tokens [batch, pos]``, ``acts [batch, pos, n_features]``, ``top_token [n_features]``.
    """
    nxt = tokens[:, 1:]  # next token at each position p
    first = first_occurrence(tokens)  # [batch, pos-1]
    fired = acts[:, :-1, :] > 0  # [batch, pos-1, n_features]
    match = nxt[:, :, None] == top_token[None, None, :]
    first_m = match & first[:, :, None]
    later_m = match & ~first[:, :, None]
    bad_first = (first_m & fired).any(1)
    eligible = later_m.any(1)
    if later_rule == "all":
        ok_later = ~(later_m & ~fired).any(1)
    elif later_rule == "any":
        ok_later = (later_m & fired).any(1)
    else:
        raise ValueError(f"later_rule must be 'all' or 'any', not {later_rule!r}")
    return eligible, eligible & ~bad_first & ok_later


class InductionBehaviour(Heuristic):
    id = "induction_behaviour"
    version = "0.1"
    needs = "activations"
    requires = ("feature_logits",)
    description = "Pass rate of the paper's induction behaviour test, all features at once"
    Options = BehaviourOptions

    def start(self, ctx) -> None:
        self.top = ctx.results["feature_logits"].data["top_token"].to(ctx.config.device)
        F = ctx.sae.d_sae
        self.n_eval = torch.zeros(F, dtype=torch.long, device=ctx.config.device)
        self.n_pass = torch.zeros(F, dtype=torch.long, device=ctx.config.device)

    def observe(self, batch, ctx) -> None:
        c = self.options.feature_chunk
        for s in range(0, self.top.shape[0], c):
            elig, passed = behaviour_checks(batch.tokens, batch.acts[..., s:s + c], self.top[s:s + c],
                                            self.options.later_rule)
            # keep each feature's first n_sequences eligible sequences, in corpus order
            rank = elig.long().cumsum(0) + self.n_eval[None, s:s + c]
            keep = elig & (rank <= self.options.n_sequences)
            self.n_eval[s:s + c] += keep.sum(0)
            self.n_pass[s:s + c] += (passed & keep).sum(0)

    def run(self, ctx) -> Result:
        o = self.options
        n_eval, n_pass = self.n_eval.cpu(), self.n_pass.cpu()
        rate = n_pass.double() / n_eval.clamp_min(1)
        tested = n_eval >= o.min_sequences
        passed = tested & (rate > o.pass_threshold)
        top = self.top.cpu()
        dets = [Detection(int(f), float(rate[f]), bool(passed[f]),
                          {"n_sequences": int(n_eval[f]), "n_passed": int(n_pass[f]), "top_token": int(top[f])})
                for f in torch.nonzero(n_eval > 0).flatten().tolist()]
        return Result(detections=dets, data={"pass_rate": rate, "n_sequences": n_eval,
                                             "tested": tested, "passed": passed},
                      summary={"tested": int(tested.sum()), "passed": int(passed.sum())})


@dataclass(frozen=True)
class SelectionOptions(Options):
    selection_threshold: float = 0.6  # attribution on one induction head, as in the paper
    control_max_attribution: float = 0.1  # control: attribution to each induction head below this
    control_size: int = 500  # paper: 500 control features (all if fewer)


class InductionSelection(Heuristic):
    id = "induction_selection"
    version = "0.1"
    needs = "activations"
    requires = ("head_roles", "head_attribution", "induction_behaviour")
    description = "Select features on induction heads; validate against a random control group"
    Options = SelectionOptions

    def run(self, ctx) -> Result:
        o = self.options
        heads = ctx.results["head_roles"].data["induction_heads"]
        att = ctx.results["head_attribution"].data["attribution"]  # [d_sae, n_heads]
        beh = ctx.results["induction_behaviour"].data
        g = attribution_groups(att, heads, ~ctx.stats.dead, o.selection_threshold, o.control_max_attribution,
                               o.control_size, ctx.generator)
        selected, control, best = g.selected, g.control, g.role_attribution
        passed = beh["passed"]
        dets, fams = [], []
        for group, mask in (("selected", selected), ("control", control)):
            for f in torch.nonzero(mask).flatten().tolist():
                ev = {"group": group, "induction_attribution": round(float(best[f]), 4),
                      "pass_rate": round(float(beh["pass_rate"][f]), 4),
                      "n_sequences": int(beh["n_sequences"][f])}
                dets.append(Detection(f, float(best[f]), bool(passed[f]) and group == "selected", ev))
                if group == "selected" and passed[f]:
                    fams.append(FamilyMember("induction", f, float(beh["pass_rate"][f])))
        val = Validation("induction", int(selected.sum()), int((selected & passed).sum()),
                         int(control.sum()), int((control & passed).sum()))
        return Result(detections=dets, families=fams, validation=[val],
                      data={"selected": selected, "control": control, "family": selected & passed},
                      summary={"induction_heads": [f"{ctx.layer}.{h}" for h in heads],
                               "selected": val.selected, "passed": val.passed,
                               "control": val.control, "control_passed": val.control_passed})


@dataclass(frozen=True)
class AblationOptions(Options):
    n_sequences: int = 256  # corpus sequences re-encoded with the head(s) mean-ablated
    off_fraction: float = 0.1  # "turned off": ablated firing count <= this x clean count
    min_fires: int = 3  # fewer clean firings in the sample: untested


class InductionAblation(Heuristic):
    id = "induction_ablation"
    version = "0.1"
    needs = "model"
    requires = ("induction_selection",)
    description = "Mean-ablate the induction head(s); which family features turn off"
    Options = AblationOptions

    def run(self, ctx) -> Result:
        o = self.options
        heads = ctx.results["head_roles"].data["induction_heads"]
        fam = ctx.results["induction_selection"].data["family"]
        feats = torch.nonzero(fam).flatten()
        if not heads or feats.numel() == 0:
            return Result(validation=[Validation("induction", ablation_tested=0, ablation_off=0)],
                          summary={"tested": 0, "turned_off": 0})
        n = min(o.n_sequences, ctx.corpus.tokens.shape[0])
        idx = torch.randperm(ctx.corpus.tokens.shape[0], generator=ctx.generator)[:n]
        ablate = {(ctx.layer, h): ctx.stats.mean_z[h].to(ctx.config.device) for h in heads}
        sae = ctx.sae
        clean = torch.zeros(feats.numel(), dtype=torch.long)
        abl = torch.zeros(feats.numel(), dtype=torch.long)
        bs = ctx.config.batch_size
        for s in range(0, n, bs):
            toks = ctx.corpus.tokens[idx[s:s + bs]].to(ctx.config.device)
            z = ctx.model.run_hook_z(toks, ctx.layer)
            za = ctx.model.run_hook_z(toks, ctx.layer, ablate=ablate)
            clean += (sae.encode(z.flatten(-2))[..., feats] > 0).sum((0, 1)).cpu()
            abl += (sae.encode(za.flatten(-2))[..., feats] > 0).sum((0, 1)).cpu()
        tested = clean >= o.min_fires
        off = tested & (abl <= o.off_fraction * clean)
        dets = [Detection(int(f), float(1 - abl[i] / max(int(clean[i]), 1)), bool(off[i]),
                          {"clean_fires": int(clean[i]), "ablated_fires": int(abl[i]),
                           "heads": [f"{ctx.layer}.{h}" for h in heads]})
                for i, f in enumerate(feats.tolist()) if tested[i]]
        val = Validation("induction", ablation_tested=int(tested.sum()), ablation_off=int(off.sum()))
        return Result(detections=dets, validation=[val],
                      summary={"tested": int(tested.sum()), "turned_off": int(off.sum())})
