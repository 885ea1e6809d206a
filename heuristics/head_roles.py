"""Head roles on repeated random tokens: induction, duplicate-token and previous-token scores.

Prompt: ``n_seqs`` sequences ``r_1..r_n r_1..r_n`` of uniform random tokens (``n = seq_len``),
the standard induction probe (Olsson et al. 2022, "In-context Learning and Induction Heads";
TransformerLens's ``make_repeated_tokens`` + ``detect_head``). Per head of every layer up to
the SAE's, each score is the mean attention (``blocks.{L}.attn.hook_pattern``), in [0, 1], from:

- induction: each token of the 2nd copy to the token *after* its 1st copy (offset ``-(n-1)``);
- duplicate_token: each token of the 2nd copy to its own 1st copy (offset ``-n``);
- previous_token: every token but the first to the token before it (offset ``-1``).

This is the mean-attention score of the TransformerLens tutorials, not ``detect_head``'s
"mul" measure (which also averages over rows where the detection pattern is empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.plugins import HeadScore, Heuristic, Options, Result


@dataclass(frozen=True)
class HeadRolesOptions(Options):
    seq_len: int = 50  # length of each copy, as in the TransformerLens induction tutorial
    n_seqs: int = 32
    induction_head_threshold: float = 0.4  # induction score above which a head is an induction head


class HeadRoles(Heuristic):
    id = "head_roles"
    version = "0.1"
    needs = "model"
    description = "Per-head induction / duplicate-token / previous-token scores on repeated random tokens"
    Options = HeadRolesOptions

    def run(self, ctx) -> Result:
        o, m = self.options, ctx.model
        n = min(o.seq_len, m.cfg.n_ctx // 2)
        tokens = repeated_random_tokens(m, n, o.n_seqs, ctx.generator)
        layers = list(range(ctx.layer + 1))
        pats = m.patterns(tokens, layers)
        idx2 = torch.arange(n, 2 * n)
        idx_all = torch.arange(1, 2 * n)
        scores = {"induction": [], "duplicate_token": [], "previous_token": []}
        for lyr in layers:
            p = pats[lyr].float()  # [batch, n_heads, q, k]
            scores["induction"].append(p[:, :, idx2, idx2 - n + 1].mean(dim=(0, 2)))
            scores["duplicate_token"].append(p[:, :, idx2, idx2 - n].mean(dim=(0, 2)))
            scores["previous_token"].append(p[:, :, idx_all, idx_all - 1].mean(dim=(0, 2)))
        scores = {k: torch.stack(v).cpu() for k, v in scores.items()}  # [n_layers_run, n_heads]
        rows = [HeadScore(lyr, h, metric, float(s[lyr, h]))
                for metric, s in scores.items() for lyr in layers for h in range(m.cfg.n_heads)]
        ind = scores["induction"][ctx.layer]
        heads = [h for h in range(m.cfg.n_heads) if ind[h] >= o.induction_head_threshold]
        best = int(ind.argmax())
        return Result(head_scores=rows, data={"scores": scores, "induction_heads": heads},
                      summary={"induction_heads": [f"{ctx.layer}.{h}" for h in heads],
                               "best_induction_head": f"{ctx.layer}.{best}",
                               "best_induction_score": round(float(ind[best]), 4)})


def repeated_random_tokens(model, seq_len: int, n_seqs: int, generator: torch.Generator) -> torch.Tensor:
    """``[n_seqs, 2*seq_len]`` int64: uniform tokens, excluding ``<|endoftext|>``, repeated once."""
    V = model.cfg.d_vocab
    excl = set()
    if model.tokenizer is not None:
        eot = model.tokenizer.encode("<|endoftext|>")
        if len(eot) == 1:
            excl.add(eot[0])
    r = torch.randint(0, V, (n_seqs, seq_len), generator=generator)
    for e in excl:  # shift excluded ids to a neighbour (keeps the draw uniform enough)
        r[r == e] = (e + 1) % V
    return torch.cat([r, r], dim=1)
