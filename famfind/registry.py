"""The detector registry and plugin loading: every detector class by id, from the
``famfind.heuristics`` entry points (famfind's built-ins register there like any package's)
and local ``.py`` files (``--plugin``); the checks a class passes when it is registered
(:func:`validate_class`); which detectors a scan runs and in what order
(:func:`selected_ids`, :func:`execution_order`). The generic loaders
(:func:`load_entry_point_group`, :func:`load_plugin_file`) also load proxies
(:mod:`famfind.proxies`). A broken plugin is recorded and skipped unless ``strict``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import re
import sys
import textwrap
import zlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from famfind.errors import FamfindError
from famfind.plugins import NEEDS, SCOPES, Heuristic, Output, stored_tables
from famfind.schema import CORE_NAMES, Table, View

ENTRY_POINT_GROUP = "famfind.heuristics"
BUILTIN_PREFIX = "famfind.heuristics."  # the built-in detectors' modules
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def validate_class(cls: type, origin: str) -> None:
    """Check a detector class's metadata; raises ``FamfindError`` naming ``origin``."""
    if not (inspect.isclass(cls) and issubclass(cls, Heuristic)):
        raise FamfindError(origin, "does not name a famfind.plugins.Heuristic subclass")
    hid = getattr(cls, "id", None)
    if not isinstance(hid, str) or not ID_RE.match(hid):
        raise FamfindError(origin, f"detector id {hid!r} must match [a-z][a-z0-9_]*")
    if cls.needs not in NEEDS:
        raise FamfindError(origin, f"needs={cls.needs!r}; must be one of {', '.join(NEEDS)}")
    if cls.scope not in SCOPES:
        raise FamfindError(origin, f"scope={cls.scope!r}; must be one of {', '.join(SCOPES)}")
    if not isinstance(cls.reads_attention, bool) or (cls.reads_attention and cls.needs != "activations"):
        raise FamfindError(origin, f"detector {hid!r}: reads_attention must be a bool, and True only with "
                           "needs='activations' (attention comes with the pass's batches)")
    if cls.scope == "model" and cls.needs == "activations":
        raise FamfindError(origin, f"detector {hid!r}: scope='model' cannot observe the activation pass "
                           "(per-SAE statistics belong to scope='sae' detectors)")
    if inspect.isabstract(cls):
        raise FamfindError(origin, "detector does not implement run(ctx)")
    if cls.produces is not None and not (inspect.isclass(cls.produces) and issubclass(cls.produces, Output)
                                         and cls.produces is not Output and dataclasses.is_dataclass(cls.produces)):
        raise FamfindError(origin, f"detector {hid!r}: produces must be a dataclass subclass of famfind.plugins.Output")
    for r in cls.requires:
        if not (inspect.isclass(r) and issubclass(r, Output)):
            raise FamfindError(origin, f"detector {hid!r}: requires {r!r}, which is not an Output type")
    for t in cls.tables:
        if not isinstance(t, Table) or t.name in CORE_NAMES:
            raise FamfindError(origin, f"detector {hid!r}: table {getattr(t, 'name', t)!r} is not a Table "
                               "or is a core table")
    if cls.__module__.startswith(BUILTIN_PREFIX):
        return  # the built-ins' requires are checked by the tests (parsing their source cost ~0.8 s per process)
    undeclared = undeclared_reads(cls)
    if undeclared:
        raise FamfindError(origin, f"detector {hid!r} reads {sorted(t.__name__ for t in undeclared)[0]} "
                           "but does not list it in requires")


def undeclared_reads(cls: type) -> set[type]:
    """Output types the class reads with ``ctx.output(T)`` but neither requires nor produces."""
    return _outputs_read(cls) - set(cls.requires) - {cls.produces}


def _outputs_read(cls: type) -> set[type]:
    """Output types named in ``ctx.output(T)`` calls in the class's source (empty when the
    source is not available): the registration-time check of ``requires``."""
    found = set()
    for k in cls.__mro__:
        if k is not Heuristic and isinstance(k, type) and issubclass(k, Heuristic):
            found |= _outputs_named(k)
    return found


