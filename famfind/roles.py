"""Per-head attention scores on repeated random tokens (shared by ``head_roles``, the
embedded-default build and its tests).

Prompt: ``n_seqs`` sequences ``r_1..r_n r_1..r_n`` of uniform random tokens (``n = seq_len``),
the standard induction probe (Olsson et al. 2022, "In-context Learning and Induction Heads";
TransformerLens's ``make_repeated_tokens``). Each score is the mean attention
(``blocks.{L}.attn.hook_pattern``), in [0, 1], from:

- induction: each token of the 2nd copy to the token *after* its 1st copy (offset ``-(n-1)``);
- duplicate_token: each token of the 2nd copy to its own 1st copy (offset ``-n``);
- previous_token: every token but the first to the token before it (offset ``-1``).

This is the mean-attention score of the TransformerLens tutorials, not ``detect_head``'s
"mul" measure (which also averages over rows where the detection pattern is empty).
"""

from __future__ import annotations

import torch

METRICS = ("induction", "duplicate_token", "previous_token")


def repeated_random_tokens(model, seq_len: int, n_seqs: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_seqs, 2*seq_len]`` int64: uniform tokens (never ``<|endoftext|>``), repeated once."""
    V = model.cfg.d_vocab
    r = torch.randint(0, V, (n_seqs, seq_len), generator=generator)
    if model.tokenizer is not None:
        eot = model.tokenizer.encode("<|endoftext|>")
        if len(eot) == 1:
            r[r == eot[0]] = (eot[0] + 1) % V
    return torch.cat([r, r], dim=1)


def head_scores(model, layers: list[int], seq_len: int = 50, n_seqs: int = 32,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``{metric: Tensor[len(layers), n_heads]}`` for the metrics above, in [0, 1]."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = min(seq_len, model.cfg.n_ctx // 2)
    pats = model.patterns(repeated_random_tokens(model, n, n_seqs, g), layers)
    idx2, idx_all = torch.arange(n, 2 * n), torch.arange(1, 2 * n)
    out = {m: [] for m in METRICS}
    for lyr in layers:
        p = pats[lyr].float()  # [batch, n_heads, query_pos, key_pos]
        out["induction"].append(p[:, :, idx2, idx2 - n + 1].mean(dim=(0, 2)))
        out["duplicate_token"].append(p[:, :, idx2, idx2 - n].mean(dim=(0, 2)))
        out["previous_token"].append(p[:, :, idx_all, idx_all - 1].mean(dim=(0, 2)))
    return {m: torch.stack(v).cpu() for m, v in out.items()}
