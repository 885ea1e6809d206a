"""Token substitution: re-run corpus sequences with one token replaced, many at once.

The causal tests of the mechanism records (:mod:`famfind.heuristics.mechanism`) ask "what does
feature ``f`` read at position ``t`` when the token at position ``p`` is replaced by ``x``?".
An *edit* is ``(sequence, position, token)``: a corpus sequence with the token at ``position``
replaced (``position = -1``: the sequence unchanged, a clean run). A *read* is ``(edit,
position, feature)``: the SAE feature's activation at that position of the edited sequence.
One edit serves every read of it, whatever the feature, so tests that need the same edit share
one forward.

The model is causal, so an edit changes nothing before its position and nothing a read needs
after the last read. Each edit is computed only over ``[start, last read]`` (``start``: the
edit's position, or its first read when that comes earlier), up to the SAE's layer. A backend
with a clean cache (:meth:`famfind.models.gpt2.HFGPT2Model.prefix_cache`, the GPT-2 fast path)
goes further, exactly up to float rounding. The model's input is position-wise, so at layer 0
an edit changes only its own position's query, key and value: a layer-0 SAE's read is one
attention row against the clean keys with the edited key put in
(:meth:`~famfind.models.gpt2.HFGPT2Model.hook_z_at`), no span at all; for a later layer's SAE
the span's layer-0 outputs come from the clean softmax sums with the edited key's term swapped,
the later layers reuse the clean keys and values before ``start``, and the SAE's layer computes
queries at each edit's distinct read positions only
(:meth:`~famfind.models.gpt2.HFGPT2Model.hook_z_spans`). Any other backend runs the sequence
from its start to the last read. Edits are sorted by length and batched under a token budget.
The cost is the sum over edits of their computed positions, never ``d_sae x corpus``.
"""

from __future__ import annotations

import torch

CACHE_FLOATS = 1 << 26  # numbers of a clean run cached at once (256 MB of float32)


