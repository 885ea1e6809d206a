"""The public detector ("heuristic") API and its registry.

A detector is a subclass of :class:`Heuristic` with a short stable ``id``
(``[a-z][a-z0-9_]*``), a ``version``, what it ``needs`` and which detectors it
``requires``. famfind's built-ins (package ``heuristics``) and a user's plugins register
the same way: the entry-point group ``famfind.heuristics`` (``name = "module:Class"``), or
a local ``.py`` file passed with ``--plugin`` (every ``Heuristic`` subclass defined in it).

``needs``:
- ``"weights"``: reads SAE/model weights only; runs before the activation pass;
- ``"model"``: may also run the model (synthetic prompts, ablations);
- ``"activations"``: runs after the one streaming pass over the corpus; it may also
  implement ``start(ctx)`` + ``observe(batch, ctx)`` to see every batch during the pass.

``run(ctx)`` returns a :class:`Result`; famfind stores its rows in the scan's DuckDB
tables (``detections``, ``heads``, ``families``, ``validation``, plus any extra
``tables`` it returns, each gaining a ``scan_id`` column). Results of required detectors are in ``ctx.results[id]``. A detector that raises
is recorded as failed and skipped (its dependents too) unless ``--strict-plugins``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

from famfind.errors import FamfindError

ENTRY_POINT_GROUP = "famfind.heuristics"
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
Needs = Literal["weights", "model", "activations"]
NEEDS = ("weights", "model", "activations")


@dataclass(frozen=True)
class Options:
    """Base for a detector's options: a frozen dataclass; unknown keys are errors."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], owner: str = "") -> "Options":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FamfindError(f"options of {owner or cls.__name__}",
                               f"unknown key {unknown[0]!r}; known: {', '.join(sorted(names)) or 'none'}")
        out = {}
        for k, v in d.items():
            typ = names[k].type if isinstance(names[k].type, type) else type(names[k].default)
            try:
                out[k] = typ(v) if typ in (int, float, str) else v
            except (TypeError, ValueError):
                raise FamfindError(f"options of {owner or cls.__name__}",
                                   f"{k}={v!r} is not a valid {typ.__name__}") from None
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Detection:
    """One feature's verdict from one detector. ``evidence`` must be JSON-serialisable."""

    feature: int
    score: float
    passed: bool
    evidence: dict = field(default_factory=dict)


@dataclass
class HeadScore:
    """A per-head score, e.g. ``metric="induction"``, range and meaning per detector."""

    layer: int
    head: int
    metric: str
    score: float


@dataclass
class FamilyMember:
    family: str
    feature: int
    confidence: float


@dataclass
class Validation:
    """One family's validation row, the shape of the paper's induction table. Several
    detectors may fill parts of one family's row; fields left ``None`` are not overwritten."""

    family: str
    selected: int | None = None
    passed: int | None = None
    control: int | None = None
    control_passed: int | None = None
    ablation_tested: int | None = None
    ablation_off: int | None = None


@dataclass
class Result:
    """What a detector returns; ``data`` is kept in memory for dependents, not stored."""

    detections: list[Detection] = field(default_factory=list)
    head_scores: list[HeadScore] = field(default_factory=list)
    families: list[FamilyMember] = field(default_factory=list)
    validation: list[Validation] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # name -> polars.DataFrame, one row set per scan
    data: dict = field(default_factory=dict)


class Heuristic(abc.ABC):
    """Base class of every detector. Subclasses set the class attributes and ``run``."""

    id: ClassVar[str]
    version: ClassVar[str] = "0.1"
    needs: ClassVar[Needs] = "weights"
    requires: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()

    def start(self, ctx) -> None:
        """Before the activation pass (``needs="activations"`` only)."""

    def observe(self, batch, ctx) -> None:
        """Each :class:`famfind.activations.ActivationBatch` of the pass."""

    @abc.abstractmethod
    def run(self, ctx) -> Result:
        """Compute the detector's rows; ``ctx`` is a :class:`famfind.scan.ScanContext`."""


