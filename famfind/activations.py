"""The activation pass: stream a corpus through the model up to the SAEs' layers, encode.

One pass serves every detector of every SAE: per batch, one forward runs to the deepest
SAE's layer (no autograd) and captures ``blocks.{L}.attn.hook_z`` of each SAE's layer;
each SAE encodes its hook and its features go to that SAE's own set of *accumulators* (counts and density, activation histogram, top-k
examples, reservoir sample, random contexts) and to each observing detector. Every
accumulator has ``update(batch)``, ``merge(other)`` and ``finalize()``, so a corpus split
into shards (sequence ranges, one process or many machines) gives exactly one pass's
answer: counts, histograms and top-k examples are equal (ties broken by corpus position),
float sums agree to rounding. Memory is O(d_sae * (top_k + n_sample) * 16) per SAE plus one
batch, whatever the corpus size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from famfind.sae import SAE

HIST_EDGES = torch.logspace(-3, 3, 25)  # activation histogram bin edges (log-spaced)
WINDOW = (-12, 4)  # example windows: 12 tokens before the position to 3 after (offsets [-12, 4))
W = WINDOW[1] - WINDOW[0]
EMPTY = torch.iinfo(torch.long).max  # corpus index of an empty top-k slot (sorts last)


@dataclass
class ActivationBatch:
    """One batch of the pass.

    ``seq_idx [batch]`` (rows of the corpus), ``tokens [batch, pos]``,
    ``z [batch, pos, n_heads, d_head]`` (hook_z), ``acts [batch, pos, d_sae]`` (SAE features);
    for an SAE with an observing detector that ``reads_attention``, the layer's
    ``pattern [batch, n_heads, query_pos, key_pos]`` (hook_pattern) and ``v [batch, pos,
    n_heads, d_head]`` (hook_v) from the same forward (else ``None``).
    """

    seq_idx: torch.Tensor
    tokens: torch.Tensor
    z: torch.Tensor
    acts: torch.Tensor
    pattern: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @cached_property
    def firing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch_idx, pos, feature)`` of every entry with ``acts > 0``, each ``[n_fired]``,
        in row-major order; computed once per batch and shared by every observer."""
        _, T, F = self.acts.shape
        bt = self._flat_firing // F
        return bt // T, bt % T, self._flat_firing % F

    @cached_property
    def _flat_firing(self) -> torch.Tensor:
        # one flat nonzero, split by integer division: faster than a 3-d nonzero and its 3-index gather
        return torch.nonzero(self.acts.reshape(-1) > 0).squeeze(1)

    @cached_property
    def firing_acts(self) -> torch.Tensor:
        """``[n_fired]`` float32: the activation of each entry of :attr:`firing`."""
        return self.acts.reshape(-1)[self._flat_firing].float()

    def firing_keys(self, seed: int) -> torch.Tensor:
        """``[n_fired]``: :func:`position_keys` of each entry of :attr:`firing` (corpus sequence,
        position, feature) under ``seed``, computed once per batch and seed for every sampler."""
        cache = self.__dict__.setdefault("_keys", {})
        if seed not in cache:
            b, t, f = self.firing
            cache[seed] = position_keys(seed, b + self.start, t, f)
        return cache[seed]

    @property
    def start(self) -> int:
        """Corpus row of the batch's first sequence (batches are contiguous row ranges)."""
        return int(self.seq_idx[0])


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: str, autocast: str):
    """:func:`torch.autocast` on ``device``'s type in ``autocast``'s dtype (``"bf16"``/``"fp16"``),
    or a no-op context for ``"none"``. Raises ``ValueError`` for another name."""
    if autocast == "none":
        return contextlib.nullcontext()
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be none, bf16 or fp16, got {autocast!r}")
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[autocast])


