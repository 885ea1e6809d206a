"""The detector registry: entry points, duplicates, unknown ids, bad metadata, cycles."""

from __future__ import annotations

import pytest

from famfind.errors import FamfindError
from famfind.plugins import Heuristic, Registry, Result, default_registry, execution_order


def _cls(hid, requires=(), needs="weights"):
    return type(f"H_{hid}", (Heuristic,), {"id": hid, "requires": requires, "needs": needs,
                                           "run": lambda self, ctx: Result()})


def test_builtins_come_through_the_entry_point_group():
    reg = default_registry()
    assert {"head_roles", "head_attribution", "feature_logits", "induction_behaviour",
            "induction_selection", "induction_ablation"} <= set(reg.ids())
    assert reg.get("head_roles").origin == "famfind[head_roles]"
    assert not reg.errors


def test_duplicates_refused_and_unknown_lists_known():
    reg = Registry()
    reg.register(_cls("a"), "x.py")
    with pytest.raises(FamfindError, match="already registered by x.py"):
        reg.register(_cls("a"), "y.py")
    with pytest.raises(FamfindError, match="unknown; known: a"):
        reg.get("b")


@pytest.mark.parametrize("hid, needs, msg", [("Bad-Id", "weights", "must match"), ("ok", "gpu", "needs='gpu'")])
def test_bad_metadata(hid, needs, msg):
    with pytest.raises(FamfindError, match=msg):
        Registry().register(_cls(hid, needs=needs), "p.py")


def test_abstract_run_is_refused():
    class NoRun(Heuristic):
        id = "norun"

    with pytest.raises(FamfindError, match="does not implement run"):
        Registry().register(NoRun, "p.py")


def test_execution_order_and_cycles():
    reg = Registry()
    for c in (_cls("c", ("b",)), _cls("b", ("a",)), _cls("a")):
        reg.register(c, "p.py")
    assert execution_order(reg, ["a", "b", "c"]) == ["a", "b", "c"]
    with pytest.raises(FamfindError, match="requires 'a', which is not selected"):
        execution_order(reg, ["b", "c"])
    reg2 = Registry()
    reg2.register(_cls("x", ("y",)), "p.py")
    reg2.register(_cls("y", ("x",)), "p.py")
    with pytest.raises(FamfindError, match="requirement cycle"):
        execution_order(reg2, ["x", "y"])
