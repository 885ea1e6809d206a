"""The activation pass: stream a corpus through the model up to the SAE's layer, encode.

One pass serves every detector: per batch, ``blocks.{L}.attn.hook_z`` is captured
(the forward stops at layer ``L``; no autograd), encoded by the SAE, folded into
:class:`FeatureStats`, and handed to each observing detector. Memory is O(d_sae * top_k)
plus one batch, whatever the corpus size; the same path serves a GPT-2-small SAE
(24,576 features, 10M tokens) on a GPU with ``device="cuda"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from famfind.corpus import TokenCorpus
from famfind.sae import SAE


@dataclass
class ActivationBatch:
    """One batch of the pass.

    ``seq_idx [batch]`` (rows of the corpus), ``tokens [batch, pos]``,
    ``z [batch, pos, n_heads, d_head]`` (hook_z), ``acts [batch, pos, d_sae]`` (SAE features).
    """

    seq_idx: torch.Tensor
    tokens: torch.Tensor
    z: torch.Tensor
    acts: torch.Tensor

    @cached_property
    def firing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(batch_idx, pos, feature)`` of every entry with ``acts > 0``, each ``[n_fired]``,
        in row-major order; computed once per batch and shared by every observer."""
        return torch.nonzero(self.acts > 0, as_tuple=True)


HIST_EDGES = torch.logspace(-3, 3, 25)  # activation histogram bin edges (log-spaced)
WINDOW = (-12, 4)  # example windows: 12 tokens before the position to 3 after (offsets [-12, 4))


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


@dataclass
class FeatureStats:
    """Per-feature statistics over the scanned corpus (all tensors on CPU).

    ``fire_count [d_sae]`` positions with activation > 0; ``act_sum``/``act_max [d_sae]``;
    ``top_acts/top_seq/top_pos [top_k, d_sae]`` the top-activating positions (act 0 = none);
    ``mean_z [n_heads, d_head]`` mean hook_z over all positions (for mean-ablation);
    ``l0_sum`` sum over positions of active-feature counts; ``n_tokens`` positions seen;
    ``hist [d_sae, len(HIST_EDGES) + 1]`` counts of positive activations per log-spaced bin
    (:data:`HIST_EDGES`; first bin below 1e-3, last above 1e3);
    ``top_win [top_k, d_sae, 16]`` the feature's activation on each token of the window
    (:data:`WINDOW`) around each top example (float16);
    ``sample_acts/sample_seq/sample_pos [n_sample, d_sae]`` and ``sample_win
    [n_sample, d_sae, 16]``: a uniform random sample, without replacement, of each feature's
    firing positions (reservoir sampling by random keys; seq -1 = empty slot), so examples
    from every activation quantile are at hand (sample_acts sorted descending);
    ``random_seq/random_pos [n_random]`` random corpus positions and ``random_active`` the
    list of features firing at each (non-activating contexts for the detection score).
    """

    fire_count: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    top_acts: torch.Tensor
    top_seq: torch.Tensor
    top_pos: torch.Tensor
    mean_z: torch.Tensor
    l0_sum: float
    n_tokens: int
    hist: torch.Tensor | None = None
    top_win: torch.Tensor | None = None
    sample_acts: torch.Tensor | None = None
    sample_seq: torch.Tensor | None = None
    sample_pos: torch.Tensor | None = None
    sample_win: torch.Tensor | None = None
    random_seq: torch.Tensor | None = None
    random_pos: torch.Tensor | None = None
    random_active: list[list[int]] | None = None

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


