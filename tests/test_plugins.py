"""The detector contract: registry (entry points, duplicates, unknown ids, bad metadata,
cycles), typed outputs read by type, declared tables, and what a broken detector does."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

from famfind.errors import FamfindError
from famfind.plugins import Column, Heuristic, Output, Result, Table
from famfind.registry import Registry, default_registry, execution_order, selected_ids

OUT: dict[str, type] = {}  # detector id -> its output type (module-level, so the source check resolves it)


def _out(hid):
    if hid not in OUT:
        OUT[hid] = dataclasses.make_dataclass(f"Out_{hid}", [("x", int)], bases=(Output,), frozen=True)
    return OUT[hid]


def _cls(hid, requires=(), needs="weights"):
    return type(f"H_{hid}", (Heuristic,), {"id": hid, "requires": tuple(_out(r) for r in requires), "needs": needs,
                                           "produces": _out(hid), "run": lambda self, ctx: Result(output=_out(hid)(1))})


def test_builtins_come_through_the_entry_point_group():
    reg = default_registry()
    assert {"head_roles", "head_attribution", "feature_logits", "induction_behaviour",
            "induction_selection", "induction_ablation"} <= set(reg.ids())
    assert reg.get("head_roles").origin == "famfind[head_roles]"
    assert reg.get("head_roles").cls.__module__ == "famfind.heuristics.head_roles"
    assert not reg.errors


def test_duplicates_refused_and_unknown_lists_known():
    reg = Registry()
    reg.register(_cls("a"), "x.py")
    with pytest.raises(FamfindError, match="already registered by x.py"):
        reg.register(_cls("a"), "y.py")
    with pytest.raises(FamfindError, match="unknown; known: a"):
        reg.get("b")


def test_one_producer_per_output_type_and_one_owner_per_table():
    reg = Registry()
    reg.register(_cls("a"), "x.py")
    twin = type("Twin", (Heuristic,), {"id": "twin", "produces": _out("a"), "run": lambda self, ctx: Result()})
    with pytest.raises(FamfindError, match="Out_a is already produced by detector 'a'"):
        reg.register(twin, "y.py")
    t = Table("t_one", (Column("feature", "INTEGER", "f"),), "doc")
    reg.register(type("T1", (Heuristic,), {"id": "t1", "tables": (t,), "run": lambda self, ctx: Result()}), "p.py")
    with pytest.raises(FamfindError, match="already declared by detector 't1'"):
        reg.register(type("T2", (Heuristic,), {"id": "t2", "tables": (t,), "run": lambda self, ctx: Result()}), "p.py")
    with pytest.raises(FamfindError, match="core table"):
        reg.register(type("T3", (Heuristic,), {"id": "t3", "tables": (Table("families", t.columns, "d"),),
                                               "run": lambda self, ctx: Result()}), "p.py")


@pytest.mark.parametrize("hid, needs, msg", [("Bad-Id", "weights", "must match"), ("ok", "gpu", "needs='gpu'")])
def test_bad_metadata(hid, needs, msg):
    with pytest.raises(FamfindError, match=msg):
        Registry().register(_cls(hid, needs=needs), "p.py")


def test_requires_and_produces_must_be_output_types():
    with pytest.raises(FamfindError, match="requires 'head_roles', which is not an Output type"):
        Registry().register(type("S", (Heuristic,), {"id": "s", "requires": ("head_roles",),
                                                     "run": lambda self, ctx: Result()}), "p.py")
    with pytest.raises(FamfindError, match="produces must be a dataclass subclass"):
        Registry().register(type("S", (Heuristic,), {"id": "s", "produces": dict,
                                                     "run": lambda self, ctx: Result()}), "p.py")


OutA = _out("a")


class Sneaky(Heuristic):
    """Reads an output it does not require: refused when it is registered."""

    id = "sneaky"

    def run(self, ctx):
        ctx.output(OutA)
        return Result()


def test_reading_an_undeclared_output_is_refused_at_registration():
    with pytest.raises(FamfindError, match="sneaky' reads Out_a but does not list it in requires"):
        Registry().register(Sneaky, "p.py")


def test_context_refuses_undeclared_reads_and_stats_at_run_time():
    from famfind.plugins import ScanContext

    a, b = _cls("a"), _cls("b", ("a",))
    ctx = ScanContext(None, None, None, None, outputs={_out("a"): _out("a")(3)})
    assert ctx.view(b).output(_out("a")).x == 3
    with pytest.raises(FamfindError, match="'a': reads Out_b but does not list it in requires"):
        ctx.view(a).output(_out("b"))
    with pytest.raises(FamfindError, match='needs="activations" is not set'):
        ctx.view(a).stats


def test_output_summary_is_its_plain_fields():
    @dataclasses.dataclass(frozen=True)
    class O(Output):
        share: torch.Tensor
        heads: list
        name: str
        k: int

    assert O(torch.ones(3), [1, 2], "x", 4).summary() == {"heads": [1, 2], "name": "x", "k": 4}


def test_execution_order_and_cycles():
    reg = Registry()
    for c in (_cls("c", ("b",)), _cls("b", ("a",)), _cls("a")):
        reg.register(c, "p.py")
    assert execution_order(reg, ["a", "b", "c"]) == ["a", "b", "c"]
    assert selected_ids(reg, ("c",)) == ["c", "b", "a"]  # the producers of what it requires come along
    with pytest.raises(FamfindError, match="requires 'a', which is not selected"):
        execution_order(reg, ["b", "c"])
    reg2 = Registry()
    reg2.register(_cls("x", ("y",)), "p.py")
    reg2.register(_cls("y", ("x",)), "p.py")
    with pytest.raises(FamfindError, match="requirement cycle"):
        execution_order(reg2, ["x", "y"])


def test_declared_table_conform():
    t = Table("t_conf", (Column("feature", "INTEGER", "f"), Column("score", "DOUBLE", "s")), "doc")
    df = t.conform(pl.DataFrame({"score": [0.5], "feature": [3]}), "detector 'x'")
    assert df.columns == ["feature", "score"] and df.schema["feature"] == pl.Int32
    with pytest.raises(FamfindError, match="undeclared column 'extra'"):
        t.conform(pl.DataFrame({"feature": [1], "score": [0.5], "extra": [1]}), "detector 'x'")
    with pytest.raises(FamfindError, match="missing column 'score'"):
        t.conform(pl.DataFrame({"feature": [1]}), "detector 'x'")
    with pytest.raises(FamfindError, match="not a polars.DataFrame"):
        t.conform({"feature": [1]}, "detector 'x'")


def test_a_plugin_drawing_random_numbers_changes_no_builtin_result(planted_paths, tmp_path):
    """Each detector draws from its own generator (seeded by the scan's seed and its id): a
    plugin that runs first and draws heavily leaves the built-ins' random samples as they were."""
    from famfind.heuristics.induction import InductionFamily
    from famfind.heuristics.head_roles import HeadRoleScores
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    plug = tmp_path / "greedy.py"
    plug.write_text("import torch\nfrom famfind.plugins import Heuristic, Result\n\n"
                    "class Greedy(Heuristic):\n    id = 'aaa_greedy'\n    scope = 'model'\n\n"
                    "    def run(self, ctx):\n        torch.rand(100_000, generator=ctx.generator)\n"
                    "        return Result()\n")
    base = dict(sae=str(planted_paths["sae"]), corpus=str(planted_paths["corpus"]), seq_len=64,
                select=("induction_selection",))
    a = run_scan(ScanConfig(**base))
    b = run_scan(ScanConfig(**{**base, "select": ("aaa_greedy", "induction_selection")}, plugins=(str(plug),)))
    assert [r.id for r in b.runs][0] == "aaa_greedy" and b.runs[0].status == "ok"  # it ran first
    sa, sb = a.output(HeadRoleScores).scores, b.output(HeadRoleScores).scores  # from random prompts
    assert all(torch.equal(sa[k][lyr], sb[k][lyr]) for k in sa for lyr in range(len(sa[k])))
    assert torch.equal(a.output(InductionFamily).control, b.output(InductionFamily).control)


def test_every_built_in_detector_requires_what_it_reads():
    """Registration skips the source check for the built-ins (famfind.heuristics.*), so it runs here."""
    from famfind.registry import BUILTIN_PREFIX, default_registry, undeclared_reads

    reg = default_registry()
    built_in = [reg.get(h).cls for h in reg.ids() if reg.get(h).cls.__module__.startswith(BUILTIN_PREFIX)]
    assert len(built_in) >= 26
    assert {c.id: sorted(t.__name__ for t in undeclared_reads(c)) for c in built_in if undeclared_reads(c)} == {}
