"""Mechanism records: for every live feature, where its activation comes from, tested causally.

Kissane et al. (2024, §3) and the seed post explain attention-SAE features by hand with head
attribution, DFA by source (which source position, and which token there, the feature reads)
and the direct logit effect. ``feature_mechanism`` does that for every live feature and checks
the answer by substitution, the way an interpretability researcher would:

*Record* (formed on the feature's ``top_k`` top examples and its uniform sample of even corpus
sequences, at most ``top_k + source_samples.n_uniform`` positions, :mod:`famfind.sources`):
at each position the *top source* is the source position with the largest DFA summed over
heads; the position's *mass* is its activation. Per feature: each head's share of the positive
DFA (mass-weighted; ``top_head``), the mass share of top sources at each distance bucket
(0, 1, 2-8, 9-32, > 32 tokens), ``top_distance`` (the mass-weighted median distance of the top
source), the *source token set* (the tokens at the top sources that cover ``set_coverage`` (80%)
of the mass, largest first) and the *current token set* likewise, and a class:
``current_token`` (>= ``class_share`` (0.5) of the mass at distance 0), ``previous_token`` (at
distance 1), ``short_range`` (2-8), ``long_range`` (> 8), else ``mixed``. Positions whose DFA
has no positive source (the feature's bias carries it) count in ``unsourced_share`` only.

*Tests* (on the held-out sample of odd corpus sequences, never a formation position):

- ``necessity``: the share of held-out positions where replacing the token at the position's
  top source by a corpus-unigram token outside the source set removes >= ``drop`` (50%) of the
  activation, the model re-run up to the SAE's layer (:mod:`famfind.substitution`);
  ``necessity_control``: the same with a uniformly random other source position at or before
  the position. ``validated``: >= ``min_tested`` (8) positions and necessity >=
  ``necessity_threshold`` (0.6). The control is a family-level gate, as in the paper's induction
  table: the share of tested features whose control passes the same threshold must be at most
  ``control_ratio`` (a tenth) of the share that pass the real test. Per feature the control rate
  is evidence, not a gate (replacing another attended token also matters to many features).
- ``sufficiency``: plant the source set (its tokens in turn, largest first) at the record's
  distance into ``n_windows`` held-out positions where the feature does not fire (so unplanted
  the rate is 0 by selection) and read whether it fires; ``sufficiency_control`` plants a
  unigram token outside the set at the same place. ``sufficiency_in_context``: the same in
  held-out positions whose current token is in the feature's current token set (a conjunction
  of source and current token shows up here, not in plain ``sufficiency``). The windows are
  positions of ``n_pool`` held-out sequences, in full context.

``max_tested`` (default 0: every feature) runs the tests on a seeded random sample of that
many features with a record (:func:`tested_sample`), for scans at users' scale; the others keep
their record, untested.

*Mechanism families*: validated records grouped by class and top head (``previous_token_via_0.0``,
``long_range_via_1.2``, ...), each with a validation row (selected: tested records of the group;
passed: validated; control / control passed: the same features' control substitution) and the
gate above; a group whose control fails the gate has no members. They claim necessity only:
that the source token is needed, not that it is enough (sufficiency says how often it is). A
feature's behaviour or proxy family, when it has one, stays its primary family.

Table ``feature_mechanism`` (one row per live feature). Cost: one forward per distinct edit
(sequence, position, token), cut at its last read position, shared by every feature that reads
it: proportional to the sampled positions, never to ``d_sae x corpus``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from famfind.activations import encode_hook
from famfind.errors import FamfindError
from famfind.heuristics.dfa import SourceSamples
from famfind.plugins import Column, Detection, FamilyMember, Heuristic, Options, Output, Result, Table, Validation
from famfind.sources import sequence_keys
from famfind.substitution import run_edits

BUCKETS = ("d0", "d1", "d2_8", "d9_32", "d33_plus")  # top-source distance buckets: 0, 1, 2-8, 9-32, > 32
BUCKET_EDGES = torch.tensor([1, 2, 9, 33])  # lower edges of buckets 1.. (bucketize, right=True)
CLASSES = ("current_token", "previous_token", "short_range", "long_range", "mixed")


@dataclass(frozen=True)
class MechanismOptions(Options):
    class_share: float = 0.5  # mass share a class's distance buckets need; below it: mixed
    set_coverage: float = 0.8  # the token sets cover this share of the mass
    min_tested: int = 8  # held-out positions a test needs (fewer: untested; 4-7 positions of a rare feature,
    # often from one or two sequences, made the control pass several times as often on a 128k-token corpus)
    drop: float = 0.5  # a substitution "removes" the activation when it falls by at least this share
    necessity_threshold: float = 0.6  # validated: the drop at >= this share of held-out positions
    control_ratio: float = 0.1  # family gate: control-passing share <= this x the validated share
    n_windows: int = 8  # sufficiency windows per feature (random, and in context)
    n_pool: int = 64  # held-out sequences the sufficiency windows come from
    token_budget: int = 0  # positions (plus cached keys) per re-run forward; 0: 2 x the scan's batch_size x seq_len
    max_tested: int = 0  # features the causal tests run on: 0, every feature with a record; N > 0, a seeded random
    # sample of N of them (records are still formed for every live feature): for scans at users' scale, where the
    # tests cost ~540 re-run positions per feature through every layer up to the SAE's

    def __post_init__(self):
        if self.max_tested < 0:
            raise FamfindError("options of feature_mechanism", f"max_tested must be >= 0, got {self.max_tested}")


@dataclass(frozen=True)
class MechanismRecords(Output):
    """Per feature ``[d_sae]``: ``mechanism`` (long, index into ``classes``; -1: no record),
    ``top_head`` (long), ``top_distance`` (long), ``n_tested`` (long), ``necessity`` /
    ``necessity_control`` (float, NaN untested), ``validated`` (bool) and ``family`` (the
    feature's mechanism family or ``""``). Counts over live features: ``n_live``, ``n_records``,
    ``n_tested``, ``n_validated``, ``n_control_passed``; ``gate_ok``: control-passing share <=
    ``control_ratio`` x validated share; ``classes``; ``by_class`` records per class;
    ``n_sufficient`` / ``n_sufficient_in_context``: features firing in >= half their planted
    windows; ``n_families`` with members; ``n_chosen``: features with a record the causal tests
    ran on (``n_records`` unless ``max_tested`` sampled them)."""

    mechanism: torch.Tensor
    top_head: torch.Tensor
    top_distance: torch.Tensor
    n_tested: torch.Tensor
    necessity: torch.Tensor
    necessity_control: torch.Tensor
    validated: torch.Tensor
    family: list[str]
    n_live: int
    n_records: int
    n_tested_features: int
    n_validated: int
    n_control_passed: int
    gate_ok: bool
    classes: list[str]
    by_class: dict[str, int]
    n_sufficient: int
    n_sufficient_in_context: int
    n_families: int
    n_chosen: int


def _segments(group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted ``group [n]``: each entry's index of its group's first entry, and the rank
    within the group."""
    n = group.numel()
    start = torch.searchsorted(group, group, right=False)
    return start, torch.arange(n) - start


def weighted_median(feat: torch.Tensor, value: torch.Tensor, weight: torch.Tensor, F: int) -> torch.Tensor:
    """Per feature ``[F]`` (long, -1: no entry): the weighted median of ``value`` over its entries
    ``(feat, value, weight) [n]``: the smallest value whose cumulative weight reaches half."""
    out = torch.full((F,), -1, dtype=torch.long)
    if feat.numel() == 0:
        return out
    order = torch.argsort(feat * (int(value.max()) + 1) + value, stable=True)
    f, v, w = feat[order], value[order], weight[order].double()
    cum = w.cumsum(0)
    start, _ = _segments(f)
    before = torch.where(start > 0, cum[(start - 1).clamp_min(0)], torch.zeros_like(cum))
    total = torch.zeros(F, dtype=torch.float64).index_add_(0, f, w)
    reached = (cum - before) >= total[f] / 2
    idx = torch.nonzero(reached).flatten()
    first = torch.full((F,), len(f), dtype=torch.long).scatter_reduce_(0, f[idx], idx, reduce="amin")
    has = first < len(f)
    out[has] = v[first[has]]
    return out


def group_median(feat: torch.Tensor, value: torch.Tensor, F: int) -> torch.Tensor:
    """Per feature ``[F]`` (NaN: no entry): the lower median of ``value`` over its entries."""
    out = torch.full((F,), float("nan"))
    if feat.numel() == 0:
        return out
    order = torch.argsort(value, stable=True)
    order = order[torch.argsort(feat[order], stable=True)]
    f, v = feat[order], value[order].float()
    count = torch.bincount(f, minlength=F)
    start = torch.cumsum(count, 0) - count
    has = count > 0
    out[has] = v[start[has] + (count[has] - 1) // 2]
    return out


def token_sets(feat: torch.Tensor, tok: torch.Tensor, mass: torch.Tensor, F: int, coverage: float):
    """Per feature, the tokens that cover ``coverage`` of its mass, largest first: returns
    ``(lists of token ids, their masses, set size [F], top token's share [F])`` from entries
    ``(feat, tok, mass) [n]``."""
    V = int(tok.max()) + 1 if tok.numel() else 1
    key, inv = torch.unique(feat * V + tok, return_inverse=True)
    m = torch.zeros(key.numel(), dtype=torch.float64).index_add_(0, inv, mass.double())
    kf, kt = key // V, key % V
    order = torch.argsort(-m, stable=True)
    order = order[torch.argsort(kf[order], stable=True)]
    kf, kt, m = kf[order], kt[order], m[order]
    total = torch.zeros(F, dtype=torch.float64).index_add_(0, kf, m)
    start, rank = _segments(kf)
    cum = m.cumsum(0)
    before = cum - m - torch.where(start > 0, cum[(start - 1).clamp_min(0)], torch.zeros_like(cum))
    keep = before < coverage * total[kf]  # include the entry that crosses the coverage
    size = torch.zeros(F, dtype=torch.long).index_add_(0, kf[keep], torch.ones(int(keep.sum()), dtype=torch.long))
    top = torch.zeros(F, dtype=torch.float64)
    first = rank == 0
    top[kf[first]] = (m[first] / total[kf[first]].clamp_min(1e-30))
    lists, masses = [[] for _ in range(F)], [[] for _ in range(F)]
    for f_, t_, m_ in zip(kf[keep].tolist(), kt[keep].tolist(), m[keep].tolist()):
        lists[f_].append(t_)
        masses[f_].append(m_)
    return lists, masses, size, top


class FeatureMechanism(Heuristic):
    id = "feature_mechanism"
    version = "0.1"
    needs = "activations"
    produces = MechanismRecords
    requires = (SourceSamples,)
    tables = (Table("feature_mechanism", (
        Column("feature", "INTEGER", "SAE feature index (every live feature)"),
        Column("layer", "INTEGER", "the SAE's layer"),
        Column("mechanism", "VARCHAR", "current_token, previous_token, short_range, long_range or mixed (NULL: no "
               "sourced position)"),
        Column("top_head", "VARCHAR", "the head with the largest share of the positive DFA, layer.head"),
        Column("head_share", "FLOAT[]", "each head's share of the positive DFA (mass-weighted)"),
        Column("share_d0", "FLOAT", "mass share of top sources at distance 0 (the current token)"),
        Column("share_d1", "FLOAT", "at distance 1 (the previous token)"),
        Column("share_d2_8", "FLOAT", "at distance 2-8"),
        Column("share_d9_32", "FLOAT", "at distance 9-32"),
        Column("share_d33_plus", "FLOAT", "at distance > 32"),
        Column("top_distance", "INTEGER", "mass-weighted median distance of the top source, tokens"),
        Column("top_source_share", "FLOAT", "mean share of a position's positive DFA on its top source"),
        Column("unsourced_share", "FLOAT", "mass share of positions with no positive source (bias-driven)"),
        Column("source_tokens", "INTEGER[]", "tokens at the top sources covering 80% of the mass, largest first"),
        Column("source_token_strs", "VARCHAR[]", "their text"),
        Column("n_source_tokens", "INTEGER", "size of the source token set"),
        Column("top_source_token_share", "FLOAT", "mass share of the commonest source token"),
        Column("current_tokens", "INTEGER[]", "tokens at the firing positions covering 80% of the mass"),
        Column("current_token_strs", "VARCHAR[]", "their text"),
        Column("n_current_tokens", "INTEGER", "size of the current token set"),
        Column("top_current_token_share", "FLOAT", "mass share of the commonest current token"),
        Column("n_formed", "INTEGER", "positions the record was formed on (top examples + even-sequence sample)"),
        Column("n_tested", "INTEGER", "held-out positions (odd sequences) of the causal tests"),
        Column("necessity", "FLOAT", "share of held-out positions losing >= 50% of the activation when the top "
               "source's token is replaced (NULL: untested)"),
        Column("necessity_control", "FLOAT", "the same, a random other source position at or before it replaced"),
        Column("median_drop", "FLOAT", "median fraction of the activation the top-source substitution removes "
               "(negative: it rises)"),
        Column("validated", "BOOLEAN", "n_tested >= min_tested (8) and necessity >= necessity_threshold (0.6)"),
        Column("n_windows", "INTEGER", "held-out windows (feature silent) the source set was planted into"),
        Column("sufficiency", "FLOAT", "share of them where the feature then fires (unplanted: 0 by selection)"),
        Column("sufficiency_control", "FLOAT", "the same with a unigram token outside the set planted"),
        Column("n_in_context", "INTEGER", "held-out windows with a current token of the set (feature silent)"),
        Column("sufficiency_in_context", "FLOAT", "share of those where planting the source set makes it fire"),
        Column("sufficiency_in_context_control", "FLOAT", "the same with a unigram token planted"),
        Column("family", "VARCHAR", "its mechanism family (class_via_layer.head; NULL: none)")),
        "per live feature: where its activation comes from (DFA by source) and the causal tests of it"),)
    description = "Per live feature: DFA-by-source mechanism record, necessity and sufficiency by token substitution"
    Options = MechanismOptions

    def run(self, ctx) -> Result:
        o = self.options
        samp = ctx.output(SourceSamples)
        st, sae, tokens = ctx.stats, ctx.sae, ctx.corpus.tokens
        F, T = sae.d_sae, tokens.shape[1]
        H = samp.top.head_val.shape[-1]
        live = ~st.dead
        rec = self._form(samp, tokens, F, H)
        budget = o.token_budget or 2 * ctx.config.batch_size * T
        unigram = tokens.reshape(-1)
        gen = ctx.generator
        in_set = _Membership(rec["src_sets"], F)
        chosen = tested_sample(live & (rec["mechanism"] >= 0), o.max_tested, ctx.config.seed)
        tests = self._necessity(ctx, samp, rec, in_set, unigram, budget, gen, chosen)
        suff = self._sufficiency(ctx, rec, in_set, unigram, budget, gen, chosen)
        validated = (tests["n_tested"] >= o.min_tested) & (tests["necessity"] >= o.necessity_threshold)
        tested = tests["n_tested"] >= o.min_tested
        ctl_pass = tested & (tests["necessity_control"] >= o.necessity_threshold)
        n_tested, n_val, n_ctl = int((tested & live).sum()), int((validated & live).sum()), int((ctl_pass & live).sum())
        gate_ok = n_val > 0 and n_ctl / max(n_tested, 1) <= o.control_ratio * n_val / max(n_tested, 1)
        # mechanism families: validated records by class and top head, each gated by its control
        family = [""] * F
        groups: dict[str, list[int]] = {}
        for f in torch.nonzero(tested & live & (rec["mechanism"] >= 0)).flatten().tolist():
            name = f"{CLASSES[int(rec['mechanism'][f])]}_via_{ctx.layer}.{int(rec['top_head'][f])}"
            groups.setdefault(name, []).append(f)
        fams, vals, n_fam = [], [], 0
        for name in sorted(groups):
            fs = torch.tensor(groups[name])
            sel, pas, cp = fs.numel(), int(validated[fs].sum()), int(ctl_pass[fs].sum())
            vals.append(Validation(name, sel, pas, sel, cp, test="necessity"))
            if pas and cp / sel <= o.control_ratio * pas / sel:
                n_fam += 1
                for f in fs[validated[fs]].tolist():
                    family[f] = name
                    fams.append(FamilyMember(name, f, float(tests["necessity"][f]), "necessity"))
        tok = ctx.model.tokenizer
        strs = (lambda ids: [tok.token_str(int(i)) for i in ids]) if tok is not None else (lambda ids: [str(i) for i in ids])
        # the table column by column (a frame from one dict per feature cost ~2 s at 24,576 features)
        fl = torch.nonzero(live).flatten()
        L = fl.tolist()
        mech = rec["mechanism"][fl].tolist()
        nts = tests["n_tested"][fl].tolist()

        def col(x, ok=None):  # floats of the live features; None where NaN or not ok
            v = x[fl].tolist()
            return [None if y != y or (ok is not None and not k) else y for y, k in zip(v, ok or v)]

        has = [m >= 0 for m in mech]
        tested_pos = [n > 0 for n in nts]
        cols = {
            "feature": L, "layer": [ctx.layer] * len(L),
            "mechanism": [CLASSES[m] if m >= 0 else None for m in mech],
            "top_head": [f"{ctx.layer}.{h}" if m >= 0 else None for h, m in zip(rec["top_head"][fl].tolist(), mech)],
            "head_share": _list_column(rec["head_share"][fl].float().numpy().reshape(-1),
                                       np.arange(len(L) + 1) * rec["head_share"].shape[1]),
            **{f"share_{b}": rec["buckets"][fl, i].tolist() for i, b in enumerate(BUCKETS)},
            "top_distance": [d if ok else None for d, ok in zip(rec["top_distance"][fl].tolist(), has)],
            "top_source_share": col(rec["top_share"]), "unsourced_share": rec["unsourced"][fl].tolist(),
            "source_tokens": _sets_column([rec["src_sets"][f] for f in L], pa.int32()),
            "source_token_strs": _sets_column([strs(rec["src_sets"][f]) for f in L], pa.string()),
            "n_source_tokens": rec["src_size"][fl].tolist(), "top_source_token_share": rec["src_top"][fl].tolist(),
            "current_tokens": _sets_column([rec["cur_sets"][f] for f in L], pa.int32()),
            "current_token_strs": _sets_column([strs(rec["cur_sets"][f]) for f in L], pa.string()),
            "n_current_tokens": rec["cur_size"][fl].tolist(), "top_current_token_share": rec["cur_top"][fl].tolist(),
            "n_formed": rec["n_formed"][fl].tolist(), "n_tested": nts,
            "necessity": col(tests["necessity"], tested_pos), "necessity_control": col(tests["necessity_control"], tested_pos),
            "median_drop": col(tests["median_drop"], tested_pos), "validated": validated[fl].tolist(),
            "n_windows": suff["n_windows"][fl].tolist(), "sufficiency": col(suff["sufficiency"]),
            "sufficiency_control": col(suff["sufficiency_control"]), "n_in_context": suff["n_in_context"][fl].tolist(),
            "sufficiency_in_context": col(suff["sufficiency_in_context"]),
            "sufficiency_in_context_control": col(suff["sufficiency_in_context_control"]),
            "family": [family[f] or None for f in L]}
        dets = [Detection(f, float(tests["necessity"][f]), bool(validated[f]), {
            "n_tested": n, "necessity_control": round(float(tests["necessity_control"][f]), 4),
            "mechanism": CLASSES[m] if m >= 0 else None, "top_distance": int(rec["top_distance"][f])})
            for f, m, n in zip(L, mech, nts) if n]
        by_class = Counter(CLASSES[int(x)] for x in rec["mechanism"][live].tolist() if x >= 0)
        suff_ok = live & (suff["sufficiency"] >= 0.5)
        ctx_ok = live & (suff["sufficiency_in_context"] >= 0.5)
        out = MechanismRecords(rec["mechanism"], rec["top_head"], rec["top_distance"], tests["n_tested"],
                               tests["necessity"], tests["necessity_control"], validated & live, family,
                               int(live.sum()), int((live & (rec["mechanism"] >= 0)).sum()), n_tested, n_val, n_ctl,
                               bool(gate_ok), list(CLASSES), dict(by_class), int(suff_ok.sum()), int(ctx_ok.sum()), n_fam,
                               int(chosen.sum()))
        return Result(output=out, detections=dets, families=fams, validation=vals,
                      tables={"feature_mechanism": self.tables[0].frame(cols)})

    # --- the record --------------------------------------------------------------------
    def _form(self, samp, tokens, F: int, H: int) -> dict:
        """The records from the formation positions (top examples + the even-sequence sample)."""
        o, T = self.options, tokens.shape[1]
        parts = []
        for part in (samp.top, samp.uniform):
            k, f = torch.nonzero(part.seq >= 0, as_tuple=True)
            parts.append((f, part.seq[k, f], part.pos[k, f], part.act[k, f], part.src_pos[k, f, 0],
                          part.src_val[k, f, 0], part.pos_total[k, f], part.head_val[k, f]))
        key_top = parts[0][0] * tokens.numel() + parts[0][1] * T + parts[0][2]
        key_uni = parts[1][0] * tokens.numel() + parts[1][1] * T + parts[1][2]
        fresh = ~torch.isin(key_uni, key_top)  # a top example may also be in the uniform sample
        cols = [torch.cat([a, b[fresh]]) for a, b in zip(parts[0], parts[1])]
        f, seq, pos, act, src, sval, ptot, hval = cols
        n_formed = torch.bincount(f, minlength=F)
        sourced = ptot > 0
        mass_all = torch.zeros(F, dtype=torch.float64).index_add_(0, f, act.double())
        unsourced = torch.zeros(F, dtype=torch.float64).index_add_(0, f[~sourced], act[~sourced].double())
        f, seq, pos, act, src, sval, ptot, hval = (x[sourced] for x in (f, seq, pos, act, src, sval, ptot, hval))
        dist = pos - src
        mass = torch.zeros(F, dtype=torch.float64).index_add_(0, f, act.double())
        b = torch.bucketize(dist, BUCKET_EDGES, right=True)
        buckets = torch.zeros(F * len(BUCKETS), dtype=torch.float64).index_add_(0, f * len(BUCKETS) + b, act.double())
        buckets = (buckets.view(F, -1) / mass.clamp_min(1e-30)[:, None]).float()
        hpos = hval.clamp_min(0)
        hshare = hpos / hpos.sum(-1, keepdim=True).clamp_min(1e-30)
        head = torch.zeros(F, H, dtype=torch.float64).index_add_(0, f, (hshare * act[:, None]).double())
        head = (head / mass.clamp_min(1e-30)[:, None]).float()
        top_head = head.argmax(1)
        n_src = torch.bincount(f, minlength=F)
        top_share = torch.zeros(F).index_add_(0, f, sval / ptot) / n_src.clamp_min(1)
        top_share[n_src == 0] = float("nan")
        stok, ctok = tokens[seq, src], tokens[seq, pos]
        src_sets, _, src_size, src_top = token_sets(f, stok, act, F, o.set_coverage)
        cur_sets, _, cur_size, cur_top = token_sets(f, ctok, act, F, o.set_coverage)
        share = buckets
        cls = torch.full((F,), CLASSES.index("mixed"), dtype=torch.long)
        for i, c in enumerate(("current_token", "previous_token", "short_range")):
            cls = torch.where(share[:, i] >= o.class_share, CLASSES.index(c), cls)
        cls = torch.where(share[:, 3] + share[:, 4] >= o.class_share, CLASSES.index("long_range"), cls)
        cls[n_src == 0] = -1
        return {"mechanism": cls, "top_head": top_head, "head_share": head, "buckets": buckets,
                "top_distance": weighted_median(f, dist, act, F), "top_share": top_share,
                "unsourced": (unsourced / mass_all.clamp_min(1e-30)).float(), "src_sets": src_sets,
                "src_size": src_size, "src_top": src_top.float(), "cur_sets": cur_sets, "cur_size": cur_size,
                "cur_top": cur_top.float(), "n_formed": n_formed,
                "form_keys": torch.unique(f * tokens.numel() + seq * T + pos)}

    # --- necessity ---------------------------------------------------------------------
    def _necessity(self, ctx, samp, rec, in_set, unigram, budget, gen, chosen) -> dict:
        o, tokens = self.options, ctx.corpus.tokens
        F, T = ctx.sae.d_sae, tokens.shape[1]
        h = samp.held_out
        k, f = torch.nonzero(h.seq >= 0, as_tuple=True)
        seq, pos, src, ptot = h.seq[k, f], h.pos[k, f], h.src_pos[k, f, 0], h.pos_total[k, f]
        keep = (ptot > 0) & chosen[f] & \
            ~torch.isin(f * tokens.numel() + seq * T + pos, rec["form_keys"])  # never a formation position
        f, seq, pos, src = f[keep], seq[keep], pos[keep], src[keep]
        n = f.numel()
        # control: a uniformly random source position at or before pos, other than the top source
        u = (torch.rand(n, generator=gen) * pos.clamp_min(1)).long().clamp_max((pos - 1).clamp_min(0))
        ctl = torch.where(u >= src, u + 1, u)
        has_ctl = pos >= 1
        ctl = torch.where(has_ctl, ctl, src)
        edits = _Edits(tokens, unigram, gen)
        clean = edits.clean(seq)
        nec = edits.replace(seq, src, f, in_set)
        con = edits.replace(seq, ctl, f, in_set)
        acts = edits.run(ctx, [(clean, pos, f), (nec, pos, f), (con, pos, f)], budget)
        a0, a1, a2 = acts
        ok = (a0 > 0) & (nec >= 0)
        drop1 = 1 - a1 / a0.clamp_min(1e-12)
        p1 = ok & (a1 <= (1 - o.drop) * a0)
        okc = ok & has_ctl & (con >= 0)
        p2 = okc & (a2 <= (1 - o.drop) * a0)

        def rate(x, m):
            cnt = torch.zeros(F).index_add_(0, f[m], torch.ones(int(m.sum())))
            return torch.zeros(F).index_add_(0, f[m], x[m].float()) / cnt.clamp_min(1), cnt

        necessity, n_tested = rate(p1, ok)
        control, n_ctl = rate(p2, okc)
        nan = torch.tensor(float("nan"))
        return {"n_tested": n_tested.long(), "necessity": torch.where(n_tested > 0, necessity, nan),
                "necessity_control": torch.where(n_ctl > 0, control, nan),
                "median_drop": group_median(f[ok], drop1[ok], F)}

    # --- sufficiency -------------------------------------------------------------------
    def _sufficiency(self, ctx, rec, in_set, unigram, budget, gen, chosen) -> dict:
        o, tokens = self.options, ctx.corpus.tokens
        F, (n_seq, T) = ctx.sae.d_sae, tokens.shape
        nan = torch.full((F,), float("nan"))
        out = {"n_windows": torch.zeros(F, dtype=torch.long), "n_in_context": torch.zeros(F, dtype=torch.long),
               "sufficiency": nan.clone(), "sufficiency_control": nan.clone(), "sufficiency_in_context": nan.clone(),
               "sufficiency_in_context_control": nan.clone()}
        odd = torch.arange(1, n_seq, 2)
        if odd.numel() == 0 or o.n_windows <= 0:
            return out
        pool = odd[torch.argsort(sequence_keys(ctx.config.seed, odd))[:o.n_pool]]
        feats = torch.nonzero(chosen).flatten()
        if feats.numel() == 0:
            return out
        # which features fire at each pool position (clean, full context): sorted keys pool position * F + feature
        keys, bs = [], ctx.config.batch_size
        for b0 in range(0, pool.numel(), bs):
            acts = encode_hook(ctx.model, ctx.sae, tokens[pool[b0:b0 + bs]].to(ctx.config.device))[1]
            nz = torch.nonzero(acts.reshape(-1, F) > 0).cpu()
            keys.append((nz[:, 0] + b0 * T) * F + nz[:, 1])
        fire_key = torch.cat(keys).sort().values
        n_pos = pool.numel() * T
        rank_of = torch.randperm(n_pos, generator=gen)  # one random order of the pool positions
        order = torch.argsort(rank_of)  # positions in that order
        d = rec["top_distance"][feats].clamp_min(0)
        M, extra = o.n_windows, 4 * o.n_windows

        def silent(fs, cand):  # [n, K] candidate pool positions (-1 pad): eligible and the feature silent
            t = cand % T
            ok = (cand >= 0) & (t >= d_of[fs][:, None])
            key = cand.clamp_min(0) * F + fs[:, None]
            i = torch.searchsorted(fire_key, key.reshape(-1)).view_as(key).clamp_max(max(fire_key.numel() - 1, 0))
            fires = fire_key[i] == key if fire_key.numel() else torch.zeros_like(ok)
            return ok & ~fires

        d_of = torch.full((F,), 0, dtype=torch.long)
        d_of[feats] = d
        # random windows: the first positions of the shared order that fit
        cand = order[:M + extra].expand(feats.numel(), -1)
        win = _first_true(silent(feats, cand), cand, M)  # [n, M] pool positions (-1: none)
        # in-context windows: positions whose current token is in the feature's current set
        pool_tok = tokens[pool].reshape(-1)
        ctx_cand = _positions_with_tokens(feats, rec["cur_sets"], pool_tok, rank_of, M + extra)
        ctx_win = _first_true(silent(feats, ctx_cand), ctx_cand, M)
        ctx_win[d[:, None].expand_as(ctx_win) == 0] = -1  # planting at distance 0 replaces the current token
        edits = _Edits(tokens, unigram, gen)
        res = {}
        for name, w in (("", win), ("_in_context", ctx_win)):
            fi, j = torch.nonzero(w >= 0, as_tuple=True)
            if fi.numel() == 0:
                res[name] = None
                continue
            fs, p = feats[fi], w[fi, j]
            s, t = pool[p // T], p % T
            sets = [rec["src_sets"][x] for x in fs.tolist()]
            x = torch.tensor([st[jj % len(st)] for st, jj in zip(sets, j.tolist())], dtype=torch.long)
            plant = edits.add(s, t - d_of[fs], x)
            ctl = edits.replace(s, t - d_of[fs], fs, in_set)
            res[name] = (fs, s, t, plant, ctl)
        reads = [(r[3], r[2], r[0]) for r in res.values() if r] + [(r[4], r[2], r[0]) for r in res.values() if r]
        if not reads:
            return out
        acts = edits.run(ctx, reads, budget)
        active = [r for r in res.items() if r[1]]
        for (name, (fs, s, t, plant, ctl)), ap, ac in zip(active, acts[:len(active)], acts[len(active):]):
            cnt = torch.zeros(F).index_add_(0, fs, torch.ones(fs.numel()))
            okc = ctl >= 0
            cntc = torch.zeros(F).index_add_(0, fs[okc], torch.ones(int(okc.sum())))
            key = "n_windows" if not name else "n_in_context"
            out[key] = cnt.long()
            out[f"sufficiency{name}"] = torch.where(cnt > 0, torch.zeros(F).index_add_(0, fs, (ap > 0).float())
                                                    / cnt.clamp_min(1), nan)
            out[f"sufficiency{name}_control"] = torch.where(
                cntc > 0, torch.zeros(F).index_add_(0, fs[okc], (ac[okc] > 0).float()) / cntc.clamp_min(1), nan)
        return out

    # --- reports -----------------------------------------------------------------------
    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary
        if not s:
            return
        live, val, ten, ctl = s["n_live"], s["n_validated"], s["n_tested_features"], s["n_control_passed"]
        section.line(f"mechanism records: {s['n_records']:,} of {live:,} live features; {ten:,} tested on held-out "
                     f"positions, {val:,} validated ({val / max(live, 1):.1%} of live): replacing the top source's "
                     f"token removes >= 50% of the activation at >= 60% of positions; control (a random other source): "
                     f"{ctl:,} ({ctl / max(ten, 1):.1%} of tested; gate {'met' if s['gate_ok'] else 'NOT met'}: "
                     f"<= a tenth of {val / max(ten, 1):.1%})")
        if tests_sampled(s):
            section.line(f"the causal tests ran on a random sample of {s['n_chosen']:,} of the {s['n_records']:,} "
                         f"records (option max_tested); the other records are untested")
        section.line("classes: " + ", ".join(f"{c} {s['by_class'].get(c, 0):,}" for c in s["classes"])
                     + f"; sufficient alone (fires in >= half the planted windows): {s['n_sufficient']:,}, "
                     f"in context: {s['n_sufficient_in_context']:,} (records claim necessity, not sufficiency)")
        rows = section.query("SELECT family, selected, passed, control_passed FROM validation WHERE scan_id = ? AND "
                             "sae = ? AND test = 'necessity' ORDER BY passed DESC, family")
        if rows:
            section.table("Mechanism families (validated records by class and top head; control: a random "
                          "other source)", ("family", "tested", "validated", "control passed"),
                          [(fam, str(a), str(b), str(c)) for fam, a, b, c in rows])

    @classmethod
    def html_part(cls, section) -> dict:
        sampled = tests_sampled(section.summary or {})
        return {"features": section.per_feature(
            "SELECT feature, mechanism, top_head, top_distance, source_token_strs, round(necessity, 2) AS nec, "
            "round(necessity_control, 2) AS ctl, round(sufficiency, 2) AS suf, round(sufficiency_in_context, 2) AS "
            "sic, validated FROM feature_mechanism WHERE scan_id = ? AND sae = ?",
            lambda r, card: card.__setitem__("mechanism", mechanism_line(r, sampled)))}


def mechanism_line(r: dict, sampled: bool = False) -> str:
    """One line of a feature's mechanism record, e.g. ``reads {' (', ' ['} at distance 1 via
    0.0 (previous_token); necessity 0.94 (control 0.03), sufficiency 0.12, in context 0.41``.
    ``sampled``: the causal tests ran on a sample of the records (``max_tested``)."""
    if r.get("mechanism") is None:
        return "no mechanism record (no position with a positive DFA source)"
    toks = ", ".join(repr(t) for t in (r.get("source_token_strs") or [])[:6])
    more = len(r.get("source_token_strs") or []) - 6
    line = (f"reads {{{toks}{', ...' if more > 0 else ''}}} at distance {r['top_distance']} via {r['top_head']} "
            f"({r['mechanism']})")

    def f2(x):
        return "-" if x is None else f"{x:.2f}"

    if r.get("nec") is None:
        return line + ("; untested (not in the max_tested sample, or too few held-out positions)" if sampled
                       else "; untested (too few held-out positions)")
    return (line + f"; necessity {f2(r['nec'])} (control {f2(r['ctl'])}), sufficiency {f2(r['suf'])}, "
            f"in context {f2(r['sic'])}" + ("" if r.get("validated") else "; not validated"))


def tests_sampled(summary: dict) -> bool:
    """Whether a stored ``feature_mechanism`` summary's causal tests ran on a sample of its
    records (``max_tested``); ``False`` for summaries written before the option."""
    return summary.get("n_chosen", summary.get("n_records", 0)) < summary.get("n_records", 0)


def _list_column(values, offsets, typ=None) -> pl.Series:
    """A polars list column from flat ``values`` and row ``offsets [n_rows + 1]`` (one Arrow
    list array: building one Series per row cost ~1.6 s per 24,576-feature table)."""
    return pl.from_arrow(pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)),
                                                  pa.array(values, type=typ)))


