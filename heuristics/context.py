"""Local-context and high-level-context features (Kissane et al. 2024 list both among the
families of attention-SAE features: "fires inside a short span, e.g. a quotation" vs "fires
across a whole document about a topic").

``context_runs`` streams, per feature, its firing *runs* (maximal stretches of consecutive
firing positions in a corpus sequence): number of runs, runs that end at a delimiter (the
token after the run, or its last token, is one of ``. , ; : ! ? ) ] } " '`` or holds a
newline), runs cut by the end of the sequence, and positions inside long runs (>=
``long_run_fraction`` of the sequence). Table ``context_runs``.

``context_features`` (requires ``dfa_source``): selection reads the mechanism (DFA by
source on the top examples), the behavioural test reads the corpus (firing runs):

- local-context: selected when the top source token is the same in >= ``consistency`` of
  the top examples but sits at varying distances (the same offset in at most
  ``max_offset_consistency`` of them): the feature reads one kind of token, such as an opening
  bracket, wherever it is in the span. Token features (offset always 0) and previous-token
  features (always 1) are not selected. Passes when it has
  ``min_runs`` runs, mean run length in ``[min_local_len, max_local_fraction * seq_len]``, and
  >= ``delimiter_fraction`` of the runs that end inside the sequence end at a delimiter;
- high-level-context: selected when no single source dominates its DFA (mean top-source
  share < ``max_top_share``: it reads many positions); passes when >= ``long_fraction`` of
  its firing positions lie in long runs.

Control for each: a random sample (``control_size``) of live features not selected, given
the same run test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.families import FamilyOutcome, Groups, family_result, random_control
from famfind.heuristics.dfa import DFASourceStats
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table

DELIMITERS = set(".,;:!?)]}\"'")


def delimiter_mask(tokenizer, d_vocab: int) -> torch.Tensor:
    """bool ``[d_vocab]``: tokens that are a delimiter (stripped) or contain a newline."""
    out = torch.zeros(d_vocab, dtype=torch.bool)
    if tokenizer is None:
        return out
    for i in range(d_vocab):
        s = tokenizer.token_str(i)
        out[i] = "\n" in s or (s.strip() != "" and set(s.strip()) <= DELIMITERS)
    return out


def run_stats(acts: torch.Tensor, delim: torch.Tensor, long_len: int,
              firing: tuple[torch.Tensor, ...] | None = None) -> dict[str, torch.Tensor]:
    """Per-feature run counts of one batch, from its firing positions only (O(n_fired)).

    ``acts [batch, pos, n_features]``, ``delim`` bool ``[batch, pos]`` (is the token at that
    position a delimiter). Returns ``[n_features]`` long tensors: ``runs``, ``ends_inside``
    (runs not cut by the sequence end), ``ends_delim`` (of those, ending at a delimiter),
    ``long_runs`` (length >= ``long_len``) and ``long_positions`` (firing positions in them).
    ``firing``: the ``(batch_idx, pos, feature)`` indices of ``acts > 0`` when already known.
    """
    B, T, F = acts.shape
    b, t, f = firing if firing is not None else torch.nonzero(acts > 0, as_tuple=True)
    key = (b * F + f) * (T + 1) + t  # a gap of one between (sequence, feature) rows
    key, order = key.sort()
    b, t, f = b[order], t[order], f[order]
    start = torch.ones_like(key, dtype=torch.bool)
    start[1:] = key[1:] != key[:-1] + 1
    end = torch.ones_like(start)
    end[:-1] = start[1:]
    run_id = start.long().cumsum(0) - 1
    length = torch.bincount(run_id, minlength=int(start.sum()))  # [n_runs]
    rf, rb, rt = f[end], b[end], t[end]  # each run's feature, sequence and last position
    inside = rt < T - 1
    nxt = torch.where(inside, rt + 1, rt)
    at_delim = inside & (delim[rb, nxt] | delim[rb, rt])
    long = length >= long_len

    def per_feature(w):
        return torch.zeros(F, dtype=torch.long, device=acts.device).index_add_(0, rf, w.long())

    return {"runs": per_feature(torch.ones_like(rf)), "ends_inside": per_feature(inside),
            "ends_delim": per_feature(at_delim), "long_runs": per_feature(long),
            "long_positions": per_feature(length * long)}


@dataclass(frozen=True)
class ContextRunsOptions(Options):
    long_run_fraction: float = 0.5


@dataclass(frozen=True)
class ContextRunStats(Output):
    """Per feature ``[d_sae]``: ``runs`` (long) firing runs, ``mean_run_length`` (positions),
    ``delimiter_fraction`` (of the runs ending inside a sequence, those ending at a
    delimiter) and ``long_fraction`` (of firing positions, those in runs of at least
    ``long_len`` positions), float64."""

    runs: torch.Tensor
    mean_run_length: torch.Tensor
    delimiter_fraction: torch.Tensor
    long_fraction: torch.Tensor
    long_len: int


@dataclass(frozen=True)
class ContextFamily(FamilyOutcome):
    """A context family (``score``: the run test's fraction)."""


@dataclass(frozen=True)
class ContextFamilies(Output):
    """The two context families of ``context_features``."""

    local_context: ContextFamily
    high_level_context: ContextFamily


class ContextRuns(Heuristic):
    id = "context_runs"
    version = "0.1"
    needs = "activations"
    produces = ContextRunStats
    tables = (Table("context_runs", (
        Column("feature", "INTEGER", "SAE feature index"), Column("runs", "BIGINT", "firing runs"),
        Column("mean_run_length", "DOUBLE", "firing positions per run"),
        Column("delimiter_end_fraction", "DOUBLE", "runs ending inside a sequence that end at a delimiter"),
        Column("long_runs", "BIGINT", "runs of at least long_run_fraction of the sequence"),
        Column("long_run_position_fraction", "DOUBLE", "firing positions inside long runs")),
        "per live feature: its firing runs"),)
    description = "Per-feature firing run lengths and where runs end (delimiters)"
    Options = ContextRunsOptions

    def start(self, ctx) -> None:
        dev = ctx.config.device
        self.delim = delimiter_mask(ctx.model.tokenizer, ctx.model.cfg.d_vocab).to(dev)
        self.long_len = max(2, int(self.options.long_run_fraction * ctx.corpus.tokens.shape[1]))
        self.acc: dict[str, torch.Tensor] = {}

    def observe(self, batch, ctx) -> None:
        part = run_stats(batch.acts, self.delim[batch.tokens], self.long_len, batch.firing)
        for k, v in part.items():
            self.acc[k] = self.acc[k] + v if k in self.acc else v

    def merge(self, other: "ContextRuns") -> None:
        for k, v in other.acc.items():
            self.acc[k] = self.acc[k] + v.to(self.acc[k].device) if k in self.acc else v

    def run(self, ctx) -> Result:
        a = {k: v.cpu() for k, v in self.acc.items()}
        fire = ctx.stats.fire_count
        live = torch.nonzero(fire > 0).flatten()
        mean_len = fire.double() / a["runs"].clamp_min(1)
        delim_frac = a["ends_delim"].double() / a["ends_inside"].clamp_min(1)
        long_frac = a["long_positions"].double() / fire.clamp_min(1)
        df = pl.DataFrame({
            "feature": live.numpy().astype(np.int32),
            "runs": a["runs"][live].numpy(), "mean_run_length": mean_len[live].numpy(),
            "delimiter_end_fraction": delim_frac[live].numpy(), "long_runs": a["long_runs"][live].numpy(),
            "long_run_position_fraction": long_frac[live].numpy()})
        return Result(output=ContextRunStats(a["runs"], mean_len, delim_frac, long_frac, self.long_len),
                      tables={"context_runs": df})


@dataclass(frozen=True)
class ContextFeaturesOptions(Options):
    min_runs: int = 20
    min_local_len: float = 2.0
    max_local_fraction: float = 0.25
    delimiter_fraction: float = 0.6
    consistency: float = 0.6
    max_offset_consistency: float = 0.6
    long_fraction: float = 0.5
    max_top_share: float = 0.5
    control_size: int = 500


class ContextFeatures(Heuristic):
    id = "context_features"
    version = "0.1"
    needs = "activations"
    produces = ContextFamilies
    requires = (ContextRunStats, DFASourceStats)
    description = "Local-context (short runs ending at delimiters) and high-level-context (long runs) features"
    Options = ContextFeaturesOptions

    def run(self, ctx) -> Result:
        o = self.options
        r = ctx.output(ContextRunStats)
        src = ctx.output(DFASourceStats)
        live = ~ctx.stats.dead
        T = ctx.corpus.tokens.shape[1]
        has_ex = src.n_examples > 0
        local_sel = live & has_ex & (src.token_consistency >= o.consistency) \
            & (src.offset_consistency <= o.max_offset_consistency)
        high_sel = live & has_ex & (src.top_share_mean < o.max_top_share)
        local_ok = (r.runs >= o.min_runs) & (r.mean_run_length >= o.min_local_len) \
            & (r.mean_run_length <= o.max_local_fraction * T) & (r.delimiter_fraction >= o.delimiter_fraction)
        high_ok = (r.runs > 0) & (r.long_fraction >= o.long_fraction)
        out, fams = Result(), {}
        for fam, sel, ok, score in (("local_context", local_sel, local_ok, r.delimiter_fraction),
                                    ("high_level_context", high_sel, high_ok, r.long_fraction)):
            g = Groups(sel, random_control(live & ~sel, o.control_size, ctx.generator), torch.zeros(sel.shape[0]))
            res = family_result(ContextFamily, fam, g, score.float(), ok,
                                {"mean_run_length": r.mean_run_length.float(),
                                 "delimiter_fraction": r.delimiter_fraction.float(),
                                 "long_fraction": r.long_fraction.float(),
                                 "dfa_token_consistency": src.token_consistency.float(),
                                 "dfa_top_share": src.top_share_mean.float()})
            out.detections += res.detections
            out.families += res.families
            out.validation += res.validation
            fams[fam] = res.output
        out.output = ContextFamilies(**fams)
        return out