@torch.no_grad()
def run_edits(model, sae, tokens: torch.Tensor, e_seq: torch.Tensor, e_pos: torch.Tensor, e_tok: torch.Tensor,
              r_edit: torch.Tensor, r_pos: torch.Tensor, r_feat: torch.Tensor, token_budget: int = 4096,
              device: str = "cpu") -> torch.Tensor:
    """Activations of the reads, ``[n_reads]`` (CPU, float32).

    ``tokens [n_seq, seq_len]`` the corpus; edits ``e_seq/e_pos/e_tok [n_edits]`` (long;
    ``e_pos = -1``: no replacement); reads ``r_edit/r_pos/r_feat [n_reads]`` (long: index into
    the edits, position, SAE feature). ``model`` runs to ``sae.layer``; the feature is encoded
    with :meth:`famfind.sae.SAE.encode_pairs`. ``token_budget``: positions per forward.
    Raises ``ValueError`` when a read names an edit that does not exist."""
    n_edits, n_reads = e_seq.numel(), r_edit.numel()
    out = torch.zeros(n_reads)
    if n_reads == 0:
        return out
    if int(r_edit.min()) < 0 or int(r_edit.max()) >= n_edits:
        raise ValueError(f"reads name edits outside [0, {n_edits})")
    last = torch.full((n_edits,), -1, dtype=torch.long).scatter_reduce_(0, r_edit, r_pos, reduce="amax")
    first = torch.full((n_edits,), tokens.shape[1], dtype=torch.long).scatter_reduce_(0, r_edit, r_pos, reduce="amin")
    used = torch.nonzero(last >= 0).flatten()
    cached = hasattr(model, "prefix_cache")  # with hook_z_at and hook_z_spans (the GPT-2 fast path)
    T = tokens.shape[1]
    # the distinct read positions of each edit (sorted by edit, then position) and each read's pair
    pair, r_pair = torch.unique(r_edit * T + r_pos, return_inverse=True)
    if cached and sae.layer == 0:
        return _run_layer0(model, sae, tokens, e_seq, e_pos, e_tok, pair, r_pair, r_feat, device)
    start = torch.where(e_pos >= 0, torch.minimum(e_pos, first), first) if cached else torch.zeros_like(first)
    length = last - start + 1
    # cost of an edit in a forward: its positions plus the cached keys it reads before them
    batches = _batches(used, e_seq, length, start if cached else torch.zeros_like(start), token_budget,
                       _seqs_per_cache(model, sae.layer, T) if cached else None)
    rank = torch.full((n_edits,), -1, dtype=torch.long)
    rank[torch.cat([b for _, b in batches])] = torch.arange(used.numel())
    r_order = torch.argsort(rank[r_edit], stable=True)
    r_rank = rank[r_edit][r_order]
    p_edit = pair // T  # each read's rank among its edit's distinct read positions: p_rank[r_pair]
    n_pairs = torch.bincount(p_edit, minlength=n_edits)
    p_rank = torch.arange(pair.numel()) - (torch.cumsum(n_pairs, 0) - n_pairs)[p_edit]
    done, cache_key, cache, z_edit = 0, None, None, None
    for chunk, grp in batches:
        L = int(length[grp].max())
        s0 = start[grp]
        idx = (s0[:, None] + torch.arange(L)).clamp_max(T - 1)
        toks = tokens[e_seq[grp][:, None], idx]
        edited = torch.nonzero((e_pos[grp] >= s0) & (e_pos[grp] - s0 < L)).flatten()  # an edit after every read changes nothing
        toks[edited, e_pos[grp][edited] - s0[edited]] = e_tok[grp][edited]
        lo, hi = int(torch.searchsorted(r_rank, done)), int(torch.searchsorted(r_rank, done + grp.numel()))
        rs = r_order[lo:hi]
        e = rank[r_edit[rs]] - done
        if cached:
            if cache_key is not chunk:
                cache, cache_key = model.prefix_cache(tokens[chunk].to(device), sae.layer), chunk
                z_edit = _edit_rows(model, cache, chunk, e_seq, e_pos, e_tok, last, device)
            rows = torch.searchsorted(chunk, e_seq[grp])
            q_rows = torch.zeros(grp.numel(), int(n_pairs[grp].max()), dtype=torch.long)
            q_rows[e, p_rank[r_pair[rs]]] = r_pos[rs] - s0[e]  # each edit's distinct read positions (0 pads)
            z = model.hook_z_spans(cache, rows.to(device), s0.to(device), toks.to(device), sae.layer,
                                   e_pos[grp].to(device), e_tok[grp].clamp_min(0).to(device), q_rows.to(device),
                                   z_edit[grp].to(device))
            x = z[e.to(z.device), p_rank[r_pair[rs]].to(z.device)]
        else:
            z = model.run_hook_z(toks.to(device), sae.layer)  # [edits, L, n_heads, d_head]
            x = z[e.to(z.device), (r_pos[rs] - s0[e]).to(z.device)]
        out[rs] = sae.encode_pairs(x.flatten(-2).float(), r_feat[rs].to(x.device)).cpu()
        done += grp.numel()
    return out


def _edit_rows(model, cache, chunk, e_seq, e_pos, e_tok, last, device) -> torch.Tensor:
    """Layer 0's hook_z at each edited position of the chunk's edits that a read sees,
    ``[n_edits, n_heads, d_head]`` (other rows 0), in one :meth:`hook_z_at` call."""
    ids = torch.nonzero(torch.isin(e_seq, chunk) & (e_pos >= 0) & (e_pos <= last)).flatten()
    out = torch.zeros(e_seq.numel(), model.cfg.n_heads, model.cfg.d_head)
    if ids.numel():
        at = e_pos[ids].to(device)
        out[ids] = model.hook_z_at(cache, torch.searchsorted(chunk, e_seq[ids]).to(device), at, at,
                                   e_tok[ids].to(device)).cpu()
    return out


