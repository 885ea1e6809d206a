"""The public detector ("heuristic") API: typed outputs, declared tables, the registry.

A detector is a subclass of :class:`Heuristic` with a short stable ``id``
(``[a-z][a-z0-9_]*``), a ``version``, what it ``needs``, the typed output it ``produces``
(a frozen :class:`Output` dataclass) and the outputs it ``requires`` (their types). famfind's
built-ins (``famfind.heuristics``) and a user's plugins register the same way: the
entry-point group ``famfind.heuristics`` (``name = "module:Class"``), or a local ``.py`` file
passed with ``--plugin`` (every ``Heuristic`` subclass defined in it).

``needs``:
- ``"weights"``: reads SAE/model weights only; runs before the activation pass;
- ``"model"``: may also run the model (synthetic prompts, ablations);
- ``"activations"``: runs after the one streaming pass over the corpus and reads
  ``ctx.stats``; it may also implement ``start(ctx)`` + ``observe(batch, ctx)`` to see every
  batch of the pass and then ``merge(other)`` to fold in another instance that observed
  another shard of the corpus (the pass may be split, see :mod:`famfind.activations`).

``scope``: ``"sae"`` (the default) runs the detector once per SAE of the scan, with
``ctx.sae`` that SAE (``ctx.sae_id`` its name, ``ctx.layer`` its layer) and its outputs and
rows keyed by the SAE (every per-feature table carries ``sae`` and ``layer``); ``"model"``
runs it once per scan, for facts of the model alone (head roles, composition) or across SAEs:
it reads a per-SAE output of every SAE with ``ctx.outputs_by_sae(Type)`` and then runs after
all of them. A per-SAE detector reads a model detector's output with ``ctx.output(Type)``.

``run(ctx)`` returns a :class:`Result`: the typed ``output`` (read by later detectors with
``ctx.output(Type)``; its scalar fields are stored as the detector's ``summary``) and rows for
the scan's DuckDB tables (``detections``, ``heads``, ``families``, ``validation``, plus the
detector's own declared ``tables``). Reading an output that is not in ``requires`` is
refused when the class is registered (its source is checked) and again at run time. A
detector that raises, or returns a malformed ``Result``, is recorded as failed and skipped
(its dependents too) unless ``--strict-plugins``.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import importlib.util
import inspect
import re
import sys
import textwrap
import zlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, TypeVar

import torch

from famfind.errors import FamfindError
from famfind.schema import CORE_NAMES, Column, Table, View  # noqa: F401  (re-exported for plugins)

if TYPE_CHECKING:
    from pathlib import Path

    from famfind.activations import ActivationBatch, FeatureStats
    from famfind.corpus import TokenCorpus
    from famfind.model import AttnModel
    from famfind.sae import SAE
    from famfind.scan import ScanConfig

ENTRY_POINT_GROUP = "famfind.heuristics"
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
Needs = Literal["weights", "model", "activations"]
NEEDS = ("weights", "model", "activations")
SCOPES = ("sae", "model")
O = TypeVar("O", bound="Output")


@dataclass(frozen=True)
class Options:
    """Base for a detector's options: a frozen dataclass; unknown keys are errors."""

    @classmethod
    def from_dict(cls, d: dict[str, Any], owner: str = "") -> "Options":
        """Options from ``{key: value}`` (TOML values or ``--set`` strings); raises
        ``FamfindError`` naming ``owner`` for an unknown key or a value of the wrong type."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FamfindError(f"options of {owner or cls.__name__}",
                               f"unknown key {unknown[0]!r}; known: {', '.join(sorted(names)) or 'none'}")
        out = {}
        for k, v in d.items():
            typ = names[k].type if isinstance(names[k].type, type) else type(names[k].default)
            try:
                out[k] = _coerce(typ, v)
            except (TypeError, ValueError):
                raise FamfindError(f"options of {owner or cls.__name__}",
                                   f"{k}={v!r} is not a valid {typ.__name__}") from None
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(typ: type, v: Any) -> Any:
    if typ is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
            return v.lower() in ("true", "1", "yes")
        raise ValueError(v)
    if typ is int and isinstance(v, str):
        return int(v)
    return typ(v) if typ in (int, float, str) else v


@dataclass(frozen=True)
class Output:
    """Base of a detector's typed output: subclass it as a frozen dataclass whose field
    docs give shapes and units. Later detectors read it with ``ctx.output(Type)``. Its
    scalar fields (bool/int/float/str/None, lists/dicts of them, nested outputs) are its stored
    serialisation (``detector_runs.summary``); tensors stay in memory and reach the database
    through the detector's tables."""

    def summary(self) -> dict[str, Any]:
        """The JSON-able fields of this output (tensors and other objects left out)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Output):
                out[f.name] = v.summary()
            elif _plain(v):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


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
    """What ``run`` returns: the typed ``output`` (an instance of the detector's
    ``produces``) and rows for the scan's tables. ``tables`` maps each of the detector's
    declared table names to a ``polars.DataFrame`` of its declared columns."""

    output: Output | None = None
    detections: list[Detection] = field(default_factory=list)
    head_scores: list[HeadScore] = field(default_factory=list)
    families: list[FamilyMember] = field(default_factory=list)
    validation: list[Validation] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanContext:
    """What a detector sees: the ``sae`` (:class:`famfind.sae.SAE`; ``None`` for a
    ``scope="model"`` detector) named ``sae_id``, every SAE of the scan (``saes``: name ->
    SAE, in layer order), the ``model`` (:class:`famfind.model.AttnModel`), the ``corpus``
    (tokens ``[n_seq, seq_len]``), the scan ``config``, a seeded ``generator`` (the detector's
    own: seeded from the scan's seed and the detector's id, so other detectors never change
    its draws) and ``log``.
    ``ctx.output(T)`` returns the typed output of the detector that produces ``T`` (this
    SAE's, or the model detector's; it must be in the reader's ``requires``);
    ``ctx.outputs_by_sae(T)`` every SAE's; ``ctx.stats``
    (:class:`famfind.activations.FeatureStats`) is there for ``needs="activations"``
    detectors once the pass is done."""

    sae: SAE | None
    model: AttnModel
    corpus: TokenCorpus
    config: ScanConfig
    generator: torch.Generator = field(default_factory=torch.Generator)
    log: Callable[[str], None] = lambda msg: None
    outputs: dict[type, Output] = field(default_factory=dict)
    feature_stats: FeatureStats | None = None
    reader: str = ""  # the detector this view is for ("" = the scan itself, reads anything)
    allowed: frozenset = frozenset()
    may_read_stats: bool = True
    sae_id: str = ""
    saes: dict[str, SAE] = field(default_factory=dict)
    shared: dict[type, Output] = field(default_factory=dict)  # outputs of scope="model" detectors
    by_sae: dict[str, dict[type, Output]] = field(default_factory=dict)  # every SAE's outputs

    @property
    def layer(self) -> int:
        """The SAE's layer (of ``blocks.{layer}.attn.hook_z``); ``FamfindError`` for a
        ``scope="model"`` detector, which has no SAE."""
        if self.sae is None:
            raise FamfindError(f"detector {self.reader or 'scan'!r}", "has scope='model': there is no ctx.layer")
        return self.sae.layer

    def output(self, kind: type[O]) -> O:
        """The typed output of type ``kind``; raises ``FamfindError`` when the reading
        detector does not require it, or when it was not produced."""
        if self.reader and kind not in self.allowed:
            raise FamfindError(f"detector {self.reader!r}", f"reads {kind.__name__} but does not list it in requires")
        if kind in self.outputs:
            return self.outputs[kind]  # type: ignore[return-value]
        if kind in self.shared:
            return self.shared[kind]  # type: ignore[return-value]
        raise FamfindError(f"detector {self.reader or 'scan'!r}", f"no {kind.__name__} was produced"
                           + (f" for SAE {self.sae_id}" if self.sae_id else ""))

    def outputs_by_sae(self, kind: type[O]) -> dict[str, O]:
        """``{sae_id: output}`` of type ``kind`` for every SAE that produced it (a per-SAE
        output read across SAEs, e.g. by a ``scope="model"`` detector)."""
        if self.reader and kind not in self.allowed:
            raise FamfindError(f"detector {self.reader!r}", f"reads {kind.__name__} but does not list it in requires")
        return {sid: outs[kind] for sid, outs in self.by_sae.items() if kind in outs}  # type: ignore[misc]

    @property
    def stats(self) -> FeatureStats:
        """Per-feature statistics of the activation pass (``needs="activations"`` only)."""
        if not self.may_read_stats:
            raise FamfindError(f"detector {self.reader!r}", 'reads ctx.stats but needs="activations" is not set')
        if self.feature_stats is None:
            raise FamfindError(f"detector {self.reader!r}", "ctx.stats read before the activation pass")
        return self.feature_stats

    def view(self, det: type[Heuristic]) -> ScanContext:
        """This context as detector ``det`` sees it (only its required outputs readable)."""
        return dataclasses.replace(self, reader=det.id, allowed=frozenset((*det.requires, det.produces)),
                                   may_read_stats=det.needs == "activations")


class Heuristic(abc.ABC):
    """Base class of every detector. Subclasses set the class attributes and ``run``.

    ``produces``: the :class:`Output` subclass ``run`` returns in ``Result.output`` (``None``:
    the detector only writes rows);
    ``requires``: the output types it reads (their producers run first); ``tables``/``views``:
    the :class:`famfind.schema.Table` / :class:`famfind.schema.View` it writes.
    """

    id: ClassVar[str]
    version: ClassVar[str] = "0.1"
    needs: ClassVar[Needs] = "weights"
    scope: ClassVar[Literal["sae", "model"]] = "sae"
    produces: ClassVar[type[Output] | None] = None
    requires: ClassVar[tuple[type[Output], ...]] = ()
    tables: ClassVar[tuple[Table, ...]] = ()
    views: ClassVar[tuple[View, ...]] = ()
    description: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()

    def start(self, ctx: ScanContext) -> None:
        """Before the activation pass (``needs="activations"`` only)."""

    def observe(self, batch: ActivationBatch, ctx: ScanContext) -> None:
        """Each :class:`famfind.activations.ActivationBatch` of the pass."""

    def merge(self, other: Heuristic) -> None:
        """Fold in ``other`` (the same class and options, started on the same context) that
        observed another shard of the corpus. Required for a detector that ``observe``\\ s
        when the pass is split; the result must equal one pass over both shards."""
        if type(self).observe is not Heuristic.observe:
            raise NotImplementedError(f"detector {self.id!r} observes batches but does not implement merge()")

    @abc.abstractmethod
    def run(self, ctx: ScanContext) -> Result:
        """Compute the detector's output and rows."""

    # report sections: what the terminal and HTML reports show for this detector, read back
    # from the database (see :class:`famfind.reports.Section`); default: nothing
    @classmethod
    def render_terminal(cls, section) -> None:
        """Print this detector's part of the terminal report."""

    @classmethod
    def html_part(cls, section) -> dict:
        """This detector's part of the HTML report's data: ``{"features": {feature: {key:
        value}}, key: value}``; the feature entries are merged into the feature cards."""
        return {}


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
    undeclared = _outputs_read(cls) - set(cls.requires) - {cls.produces}
    if undeclared:
        raise FamfindError(origin, f"detector {hid!r} reads {sorted(t.__name__ for t in undeclared)[0]} "
                           "but does not list it in requires")


def _outputs_read(cls: type) -> set[type]:
    """Output types named in ``ctx.output(T)`` calls in the class's source (empty when the
    source is not available): the registration-time check of ``requires``."""
    found = set()
    for k in cls.__mro__:
        if k is not Heuristic and isinstance(k, type) and issubclass(k, Heuristic):
            found |= _outputs_named(k)
    return found


def _outputs_named(cls: type) -> set[type]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return set()
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
    return found


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
    from pathlib import Path

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


def stored_tables(cls: type[Heuristic]) -> list[Table]:
    """A detector's declared tables as stored: a ``scope="sae"`` detector's rows are keyed
    by the SAE, so each of its tables gains a leading ``sae`` column (filled by the store)."""
    return [t.with_sae() if cls.scope == "sae" else t for t in cls.tables]


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
