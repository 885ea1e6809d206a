"""Head roles: induction, duplicate-token and previous-token scores per head of every layer
up to the SAE's, on repeated random tokens (see :mod:`famfind.roles` for the exact scores:
mean attention to the target offset, Olsson et al. 2022). A head of the SAE's layer whose
induction score reaches ``induction_head_threshold`` is an induction head for selection.
"""

from __future__ import annotations

from dataclasses import dataclass

from famfind.plugins import HeadScore, Heuristic, Options, Result
from famfind.roles import head_scores


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
        o, H = self.options, ctx.model.cfg.n_heads
        layers = list(range(ctx.layer + 1))
        scores = head_scores(ctx.model, layers, o.seq_len, o.n_seqs, ctx.generator)
        rows = [HeadScore(lyr, h, metric, float(s[lyr, h]))
                for metric, s in scores.items() for lyr in layers for h in range(H)]
        ind = scores["induction"][ctx.layer]
        heads = [h for h in range(H) if ind[h] >= o.induction_head_threshold]
        best = int(ind.argmax())
        return Result(head_scores=rows, data={"scores": scores, "induction_heads": heads},
                      summary={"induction_heads": [f"{ctx.layer}.{h}" for h in heads],
                               "best_induction_head": f"{ctx.layer}.{best}",
                               "best_induction_score": round(float(ind[best]), 4)})
