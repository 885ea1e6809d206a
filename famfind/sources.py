"""DFA by source position on samples of each feature's firing positions, kept in the pass.

For an SAE on ``hook_z``, feature ``f``'s pre-activation at position ``t`` splits over heads
``h`` and source positions ``s`` (:mod:`famfind.dfa`; Kissane et al. 2024, §3):
``c[h, s] = pattern[h, t, s] * (v[s, h] - b_dec_h) . W_enc[h-block, f]``. When an observing
detector asks for attention (``Heuristic.reads_attention``), the pass hands it each batch's
attention pattern and values at the SAE's layer, so DFA by source is computed where a sample
keeps a firing position, with no second forward over the corpus.

A :class:`SourceSampler` keeps three samples per feature, each slot a :class:`SourceSlots`
row (the position, the activation, the DFA summary):

- ``top``: the ``k`` highest activations (ties: the earlier corpus position), the positions
  of :class:`famfind.activations.FeatureStats`' top examples;
- ``uniform``: a uniform random sample of ``n`` firing positions in the *even* corpus
  sequences (keys from :func:`famfind.activations.position_keys`);
- ``held_out``: ``n`` firing positions in the *odd* corpus sequences, at most ``per_seq`` from
  one sequence, the sequences taken in one random order shared by every feature, so that
  causal tests of many features land in the same sequences and share their forwards.

The DFA summary of a slot: ``src_pos/src_val [n_sources]`` the sources (summed over heads)
with the largest contributions, ``total`` the sum over every source and head (the heads' part
of the pre-activation), ``pos_total`` the sum of the positive source contributions, and
``head_val [n_heads]`` each head's sum over sources. Every sample has ``update(batch)``,
``merge(other)`` and a deterministic order (keys depend only on seed, sequence, position and
feature), so shards merge to one pass's answer. Memory: ``d_sae x (k + 2n) x (n_sources + n_heads
+ 6)`` numbers per SAE, whatever the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.activations import ActivationBatch, Slots, _mix32

PAIR_FLOATS = 1 << 22  # (position, feature) pairs x source positions held at once (16 MB)


@dataclass
class SourceSummary:
    """DFA-by-source summary of ``n`` (position, feature) pairs: ``src_pos [n, n_sources]``
    (long) and ``src_val [n, n_sources]`` the sources with the largest contribution summed over
    heads, in pre-activation units; ``total [n]`` every source's; ``pos_total [n]`` the
    positive ones'; ``head_val [n, n_heads]`` per head."""

    src_pos: torch.Tensor
    src_val: torch.Tensor
    total: torch.Tensor
    pos_total: torch.Tensor
    head_val: torch.Tensor


