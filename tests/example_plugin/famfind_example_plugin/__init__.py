"""A third-party detector: reads two built-ins' typed outputs (the induction family and the
top boosted tokens) and writes a table of its own."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from famfind.heuristics.attribution import TopBoostedTokens
from famfind.heuristics.induction import InductionFamily
from famfind.plugins import Column, Heuristic, Output, Result, Table


@dataclass(frozen=True)
class InductionTokenCounts(Output):
    """``n_members``: induction-family features; ``n_tokens``: distinct tokens they predict."""

    n_members: int
    n_tokens: int


class InductionTokens(Heuristic):
    """The token each induction-family feature predicts (its top boosted token)."""

    id = "induction_tokens"
    version = "0.1.0"
    needs = "activations"
    requires = (InductionFamily, TopBoostedTokens)
    produces = InductionTokenCounts
    tables = (Table("induction_tokens", (Column("feature", "INTEGER", "induction-family feature"),
                                         Column("token", "INTEGER", "its top boosted token")),
                    "the token each induction-family feature predicts"),)
    description = "Top boosted token of each induction-family feature (example third-party plugin)"

    def run(self, ctx) -> Result:
        members = torch.nonzero(ctx.output(InductionFamily).members).flatten()
        tokens = ctx.output(TopBoostedTokens).top_token[members]
        return Result(output=InductionTokenCounts(members.numel(), int(tokens.unique().numel())),
                      tables={"induction_tokens": pl.DataFrame({"feature": members.tolist(),
                                                                "token": tokens.tolist()})})
