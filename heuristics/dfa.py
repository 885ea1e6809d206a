"""Direct feature attribution (DFA), the evidence layer several families use
(Kissane et al. 2024, §3; the seed post's footnote 3; see :mod:`famfind.dfa` for the maths).

- ``dfa_head``: per feature, the fraction of its DFA variance each head explains, over every
  position where it fires in the first ``max_tokens`` corpus positions (streamed during the
  activation pass);
  table ``dfa_head`` (feature, layer, head, share).
- ``source_samples``: observes the pass with the SAE layer's attention and keeps, per feature,
  DFA by source on three samples of its firing positions (:mod:`famfind.sources`): its top
  examples, a uniform sample of the even corpus sequences and a held-out sample of the odd ones
  (what the mechanism records are formed from and tested on). No table; typed output
  :class:`SourceSamples`.
- ``dfa_source``: for each live feature's top-activating examples, the source positions
  (summed over heads) that carry its pre-activation, read from ``source_samples``' top slots;
  table ``dfa_source`` (top ``n_sources`` sources per example: distance = dest - src, token,
  contribution, share of the heads' part of the pre-activation) and per-feature consistency
  (``data``): how often the top source is the same token / the same offset across examples,
  and how often it is the firing position itself (``self_fraction``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.dfa import HeadDFAAccumulator
from famfind.errors import FamfindError
from famfind.families import mode_per_feature
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table
from famfind.activations import EMPTY
from famfind.sources import SourceSampler, SourceSlots


@dataclass(frozen=True)
class DFAHeadShares(Output):
    """``share [d_sae, n_heads]`` float: each head's share of the feature's DFA variance where
    it fires (rows sum to 1 for features that fired; 0 rows otherwise); ``tokens``: corpus
    positions it was measured on."""

    share: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class DFASourceStats(Output):
    """Per feature ``[d_sae]``, over its top examples: ``n_examples`` (long);
    ``top_share_mean`` the mean share of the heads' pre-activation carried by the top source;
    ``token_consistency`` / ``offset_consistency`` the fraction of examples whose top source
    is the most common token / distance; ``mode_token`` / ``mode_offset`` those (-1: none);
    ``self_fraction`` the fraction whose top source is the firing position itself. Per
    example (``[n]``, the rows of table ``dfa_source``): ``ex_feature``, ``ex_seq``,
    ``ex_pos``, and ``src_pos``/``src_share [n, n_sources]`` its top sources' positions and
    shares of the heads' part of the pre-activation."""

    n_examples: torch.Tensor
    top_share_mean: torch.Tensor
    token_consistency: torch.Tensor
    offset_consistency: torch.Tensor
    mode_token: torch.Tensor
    mode_offset: torch.Tensor
    self_fraction: torch.Tensor
    examples: int
    sequences: int
    ex_feature: torch.Tensor | None = None
    ex_seq: torch.Tensor | None = None
    ex_pos: torch.Tensor | None = None
    src_pos: torch.Tensor | None = None
    src_share: torch.Tensor | None = None


@dataclass(frozen=True)
class DFAHeadOptions(Options):
    max_tokens: int = 262144  # corpus positions used (the first ones); 0 = all. The shares
    # converge long before 1M tokens and the gather costs ~0.6x the SAE encode per batch.