def validate_class(cls: type, origin: str) -> None:
    """Check a detector class's metadata; raises ``FamfindError`` naming ``origin``."""
    if not (inspect.isclass(cls) and issubclass(cls, Heuristic)):
        raise FamfindError(origin, "does not name a famfind.plugins.Heuristic subclass")
    hid = getattr(cls, "id", None)
    if not isinstance(hid, str) or not ID_RE.match(hid):
        raise FamfindError(origin, f"detector id {hid!r} must match [a-z][a-z0-9_]*")
    if cls.needs not in NEEDS:
        raise FamfindError(origin, f"needs={cls.needs!r}; must be one of {', '.join(NEEDS)}")
    if inspect.isabstract(cls):
        raise FamfindError(origin, "detector does not implement run(ctx)")


@dataclass
class Entry:
    cls: type[Heuristic]
    origin: str  # "package[entry]" or a file path


@dataclass
class LoadError:
    origin: str
    error: str


class Registry:
    """Detector classes by id. Refuses duplicates; an unknown id lists the known ones."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self.errors: list[LoadError] = []

    def register(self, cls: type[Heuristic], origin: str) -> None:
        validate_class(cls, origin)
        if cls.id in self._entries:
            raise FamfindError(origin, f"detector id {cls.id!r} is already registered by "
                               f"{self._entries[cls.id].origin}")
        self._entries[cls.id] = Entry(cls, origin)

    def get(self, hid: str) -> Entry:
        if hid not in self._entries:
            raise FamfindError(f"detector {hid!r}", f"unknown; known: {', '.join(sorted(self._entries))}")
        return self._entries[hid]

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, hid: str) -> bool:
        return hid in self._entries

    def load_entry_points(self, strict: bool = False) -> None:
        """Register every ``famfind.heuristics`` entry point; a broken one is recorded."""
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            origin = f"{dist}[{ep.name}]"
            try:
                self.register(ep.load(), origin)
            except Exception as e:  # a broken plugin must never stop a scan
                if strict:
                    raise FamfindError(origin, f"plugin failed to load ({_short(e)})") from None
                self.errors.append(LoadError(origin, _short(e)))

    def load_file(self, path: str | Path, strict: bool = True) -> list[str]:
        """Register every Heuristic subclass defined in a local ``.py`` file; returns ids."""
        p = Path(path)
        if not p.is_file():
            raise FamfindError(p, "plugin file not found")
        name = f"famfind_local_plugin_{abs(hash(str(p.resolve())))}"
        try:
            spec = importlib.util.spec_from_file_location(name, p)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except Exception as e:
            if strict:
                raise FamfindError(p, f"plugin failed to import ({_short(e)})") from None
            self.errors.append(LoadError(str(p), _short(e)))
            return []
        found = [c for c in vars(mod).values()
                 if inspect.isclass(c) and issubclass(c, Heuristic) and c is not Heuristic
                 and c.__module__ == name]
        if not found:
            raise FamfindError(p, "defines no famfind.plugins.Heuristic subclass")
        for c in found:
            self.register(c, str(p))
        return [c.id for c in found]


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:200]


def default_registry(plugin_files: list[str | Path] = (), strict: bool = False) -> Registry:
    """Registry with all installed entry points plus the given local plugin files."""
    reg = Registry()
    reg.load_entry_points(strict=strict)
    for f in plugin_files:
        reg.load_file(f, strict=True)
    return reg


def execution_order(reg: Registry, ids: list[str]) -> list[str]:
    """Topological order of ``ids`` by ``requires`` (stable by id); raises on a cycle or
    on a requirement that is neither selected nor registered."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(h: str, chain: tuple[str, ...]):
        if state.get(h) == 2:
            return
        if state.get(h) == 1:
            raise FamfindError(f"detector {h!r}", f"requirement cycle: {' -> '.join(chain + (h,))}")
        state[h] = 1
        for r in reg.get(h).cls.requires:
            if r not in ids:
                raise FamfindError(f"detector {h!r}", f"requires {r!r}, which is not selected "
                                   "(drop it from --skip or add it to --select)")
            visit(r, chain + (h,))
        state[h] = 2
        order.append(h)

    for h in sorted(ids):
        visit(h, ())
    return order
