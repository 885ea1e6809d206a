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

from famfind.activations import EMPTY, best_rows
from famfind.families import FamilyOutcome, attribution_groups, family_result, head_names, mean_ablation
from famfind.heuristics.attribution import HeadAttributionMatrix, TopBoostedTokens
from famfind.heuristics.head_roles import HeadRoleScores
from famfind.plugins import Detection, Heuristic, Options, Output, Result, Validation


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
    Sparse: a check exists only where the next token is a feature's top token, so only those
    (position, feature) pairs are read (each position's features found by binary search in the
    features sorted by top token), not the dense ``[batch, pos, n_features]`` grid.
    """
    if later_rule not in ("all", "any"):
        raise ValueError(f"later_rule must be 'all' or 'any', not {later_rule!r}")
    B, T = tokens.shape
    F, dev = top_token.numel(), tokens.device
    nxt = tokens[:, 1:].reshape(-1)  # next token at each position p, [B * (T-1)]
    first = first_occurrence(tokens).reshape(-1)
    order = torch.argsort(top_token, stable=True)
    tops = top_token[order]
    lo, hi = torch.searchsorted(tops, nxt), torch.searchsorted(tops, nxt, right=True)
    count = hi - lo
    at = torch.repeat_interleave(torch.arange(nxt.numel(), device=dev), count)  # one entry per check
    k = torch.arange(at.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    f = order[lo[at] + k]
    b, p = at // (T - 1), at % (T - 1)
    fired = acts[b, p, f] > 0
    is_first = first[at]
    cell = b * F + f

    def any_of(mask):
        return torch.zeros(B * F, dtype=torch.bool, device=dev).index_fill_(0, cell[mask], True).view(B, F)

    bad_first = any_of(is_first & fired)
    eligible = any_of(~is_first)
    ok_later = ~any_of(~is_first & ~fired) if later_rule == "all" else any_of(~is_first & fired)
    return eligible, eligible & ~bad_first & ok_later


@dataclass(frozen=True)
class InductionBehaviourRates(Output):
    """Per feature ``[d_sae]``: ``pass_rate`` (float64 in [0, 1]) over ``n_sequences`` (long)
    eligible sequences, ``tested`` (at least ``min_sequences``) and ``passed`` (tested and
    pass rate > the threshold), bool. ``n_tested``/``n_passed``: their counts."""

    pass_rate: torch.Tensor
    n_sequences: torch.Tensor
    tested: torch.Tensor
    passed: torch.Tensor
    n_tested: int
    n_passed: int


class InductionBehaviour(Heuristic):
    id = "induction_behaviour"
    version = "0.1"
    needs = "activations"
    produces = InductionBehaviourRates
    requires = (TopBoostedTokens,)
    description = "Pass rate of the paper's induction behaviour test, all features at once"
    Options = BehaviourOptions

    def start(self, ctx) -> None:
        dev, n = ctx.config.device, self.options.n_sequences
        self.top = ctx.output(TopBoostedTokens).top_token.to(dev)
        F = ctx.sae.d_sae
        # each feature's first n_sequences eligible sequences (corpus rows, ascending) and whether each passed
        self.seq = torch.full((n, F), EMPTY, dtype=torch.long, device=dev)
        self.ok = torch.zeros(n, F, dtype=torch.bool, device=dev)
        self.count = torch.zeros(F, dtype=torch.long, device=dev)

    def observe(self, batch, ctx) -> None:
        c, n = self.options.feature_chunk, self.options.n_sequences
        rows = batch.seq_idx.to(self.seq.device)
        for s in range(0, self.top.shape[0], c):
            elig, passed = behaviour_checks(batch.tokens, batch.acts[..., s:s + c], self.top[s:s + c],
                                            self.options.later_rule)
            slot = elig.long().cumsum(0) - 1 + self.count[None, s:s + c]  # [batch, chunk]
            keep = elig & (slot < n)
            b, f = torch.nonzero(keep, as_tuple=True)
            self.seq[slot[b, f], f + s] = rows[b]
            self.ok[slot[b, f], f + s] = passed[b, f]
            self.count[s:s + c] += keep.sum(0)

    def merge(self, other: "InductionBehaviour") -> None:
        n = self.options.n_sequences
        self.seq, self.ok = best_rows([torch.cat([self.seq, other.seq.to(self.seq.device)])],
                                      [torch.cat([self.seq, other.seq.to(self.seq.device)]),
                                       torch.cat([self.ok, other.ok.to(self.ok.device)])], n, largest=False)
        self.count = (self.count + other.count.to(self.count.device)).clamp_max(n)

    def run(self, ctx) -> Result:
        o = self.options
        n_eval, n_pass = self.count.cpu(), self.ok.sum(0).cpu()
        rate = n_pass.double() / n_eval.clamp_min(1)
        tested = n_eval >= o.min_sequences
        passed = tested & (rate > o.pass_threshold)
        top = self.top.cpu()
        dets = [Detection(int(f), float(rate[f]), bool(passed[f]),
                          {"n_sequences": int(n_eval[f]), "n_passed": int(n_pass[f]), "top_token": int(top[f])})
                for f in torch.nonzero(n_eval > 0).flatten().tolist()]
        return Result(output=InductionBehaviourRates(rate, n_eval, tested, passed, int(tested.sum()),
                                                     int(passed.sum())), detections=dets)


@dataclass(frozen=True)
class SelectionOptions(Options):
    selection_threshold: float = 0.6  # attribution on one induction head, as in the paper
    control_max_attribution: float = 0.1  # control: attribution to each induction head below this
    control_size: int = 500  # paper: 500 control features (all if fewer)


@dataclass(frozen=True)
class InductionFamily(FamilyOutcome):
    """The induction family: selected on induction heads, passed = the behaviour test
    (``score``: the largest attribution to one induction head; confidence: the pass rate)."""


# Kissane et al. (2024), automated induction-feature analysis on gelu-2l's L1 attention SAE
PAPER_INDUCTION = {"selected": 586, "passed": 450, "control": 500, "control_passed": 3,
                   "ablation_tested": 450, "ablation_off": 443}


class InductionSelection(Heuristic):
    id = "induction_selection"
    version = "0.1"
    needs = "activations"
    produces = InductionFamily
    requires = (HeadRoleScores, HeadAttributionMatrix, InductionBehaviourRates)
    description = "Select features on induction heads; validate against a random control group"
    Options = SelectionOptions

    def run(self, ctx) -> Result:
        o = self.options
        heads = ctx.output(HeadRoleScores).induction_heads_in(ctx.layer)
        att = ctx.output(HeadAttributionMatrix).attribution  # [d_sae, n_heads]
        beh = ctx.output(InductionBehaviourRates)
        g = attribution_groups(att, heads, ~ctx.stats.dead, o.selection_threshold,
                               o.control_max_attribution, o.control_size, ctx.generator)
        return family_result(InductionFamily, "induction", g, g.role_attribution, beh.passed,
                             {"pass_rate": beh.pass_rate, "n_sequences": beh.n_sequences},
                             head_names(ctx.layer, heads), confidence=beh.pass_rate)

    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary
        v = section.query("SELECT selected, passed, control, control_passed, ablation_tested, ablation_off "
                          "FROM validation WHERE scan_id = ? AND sae = ? AND family = 'induction'")
        if v:
            fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
            p = PAPER_INDUCTION
            section.table("Induction family against the paper (gelu-2l, Kissane et al. 2024)",
                          ("", "selected", "passed behaviour", "control", "control passed", "ablation tested",
                           "turned off by ablation"),
                          [("this scan", *map(fmt, v[0])),
                           ("paper", *(str(p[k]) for k in ("selected", "passed", "control", "control_passed",
                                                           "ablation_tested", "ablation_off")))])
        heads = s.get("role_heads", s.get("induction_heads"))
        section.line("induction heads used for selection: " + (", ".join(heads) if heads else
                     "none in this layer reached head_roles.induction_head_threshold, so no feature can be selected"))


@dataclass(frozen=True)
class AblationOptions(Options):
    n_sequences: int = 256  # corpus sequences re-encoded with the head(s) mean-ablated
    off_fraction: float = 0.1  # "turned off": ablated firing count <= this x clean count
    min_fires: int = 3  # fewer clean firings in the sample: untested


@dataclass(frozen=True)
class AblationCounts(Output):
    """Family features with at least ``min_fires`` clean firings (``tested``) and of those
    turned off by mean-ablating the family's role heads (``turned_off``); ``heads`` ablated."""

    tested: int
    turned_off: int
    heads: list[str]


@dataclass(frozen=True)
class InductionAblationCounts(AblationCounts):
    """:class:`AblationCounts` of the induction family (heads: the induction heads)."""


class FamilyAblation(Heuristic):
    """Base of a detector that mean-ablates a head-role family's role heads
    (:func:`famfind.families.mean_ablation`) and fills the family's validation row;
    subclasses set ``family_output`` (the family's output type) and ``produces``."""

    needs = "activations"  # mean-ablation uses the pass's mean hook_z
    Options = AblationOptions
    family_output: type[FamilyOutcome]

    def run(self, ctx) -> Result:
        o = self.options
        fam = ctx.output(self.family_output)
        tested, off, dets = mean_ablation(ctx, fam, o.n_sequences, o.off_fraction, o.min_fires)
        val = Validation(fam.family, ablation_tested=tested, ablation_off=off)
        return Result(output=self.produces(tested, off, fam.role_heads), detections=dets,
                      validation=[val] if fam.role_heads else [])


class InductionAblation(FamilyAblation):
    id = "induction_ablation"
    version = "0.2"
    produces = InductionAblationCounts
    requires = (InductionFamily,)
    family_output = InductionFamily
    description = "Mean-ablate the induction head(s); which family features turn off"
