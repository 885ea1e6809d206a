"""Proxies scored against every feature in the one activation pass (Kissane et al. 2024, §4;
Bricken et al. 2023's specificity and expected-value plots).

- ``proxy_marks`` (model scope): runs every registered proxy (:mod:`famfind.proxies`:
  entry points ``famfind.proxies`` plus ``--proxy`` files) over every document of the corpus
  and packs the marks into one bit per proxy per position. Table ``proxies``.
- ``proxy_scores`` (per SAE, observes the pass): per feature and proxy, with mergeable
  accumulators (sums; a split pass gives one pass's answer) kept per held-out half (even /
  odd documents):

  - *sensitivity*: share of the proxy's positions where the feature fires;
  - *precision*: share of the feature's firing positions inside the proxy;
  - *activation-mass precision*: share of the feature's summed activation inside the proxy
    (the expected-value plot's number);
  - *AUROC* of the feature's activation as a score for "inside the proxy" (pooled halves;
    activations binned on the activation histogram's 26 log-spaced bins plus zero, ties
    counted half: exact up to that binning);
  - the histogram of its activations inside the proxy (the specificity plot's stacked part).

  Table ``feature_proxy`` keeps only pairs above the floor: pooled activation-mass precision
  >= ``floor_mass_precision`` (0.5) and >= ``floor_lift`` (1.25) times the proxy's base rate
  (its share of corpus positions), so it stays proportional to the features.

Memory: the bits are one int64 per corpus position (the size of the token tensor); the
accumulators are ``2 x n_proxies x d_sae`` counts and sums plus an int32 histogram ``n_proxies
x d_sae x 26`` per SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.activations import HIST_EDGES
from famfind.corpus import EOT
from famfind.errors import FamfindError
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table
from famfind.proxies import Marks, default_proxies, mark_corpus

NB = HIST_EDGES.numel() + 1


@dataclass(frozen=True)
class ProxyMarks(Output):
    """The proxies of the scan and their marks on the corpus (``marks``: bits ``[n_seq,
    seq_len]``, see :class:`famfind.proxies.Marks`). Per proxy (in bit order): ``proxies``
    ids, ``contexts`` (``"local"``/``"high_level"``), ``base_rate`` (share of corpus positions
    marked), ``docs_unparsed``; ``n_docs`` documents, ``doc_kinds`` per kind; ``note``: why
    no proxy ran, if none did."""

    marks: Marks
    proxies: list[str]
    contexts: list[str]
    base_rate: list[float]
    docs_unparsed: list[int]
    n_docs: int
    doc_kinds: dict[str, int]
    note: str = ""


def eot_id(tokenizer) -> int | None:
    """The ``<|endoftext|>`` token id, or ``None`` when the tokenizer has no such token."""
    lookup = getattr(tokenizer, "token_to_id", None)
    return lookup(EOT) if lookup is not None else None


@dataclass(frozen=True)
class ProxyMarksOptions(Options):
    proxies: str = "all"  # "all", "none", or comma-separated proxy ids to run


class ProxyMarking(Heuristic):
    id = "proxy_marks"
    version = "0.1"
    needs = "weights"
    scope = "model"
    produces = ProxyMarks
    tables = (Table("proxies", (
        Column("proxy", "VARCHAR", "proxy id"), Column("context", "VARCHAR", "local or high_level"),
        Column("description", "VARCHAR", "what it marks"), Column("origin", "VARCHAR", "package[entry] or file"),
        Column("positions", "BIGINT", "corpus positions it marks"),
        Column("base_rate", "DOUBLE", "share of corpus positions it marks"),
        Column("docs_read", "BIGINT", "documents of the kinds it reads"),
        Column("docs_unparsed", "BIGINT", "of those, documents it could not parse (nothing marked there)"),
        Column("first_error", "VARCHAR", "the first parse error, if any")),
        "per proxy: what it marks on the scanned corpus"),)
    description = "Marks every proxy (comment, string, code block, document kind, ...) on the corpus"
    Options = ProxyMarksOptions

    def run(self, ctx) -> Result:
        tok = ctx.model.tokenizer
        reg = default_proxies(ctx.config.proxies, ctx.config.strict_plugins)
        for e in reg.errors:
            ctx.log(f"warning: proxy {e.origin} failed to load and was skipped: {e.error}")
        entries = list(reg.entries.values())
        want = self.options.proxies.strip()
        if want != "all":
            ids = [] if want == "none" else [x.strip() for x in want.split(",") if x.strip()]
            unknown = sorted(set(ids) - set(reg.entries))
            if unknown:
                raise FamfindError("detector 'proxy_marks'", f"unknown proxy {unknown[0]!r} in option proxies; "
                                   f"known: {', '.join(reg.ids())}")
            entries = [reg.entries[i] for i in ids]
        note = "" if entries or want != "none" else "option proxies = 'none': no proxy ran"
        if tok is None and entries:  # proxies read decoded text: none can run
            entries, note = [], "the model has no tokenizer: no proxy can read the text, so no context family"
        corpus = ctx.corpus
        marks = mark_corpus(corpus.tokens, tok, ctx.model.cfg.d_vocab, [e.cls() for e in entries],
                            corpus.docs, eot_id(tok))
        n = corpus.tokens.numel()
        base = [float(x) / n for x in marks.positions]
        df = pl.DataFrame({
            "proxy": marks.ids, "context": [e.cls.context for e in entries],
            "description": [e.cls.description for e in entries], "origin": [e.origin for e in entries],
            "positions": marks.positions, "base_rate": base, "docs_read": marks.docs_read,
            "docs_unparsed": marks.docs_unparsed, "first_error": marks.errors})
        out = ProxyMarks(marks, marks.ids, [e.cls.context for e in entries], base,
                         [int(x) for x in marks.docs_unparsed], marks.n_docs, marks.doc_kinds, note)
        return Result(output=out, tables={"proxies": df})

    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary
        if s.get("note"):
            section.line(f"proxies: {s['note']}")
            return
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(s.get("doc_kinds", {}).items()))
        section.line(f"proxies: {len(s.get('proxies', []))} on {s.get('n_docs', 0)} documents ({kinds})")
        rows = section.query("SELECT proxy, context, round(base_rate, 4), docs_read, docs_unparsed, first_error "
                             "FROM proxies WHERE scan_id = ? ORDER BY context, proxy")
        section.table("Proxies (base rate: share of corpus positions marked)",
                      ("proxy", "context", "base rate", "documents read", "unparsed", "first error"), rows)


@dataclass(frozen=True)
class ProxyScores(Output):
    """Accumulated sums of ``proxy_scores`` (proxies in :class:`ProxyMarks` order, halves
    0 = even documents, 1 = odd): ``n_pos [2]`` positions, ``n_in [2, n_proxies]`` positions
    inside each proxy, ``fire [2, d_sae]`` firing positions, ``mass [2, d_sae]`` summed
    activation, ``fire_in``/``mass_in [2, n_proxies, d_sae]`` those inside each proxy,
    ``hist_in [n_proxies, d_sae, 26]`` int32 activation histogram inside the proxy (bins of
    :data:`famfind.activations.HIST_EDGES`), ``auroc [n_proxies, d_sae]`` (pooled halves; 0.5
    for a feature that never fires). Metrics: :meth:`sensitivity`, :meth:`precision`,
    :meth:`mass_precision` (``half``: 0, 1 or ``None`` for both)."""

    n_pos: torch.Tensor
    n_in: torch.Tensor
    fire: torch.Tensor
    mass: torch.Tensor
    fire_in: torch.Tensor
    mass_in: torch.Tensor
    hist_in: torch.Tensor
    auroc: torch.Tensor

    @staticmethod
    def _h(x: torch.Tensor, half: int | None) -> torch.Tensor:
        return x.sum(0) if half is None else x[half]

    def sensitivity(self, half: int | None = None) -> torch.Tensor:
        """``[n_proxies, d_sae]``: firing positions inside the proxy / the proxy's positions."""
        return self._h(self.fire_in, half).double() / self._h(self.n_in, half).clamp_min(1).double()[:, None]

    def precision(self, half: int | None = None) -> torch.Tensor:
        """``[n_proxies, d_sae]``: firing positions inside the proxy / all firing positions."""
        return self._h(self.fire_in, half).double() / self._h(self.fire, half).clamp_min(1).double()[None]

    def mass_precision(self, half: int | None = None) -> torch.Tensor:
        """``[n_proxies, d_sae]``: activation summed inside the proxy / all of it."""
        return self._h(self.mass_in, half) / self._h(self.mass, half).clamp_min(1e-30)[None]


