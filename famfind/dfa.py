"""Direct feature attribution (DFA) of an attention-SAE feature to heads and source positions.

For an SAE on ``hook_z`` the pre-activation of feature ``f`` at a position is linear in the
concatenated heads: ``pre_f = sum_h (z_h - b_dec_h) . W_enc[h-block, f] + b_enc[f]``
(``b_dec`` subtracted when ``apply_b_dec_to_input``, as the SAE encodes). Each head's term
is its DFA (Kissane et al. 2024, "Interpreting Attention Layer Outputs with Sparse
Autoencoders", §3 and the seed post's footnote 3). Because
``z_h[dest] = sum_src pattern[h, dest, src] * v[src, h]`` and each pattern row sums to 1, a
head's term splits further over source positions:
``pattern[h, dest, src] * (v[src, h] - b_dec_h) . W_enc[h-block, f]`` (DFA by source).
"""

from __future__ import annotations

import torch


def _enc_blocks(W_enc: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``W_enc [n_heads*d_head, d_sae]`` -> ``[n_heads, d_head, d_sae]``."""
    return W_enc.reshape(n_heads, -1, W_enc.shape[1])


def dfa_by_head_at(z: torch.Tensor, acts: torch.Tensor, W_enc_T: torch.Tensor, b_dec: torch.Tensor | None,
                   firing: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head DFA at every firing (position, feature) pair of a batch.

    ``z [batch, pos, n_heads, d_head]`` (hook_z), ``acts [batch, pos, d_sae]``,
    ``W_enc_T [d_sae, n_heads*d_head]`` (the encoder transposed, contiguous),
    ``b_dec [n_heads*d_head]`` or ``None``; ``firing``: the ``(batch_idx, pos, feature)``
    indices of ``acts > 0`` when already known (:attr:`ActivationBatch.firing`).
    Returns ``(row, feature, dfa)``: the flat position index ``[n_pairs]``, the feature
    ``[n_pairs]`` and ``dfa [n_pairs, n_heads]`` in pre-activation units. Only firing pairs
    are computed (``O(n_tokens * L0 * d_in)``), so it is cheap for any ``d_sae``.
    """
    B, T, H, dh = z.shape
    zf = z.reshape(B * T, H * dh)
    if b_dec is not None:
        zf = zf - b_dec
    b, t, feat = firing if firing is not None else torch.nonzero(acts > 0, as_tuple=True)
    row = b * T + t
    dfa = (zf[row].view(-1, H, dh) * W_enc_T[feat].view(-1, H, dh)).sum(-1)
    return row, feat, dfa


class HeadDFAAccumulator:
    """Streams :func:`dfa_by_head_at` into each feature's per-head share of variance.

    ``share[f, h] = sum_t dfa_h(t) * a(t) / sum_t a(t)^2`` over positions ``t`` where ``f``
    fires, with ``a = sum_h dfa_h`` (uncentred; rows sum to 1 for features that fired).
    """

    def __init__(self, d_sae: int, n_heads: int, device="cpu"):
        self.num = torch.zeros(d_sae, n_heads, dtype=torch.float64, device=device)
        self.den = torch.zeros(d_sae, dtype=torch.float64, device=device)

    #: firing pairs per gather: bounds the two ``[pairs, d_in]`` gathers to ~50 MB each at
    #: d_in 768, whatever the batch size or L0.
    CHUNK = 1 << 14

    def update(self, z, acts, W_enc_T, b_dec, firing=None) -> None:
        """One batch; ``W_enc_T [d_sae, d_in]``, other arguments as :func:`dfa_by_head_at`.
        Works through the firing pairs :attr:`CHUNK` at a time, so its memory is flat in the
        batch size and L0."""
        if firing is None:
            firing = torch.nonzero(acts > 0, as_tuple=True)
        n = firing[0].shape[0]
        for i in range(0, n, self.CHUNK):
            part = tuple(x[i:i + self.CHUNK] for x in firing)
            _, feat, dfa = dfa_by_head_at(z, acts, W_enc_T, b_dec, part)
            a = dfa.sum(-1, keepdim=True)
            self.num.index_add_(0, feat, (dfa * a).double())
            self.den.index_add_(0, feat, (a * a).squeeze(-1).double())

    def merge(self, other: "HeadDFAAccumulator") -> None:
        """Fold in another shard's sums."""
        self.num += other.num.to(self.num.device)
        self.den += other.den.to(self.den.device)

    def share(self) -> torch.Tensor:
        """``[d_sae, n_heads]`` fraction of each feature's DFA variance per head (0 rows: never fired)."""
        return (self.num / self.den.clamp_min(1e-30)[:, None]).float().cpu()


def dfa_by_source(pattern: torch.Tensor, v: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor | None,
                  features: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """DFA by source position for several (feature, destination) pairs of one sequence.

    ``pattern [n_heads, pos, pos]`` and ``v [pos, n_heads, d_head]`` of the SAE's layer
    (:meth:`famfind.models.base.AttnModel.attn_parts`), ``W_enc [n_heads*d_head, d_sae]``,
    ``features`` and ``dest`` ``[n]`` (int). Returns ``[n, n_heads, pos]``: the contribution
    of head h reading source position ``src`` to the feature's pre-activation at ``dest``;
    summed over heads and sources it equals the heads' part of the pre-activation.
    """
    T, H, dh = v.shape
    vv = v - b_dec.view(H, dh) if b_dec is not None else v
    Wb = _enc_blocks(W_enc, H)[:, :, features]  # [H, dh, n]
    vw = torch.einsum("khd,hdn->nhk", vv, Wb)  # [n, H, src]
    return pattern[:, dest, :].permute(1, 0, 2) * vw