@functools.cache  # a class's source does not change in a process; parsing it cost ~4 ms per detector per registry
def _outputs_named(cls: type) -> frozenset[type]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    env = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    found = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("output", "outputs_by_sae")
                and len(node.args) == 1):
            a = node.args[0]
            obj = None
            if isinstance(a, ast.Name):
                obj = env.get(a.id)
            elif isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name):
                obj = getattr(env.get(a.value.id), a.attr, None)
            if inspect.isclass(obj) and issubclass(obj, Output):
                found.add(obj)
    return frozenset(found)


@dataclass
class Entry:
    cls: type[Heuristic]
    origin: str  # "package[entry]" or a file path


@dataclass
class LoadError:
    origin: str
    error: str


class Registry:
    """Detector classes by id. Refuses duplicate ids, two producers of one output type and
    two owners of one table; an unknown id lists the known ones."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self._producers: dict[type, str] = {}
        self._tables: dict[str, str] = {}
        self.errors: list[LoadError] = []

    def register(self, cls: type[Heuristic], origin: str) -> None:
        validate_class(cls, origin)
        if cls.id in self._entries:
            raise FamfindError(origin, f"detector id {cls.id!r} is already registered by "
                               f"{self._entries[cls.id].origin}")
        if cls.produces is not None and cls.produces in self._producers:
            raise FamfindError(origin, f"{cls.produces.__name__} is already produced by detector "
                               f"{self._producers[cls.produces]!r}")
        for t in (*cls.tables, *cls.views):
            if t.name in self._tables:
                raise FamfindError(origin, f"table {t.name!r} is already declared by detector {self._tables[t.name]!r}")
        self._entries[cls.id] = Entry(cls, origin)
        if cls.produces is not None:
            self._producers[cls.produces] = cls.id
        for t in (*cls.tables, *cls.views):
            self._tables[t.name] = cls.id

    def get(self, hid: str) -> Entry:
        if hid not in self._entries:
            raise FamfindError(f"detector {hid!r}", f"unknown; known: {', '.join(sorted(self._entries))}")
        return self._entries[hid]

    def producer(self, kind: type[Output], reader: str = "") -> str:
        """Id of the detector producing ``kind``; raises ``FamfindError`` if none is registered."""
        if kind not in self._producers:
            raise FamfindError(f"detector {reader!r}" if reader else kind.__name__,
                               f"requires {kind.__name__}, which no registered detector produces")
        return self._producers[kind]

    def dependencies(self, hid: str) -> list[str]:
        """Ids of the detectors producing what ``hid`` requires."""
        return [self.producer(k, hid) for k in self.get(hid).cls.requires]

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def table_owner(self, name: str) -> str | None:
        """Id of the detector declaring table or view ``name`` (``None``: not a detector's)."""
        return self._tables.get(name)

    def declared_tables(self) -> tuple[list[Table], list[View]]:
        """Every table (as stored: see :func:`stored_tables`) and view declared by a
        registered detector, by detector id."""
        cls = [self._entries[h].cls for h in self.ids()]
        return [t for c in cls for t in stored_tables(c)], [v for c in cls for v in c.views]

    def __contains__(self, hid: str) -> bool:
        return hid in self._entries

    def load_entry_points(self, strict: bool = False) -> None:
        """Register every ``famfind.heuristics`` entry point; a broken one is recorded."""
        self.errors += load_entry_point_group(ENTRY_POINT_GROUP, self.register, strict, "plugin")

    def load_file(self, path: str | Path, strict: bool = True) -> list[str]:
        """Register every Heuristic subclass defined in a local ``.py`` file; returns ids."""
        return load_plugin_file(path, Heuristic, self.register, strict, "plugin", self.errors)


def load_entry_point_group(group: str, register: Callable[[type, str], None], strict: bool,
                           what: str) -> list[LoadError]:
    """``register(cls, "dist[name]")`` every entry point of ``group`` (sorted by name). A
    broken one raises ``FamfindError`` with ``strict``, else it is returned as a
    :class:`LoadError` (``what``: "plugin", "proxy", for the message)."""
    errors = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        origin = f"{ep.dist.name if ep.dist is not None else '?'}[{ep.name}]"
        try:
            register(ep.load(), origin)
        except Exception as e:  # a broken plugin must never stop a scan
            if strict:
                raise FamfindError(origin, f"{what} failed to load ({_short(e)})") from None
            errors.append(LoadError(origin, _short(e)))
    return errors


def load_plugin_file(path: str | Path, base: type, register: Callable[[type, str], None], strict: bool,
                     what: str, errors: list[LoadError]) -> list[str]:
    """Import a local ``.py`` file as its own module and ``register(cls, path)`` every
    concrete ``base`` subclass it defines; returns their ids. A missing file always raises
    ``FamfindError``; a file that fails to import, defines none or declares a bad one raises
    with ``strict``, else it is appended to ``errors`` and nothing is registered."""
    p = Path(path)
    if not p.is_file():
        raise FamfindError(p, f"{what} file not found")
    name = f"famfind_local_{what}_{zlib.crc32(str(p.resolve()).encode()):08x}"  # the same in every process (Ray workers)
    try:
        spec = importlib.util.spec_from_file_location(name, p)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except Exception as e:
        if strict:
            raise FamfindError(p, f"{what} failed to import ({_short(e)})") from None
        errors.append(LoadError(str(p), _short(e)))
        return []
    found = [c for c in vars(mod).values()
             if inspect.isclass(c) and issubclass(c, base) and c is not base
             and c.__module__ == name and not inspect.isabstract(c)]
    try:
        if not found:
            raise FamfindError(p, f"defines no {base.__module__}.{base.__name__} subclass")
        for c in found:
            register(c, str(p))
    except FamfindError as e:
        if strict:
            raise
        errors.append(LoadError(str(p), str(e)))
        return []
    return [c.id for c in found]




def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200]


