"""Head polysemanticity: do a head's most attributed features share one role?

Kissane et al. (2024, §4.3) inspect the top features of every GPT-2 small attention head and
report that about 90% of heads are polysemantic (their features do several unrelated things).
Here, per head of the SAE's layer, the ``top_n`` live features (default 10, the paper's
inspection depth) with the highest head attribution (:mod:`famfind.heuristics.attribution`)
each take a *role*: their primary family (the family in which they have the highest
confidence, ties by family name: the ``families.is_primary`` rule) or none. Then:

- *monosemantic*: at least ``share`` (0.8) of the top features hold the same role;
- *polysemantic*: not monosemantic, and at least ``min_members`` (2) of the top features hold
  roles other than the commonest one (two families of >= 2 each, or one family and several
  features of other roles);
- *unresolved*: neither, i.e. the top features that are not in the commonest role are mostly
  in no family, so families cannot say whether the head has one role (an LLM label of each
  feature would be needed).

A feature's role is its primary behaviour or proxy family; a feature in none takes the class of
its mechanism family (``feature_mechanism``, validated by substitution: ``previous_token``,
``short_range``, ...; the class, not the family name with its head, so a previous-token
behaviour family and the previous-token mechanism class are one role). A head whose top
features all read the previous token is monosemantic; one whose top features read the previous
token, short-range and long-range sources is polysemantic.

Head-loading clusters are not used: they group features by the heads they load on, so a
head's top features share its cluster by construction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl
import torch

from famfind.families import FamilyOutcome
from famfind.heuristics.attribution import HeadAttributionMatrix
from famfind.heuristics.context import ContextFamilies
from famfind.heuristics.induction import InductionFamily
from famfind.heuristics.long_prefix import LongPrefixFamily
from famfind.heuristics.mechanism import MechanismRecords
from famfind.heuristics.name_mover import NameMoverFamily
from famfind.heuristics.successor import SuccessorFamily
from famfind.heuristics.token_roles import DuplicateTokenFamily, PreviousTokenFamily
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table

FAMILY_TYPES = (InductionFamily, PreviousTokenFamily, DuplicateTokenFamily, SuccessorFamily, NameMoverFamily,
                LongPrefixFamily)


def family_outcomes(ctx) -> list[FamilyOutcome]:
    """Every built-in family's typed output for the reading detector's SAE (the reader must
    require ``ContextFamilies`` and :data:`FAMILY_TYPES`)."""
    cf = ctx.output(ContextFamilies)
    return [ctx.output(t) for t in FAMILY_TYPES] + [cf.local_context, cf.high_level_context]


def primary_roles(outcomes: list[FamilyOutcome], d_sae: int) -> list[str | None]:
    """Each feature's primary family (highest confidence; ties: family name) or ``None``."""
    best: list[tuple[float, str] | None] = [None] * d_sae
    for o in outcomes:
        conf = o.score if o.confidence is None else o.confidence
        for f in torch.nonzero(o.members).flatten().tolist():
            key = (-float(conf[f]), o.family)
            if best[f] is None or key < best[f]:
                best[f] = key
    return [None if b is None else b[1] for b in best]


def head_verdict(roles: list[str | None], share: float = 0.8, min_members: int = 2) -> str:
    """``monosemantic`` / ``polysemantic`` / ``unresolved`` for one head's top features' roles
    (see the module doc)."""
    fams = Counter(r for r in roles if r is not None)
    top = fams.most_common(1)[0][1] if fams else 0
    if roles and fams and top >= share * len(roles):
        return "monosemantic"
    if sum(fams.values()) - top >= min_members:
        return "polysemantic"
    return "unresolved"


@dataclass(frozen=True)
class PolysemanticityOptions(Options):
    top_n: int = 10  # the paper's inspection depth
    share: float = 0.8  # of the top features in one family: monosemantic
    min_members: int = 2  # top features outside the commonest role a polysemantic head needs


@dataclass(frozen=True)
class HeadPolysemanticity(Output):
    """``verdict``: head name ``"l.h"`` -> monosemantic / polysemantic / unresolved;
    ``top_roles``: head -> the primary family (or ``None``) of each of its top features."""

    verdict: dict[str, str]
    top_roles: dict[str, list]
    n_heads: int
    n_polysemantic: int
    n_monosemantic: int
    n_unresolved: int


class HeadPolysemanticityCheck(Heuristic):
    id = "head_polysemanticity"
    version = "0.2"
    needs = "activations"
    produces = HeadPolysemanticity
    requires = (HeadAttributionMatrix, ContextFamilies, MechanismRecords, *FAMILY_TYPES)
    tables = (Table("head_polysemanticity", (
        Column("layer", "INTEGER", "the head's layer"),
        Column("head", "INTEGER", "head index"),
        Column("verdict", "VARCHAR", "monosemantic, polysemantic or unresolved (rule: famfind heuristics list)"),
        Column("n_top", "INTEGER", "live features inspected (the top_n by head attribution)"),
        Column("families", "VARCHAR[]", "distinct primary families among them"),
        Column("top_features", "INTEGER[]", "the features, most attributed first"),
        Column("top_roles", "VARCHAR[]", "each one's primary family, else its mechanism class ('' = none)"),
    ), "per head: the roles of its most attributed live features, and whether they share one"),)
    description = "Per head: monosemantic, polysemantic or unresolved from its top features' families"
    Options = PolysemanticityOptions

    def run(self, ctx) -> Result:
        o = self.options
        att = ctx.output(HeadAttributionMatrix).attribution  # [d_sae, n_heads]
        F, H = att.shape
        roles = primary_roles(family_outcomes(ctx), F)
        mech = ctx.output(MechanismRecords)
        roles = [r or (mech.classes[int(mech.mechanism[f])] if mech.family[f] else None)  # behaviour / proxy first
                 for f, r in enumerate(roles)]
        live = ~ctx.stats.dead
        verdict, top_roles, rows = {}, {}, []
        for h in range(H):
            a = torch.where(live, att[:, h], torch.tensor(-1.0))
            top = [f for f in a.argsort(descending=True, stable=True)[:o.top_n].tolist() if live[f]]
            r = [roles[f] for f in top]
            name = f"{ctx.layer}.{h}"
            verdict[name] = head_verdict(r, o.share, o.min_members)
            top_roles[name] = r
            rows.append({"layer": ctx.layer, "head": h, "verdict": verdict[name], "n_top": len(top),
                         "families": sorted({x for x in r if x}), "top_features": top,
                         "top_roles": [x or "" for x in r]})
        n = Counter(verdict.values())
        return Result(output=HeadPolysemanticity(verdict, top_roles, H, n["polysemantic"], n["monosemantic"],
                                                 n["unresolved"]),
                      tables={"head_polysemanticity": pl.DataFrame(rows)})

    @classmethod
    def render_terminal(cls, section) -> None:
        s = section.summary
        if not s:
            return
        rows = section.query("SELECT layer || '.' || head, verdict, array_to_string(families, ', ') "
                             "FROM head_polysemanticity WHERE scan_id = ? AND sae = ? ORDER BY layer, head")
        section.table("Head polysemanticity (top features' roles)", ("head", "verdict", "families"), rows)
        section.line(f"{s['n_polysemantic']} of {s['n_heads']} heads polysemantic, {s['n_monosemantic']} "
                     f"monosemantic, {s['n_unresolved']} unresolved (most top features in no family) "
                     "(roles: behaviour/proxy family, else mechanism family; paper: ~90% of GPT-2 small's heads "
                     "polysemantic)")
