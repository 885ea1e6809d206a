"""famfind's imports point one way (issue #24): no import cycle among its modules, counting
imports placed inside functions and under ``TYPE_CHECKING``, read from the source with ``ast``
(nothing is imported). A module is a module: none replaces its own class.

The modules are ``famfind/**.py`` and the two folders installed inside it, ``heuristics/``
(``famfind.heuristics``) and ``reports/`` (``famfind.reports``). An edge ``A -> B`` is an
``import B`` / ``from B import x`` in A (``from P import m``, with ``m`` a module of package
P, is an edge to ``P.m``). Importing ``P.m`` also runs package P's ``__init__``; that is not
counted as an edge to P, so a package's ``__init__`` may re-export its own modules as long as
they never import the package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"famfind": ROOT / "famfind", "famfind.heuristics": ROOT / "heuristics", "famfind.reports": ROOT / "reports"}


def modules() -> dict[str, Path]:
    """Every module name of the installed package -> its source file."""
    out = {}
    for pkg, folder in TREES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "data" in rel.parts:
                continue
            out[".".join([pkg, *parts])] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over famfind's own modules (every import statement,
    wherever it sits in the file)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # import famfind.x.y of a name inside module famfind.x
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_famfinds_modules():
    mods = modules()
    assert "famfind.runner" in mods and "famfind.heuristics.dfa" in mods and "famfind.reports.html" in mods
    found = cycles(import_graph(mods))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    """The check can fail: a cycle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert cycles(import_graph(mods)) == [["a", "b"]]


def test_no_module_replaces_its_own_class():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "__class__"
                                                    for t in node.targets):
                raise AssertionError(f"{name} assigns a __class__ (line {node.lineno})")


def test_there_is_no_module_named_scan_and_the_api_function_is_famfind_scan():
    import importlib.util

    import famfind

    assert importlib.util.find_spec("famfind.scan") is None
    assert callable(famfind.scan) and famfind.scan.__module__ == "famfind.api"


def test_model_backends_live_in_their_own_modules():
    from famfind.models import load_model
    from famfind.models.bridge import BridgeModel
    from famfind.models.gpt2 import HFGPT2Model
    from famfind.models.transformer_lens import TLModel

    assert {c.__module__ for c in (BridgeModel, HFGPT2Model, TLModel)} == {
        "famfind.models.bridge", "famfind.models.gpt2", "famfind.models.transformer_lens"}
    assert load_model.__module__ == "famfind.models"
    graph = import_graph(modules())
    assert "famfind.registry" not in graph["famfind.plugins"]  # the detector API does not load plugins