def activation_pass(model, sae: SAE, corpus: TokenCorpus, batch_size: int = 32, top_k: int = 10,
                    observers: list[Callable[[ActivationBatch], None]] = (),
                    progress: Callable[[int], None] | None = None, device: str = "cpu",
                    n_sample: int = 20, n_random: int = 256, seed: int = 0) -> FeatureStats:
    """Run the pass; returns :class:`FeatureStats`. ``progress(n_seqs_done)`` per batch.

    ``top_k`` top examples and ``n_sample`` uniformly sampled firing positions per feature
    (with their activation windows), and ``n_random`` random corpus positions (seeded by
    ``seed``) with the features active there, are kept for example-based reports and
    labelling. Memory: O(d_sae * (top_k + n_sample) * 16) plus one batch.
    """
    layer, F = sae.layer, sae.d_sae
    n_seq, T = corpus.tokens.shape
    fire = torch.zeros(F, dtype=torch.long)
    asum = torch.zeros(F, dtype=torch.float64)
    amax = torch.zeros(F)
    top_a = torch.zeros(top_k, F)
    top_s = torch.full((top_k, F), -1, dtype=torch.long)
    top_p = torch.full((top_k, F), -1, dtype=torch.long)
    zsum = None
    l0 = 0.0
    nb = HIST_EDGES.numel() + 1
    hist = torch.zeros(F * nb, dtype=torch.long, device=device)
    edges = HIST_EDGES.to(device)
    W = WINDOW[1] - WINDOW[0]
    top_w = torch.zeros(top_k, F, W, dtype=torch.float16)
    gen = torch.Generator().manual_seed(seed)
    samp_key = torch.full((n_sample, F), float("inf"))
    samp_a = torch.zeros(n_sample, F)
    samp_s = torch.full((n_sample, F), -1, dtype=torch.long)
    samp_p = torch.full((n_sample, F), -1, dtype=torch.long)
    samp_w = torch.zeros(n_sample, F, W, dtype=torch.float16)
    n_random = min(n_random, n_seq * T)
    rnd = torch.randperm(n_seq * T, generator=gen)[:n_random].sort().values
    rnd_seq, rnd_pos = rnd // T, rnd % T
    rnd_active: list[list[int]] = [[] for _ in range(n_random)]
    for start in range(0, n_seq, batch_size):
        toks = corpus.tokens[start:start + batch_size].to(device)
        B = toks.shape[0]
        z = model.run_hook_z(toks, layer)  # [batch, pos, n_heads, d_head]
        acts = sae.encode(z.flatten(-2))  # [batch, pos, d_sae]
        flat = acts.reshape(-1, F)
        active = flat > 0
        fire += active.sum(0).cpu()
        asum += flat.sum(0, dtype=torch.float64).cpu()
        amax = torch.maximum(amax, flat.max(0).values.cpu())
        l0 += active.sum().item()
        batch = ActivationBatch(torch.arange(start, start + B), toks, z, acts)
        b, t, f = batch.firing  # histogram from the firing entries only
        hist.index_add_(0, f * nb + torch.bucketize(acts[b, t, f], edges), torch.ones_like(f))
        zs = z.sum(dim=(0, 1), dtype=torch.float64).cpu()
        zsum = zs if zsum is None else zsum + zs
        # streaming top-k per feature: merge this batch's best with the running best
        k = min(top_k, flat.shape[0])
        v, i = flat.topk(k, dim=0)  # [k, d_sae]
        seq = (i // T + start).cpu()
        pos = (i % T).cpu()
        fidx = torch.arange(F, device=flat.device).expand(k, F)
        win = window_acts(flat, (i // T).flatten(), (i % T).flatten(), fidx.flatten(), T).view(k, F, W).cpu()
        cat_a = torch.cat([top_a, v.cpu()])
        order = cat_a.topk(top_k, dim=0).indices
        top_a = cat_a.gather(0, order)
        top_s = torch.cat([top_s, seq]).gather(0, order)
        top_p = torch.cat([top_p, pos]).gather(0, order)
        top_w = torch.cat([top_w, win]).gather(0, order[..., None].expand(-1, -1, W))
        if n_sample:  # reservoir sample by random keys: keep each feature's n_sample smallest keys
            key = torch.rand(f.numel(), generator=gen).to(f.device)
            o1 = key.argsort()
            o2 = f[o1].argsort(stable=True)
            srt = o1[o2]  # grouped by feature, keys ascending within a feature
            fs = f[srt]
            first = torch.searchsorted(fs, fs, right=False)
            rank = torch.arange(fs.numel(), device=fs.device) - first
            keep = srt[rank < n_sample]
            r_k = rank[rank < n_sample]
            kb, kt, kf = b[keep], t[keep], f[keep]
            slot = (r_k.cpu(), kf.cpu())  # (rank, feature) of each kept entry
            new_key = torch.full((n_sample, F), float("inf"))
            new_key[slot] = key[keep].cpu()
            new_a = torch.zeros(n_sample, F)
            new_a[slot] = acts[kb, kt, kf].float().cpu()
            new_s = torch.full((n_sample, F), -1, dtype=torch.long)
            new_s[slot] = (kb + start).cpu()
            new_p = torch.full((n_sample, F), -1, dtype=torch.long)
            new_p[slot] = kt.cpu()
            new_w = torch.zeros(n_sample, F, W, dtype=torch.float16)
            new_w[slot] = window_acts(flat, kb, kt, kf, T).cpu()
            o = torch.cat([samp_key, new_key]).topk(n_sample, dim=0, largest=False).indices
            samp_key = torch.cat([samp_key, new_key]).gather(0, o)
            samp_a = torch.cat([samp_a, new_a]).gather(0, o)
            samp_s = torch.cat([samp_s, new_s]).gather(0, o)
            samp_p = torch.cat([samp_p, new_p]).gather(0, o)
            samp_w = torch.cat([samp_w, new_w]).gather(0, o[..., None].expand(-1, -1, W))
        in_b = torch.nonzero((rnd_seq >= start) & (rnd_seq < start + B)).flatten().tolist()
        for j in in_b:
            rnd_active[j] = torch.nonzero(acts[int(rnd_seq[j]) - start, int(rnd_pos[j])] > 0).flatten().tolist()
        for obs in observers:
            obs(batch)
        if progress:
            progress(start + B)
    n_tok = n_seq * T
    top_s[top_a <= 0] = -1
    top_p[top_a <= 0] = -1
    samp_s[samp_key == float("inf")] = -1
    o = samp_a.argsort(dim=0, descending=True)  # sample ordered by activation, empty slots last
    samp_a, samp_s, samp_p = samp_a.gather(0, o), samp_s.gather(0, o), samp_p.gather(0, o)
    samp_w = samp_w.gather(0, o[..., None].expand(-1, -1, W))
    samp_p[samp_s < 0] = -1
    return FeatureStats(fire, asum, amax, top_a, top_s, top_p,
                        (zsum / n_tok).float(), l0, n_tok, hist.view(F, nb).cpu(), top_w,
                        samp_a, samp_s, samp_p, samp_w, rnd_seq, rnd_pos, rnd_active)
