"""Head roles: induction, duplicate-token and previous-token scores per head of every layer
up to the SAE's, on repeated random tokens (see :mod:`famfind.roles` for the exact scores:
mean attention to the target offset, Olsson et al. 2022). A head of the SAE's layer whose
induction score reaches ``induction_head_threshold`` is an induction head for selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from famfind.families import head_names, role_heads
from famfind.plugins import HeadScore, Heuristic, Options, Output, Result
from famfind.roles import head_scores


@dataclass(frozen=True)
class HeadRoleScores(Output):
    """``scores``: metric (``induction``, ``duplicate_token``, ``previous_token``) ->
    ``[layer + 1, n_heads]`` mean attention to the metric's target offset, in [0, 1], for
    every layer up to the SAE's; ``induction_heads``: heads of the SAE's ``layer`` whose
    induction score reaches the threshold (names ``"layer.head"``)."""

    scores: dict[str, torch.Tensor]
    layer: int
    induction_heads: list[int]
    induction_head_names: list[str]
    best_induction_head: str
    best_induction_score: float


@dataclass(frozen=True)
class HeadRolesOptions(Options):
    seq_len: int = 50  # length of each copy, as in the TransformerLens induction tutorial
    n_seqs: int = 32
    induction_head_threshold: float = 0.4  # induction score above which a head is an induction head


class HeadRoles(Heuristic):
    id = "head_roles"
    version = "0.1"
    needs = "model"
    produces = HeadRoleScores
    description = "Per-head induction / duplicate-token / previous-token scores on repeated random tokens"
    Options = HeadRolesOptions

    def run(self, ctx) -> Result:
        o, H = self.options, ctx.model.cfg.n_heads
        layers = list(range(ctx.layer + 1))
        scores = head_scores(ctx.model, layers, o.seq_len, o.n_seqs, ctx.generator)
        rows = [HeadScore(lyr, h, metric, float(s[lyr, h]))
                for metric, s in scores.items() for lyr in layers for h in range(H)]
        ind = scores["induction"][ctx.layer]
        heads = role_heads(ind, o.induction_head_threshold)
        best = int(ind.argmax())
        return Result(output=HeadRoleScores(scores, ctx.layer, heads, head_names(ctx.layer, heads),
                                            f"{ctx.layer}.{best}", round(float(ind[best]), 4)),
                      head_scores=rows)