def default_registry(plugin_files: list[str | Path] = (), strict: bool = False) -> Registry:
    """Registry with all installed entry points plus the given local plugin files. A plugin
    that cannot be loaded (an entry point or a file that fails to import, defines no
    detector, or declares a bad one) is recorded in ``reg.errors`` and skipped; with
    ``strict`` it raises ``FamfindError`` naming it. A plugin file that does not exist is
    always an error."""
    reg = Registry()
    reg.load_entry_points(strict=strict)
    for f in plugin_files:
        reg.load_file(f, strict=strict)
    return reg


def selected_ids(reg: Registry, select: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> list[str]:
    """The detectors a scan runs: ``select`` (all when empty) plus what they require, less
    ``skip``. Unknown ids are an error that lists the known ones."""
    for hid in (*select, *skip):
        reg.get(hid)
    ids = list(select) if select else reg.ids()
    if select:  # pull in the producers of what selected detectors require
        todo = list(ids)
        while todo:
            for r in reg.dependencies(todo.pop()):
                if r not in ids:
                    ids.append(r)
                    todo.append(r)
    return [h for h in ids if h not in skip]


def execution_order(reg: Registry, ids: list[str]) -> list[str]:
    """Topological order of ``ids`` by ``requires`` (stable by id); raises on a cycle or
    on a requirement whose producer is not selected."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(h: str, chain: tuple[str, ...]):
        if state.get(h) == 2:
            return
        if state.get(h) == 1:
            raise FamfindError(f"detector {h!r}", f"requirement cycle: {' -> '.join(chain + (h,))}")
        state[h] = 1
        for r in reg.dependencies(h):
            if r not in ids:
                raise FamfindError(f"detector {h!r}", f"requires {r!r}, which is not selected "
                                   "(drop it from --skip or add it to --select)")
            visit(r, chain + (h,))
        state[h] = 2
        order.append(h)

    for h in sorted(ids):
        visit(h, ())
    return order