def _run_layer0(model, sae, tokens, e_seq, e_pos, e_tok, pair, inv, r_feat, device) -> torch.Tensor:
    """:func:`run_edits` for a layer-0 SAE: an edit changes layer 0's query, key and value at its
    own position only, so each distinct ``(edit, read position)`` (``pair``: edit x seq_len +
    position; ``inv``: each read's pair) is one row of
    :meth:`~famfind.models.gpt2.HFGPT2Model.hook_z_at` against the clean cache, no span re-run."""
    out = torch.zeros(inv.numel())
    T = tokens.shape[1]
    p_edit, p_pos = pair // T, pair % T
    p_seq = e_seq[p_edit]
    seqs = torch.unique(p_seq)
    per = _seqs_per_cache(model, 0, T)
    for c0 in range(0, seqs.numel(), per):
        chunk = seqs[c0:c0 + per]
        cache = model.prefix_cache(tokens[chunk].to(device), 0)
        pi = torch.nonzero(torch.isin(p_seq, chunk)).flatten()
        rows = torch.searchsorted(chunk, p_seq[pi])
        z = model.hook_z_at(cache, rows.to(device), p_pos[pi].to(device), e_pos[p_edit[pi]].to(device),
                            e_tok[p_edit[pi]].clamp_min(0).to(device))
        where = torch.full((pair.numel(),), -1, dtype=torch.long)
        where[pi] = torch.arange(pi.numel())
        rs = torch.nonzero(where[inv] >= 0).flatten()
        out[rs] = sae.encode_pairs(z[where[inv[rs]].to(z.device)].flatten(-2).float(), r_feat[rs].to(z.device)).cpu()
    return out


def _seqs_per_cache(model, layer: int, seq_len: int) -> int:
    """Sequences whose clean run (:class:`~famfind.models.gpt2.SpanCache`: layer 0's queries,
    every layer's keys and values up to ``layer``, and for ``layer >= 1`` layer 0's softmax
    sums) fits :data:`CACHE_FLOATS`."""
    d, T = model.cfg.d_model, seq_len
    per_seq = (2 * layer + 3) * T * d + (2 * T * d + 5 * T * model.cfg.n_heads if layer else 0)
    return max(1, CACHE_FLOATS // per_seq)


def _batches(used: torch.Tensor, e_seq: torch.Tensor, length: torch.Tensor, start: torch.Tensor, budget: int,
             seqs_per_chunk: int | None) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """``[(sequences of the chunk or None, edit ids)]``: with a prefix cache, the edits grouped
    by chunks of ``seqs_per_chunk`` sequences (one cache each), each edit costing its length
    plus the cached keys before it (``start``); without a cache, its length alone. Within a
    group the edits are sorted by length, then start, and cut so that edits x (longest +
    latest start) <= ``budget``."""
    if seqs_per_chunk is None:
        groups = [(None, used)]
    else:
        seqs = torch.unique(e_seq[used])
        groups = []
        for c0 in range(0, seqs.numel(), seqs_per_chunk):
            chunk = seqs[c0:c0 + seqs_per_chunk]
            groups.append((chunk, used[torch.isin(e_seq[used], chunk)]))
    out = []
    for chunk, ids in groups:
        ids = ids[torch.argsort(length[ids] * (int(start.max()) + 2) + start[ids], stable=True)]
        ln, st = length[ids].tolist(), start[ids].tolist()
        i = 0
        while i < len(ids):
            j, top_ln, top_st = i, 0, 0
            while j < len(ids):
                nl, ns = max(top_ln, ln[j]), max(top_st, st[j] if chunk is not None else 0)
                if j > i and (j - i + 1) * (nl + ns) > budget:
                    break
                top_ln, top_st, j = nl, ns, j + 1
            out.append((chunk, ids[i:j]))
            i = j
    return out