def binned_auroc(hist_in: torch.Tensor, zeros_in: torch.Tensor, hist_all: torch.Tensor, zeros_all: torch.Tensor
                 ) -> torch.Tensor:
    """AUROC of activation as a score for "inside", from histograms: ``hist_in [P, F, B]``
    and ``zeros_in [P, F]`` (inside: per bin / not firing), ``hist_all [F, B]``,
    ``zeros_all [F]`` (everywhere). Bins are ordered (zero lowest); ties count half.
    ``[P, F]`` float64; 0.5 where either side is empty."""
    i = torch.cat([zeros_in[..., None], hist_in], -1).double()  # [P, F, B+1]
    a = torch.cat([zeros_all[:, None], hist_all], -1).double()[None]
    o = (a - i).clamp_min(0)
    below = o.cumsum(-1) - o  # outside counts strictly below each bin
    num = (i * (below + 0.5 * o)).sum(-1)
    den = i.sum(-1) * o.sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, 0.5))


@dataclass(frozen=True)
class ProxyScoresOptions(Options):
    floor_mass_precision: float = 0.5  # feature_proxy keeps pairs at or above this pooled mass precision
    floor_lift: float = 1.25  # ... and at least this many times the proxy's base rate


class ProxyScoring(Heuristic):
    id = "proxy_scores"
    version = "0.1"
    needs = "activations"
    produces = ProxyScores
    requires = (ProxyMarks,)
    tables = (Table("feature_proxy", (
        Column("feature", "INTEGER", "SAE feature index"), Column("proxy", "VARCHAR", "proxy id"),
        Column("fires_in", "BIGINT", "firing positions inside the proxy"),
        Column("sensitivity", "DOUBLE", "firing positions inside / the proxy's positions"),
        Column("precision", "DOUBLE", "firing positions inside / all firing positions"),
        Column("mass_precision", "DOUBLE", "activation inside / all activation (expected-value plot)"),
        Column("mass_precision_a", "DOUBLE", "mass precision on even documents"),
        Column("mass_precision_b", "DOUBLE", "mass precision on odd documents (held out)"),
        Column("sensitivity_a", "DOUBLE", "sensitivity on even documents"),
        Column("sensitivity_b", "DOUBLE", "sensitivity on odd documents"),
        Column("lift", "DOUBLE", "mass precision / the proxy's base rate"),
        Column("auroc", "DOUBLE", "AUROC of activation for inside-the-proxy (binned, ties half)"),
        Column("hist_in", "INTEGER[]", "activation histogram inside the proxy (activation_histogram's bins 1..26)")),
        "per live feature and proxy above the floor: how well the proxy explains it"),)
    description = "Sensitivity, precision, activation-mass precision and AUROC of every proxy for every feature"
    Options = ProxyScoresOptions

    def start(self, ctx) -> None:
        m = ctx.output(ProxyMarks).marks
        dev = ctx.config.device
        P, F = len(m.ids), ctx.sae.d_sae
        self.P, self.F = P, F
        self.bits, self.half = m.bits, m.half
        self.shifts = torch.arange(P, device=dev)
        self.edges = HIST_EDGES.to(dev)
        self.n_pos = torch.zeros(2, dtype=torch.long, device=dev)
        self.n_in = torch.zeros(2, P, dtype=torch.long, device=dev)
        self.fire = torch.zeros(2, F, dtype=torch.long, device=dev)
        self.mass = torch.zeros(2, F, dtype=torch.float64, device=dev)
        self.fire_in = torch.zeros(2, P, F, dtype=torch.long, device=dev)
        self.mass_in = torch.zeros(2, P, F, dtype=torch.float64, device=dev)
        self.hist_in = torch.zeros(P, F, NB, dtype=torch.int32, device=dev)

    def observe(self, batch, ctx) -> None:
        P, F = self.P, self.F
        dev = batch.acts.device
        bits = self.bits[batch.seq_idx].to(dev)  # [B, T]
        half = self.half[batch.seq_idx].to(dev).long()
        self.n_pos += torch.bincount(half.reshape(-1), minlength=2)
        if P:
            inside = ((bits[..., None] >> self.shifts) & 1).reshape(-1, P)  # [B*T, P]
            self.n_in.index_add_(0, half.reshape(-1), inside)
        b, t, f = batch.firing
        if f.numel() == 0:
            return
        v = batch.firing_acts
        eh = half[b, t]
        hf = eh * F + f
        self.fire.view(-1).add_(torch.bincount(hf, minlength=2 * F))
        self.mass.view(-1).index_add_(0, hf, v.double())
        if not P:
            return
        e, p = torch.nonzero((bits[b, t][:, None] >> self.shifts) & 1, as_tuple=True)
        if e.numel() == 0:
            return
        fe = f[e]
        key = (eh[e] * P + p) * F + fe
        # scatter-adds cost O(entries); a bincount to the full length would cost O(P x d_sae x bins) per batch
        self.fire_in.view(-1).index_add_(0, key, torch.ones_like(key))
        self.mass_in.view(-1).index_add_(0, key, v[e].double())
        hkey = (p * F + fe) * NB + torch.bucketize(v[e], self.edges)
        self.hist_in.view(-1).index_add_(0, hkey, torch.ones_like(hkey, dtype=torch.int32))

    def merge(self, other: "ProxyScoring") -> None:
        for k in ("n_pos", "n_in", "fire", "mass", "fire_in", "mass_in", "hist_in"):
            mine = getattr(self, k)
            mine += getattr(other, k).to(mine.device)

    def run(self, ctx) -> Result:
        pm = ctx.output(ProxyMarks)
        n_pos, n_in, fire, mass, fire_in, mass_in, hist_in = (
            getattr(self, k).cpu() for k in ("n_pos", "n_in", "fire", "mass", "fire_in", "mass_in", "hist_in"))
        N, Nin = int(n_pos.sum()), n_in.sum(0)  # [P]
        fin = fire_in.sum(0)
        auroc = binned_auroc(hist_in, (Nin[:, None] - fin), ctx.stats.hist, N - fire.sum(0))
        out = ProxyScores(n_pos, n_in, fire, mass, fire_in, mass_in, hist_in, auroc)
        mp = out.mass_precision()
        base = torch.tensor(pm.base_rate, dtype=torch.float64)
        lift = mp / base.clamp_min(1e-12)[:, None]
        o = self.options
        keep = (mp >= o.floor_mass_precision) & (lift >= o.floor_lift) & (fire.sum(0) > 0)[None] \
            & (base > 0)[:, None]
        p, f = torch.nonzero(keep, as_tuple=True)
        sens, prec = out.sensitivity(), out.precision()
        mpa, mpb, sa, sb = out.mass_precision(0), out.mass_precision(1), out.sensitivity(0), out.sensitivity(1)
        df = pl.DataFrame({
            "feature": f.numpy().astype(np.int32), "proxy": [pm.proxies[i] for i in p.tolist()],
            "fires_in": fin[p, f].numpy(), "sensitivity": sens[p, f].numpy(), "precision": prec[p, f].numpy(),
            "mass_precision": mp[p, f].numpy(), "mass_precision_a": mpa[p, f].numpy(),
            "mass_precision_b": mpb[p, f].numpy(), "sensitivity_a": sa[p, f].numpy(),
            "sensitivity_b": sb[p, f].numpy(), "lift": lift[p, f].numpy(), "auroc": auroc[p, f].numpy(),
            "hist_in": [r.tolist() for r in hist_in[p, f]]})
        return Result(output=out, tables={"feature_proxy": df})

    @classmethod
    def render_terminal(cls, section) -> None:
        rows = section.query(
            "SELECT proxy, count(*) FILTER (WHERE mass_precision >= 0.8), count(*), arg_max(feature, mass_precision), "
            "round(max(mass_precision), 3), round(arg_max(auroc, mass_precision), 3) FROM feature_proxy "
            "WHERE scan_id = ? AND sae = ? GROUP BY proxy ORDER BY 2 DESC, 3 DESC, proxy")
        section.table("Proxy precision per proxy (activation-mass precision, both halves; pairs above the floor)",
                      ("proxy", "features >= 0.8", "features >= floor", "best feature", "its mass precision",
                       "its AUROC"), rows)

    @classmethod
    def html_part(cls, section) -> dict:
        """Each feature card's best proxy: ``[proxy, mass precision, sensitivity, AUROC, hist_in]``."""
        return {"features": section.per_feature(
            "SELECT feature, proxy, round(mass_precision, 3) AS mp, round(sensitivity, 3) AS s, round(auroc, 3) AS a, "
            "hist_in FROM (SELECT *, row_number() OVER (PARTITION BY feature ORDER BY mass_precision DESC, lift DESC) "
            "AS r FROM feature_proxy WHERE scan_id = ? AND sae = ?) WHERE r = 1",
            lambda r, card: card.__setitem__("proxy", [r["proxy"], r["mp"], r["s"], r["a"], list(r["hist_in"])]))}