def source_summary(pattern: torch.Tensor, v: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor | None,
                   b: torch.Tensor, t: torch.Tensor, f: torch.Tensor, n_sources: int) -> SourceSummary:
    """DFA by source (:func:`famfind.dfa.dfa_by_source`) of pairs ``(b, t, f)`` of one batch,
    reduced to a :class:`SourceSummary`.

    ``pattern [batch, n_heads, pos, pos]`` and ``v [batch, pos, n_heads, d_head]`` of the SAE's
    layer, ``W_enc [n_heads*d_head, d_sae]``, ``b_dec [n_heads*d_head]`` or ``None`` (when the
    SAE does not subtract it), ``b/t/f [n]`` batch row, destination position and feature.
    ``(v - b_dec) . W_enc`` is computed once per sequence for the features of its pairs (one
    batched GEMM over sequences and heads, ``O(batch * pos * d_in * max features per
    sequence)``), then each pair's ``[n_heads, pos]`` contribution, :data:`PAIR_FLOATS` /
    (n_heads * pos) pairs at a time. Sources after ``t`` contribute 0 (causal pattern); the top
    sources are taken over every position, as ``dfa_source`` always has."""
    B, T, H, dh = v.shape
    n = b.numel()
    S = min(n_sources, T)
    dev = v.device
    out = SourceSummary(torch.zeros(n, S, dtype=torch.long, device=dev), torch.zeros(n, S, device=dev),
                        torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, H, device=dev))
    if n == 0:
        return out
    Wb = W_enc.view(H, dh, -1)
    vv = v - b_dec.view(H, dh) if b_dec is not None else v  # [batch, src, H, dh]
    # the distinct (sequence, feature) pairs; each sequence's features in columns 0..F_b-1
    key, inv = torch.unique(b * W_enc.shape[1] + f, return_inverse=True)
    ub, uf = key // W_enc.shape[1], key % W_enc.shape[1]
    col = torch.arange(key.numel(), device=dev) - torch.searchsorted(ub, ub)
    Fmax = int(col.max()) + 1
    Wsel = torch.zeros(B, H, dh, Fmax, device=dev)
    Wsel[ub, :, :, col] = Wb[:, :, uf].permute(2, 0, 1)
    # (v - b_dec) . W_enc for every sequence and its features: one batched GEMM per head
    vw = torch.matmul(vv.permute(0, 2, 1, 3), Wsel).permute(0, 3, 1, 2).contiguous()  # [batch, F_b, H, src]
    rows, cols = ub[inv], col[inv]
    chunk = max(1, PAIR_FLOATS // (H * T))
    for c0 in range(0, n, chunk):
        sl = slice(c0, c0 + chunk)
        c = pattern[b[sl], :, t[sl], :] * vw[rows[sl], cols[sl]]  # [pairs, H, src]
        src = c.sum(1)  # [pairs, src]
        val, pos = src.topk(S, dim=-1)
        out.src_pos[sl], out.src_val[sl] = pos, val
        out.total[sl] = src.sum(-1)
        out.pos_total[sl] = src.clamp_min(0).sum(-1)
        out.head_val[sl] = c.sum(-1)
    return out


class SourceSlots(Slots):
    """``k`` slots per feature (:class:`famfind.activations.Slots`), each a firing position with
    its activation ``act`` and :class:`SourceSummary` fields ``src_pos``, ``src_val``, ``total``,
    ``pos_total``, ``head_val``."""

    def __init__(self, k: int, d_sae: int, n_heads: int, n_sources: int, largest: bool, key_dtype, device):
        super().__init__(k, d_sae, largest, key_dtype, {
            "act": ((), torch.float32), "src_pos": ((n_sources,), torch.long), "src_val": ((n_sources,), torch.float32),
            "total": ((), torch.float32), "pos_total": ((), torch.float32), "head_val": ((n_heads,), torch.float32)},
            device)


def _rank_within(group: torch.Tensor, order_keys: list[torch.Tensor], descending_first: bool) -> torch.Tensor:
    """Rank of each entry within its ``group`` (0 = best), ordered by ``order_keys`` (the first
    decides, descending if ``descending_first``; later keys ascending break ties)."""
    n = group.numel()
    perm = torch.arange(n, device=group.device)
    for i, key in enumerate(reversed(order_keys)):
        first = i == len(order_keys) - 1
        o = key[perm].argsort(descending=descending_first and first, stable=True)
        perm = perm[o]
    perm = perm[group[perm].argsort(stable=True)]
    g = group[perm]
    rank_sorted = torch.arange(n, device=group.device) - torch.searchsorted(g, g, right=False)
    rank = torch.empty_like(rank_sorted)
    rank[perm] = rank_sorted
    return rank


def sequence_keys(seed: int, seq: torch.Tensor) -> torch.Tensor:
    """A random order of corpus sequences shared by every feature: ``[n]`` int64 keys in
    [0, 2^31) that depend only on ``(seed, seq)``."""
    s = ((seed & 0xFFFFFFFF) * 0x9E3779B1) & 0xFFFFFFFF  # mod 2^32 first: any seed, the same keys
    return (_mix32(_mix32((seq.long() * 0x2545F491 + s + 0x51ED27) & 0xFFFFFFFF)) >> 1).long()


class SourceSampler:
    """The three samples of every feature (module doc): ``top`` (``k_top``), ``uniform``
    (``n_uniform``, even sequences) and ``held_out`` (``n_held_out``, odd sequences, at most
    ``per_seq`` per sequence). ``update(batch)`` needs ``batch.pattern``/``batch.v``."""

    def __init__(self, d_sae: int, n_heads: int, seq_len: int, k_top: int, n_uniform: int, n_held_out: int,
                 per_seq: int, n_sources: int, seed: int, device):
        self.T, self.seed, self.per_seq, self.n_sources = seq_len, seed, per_seq, n_sources
        S = min(n_sources, seq_len)
        self.top = SourceSlots(k_top, d_sae, n_heads, S, True, torch.float32, device)
        self.uniform = SourceSlots(n_uniform, d_sae, n_heads, S, False, torch.float64, device)
        self.held_out = SourceSlots(n_held_out, d_sae, n_heads, S, False, torch.int64, device)

    def parts(self) -> dict[str, SourceSlots]:
        return {"top": self.top, "uniform": self.uniform, "held_out": self.held_out}

    def update(self, batch: ActivationBatch, W_enc: torch.Tensor, b_dec: torch.Tensor | None) -> None:
        """One batch of the pass; ``W_enc [d_in, d_sae]``, ``b_dec [d_in]`` or ``None``."""
        if batch.pattern is None or batch.v is None:
            raise ValueError("SourceSampler needs the batch's attention (pattern and v)")
        b, t, f = batch.firing
        if f.numel() == 0:
            return
        act = batch.firing_acts
        seq = b + batch.start
        idx = seq * self.T + t
        odd = (seq % 2).bool()
        picks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (pair index, key)
        # pairs come in row-major order, i.e. ascending corpus position: stable sorts break ties by it
        sel = self.top.candidates(f, act)
        picks["top"] = (sel, act[sel])
        if self.uniform.k:
            ev = torch.nonzero(~odd).flatten()
            key = batch.firing_keys(self.seed)[ev]
            sel = self.uniform.candidates(f[ev], key)
            picks["uniform"] = (ev[sel], key[sel])
        if self.held_out.k:
            od = torch.nonzero(odd).flatten()
            within = batch.firing_keys(self.seed)[od]  # the order within a sequence; sequences by sequence_keys
            key = (sequence_keys(self.seed, seq[od]) << 31) | (within * (1 << 31)).long()
            keep = key <= self.held_out.worst()[f[od]]  # (candidates() filters too; the cap needs it first)
            od, within, key = od[keep], within[keep], key[keep]
            cap = _rank_within(seq[od] * batch.acts.shape[-1] + f[od], [within], False) < self.per_seq
            od, key = od[cap], key[cap]
            sel = self.held_out.candidates(f[od], key)
            picks["held_out"] = (od[sel], key[sel])
        pairs = torch.unique(torch.cat([p[0] for p in picks.values()]))
        summ = source_summary(batch.pattern, batch.v, W_enc, b_dec, b[pairs], t[pairs], f[pairs], self.n_sources)
        where = torch.full((f.numel(),), -1, dtype=torch.long, device=f.device)
        where[pairs] = torch.arange(pairs.numel(), device=f.device)
        for name, (sel, key) in picks.items():
            j = where[sel]
            self.parts()[name].fold(f[sel], {
                "key": key, "idx": idx[sel], "act": act[sel], "src_pos": summ.src_pos[j], "src_val": summ.src_val[j],
                "total": summ.total[j], "pos_total": summ.pos_total[j], "head_val": summ.head_val[j]})

    def merge(self, other: "SourceSampler") -> None:
        for name, part in self.parts().items():
            part.merge(other.parts()[name])
