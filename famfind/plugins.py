"""The public detector ("heuristic") API: what a detector author imports (typed outputs,
rows, declared tables, the context a detector sees, the base class).

A detector is a subclass of :class:`Heuristic` with a short stable ``id``
(``[a-z][a-z0-9_]*``), a ``version``, what it ``needs``, the typed output it ``produces``
(a frozen :class:`Output` dataclass) and the outputs it ``requires`` (their types). famfind's
built-ins (``famfind.heuristics``) and a user's plugins register the same way: the
entry-point group ``famfind.heuristics`` (``name = "module:Class"``), or a local ``.py`` file
passed with ``--plugin`` (every ``Heuristic`` subclass defined in it); the registry and the
loading live in :mod:`famfind.registry`.

``needs``:
- ``"weights"``: reads SAE/model weights only; runs before the activation pass;
- ``"model"``: may also run the model (synthetic prompts, ablations);
- ``"activations"``: runs after the one streaming pass over the corpus and reads
  ``ctx.stats``; it may also implement ``start(ctx)`` + ``observe(batch, ctx)`` to see every
  batch of the pass and then ``merge(other)`` to fold in another instance that observed
  another shard of the corpus (the pass may be split, see :mod:`famfind.activations`).
  With ``reads_attention = True`` each batch also carries the SAE layer's attention pattern
  and values (``batch.pattern``, ``batch.v``), computed in the same forward.

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
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, TypeVar

import torch

from famfind.errors import FamfindError
from famfind.schema import Column, Table, View  # noqa: F401  (re-exported for plugins)

if TYPE_CHECKING:
    from famfind.activations import ActivationBatch, FeatureStats
    from famfind.config import ScanConfig
    from famfind.corpus import TokenCorpus
    from famfind.models.base import AttnModel
    from famfind.sae import SAE

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


TESTS = ("behaviour", "proxy", "necessity")  # what a family tested (families.test)


@dataclass
class FamilyMember:
    """A feature in ``family`` with ``confidence`` (e.g. a pass rate). ``test`` says what the
    family tested: ``behaviour`` (its behaviour on the corpus or on planted prompts), ``proxy``
    (a held-out proxy test) or ``necessity`` (a causal substitution); behaviour and proxy
    families take precedence over necessity families as a feature's primary family."""

    family: str
    feature: int
    confidence: float
    test: str = "behaviour"


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
    test: str | None = None  # behaviour, proxy or necessity (as FamilyMember.test)


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
    SAE, in layer order), the ``model`` (:class:`famfind.models.base.AttnModel`), the ``corpus``
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
    reads_attention: ClassVar[bool] = False  # observe() gets batch.pattern / batch.v of the SAE's layer
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


def stored_tables(cls: type[Heuristic]) -> list[Table]:
    """A detector's declared tables as stored: a ``scope="sae"`` detector's rows are keyed
    by the SAE, so each of its tables gains a leading ``sae`` column (filled by the store)."""
    return [t.with_sae() if cls.scope == "sae" else t for t in cls.tables]

