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


@dataclass
class FeatureStats:
    """Per-feature statistics over the scanned corpus (all tensors on CPU).

    ``fire_count [d_sae]`` positions with activation > 0; ``act_sum``/``act_max [d_sae]``;
    ``top_acts/top_seq/top_pos [top_k, d_sae]`` the top-activating positions (act 0 = none);
    ``mean_z [n_heads, d_head]`` mean hook_z over all positions (for mean-ablation);
    ``l0_sum`` sum over positions of active-feature counts; ``n_tokens`` positions seen;
    ``hist [d_sae, len(HIST_EDGES) + 1]`` counts of positive activations per log-spaced bin
    (:data:`HIST_EDGES`; first bin below 1e-3, last above 1e3).
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
                    progress: Callable[[int], None] | None = None, device: str = "cpu") -> FeatureStats:
    """Run the pass; returns :class:`FeatureStats`. ``progress(n_seqs_done)`` per batch."""
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
        cat_a = torch.cat([top_a, v.cpu()])
        order = cat_a.topk(top_k, dim=0).indices
        top_a = cat_a.gather(0, order)
        top_s = torch.cat([top_s, seq]).gather(0, order)
        top_p = torch.cat([top_p, pos]).gather(0, order)
        for obs in observers:
            obs(batch)
        if progress:
            progress(start + B)
    n_tok = n_seq * T
    top_s[top_a <= 0] = -1
    top_p[top_a <= 0] = -1
    return FeatureStats(fire, asum, amax, top_a, top_s, top_p,
                        (zsum / n_tok).float(), l0, n_tok, hist.view(F, nb).cpu())