def _sets_column(sets: list[list], typ) -> pl.Series:
    """:func:`_list_column` of variable-length ``sets`` (one list per row) of Arrow type ``typ``."""
    return _list_column([y for x in sets for y in x], np.cumsum([0] + [len(x) for x in sets]), typ)


def tested_sample(eligible: torch.Tensor, max_tested: int, seed: int) -> torch.Tensor:
    """The features the causal tests run on, bool ``[d_sae]``: every ``eligible`` one when
    ``max_tested`` is 0 or at least their number, else the ``max_tested`` eligible features with
    the smallest seeded hash of their index (:func:`famfind.sources.sequence_keys`), the same
    sample for a seed whatever else the scan runs. Raises ``ValueError`` for a negative
    ``max_tested``."""
    if max_tested < 0:
        raise ValueError(f"max_tested must be >= 0, got {max_tested}")
    idx = torch.nonzero(eligible).flatten()
    if max_tested == 0 or idx.numel() <= max_tested:
        return eligible.clone()
    pick = idx[torch.argsort(sequence_keys(seed + 0x3C6EF372, idx), stable=True)[:max_tested]]
    out = torch.zeros_like(eligible)
    out[pick] = True
    return out


def _first_true(mask: torch.Tensor, cand: torch.Tensor, M: int) -> torch.Tensor:
    """Per row, the first ``M`` entries of ``cand`` where ``mask`` holds (-1 pads), ``[n, M]``."""
    rank = mask.long().cumsum(1) - 1
    keep = mask & (rank < M)
    out = torch.full((cand.shape[0], M), -1, dtype=torch.long)
    r, c = torch.nonzero(keep, as_tuple=True)
    out[r, rank[r, c]] = cand[r, c]
    return out