class DFAHead(Heuristic):
    id = "dfa_head"
    version = "0.1"
    needs = "activations"
    produces = DFAHeadShares
    tables = (Table("dfa_head", (
        Column("feature", "INTEGER", "SAE feature index"), Column("layer", "INTEGER", "layer of the head"),
        Column("head", "INTEGER", "head index"),
        Column("share", "FLOAT", "share of the feature's DFA variance where it fires")),
        "per live feature and head: DFA by head (Kissane et al. 2024)"),)
    description = "Per feature, each head's share of DFA variance where it fires (Kissane et al. 2024)"
    Options = DFAHeadOptions

    def start(self, ctx) -> None:
        self.seen = 0
        self.acc = HeadDFAAccumulator(ctx.sae.d_sae, ctx.model.cfg.n_heads, ctx.config.device)
        self.b_dec = ctx.sae.b_dec if ctx.sae.apply_b_dec_to_input else None
        self.W_enc_T = ctx.sae.W_enc.T.contiguous()  # [d_sae, d_in]: row gathers are cheap
        T = ctx.corpus.tokens.shape[1]  # the first max_tokens positions, whole sequences (rounded up)
        self.n_seq = -(-self.options.max_tokens // T) if self.options.max_tokens else ctx.corpus.tokens.shape[0]

    def observe(self, batch, ctx) -> None:
        keep = int((batch.seq_idx < self.n_seq).sum())  # batches are contiguous: a prefix of the rows
        if keep == 0:
            return
        if keep < batch.seq_idx.numel():
            z, acts = batch.z[:keep], batch.acts[:keep]
            self.acc.update(z, acts, self.W_enc_T, self.b_dec, None)
        else:
            self.acc.update(batch.z, batch.acts, self.W_enc_T, self.b_dec, batch.firing)
        self.seen += keep * batch.tokens.shape[1]

    def merge(self, other: "DFAHead") -> None:
        self.acc.merge(other.acc)
        self.seen += other.seen

    def run(self, ctx) -> Result:
        share = self.acc.share()  # [d_sae, n_heads]
        live = torch.nonzero(~ctx.stats.dead).flatten().numpy()
        H = share.shape[1]
        df = pl.DataFrame({
            "feature": np.repeat(live, H).astype(np.int32),
            "layer": np.full(live.size * H, ctx.layer, dtype=np.int32),
            "head": np.tile(np.arange(H), live.size).astype(np.int32),
            "share": share[live].reshape(-1).numpy().astype(np.float32),
        })
        return Result(output=DFAHeadShares(share, self.seen), tables={"dfa_head": df})

    @classmethod
    def html_part(cls, section) -> dict:
        return {"features": section.per_feature(
            "SELECT feature, round(share, 3) AS s FROM dfa_head WHERE scan_id = ? AND sae = ? ORDER BY feature, head",
            lambda r, card: card.setdefault("dfa", []).append(r["s"]))}


@dataclass(frozen=True)
class SampleSlots:
    """One sample of every feature's firing positions (:mod:`famfind.sources`), ``[k, d_sae]``
    each: ``seq``/``pos`` (long, -1 = empty slot), ``act``; DFA by source at each position:
    ``src_pos [k, d_sae, n_sources]`` (long) and ``src_val`` the sources with the largest
    contribution summed over heads (pre-activation units), ``total`` the heads' whole part of
    the pre-activation, ``pos_total`` its positive sources' part, ``head_val [k, d_sae,
    n_heads]`` each head's part."""

    seq: torch.Tensor
    pos: torch.Tensor
    act: torch.Tensor
    src_pos: torch.Tensor
    src_val: torch.Tensor
    total: torch.Tensor
    pos_total: torch.Tensor
    head_val: torch.Tensor

    @classmethod
    def of(cls, slots: SourceSlots, seq_len: int) -> "SampleSlots":
        idx = slots["idx"].cpu()
        empty = idx == EMPTY
        return cls(torch.where(empty, -1, idx // seq_len), torch.where(empty, -1, idx % seq_len),
                   *(slots[n].cpu() for n in ("act", "src_pos", "src_val", "total", "pos_total", "head_val")))


@dataclass(frozen=True)
class SourceSamples(Output):
    """DFA by source on three samples of each feature's firing positions (:mod:`famfind.sources`):
    ``top`` (its ``top_k`` highest activations, the positions of ``FeatureStats``' top
    examples), ``uniform`` (a uniform sample of the even corpus sequences) and ``held_out``
    (the odd sequences, at most ``per_seq`` positions per sequence, sequences in one shared
    random order), each a :class:`SampleSlots`."""

    top: SampleSlots
    uniform: SampleSlots
    held_out: SampleSlots
    n_sources: int
    per_seq: int


@dataclass(frozen=True)
class SourceSampleOptions(Options):
    n_uniform: int = 16  # formation sample per feature (even sequences), beside its top_k top examples
    n_held_out: int = 16  # test sample per feature (odd sequences)
    per_seq: int = 4  # at most this many held-out positions of one feature from one sequence
    n_sources: int = 3  # sources kept per position


class SourceSampling(Heuristic):
    id = "source_samples"
    version = "0.1"
    needs = "activations"
    reads_attention = True
    produces = SourceSamples
    description = "DFA by source on each feature's top examples and two samples (even / odd sequences), in the pass"
    Options = SourceSampleOptions

    def start(self, ctx) -> None:
        o = self.options
        sae = ctx.sae
        self.T = ctx.corpus.tokens.shape[1]
        self.sampler = SourceSampler(sae.d_sae, ctx.model.cfg.n_heads, self.T, ctx.config.top_k, o.n_uniform,
                                     o.n_held_out, o.per_seq, o.n_sources, ctx.config.seed, ctx.config.device)
        self.b_dec = sae.b_dec if sae.apply_b_dec_to_input else None

    def observe(self, batch, ctx) -> None:
        self.sampler.update(batch, ctx.sae.W_enc, self.b_dec)

    def merge(self, other: "SourceSampling") -> None:
        self.sampler.merge(other.sampler)

    def run(self, ctx) -> Result:
        p = self.sampler.parts()
        return Result(output=SourceSamples(*(SampleSlots.of(p[n], self.T) for n in ("top", "uniform", "held_out")),
                                           self.options.n_sources, self.options.per_seq))


@dataclass(frozen=True)
class DFASourceOptions(Options):
    n_examples: int = 5  # top-activating examples per live feature
    n_sources: int = 3  # sources stored per example (at most source_samples.n_sources)


class DFASource(Heuristic):
    id = "dfa_source"
    version = "0.2"
    needs = "activations"
    produces = DFASourceStats
    requires = (SourceSamples,)
    tables = (Table("dfa_source", (
        Column("feature", "INTEGER", "SAE feature index"),
        Column("example_rank", "INTEGER", "rank of the top example"),
        Column("seq", "INTEGER", "corpus sequence"), Column("pos", "INTEGER", "firing position"),
        Column("source_rank", "INTEGER", "0 = the source carrying most"),
        Column("src_pos", "INTEGER", "source position"), Column("distance", "INTEGER", "pos - src_pos"),
        Column("token", "INTEGER", "token at the source"), Column("token_str", "VARCHAR", "its text"),
        Column("contribution", "FLOAT", "the source's part of the pre-activation"),
        Column("share", "FLOAT", "of the heads' part of the pre-activation")),
        "DFA by source position on each live feature's top examples"),)
    description = "DFA by source position on each feature's top-activating examples"
    Options = DFASourceOptions

    def run(self, ctx) -> Result:
        o = self.options
        samples = ctx.output(SourceSamples)
        if o.n_sources > samples.n_sources:
            raise FamfindError("detector 'dfa_source'", f"n_sources={o.n_sources} but source_samples keeps "
                               f"{samples.n_sources}: set source_samples.n_sources too")
        top, F = samples.top, samples.top.seq.shape[1]
        k = min(o.n_examples, top.seq.shape[0])
        seq = top.seq[:k]  # [k, d_sae]
        rank, feat = torch.nonzero(seq >= 0, as_tuple=True)
        order = torch.argsort(seq[rank, feat], stable=True)
        rank, feat = rank[order], feat[order]
        ex_seq, ex_pos = seq[rank, feat], top.pos[rank, feat]
        ns = o.n_sources
        n = ex_seq.numel()
        top_src, top_val, total = top.src_pos[rank, feat, :ns], top.src_val[rank, feat, :ns], top.total[rank, feat]
        tokens = ctx.corpus.tokens
        src_tok = tokens[ex_seq[:, None], top_src]  # [n, n_sources]
        offset = ex_pos[:, None] - top_src
        share = top_val / total.clamp_min(1e-9)[:, None]
        tok = ctx.model.tokenizer
        strs = {int(t): tok.token_str(int(t)) if tok is not None else str(int(t)) for t in src_tok.unique()}
        flat_tok = src_tok.reshape(-1).numpy()
        df = pl.DataFrame({
            "feature": feat.repeat_interleave(ns).numpy().astype(np.int32),
            "example_rank": rank.repeat_interleave(ns).numpy().astype(np.int32),
            "seq": ex_seq.repeat_interleave(ns).numpy().astype(np.int32),
            "pos": ex_pos.repeat_interleave(ns).numpy().astype(np.int32),
            "source_rank": np.tile(np.arange(ns), n).astype(np.int32),
            "src_pos": top_src.reshape(-1).numpy().astype(np.int32),
            "distance": offset.reshape(-1).numpy().astype(np.int32),  # dest - src; "offset" is SQL syntax
            "token": flat_tok.astype(np.int32),
            "token_str": [strs[int(t)] for t in flat_tok],
            "contribution": top_val.reshape(-1).numpy().astype(np.float32),
            "share": share.reshape(-1).numpy().astype(np.float32),
        })
        # per-feature consistency of the top source across its examples
        n_ex = torch.bincount(feat, minlength=F)
        share_mean = torch.zeros(F).index_add_(0, feat, share[:, 0]) / n_ex.clamp_min(1)
        mode_tok, n_tok = mode_per_feature(feat, src_tok[:, 0], F)
        mode_off, n_off = mode_per_feature(feat, offset[:, 0], F)
        self_frac = torch.zeros(F).index_add_(0, feat, (offset[:, 0] == 0).float()) / n_ex.clamp_min(1)
        tok_cons = n_tok.float() / n_ex.clamp_min(1)
        off_cons = n_off.float() / n_ex.clamp_min(1)
        return Result(output=DFASourceStats(n_ex, share_mean, tok_cons, off_cons, mode_tok, mode_off, self_frac,
                                            n, int(ex_seq.unique().numel()), feat, ex_seq, ex_pos, top_src, share),
                      tables={"dfa_source": df})

    @classmethod
    def html_part(cls, section) -> dict:
        return {"features": section.per_feature(
            "SELECT feature, token_str, distance, round(share, 3) AS s FROM dfa_source WHERE scan_id = ? AND sae = ? "
            "AND example_rank = 0 ORDER BY feature, source_rank",
            lambda r, card: card.setdefault("sources", []).append([r["token_str"], r["distance"], r["s"]]))}
