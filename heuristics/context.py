"""Local-context and high-level-context features (Kissane et al. 2024 list both among the
families of attention-SAE features: "fires inside a short span, e.g. a quotation" vs "fires
across a whole document about a topic").

``context_runs`` streams, per feature, its firing *runs* (maximal stretches of consecutive
firing positions in a corpus sequence): number of runs, runs that end at a delimiter (the
token after the run, or its last token, is one of ``. , ; : ! ? ) ] } " '`` or holds a
newline), runs cut by the end of the sequence, and positions inside long runs (>=
``long_run_fraction`` of the sequence). Table ``context_runs``; its statistics are evidence
columns of the context families.

``context_features`` forms the two families on *proxies* (:mod:`famfind.proxies`,
:mod:`famfind.heuristics.proxy_scores`): a feature joins the local- (high-level-) context
family of proxy P when P holds most of its activation mass on one half of the corpus and on
the held-out other half, and the DFA of its top examples agrees with the context's kind
(sources inside P's span; sources spread out). See :class:`ContextFeatures`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from famfind.db import table_exists
from famfind.families import FamilyOutcome, Groups, family_result, random_control
from famfind.heuristics.dfa import DFASourceStats
from famfind.heuristics.proxy_scores import ProxyMarks, ProxyScores
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
    """A context family (``score [d_sae]``: held-out activation-mass precision for the
    feature's proxy); ``proxy [d_sae]`` long: each feature's proxy (index into
    :attr:`ContextFamilies.proxies`; -1: none)."""

    proxy: torch.Tensor | None = None


@dataclass(frozen=True)
class ContextFamilies(Output):
    """The two context families of ``context_features`` and the proxy ids their ``proxy``
    indices refer to."""

    local_context: ContextFamily
    high_level_context: ContextFamily
    proxies: list[str] = field(default_factory=list)


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
    mass_precision: float = 0.8  # activation-mass precision for the proxy, on each half
    min_sensitivity: float = 0.05  # fires on >= 5% of the proxy's positions, on each half
    min_fires: int = 20  # firing positions per half (fewer: precision is noise)
    max_base_rate: float = 0.5  # proxies marking more of the corpus are not specific enough
    min_span_share: float = 0.5  # local: DFA share of the top sources inside the proxy's span
    max_top_share: float = 0.5  # high-level: mean share of the top source below this ...
    min_source_distance: float = 4.0  # ... and the sources' mean distance (tokens) at least this
    control_size: int = 500


def span_share(src: DFASourceStats, marks, proxy: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Per feature ``[d_sae]``: over its top examples, the mean share of the stored top
    sources' DFA (positive parts) carried by sources inside the same span of proxy
    ``proxy[feature]`` as the firing position (every position between source and
    destination marked); 0 when the firing position is outside the proxy."""
    if src.ex_feature is None or src.ex_feature.numel() == 0:
        return torch.zeros(d_sae)
    f = src.ex_feature
    p = proxy[f].clamp_min(0)
    inp = (marks.bits[src.ex_seq] >> p[:, None]) & 1  # [n, T]
    gaps = (1 - inp).cumsum(1)
    sp, pos = src.src_pos, src.ex_pos[:, None]
    inside = (inp.gather(1, sp) == 1) & (inp.gather(1, pos) == 1) & (gaps.gather(1, sp) == gaps.gather(1, pos))
    sh = src.src_share.clamp_min(0)
    per = (sh * inside).sum(1) / sh.sum(1).clamp_min(1e-9)
    per = torch.where(proxy[f] >= 0, per, torch.zeros_like(per))
    return torch.zeros(d_sae).index_add_(0, f, per.float()) / src.n_examples.clamp_min(1)


def source_distance(src: DFASourceStats, d_sae: int) -> torch.Tensor:
    """Per feature ``[d_sae]``: the share-weighted mean distance (tokens) from the firing
    position to its top sources, averaged over its top examples."""
    if src.ex_feature is None or src.ex_feature.numel() == 0:
        return torch.zeros(d_sae)
    sh = src.src_share.clamp_min(0)
    dist = (src.ex_pos[:, None] - src.src_pos).abs().float()
    per = (sh * dist).sum(1) / sh.sum(1).clamp_min(1e-9)
    return torch.zeros(d_sae).index_add_(0, src.ex_feature, per.float()) / src.n_examples.clamp_min(1)


class ContextFeatures(Heuristic):
    """Local- and high-level-context families on proxies (Kissane et al. 2024 §4, validated
    the paper's way: a proxy, its specificity, held out).

    Per family (local: proxies with ``context="local"``; high-level: ``"high_level"``), using
    only proxies marking at most ``max_base_rate`` of the corpus:

    - *selected*: on the even documents (half A) the feature fires >= ``min_fires`` times, its
      activation-mass precision for some proxy is >= ``mass_precision`` with sensitivity >=
      ``min_sensitivity``; its proxy is the best such (ties: the rarer proxy);
    - *passes*: the same holds for that proxy on the odd documents (half B, held out), and the
      mechanism agrees: local: >= ``min_span_share`` of the DFA of its top examples' top
      sources lies inside the proxy's span around the firing position; high-level: no source
      dominates (mean top-source share < ``max_top_share``) and the sources lie
      >= ``min_source_distance`` tokens away on average;
    - *control*: a random sample (``control_size``) of live features not selected, each with
      its best proxy on half A (whatever its precision), given the same test.

    Table ``context_family``; each detection's evidence also carries the firing-run
    statistics of ``context_runs``.
    """

    id = "context_features"
    version = "0.2"
    needs = "activations"
    produces = ContextFamilies
    requires = (ContextRunStats, DFASourceStats, ProxyMarks, ProxyScores)
    tables = (Table("context_family", (
        Column("feature", "INTEGER", "SAE feature index"), Column("family", "VARCHAR", "local_context or high_level_context"),
        Column("grp", "VARCHAR", "selected or control"), Column("proxy", "VARCHAR", "the feature's proxy"),
        Column("mass_precision_a", "DOUBLE", "activation-mass precision on even documents (selection)"),
        Column("mass_precision_b", "DOUBLE", "on odd documents (held out)"),
        Column("sensitivity_a", "DOUBLE", "sensitivity on even documents"),
        Column("sensitivity_b", "DOUBLE", "sensitivity on odd documents"),
        Column("span_share", "DOUBLE", "DFA share of top sources inside the proxy's span (local mechanism)"),
        Column("top_share", "DOUBLE", "mean share of the top source (high-level mechanism)"),
        Column("source_distance", "DOUBLE", "share-weighted mean source distance, tokens"),
        Column("passed", "BOOLEAN", "held-out precision and mechanism hold")),
        "per selected and control feature of the context families: its proxy and the test"),)
    description = "Local- and high-level-context families: proxy mass precision, held out, with the DFA mechanism"
    Options = ContextFeaturesOptions

    def run(self, ctx) -> Result:
        o = self.options
        pm, ps = ctx.output(ProxyMarks), ctx.output(ProxyScores)
        r, src = ctx.output(ContextRunStats), ctx.output(DFASourceStats)
        live = ~ctx.stats.dead
        F = live.numel()
        ar = torch.arange(F)
        base = torch.tensor(pm.base_rate, dtype=torch.float64)
        mpa, mpb = ps.mass_precision(0), ps.mass_precision(1)
        sa, sb = ps.sensitivity(0), ps.sensitivity(1)
        fa, fb = ps.fire[0], ps.fire[1]
        dist = source_distance(src, F)
        out, fams, rows = Result(), {}, []
        for fam, kind in (("local_context", "local"), ("high_level_context", "high_level")):
            usable = torch.tensor([c == kind for c in pm.contexts], dtype=torch.bool) & (base > 0) \
                & (base <= o.max_base_rate)
            key = torch.where(usable[:, None], mpa + 1e-6 * (1 - base)[:, None], torch.tensor(-1.0, dtype=torch.float64))
            elig = usable[:, None] & (sa >= o.min_sensitivity) & (fa >= o.min_fires)[None]
            key_sel = torch.where(elig, key, torch.tensor(-1.0, dtype=torch.float64))
            if usable.any():
                val_sel, best_sel = key_sel.max(0)
                best = torch.where(val_sel >= 0, best_sel, key.max(0).indices)
            else:
                val_sel, best = torch.full((F,), -1.0, dtype=torch.float64), torch.full((F,), -1, dtype=torch.long)
            selected = live & (val_sel >= o.mass_precision)
            b = best.clamp_min(0)

            def at(x: torch.Tensor) -> torch.Tensor:  # [P, d_sae] -> each feature's value for its proxy
                return torch.where(best >= 0, x[b, ar], 0.0) if x.shape[0] else torch.zeros(F, dtype=x.dtype)

            held, mp_a, sens_a, sens_b = at(mpb), at(mpa), at(sa), at(sb)
            holds = (best >= 0) & (held >= o.mass_precision) & (sens_b >= o.min_sensitivity) & (fb >= o.min_fires)
            if kind == "local":
                mech_val = span_share(src, pm.marks, best, F)
                mech = mech_val >= o.min_span_share
            else:
                mech = (src.top_share_mean < o.max_top_share) & (dist >= o.min_source_distance)
            passed = holds & mech & (src.n_examples > 0)
            control = random_control(live & ~selected, o.control_size, ctx.generator)
            g = Groups(selected, control, torch.zeros(F))
            res = family_result(ContextFamily, fam, g, held.float(), passed, {
                "mass_precision_a": mp_a.float(), "sensitivity_a": sens_a.float(),
                "sensitivity_b": sens_b.float(), "top_share": src.top_share_mean.float(),
                "source_distance": dist, "mean_run_length": r.mean_run_length.float(),
                "delimiter_fraction": r.delimiter_fraction.float(), "long_fraction": r.long_fraction.float()},
                test="proxy")
            sp = span_share(src, pm.marks, best, F) if kind != "local" else mech_val
            for d in res.detections:
                d.evidence["proxy"] = pm.proxies[int(best[d.feature])] if best[d.feature] >= 0 else None
                d.evidence["span_share"] = round(float(sp[d.feature]), 4)
                f = d.feature
                rows.append({"feature": f, "family": fam, "grp": d.evidence["group"], "proxy": d.evidence["proxy"],
                             "mass_precision_a": float(mp_a[f]), "mass_precision_b": float(held[f]),
                             "sensitivity_a": float(sens_a[f]), "sensitivity_b": float(sens_b[f]),
                             "span_share": float(sp[f]), "top_share": float(src.top_share_mean[f]),
                             "source_distance": float(dist[f]), "passed": bool(passed[f])})
            out.detections += res.detections
            out.families += res.families
            out.validation += res.validation
            fams[fam] = dataclasses.replace(res.output, proxy=torch.where(selected | control, best, -1))
        out.output = ContextFamilies(**fams, proxies=list(pm.proxies))
        out.tables = {"context_family": self.tables[0].frame(rows)}
        return out

    @classmethod
    def render_terminal(cls, section) -> None:
        """One line per context family: members / selected, control, members' held-out mass
        precision and sensitivity, and the proxies they hold to (nothing for a scan stored by
        context_features 0.1, which had no proxies)."""
        if not table_exists(section.con, "context_family"):
            return
        for fam in ("local_context", "high_level_context"):
            r = section.rows(
                "SELECT count(*) FILTER (WHERE grp = 'selected') AS sel, count(*) FILTER (WHERE grp = 'selected' AND "
                "passed) AS n, count(*) FILTER (WHERE grp = 'control') AS c, count(*) FILTER (WHERE grp = 'control' "
                "AND passed) AS cp, avg(mass_precision_b) FILTER (WHERE grp = 'selected' AND passed) AS mp, "
                "avg(sensitivity_b) FILTER (WHERE grp = 'selected' AND passed) AS s FROM context_family "
                f"WHERE scan_id = ? AND sae = ? AND family = '{fam}'")[0]
            by = section.query("SELECT proxy, count(*) FROM context_family WHERE scan_id = ? AND sae = ? AND "
                               f"family = '{fam}' AND grp = 'selected' AND passed GROUP BY proxy ORDER BY 2 DESC, 1")
            sel = section.query("SELECT proxy, count(*) FROM context_family WHERE scan_id = ? AND sae = ? AND "
                                f"family = '{fam}' AND grp = 'selected' GROUP BY proxy ORDER BY 2 DESC, 1")
            nums = (f"held-out mass precision {r['mp']:.2f}, sensitivity {r['s']:.2f}" if r["n"] else
                    "selected by proxy: " + (", ".join(f"{p} {n}" for p, n in sel) or "none"))
            section.line(f"{fam}: {r['n']} of {r['sel']} selected pass (control {r['cp']} of {r['c']}); {nums}"
                         + (" (" + ", ".join(f"{p} {n}" for p, n in by) + ")" if by else ""))

    @classmethod
    def html_part(cls, section) -> dict:
        """``context_families``: per (family, proxy) the members' summed activation histogram
        and the part inside the proxy (the specificity plot); the members' cards show their
        family proxy's plot."""
        if not (table_exists(section.con, "context_family") and table_exists(section.con, "feature_proxy")):
            return {}
        fams = section.rows(
            "SELECT c.family, c.proxy, count(*) AS members, round(avg(c.mass_precision_b), 3) AS mass_precision_b, "
            "round(avg(c.sensitivity_b), 3) AS sensitivity_b, list(c.feature ORDER BY c.feature) AS features, "
            "list(p.hist_in) AS hists FROM context_family c JOIN feature_proxy p ON p.scan_id = c.scan_id AND "
            "p.sae = c.sae AND p.feature = c.feature AND p.proxy = c.proxy WHERE c.scan_id = ? AND c.sae = ? AND "
            "c.grp = 'selected' AND c.passed GROUP BY ALL ORDER BY c.family, members DESC")
        hist_all = {(f, b): n for f, b, n in section.query(
            "SELECT feature, bin, count FROM activation_histogram WHERE scan_id = ? AND sae = ? AND feature IN "
            "(SELECT feature FROM context_family WHERE scan_id = ? AND sae = ? AND grp = 'selected' AND passed)")}
        for r in fams:
            inside = [sum(h[i] for h in r["hists"]) for i in range(len(r["hists"][0]))] if r["hists"] else []
            r["hist_in"] = inside
            r["hist_all"] = [sum(hist_all.get((f, i), 0) for f in r["features"]) for i in range(len(inside))]
            del r["hists"]
        cards = section.per_feature(
            "SELECT c.feature, c.proxy, round(p.mass_precision, 3) AS mp, round(p.sensitivity, 3) AS s, "
            "round(p.auroc, 3) AS a, p.hist_in FROM context_family c JOIN feature_proxy p ON p.scan_id = c.scan_id AND "
            "p.sae = c.sae AND p.feature = c.feature AND p.proxy = c.proxy WHERE c.scan_id = ? AND c.sae = ? AND "
            "c.grp = 'selected' AND c.passed",
            lambda r, card: card.__setitem__("proxy", [r["proxy"], r["mp"], r["s"], r["a"], list(r["hist_in"])]))
        return {"features": cards, "context_families": fams}