@torch.no_grad()
def encode_hook(model, sae: SAE, tokens: torch.Tensor, ablate=None,
                positions: slice = slice(None), features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` to the SAE's hook and encode: ``(z [batch, pos, n_heads, d_head],
    acts [batch, pos, d_sae])``. ``tokens [batch, pos]`` on the model's device; ``ablate``
    as :meth:`famfind.models.base.AttnModel.run_hook_z`; ``positions``: encode only these (both
    outputs are cut to them); ``features``: encode only these (``acts [batch, pos,
    len(features)]``, :meth:`famfind.sae.SAE.encode_features`). The one path from tokens to
    SAE features."""
    z = model.run_hook_z(tokens, sae.layer, ablate=ablate) if ablate else model.run_hook_z(tokens, sae.layer)
    z = z[:, positions]
    if features is not None:
        return z, sae.encode_features(z.flatten(-2), features)
    return z, sae.encode(z.flatten(-2))


def window_acts(flat: torch.Tensor, b: torch.Tensor, t: torch.Tensor, f: torch.Tensor, T: int) -> torch.Tensor:
    """Feature ``f``'s activation on each token of the window around ``(b, t)``.

    ``flat [batch * pos, d_sae]`` one batch's activations; ``b, t, f [n]`` batch row,
    position and feature of each entry; returns ``[n, 16]`` (offsets ``WINDOW``; 0 outside
    the sequence), float16.
    """
    off = torch.arange(*WINDOW, device=flat.device)
    pos = t[:, None] + off  # [n, W]
    ok = (pos >= 0) & (pos < T)
    idx = b[:, None] * T + pos.clamp(0, T - 1)
    return (flat[idx, f[:, None]] * ok).half()


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 ``x`` in [0, 2^32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


def position_keys(seed: int, seq: torch.Tensor, pos: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Uniform random keys in [0, 1), float64 with 52 random bits, that depend only on
    ``(seed, seq, pos, feature)``: the reservoir sample is the same however the corpus is
    split into shards."""
    h = _mix32((seq.long() * 0x9E3779B1 + (seed & 0xFFFFFFFF)) & 0xFFFFFFFF)  # mod 2^32 first: any seed
    h = _mix32(h ^ pos.long())
    h1 = _mix32(h ^ feature.long())
    h2 = _mix32(h1 ^ 0x5BD1E995)
    return ((h1 << 20) | (h2 >> 12)).double() / float(1 << 52)


def best_rows(keys: list[torch.Tensor], vals: list[torch.Tensor], k: int, largest: bool) -> list[torch.Tensor]:
    """Per column, the ``k`` rows ranked first by ``keys`` (``keys[0]`` decides, later keys
    break its ties; each ``[n, d_sae]``), smallest first unless ``largest``; returns ``vals``
    gathered to ``[k, d_sae, ...]``."""
    order = None
    for key in reversed(keys):  # stable sorts from the least to the most significant key
        cur = key if order is None else key.gather(0, order)
        o = cur.argsort(dim=0, descending=largest and key is keys[0], stable=True)
        order = o if order is None else order.gather(0, o)
    order = order[:k]
    return [v.gather(0, order if v.dim() == 2 else order[..., None].expand(-1, -1, v.shape[-1])) for v in vals]


class Counts:
    """Fire counts, activation sums and maxima, L0 and the mean hook_z (for mean-ablation)."""

    def __init__(self, d_sae: int, n_heads: int, d_head: int, device):
        self.fire = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.asum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.amax = torch.zeros(d_sae, device=device)
        self.zsum = torch.zeros(n_heads, d_head, dtype=torch.float64, device=device)
        self.l0 = 0
        self.n_tokens = 0

    def update(self, batch: ActivationBatch) -> None:
        """O(fired entries): reads ``batch.firing``, never the dense ``[tokens, d_sae]`` matrix
        (only the mean hook_z reads every position)."""
        b, t, f = batch.firing
        v = batch.firing_acts
        self.fire += torch.bincount(f, minlength=self.fire.numel())
        self.asum.index_add_(0, f, v.double())
        self.amax.scatter_reduce_(0, f, v.float(), reduce="amax")
        self.zsum += batch.z.sum(dim=(0, 1), dtype=torch.float64)
        self.l0 += int(f.numel())
        self.n_tokens += batch.acts.shape[0] * batch.acts.shape[1]

    def merge(self, o: Counts) -> None:
        self.fire += o.fire.to(self.fire.device)
        self.asum += o.asum.to(self.asum.device)
        self.amax = torch.maximum(self.amax, o.amax.to(self.amax.device))
        self.zsum += o.zsum.to(self.zsum.device)
        self.l0 += o.l0
        self.n_tokens += o.n_tokens


class Histogram:
    """Counts of positive activations per log-spaced bin (:data:`HIST_EDGES`), ``[d_sae, 26]``."""

    def __init__(self, d_sae: int, device):
        self.edges = HIST_EDGES.to(device)
        self.nb = HIST_EDGES.numel() + 1
        self.count = torch.zeros(d_sae * self.nb, dtype=torch.long, device=device)

    def update(self, batch: ActivationBatch) -> None:
        b, t, f = batch.firing
        self.count.index_add_(0, f * self.nb + torch.bucketize(batch.firing_acts, self.edges), torch.ones_like(f))

    def merge(self, o: Histogram) -> None:
        self.count += o.count.to(self.count.device)


class Slots:
    """``k`` slots per feature, ranked by ``key`` (descending when ``largest``; ties: the earlier
    corpus index ``idx``), each slot holding payload fields. ``key/idx [k, d_sae]`` (``idx``:
    ``seq * seq_len + pos``, :data:`EMPTY` in an empty slot), each payload field ``[k, d_sae,
    ...]``. The shared machinery of every "best k per feature" accumulator (top-k examples,
    reservoir samples, DFA-by-source samples): a batch's candidates are filtered against each
    feature's worst kept key and ranked within their feature (:meth:`candidates`); the survivors
    wait in a buffer and are folded in (one sort of buffer and slots together) once the buffer
    holds as many rows as the slots, or when the slots are read; ``merge`` folds another
    shard's slots. The kept rows are the same however the candidates were batched."""

    def __init__(self, k: int, d_sae: int, largest: bool, key_dtype: torch.dtype, payload: dict, device):
        self.k, self.largest = k, largest
        if key_dtype.is_floating_point:
            self.key_fill = float("-inf") if largest else float("inf")
        else:
            self.key_fill = torch.iinfo(key_dtype).min if largest else torch.iinfo(key_dtype).max
        self.names = ("key", "idx", *payload)
        self.fields = {"key": torch.full((k, d_sae), self.key_fill, dtype=key_dtype, device=device),
                       "idx": torch.full((k, d_sae), EMPTY, dtype=torch.long, device=device)}
        for name, (tail, dtype) in payload.items():
            self.fields[name] = torch.zeros(k, d_sae, *tail, dtype=dtype, device=device)
        self.pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.n_pending = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self._compact()
        return self.fields[name]

    def worst(self) -> torch.Tensor:
        """``[d_sae]`` each feature's last kept key (buffered candidates not counted: a filter
        that lets a few more through, never fewer)."""
        return self.fields["key"][-1]

    def candidates(self, feat: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Of one batch's candidates ``(feat, key) [n]``, in ascending corpus order, the indices
        of those that can enter: each feature's best ``k`` of the batch. Candidates worse than
        the feature's last slot are dropped first (the rest are a prefix of the feature's order,
        so their ranks are the same)."""
        w = self.worst()[feat]
        sel = torch.nonzero(key >= w if self.largest else key <= w).flatten()
        o = key[sel].argsort(descending=self.largest, stable=True)  # stable: ties stay in corpus order
        o = o[feat[sel][o].argsort(stable=True)]
        fs = feat[sel][o]
        rank = torch.arange(fs.numel(), device=fs.device) - torch.searchsorted(fs, fs, right=False)
        return sel[o[rank < self.k]]

    def fold(self, feat: torch.Tensor, vals: dict[str, torch.Tensor]) -> None:
        """Add candidates ``vals[name] [n, ...]`` of features ``feat [n]``."""
        if feat.numel() == 0:
            return
        self.pending.append((feat, vals))
        self.n_pending += feat.numel()
        if self.n_pending >= self.fields["key"].numel():
            self._compact()

    def _compact(self) -> None:
        """Keep each feature's best ``k`` of its slots and the buffered candidates."""
        if not self.pending:
            return
        dev = self.fields["key"].device
        kk, ff = torch.nonzero(self.fields["idx"] != EMPTY, as_tuple=True)
        feat = torch.cat([ff, *(p[0].to(dev) for p in self.pending)])
        rows = {n: torch.cat([self.fields[n][kk, ff], *(p[1][n].to(device=dev, dtype=self.fields[n].dtype)
                                                        for p in self.pending)]) for n in self.names}
        self.pending, self.n_pending = [], 0
        o = rows["idx"].argsort(stable=True)  # ties of the key: the earlier corpus position first
        o = o[rows["key"][o].argsort(descending=self.largest, stable=True)]
        o = o[feat[o].argsort(stable=True)]
        fs = feat[o]
        rank = torch.arange(fs.numel(), device=dev) - torch.searchsorted(fs, fs, right=False)
        keep = rank < self.k
        r, f, src = rank[keep], fs[keep], o[keep]
        for n in self.names:
            fill = self.key_fill if n == "key" else (EMPTY if n == "idx" else 0)
            self.fields[n].fill_(fill)
            self.fields[n][r, f] = rows[n][src]

    def merge(self, other: "Slots") -> None:
        other._compact()
        kk, ff = torch.nonzero(other.fields["idx"] != EMPTY, as_tuple=True)
        self.pending.append((ff, {n: other.fields[n][kk, ff] for n in self.names}))
        self._compact()


class TopK:
    """Each feature's ``k`` highest activations with their corpus position and window;
    ties go to the earlier corpus position (``seq * seq_len + pos``), so the result does not
    depend on batching or sharding."""

    def __init__(self, k: int, d_sae: int, T: int, device):
        self.k, self.T = k, T
        self.slots = Slots(k, d_sae, True, torch.float32, {"win": ((W,), torch.float16)}, device)

    acts = property(lambda self: self.slots["key"])
    idx = property(lambda self: self.slots["idx"])
    win = property(lambda self: self.slots["win"])

    def update(self, batch: ActivationBatch) -> None:
        """O(fired entries): each feature's best ``k`` firings of the batch (by activation,
        ties by position) that beat its current ``k``-th are folded in."""
        b, t, f = batch.firing  # row-major: ascending batch position
        if f.numel() == 0:
            return
        v = batch.firing_acts
        keep = self.slots.candidates(f, v)
        kb, kt, kf = b[keep], t[keep], f[keep]
        self.slots.fold(kf, {"key": v[keep], "idx": (kb + batch.start) * self.T + kt,
                                   "win": window_acts(batch.acts.reshape(-1, batch.acts.shape[-1]), kb, kt, kf, self.T)})

    def merge(self, o: TopK) -> None:
        self.slots.merge(o.slots)


class Reservoir:
    """A uniform random sample without replacement of each feature's firing positions
    (``n`` per feature): the positions with the ``n`` smallest :func:`position_keys`."""

    def __init__(self, n: int, d_sae: int, T: int, seed: int, device):
        self.n, self.T, self.seed = n, T, seed
        self.slots = Slots(n, d_sae, False, torch.float64, {"acts": ((), torch.float32),
                                                            "win": ((W,), torch.float16)}, device)

    key = property(lambda self: self.slots["key"])
    acts = property(lambda self: self.slots["acts"])
    idx = property(lambda self: self.slots["idx"])
    win = property(lambda self: self.slots["win"])

    def update(self, batch: ActivationBatch) -> None:
        if not self.n:
            return
        b, t, f = batch.firing
        key = batch.firing_keys(self.seed)
        keep = self.slots.candidates(f, key)
        kb, kt, kf = b[keep], t[keep], f[keep]
        self.slots.fold(kf, {"key": key[keep], "idx": (kb + batch.start) * self.T + kt,
                                   "acts": batch.firing_acts[keep],
                                   "win": window_acts(batch.acts.reshape(-1, batch.acts.shape[-1]), kb, kt, kf, self.T)})

    def merge(self, o: Reservoir) -> None:
        self.slots.merge(o.slots)


class RandomContexts:
    """``n`` random corpus positions (chosen over the whole corpus from ``seed``, uniformly
    without replacement) and the features active at each; each shard fills the positions
    inside its rows. Memory is O(n), not O(corpus): numpy's ``Generator.choice`` draws a few
    positions out of many by Floyd's algorithm (a hash set of the ``n`` chosen) rather than a
    permutation of all ``n_seq * T`` positions."""

    def __init__(self, n: int, n_seq: int, T: int, seed: int):
        n = min(n, n_seq * T)
        pick = np.random.default_rng(seed).choice(n_seq * T, size=n, replace=False)
        rnd = torch.from_numpy(np.sort(pick).astype(np.int64))
        self.seq, self.pos = rnd // T, rnd % T
        self.active: dict[int, list[int]] = {}

    def update(self, batch: ActivationBatch) -> None:
        lo, hi = batch.start, batch.start + batch.tokens.shape[0]
        for j in torch.nonzero((self.seq >= lo) & (self.seq < hi)).flatten().tolist():
            row = batch.acts[int(self.seq[j]) - lo, int(self.pos[j])]
            self.active[j] = torch.nonzero(row > 0).flatten().tolist()

    def merge(self, o: RandomContexts) -> None:
        self.active.update(o.active)


@dataclass
class FeatureStats:
    """Per-feature statistics over the scanned corpus (all tensors on CPU).

    ``fire_count [d_sae]`` positions with activation > 0; ``act_sum``/``act_max [d_sae]``;
    ``top_acts/top_seq/top_pos [top_k, d_sae]`` the top-activating positions, highest first
    (act 0 and seq -1 = none); ``top_win [top_k, d_sae, 16]`` the feature's activation on each
    token of the window (:data:`WINDOW`) around each (float16);
    ``mean_z [n_heads, d_head]`` mean hook_z over all positions (for mean-ablation);
    ``l0_sum`` active (position, feature) pairs; ``n_tokens`` positions seen;
    ``hist [d_sae, len(hist_edges) + 1]`` counts of positive activations per bin
    (``hist_edges``: :data:`HIST_EDGES`; first bin below 1e-3, last above 1e3);
    ``sample_acts/sample_seq/sample_pos [n_sample, d_sae]`` and ``sample_win [n_sample,
    d_sae, 16]``: a uniform random sample without replacement of each feature's firing
    positions (seq -1 = empty slot), highest activation first, so examples from every
    activation quantile are at hand; ``random_seq/random_pos [n_random]`` random corpus
    positions and ``random_active`` the features firing at each.
    """

    fire_count: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    top_acts: torch.Tensor
    top_seq: torch.Tensor
    top_pos: torch.Tensor
    top_win: torch.Tensor
    mean_z: torch.Tensor
    l0_sum: int
    n_tokens: int
    hist: torch.Tensor
    hist_edges: torch.Tensor
    sample_acts: torch.Tensor
    sample_seq: torch.Tensor
    sample_pos: torch.Tensor
    sample_win: torch.Tensor
    random_seq: torch.Tensor
    random_pos: torch.Tensor
    random_active: list[list[int]]

    @property
    def density(self) -> torch.Tensor:
        """Firing density per feature, fraction of positions in [0, 1]."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def dead(self) -> torch.Tensor:
        """Features that never fired on the scanned corpus, bool ``[d_sae]``."""
        return self.fire_count == 0

    @property
    def l0(self) -> float:
        """Mean number of active features per token (L0)."""
        return self.l0_sum / max(self.n_tokens, 1)


class PassState:
    """The accumulators of one pass (or one shard of it): ``update(batch)`` per batch,
    ``merge(other)`` to fold in another shard, ``finalize()`` -> :class:`FeatureStats`."""

    def __init__(self, sae: SAE, n_heads: int, n_seq: int, T: int, top_k: int = 10, n_sample: int = 20,
                 n_random: int = 256, seed: int = 0, device="cpu"):
        F = sae.d_sae
        self.T = T
        self.counts = Counts(F, n_heads, sae.d_in // n_heads, device)
        self.hist = Histogram(F, device)
        self.top = TopK(top_k, F, T, device)
        self.sample = Reservoir(n_sample, F, T, seed, device)
        self.random = RandomContexts(n_random, n_seq, T, seed)
        self.parts = (self.counts, self.hist, self.top, self.sample, self.random)

    def update(self, batch: ActivationBatch) -> None:
        for p in self.parts:
            p.update(batch)

    def merge(self, other: PassState) -> None:
        for p, q in zip(self.parts, other.parts):
            p.merge(q)

    def finalize(self) -> FeatureStats:
        c, T = self.counts, self.T
        top_a, top_i, top_w = (x.cpu() for x in (self.top.acts, self.top.idx, self.top.win))
        none = top_a <= 0
        top_a = torch.where(none, 0.0, top_a)
        top_s = torch.where(none, -1, top_i // T)
        top_p = torch.where(none, -1, top_i % T)
        top_w[none] = 0
        s = self.sample  # the sample ordered by activation (ties: by key), empty slots last
        sa, si, sw = best_rows([s.acts.cpu(), s.key.cpu()], [s.acts.cpu(), s.idx.cpu(), s.win.cpu()], s.n, largest=True) \
            if s.n else (s.acts.cpu(), s.idx.cpu(), s.win.cpu())
        empty = si == EMPTY
        return FeatureStats(
            c.fire.cpu(), c.asum.cpu(), c.amax.cpu(), top_a, top_s, top_p, top_w,
            (c.zsum / max(c.n_tokens, 1)).float().cpu(), c.l0, c.n_tokens,
            self.hist.count.view(-1, self.hist.nb).cpu(), HIST_EDGES.clone(),
            sa, torch.where(empty, -1, si // T), torch.where(empty, -1, si % T), sw,
            self.random.seq, self.random.pos, [self.random.active.get(j, []) for j in range(self.random.seq.numel())])


def activation_pass(model, sae: SAE | list[SAE], tokens: torch.Tensor, state: PassState | list[PassState],
                    batch_size: int = 32, observers: list = (),
                    progress: Callable[[int], None] | None = None, device: str = "cpu",
                    rows: tuple[int, int] | None = None, autocast: str = "none",
                    attention: list[bool] | None = None) -> PassState | list[PassState]:
    """Stream corpus ``rows`` ``[lo, hi)`` (all by default) of ``tokens [n_seq, seq_len]``
    through ``model`` in batches of ``batch_size`` sequences. One forward per batch runs to
    the deepest SAE's layer and captures every SAE's hook (:meth:`run_hook_zs`); each SAE's
    features update its own ``state`` and go to its own observers. ``sae``/``state`` may be
    one SAE and its state (``observers``: callbacks) or equal-length lists (``observers``: one
    list of callbacks per SAE). ``progress(n_seqs_done)`` per batch. ``autocast`` (``"none"``,
    ``"bf16"``, ``"fp16"``): the model forward runs under :func:`torch.autocast` in that dtype;
    hook_z is cast back to fp32 before the SAE encode, so accumulators and observers see fp32.
    ``attention``: per SAE, whether its batches carry the layer's attention pattern and values
    (:meth:`famfind.models.base.AttnModel.run_attention`, the same forward). Returns ``state``."""
    many = isinstance(sae, (list, tuple))
    saes, states = (list(sae), list(state)) if many else ([sae], [state])
    obs = [list(o) for o in observers] if many else [list(observers)]
    obs += [[] for _ in range(len(saes) - len(obs))]
    layers = sorted({s.layer for s in saes})
    att_layers = sorted({s.layer for s, a in zip(saes, attention or [False] * len(saes)) if a})
    lo, hi = rows or (0, tokens.shape[0])
    for start in range(lo, hi, batch_size):
        toks = tokens[start:min(start + batch_size, hi)].to(device)
        att = {}
        with torch.no_grad(), autocast_context(device, autocast):
            if att_layers:
                zs, att = model.run_attention(toks, layers, att_layers)
            else:
                zs = model.run_hook_zs(toks, layers) if len(layers) > 1 else {layers[0]: model.run_hook_z(toks, layers[0])}
        zs = {k: v.float() for k, v in zs.items()}
        att = {k: (p.float(), v.float()) for k, (p, v) in att.items()}
        seq_idx = torch.arange(start, start + toks.shape[0])
        for s, st, ob in zip(saes, states, obs):
            z = zs[s.layer]
            with torch.no_grad():
                batch = ActivationBatch(seq_idx, toks, z, s.encode(z.flatten(-2)), *att.get(s.layer, (None, None)))
            st.update(batch)
            for o in ob:
                o(batch)
        if progress:
            progress(start + toks.shape[0] - lo)
    return states if many else states[0]
