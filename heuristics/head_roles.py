"""Head roles: induction, duplicate-token and previous-token scores per head of every layer
of the model, on repeated random tokens (see :mod:`famfind.roles` for the exact scores: mean
attention to the target offset, Olsson et al. 2022). Runs once per scan (``scope="model"``);
a head of an SAE's layer whose induction score reaches ``induction_head_threshold`` is an
induction head for that SAE's selection.
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
    ``[n_layers, n_heads]`` mean attention to the metric's target offset, in [0, 1], for every
    layer of the model; ``threshold``: the score at which a head takes a role;
    ``induction_heads``: every head whose induction score reaches it (``"layer.head"``);
    ``best_induction_head``/``best_induction_score``: the highest over the model."""

    scores: dict[str, torch.Tensor]
    threshold: float
    induction_heads: list[str]
    best_induction_head: str
    best_induction_score: float

    def heads(self, metric: str, layer: int, threshold: float | None = None) -> list[int]:
        """Head indices of ``layer`` whose ``metric`` score reaches ``threshold`` (default: the
        detector's ``induction_head_threshold``)."""
        return role_heads(self.scores[metric][layer], self.threshold if threshold is None else threshold)

    def induction_heads_in(self, layer: int) -> list[int]:
        """The induction heads of ``layer`` (indices)."""
        return self.heads("induction", layer)


@dataclass(frozen=True)
class HeadRolesOptions(Options):
    seq_len: int = 50  # length of each copy, as in the TransformerLens induction tutorial
    n_seqs: int = 32
    induction_head_threshold: float = 0.4  # induction score above which a head is an induction head


class HeadRoles(Heuristic):
    id = "head_roles"
    version = "0.2"
    needs = "model"
    scope = "model"
    produces = HeadRoleScores
    description = "Per-head induction / duplicate-token / previous-token scores on repeated random tokens, every layer"
    Options = HeadRolesOptions

    def run(self, ctx) -> Result:
        o, H = self.options, ctx.model.cfg.n_heads
        layers = list(range(ctx.model.cfg.n_layers))
        scores = head_scores(ctx.model, layers, o.seq_len, o.n_seqs, ctx.generator)
        rows = [HeadScore(lyr, h, metric, float(s[lyr, h]))
                for metric, s in scores.items() for lyr in layers for h in range(H)]
        ind = scores["induction"]
        heads = [n for lyr in layers for n in head_names(lyr, role_heads(ind[lyr], o.induction_head_threshold))]
        best = int(ind.argmax())
        return Result(output=HeadRoleScores(scores, o.induction_head_threshold, heads, f"{best // H}.{best % H}",
                                            round(float(ind.flatten()[best]), 4)),
                      head_scores=rows)