def _positions_with_tokens(feats: torch.Tensor, sets: list[list[int]], pool_tok: torch.Tensor,
                           rank_of: torch.Tensor, K: int) -> torch.Tensor:
    """Per feature ``[n, K]``: the pool positions whose token is in its set, earliest in the
    shared random order first (``rank_of [positions]``), -1 pads."""
    out = torch.full((feats.numel(), K), -1, dtype=torch.long)
    if pool_tok.numel() == 0:
        return out
    order = torch.argsort(rank_of)
    tok_sorted = pool_tok[order]  # tokens in the random order
    by_tok = torch.argsort(tok_sorted, stable=True)  # grouped by token, random order within
    toks_grouped = tok_sorted[by_tok]
    for i, s in enumerate(sets[f] for f in feats.tolist()):
        if not s:
            continue
        q = torch.tensor(s)
        lo, hi = torch.searchsorted(toks_grouped, q), torch.searchsorted(toks_grouped, q, right=True)
        idx = torch.cat([by_tok[a:b][:K] for a, b in zip(lo.tolist(), hi.tolist())])
        idx = idx.sort().values[:K]  # positions in the shared order
        out[i, :idx.numel()] = order[idx]
    return out


class _Membership:
    """``(feature, token)`` membership in the features' source sets, vectorised."""

    def __init__(self, sets: list[list[int]], F: int):
        pairs = [(f, t) for f, s in enumerate(sets) for t in s]
        self.V = 1 + max((t for _, t in pairs), default=0)
        self.keys = torch.tensor(sorted(f * self.V + t for f, t in pairs), dtype=torch.long)

    def __call__(self, feat: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        ok = tok < self.V
        return ok & torch.isin(feat * self.V + tok.clamp_max(self.V - 1), self.keys)


class _Edits:
    """The edits of one test (:mod:`famfind.substitution`): each ``(sequence, position)`` gets one
    unigram replacement token (resampled until it differs from the corpus token), shared by every
    feature whose source set does not hold it; a feature whose set does gets its own draw."""

    MAX_DRAWS = 32

    def __init__(self, tokens: torch.Tensor, unigram: torch.Tensor, gen: torch.Generator):
        self.tokens, self.unigram, self.gen = tokens, unigram, gen
        self.index: dict[tuple[int, int, int], int] = {}
        self.shared: dict[tuple[int, int], int] = {}

    def _draw(self, n: int) -> torch.Tensor:
        return self.unigram[torch.randint(0, self.unigram.numel(), (n,), generator=self.gen)]

    def _ids(self, s: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        index = self.index
        return torch.tensor([index.setdefault(key, len(index)) for key in zip(s.tolist(), p.tolist(), x.tolist())],
                            dtype=torch.long)

    def clean(self, s: torch.Tensor) -> torch.Tensor:
        return self._ids(s, torch.full_like(s, -1), torch.full_like(s, -1))

    def add(self, s: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Edits that put token ``x`` at ``(s, p)``."""
        return self._ids(s, p, x)

    def replace(self, s: torch.Tensor, p: torch.Tensor, feat: torch.Tensor, in_set) -> torch.Tensor:
        """Edits replacing ``(s, p)``'s token by a unigram token outside ``feat``'s source set
        (-1 where none was found in :attr:`MAX_DRAWS` draws)."""
        orig = self.tokens[s, p]
        keys = list(zip(s.tolist(), p.tolist()))
        new = [k for k in dict.fromkeys(keys) if k not in self.shared]
        if new:
            ns, npos = torch.tensor([k[0] for k in new]), torch.tensor([k[1] for k in new])
            x = self._draw(len(new))
            o = self.tokens[ns, npos]
            for _ in range(self.MAX_DRAWS):
                bad = x == o
                if not bad.any():
                    break
                x[bad] = self._draw(int(bad.sum()))
            self.shared.update(zip(new, x.tolist()))
        x = torch.tensor([self.shared[k] for k in keys], dtype=torch.long)
        bad = in_set(feat, x) | (x == orig)
        for _ in range(self.MAX_DRAWS):
            if not bad.any():
                break
            x[bad] = self._draw(int(bad.sum()))
            bad = in_set(feat, x) | (x == orig)
        ids = self._ids(s, p, x)
        return torch.where(bad, -1, ids)

    def run(self, ctx, reads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], budget: int) -> list[torch.Tensor]:
        """Activations of each ``(edit ids, position, feature)`` read set (edit id -1: 0)."""
        keys = list(self.index)
        e = torch.tensor(keys, dtype=torch.long).view(-1, 3)
        ok = [r[0] >= 0 for r in reads]
        r_edit = torch.cat([r[0][m] for r, m in zip(reads, ok)])
        r_pos = torch.cat([r[1][m] for r, m in zip(reads, ok)])
        r_feat = torch.cat([r[2][m] for r, m in zip(reads, ok)])
        acts = run_edits(ctx.model, ctx.sae, self.tokens, e[:, 0], e[:, 1], e[:, 2], r_edit, r_pos, r_feat, budget,
                         ctx.config.device)
        out, i = [], 0
        for r, m in zip(reads, ok):
            a = torch.zeros(r[0].numel())
            k = int(m.sum())
            a[m] = acts[i:i + k]
            i += k
            out.append(a)
        return out
