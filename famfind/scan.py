"""``famfind scan``: load attention SAEs (one, or every layer's) + their model + a corpus,
run the detectors.

A scan holds one or more SAEs of one model (paths, or a folder of SAE folders laid out as a
SAELens release: one folder per hook). ``scope="model"`` detectors run once; every
``scope="sae"`` detector runs once per SAE, with that SAE's context. Order: model detectors
that read no per-SAE output; per SAE, the detectors that need only weights or the model
(topologically by the outputs they require); then one activation pass whose forward runs to
the deepest SAE's layer and encodes every SAE at its hook, feeding each SAE's accumulators and
observing detectors (:mod:`famfind.activations`); then per SAE the ``needs="activations"``
detectors (and any that require their outputs); last, model detectors that read per-SAE
outputs. The pass may be split into ``shards`` sequence ranges whose accumulators (and
observing detectors) are merged: the answer is one pass's. A failing detector, or one
returning a malformed :class:`Result`, is recorded and skipped with its dependents (per SAE),
unless ``strict_plugins``. Nothing is written here; :func:`famfind.db.write_scan` stores the
result in one transaction.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import sys
import time
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from famfind.activations import FeatureStats, PassState, activation_pass
from famfind.corpus import default_dir, load_corpus
from famfind.errors import FamfindError
from famfind.model import AttnModel, load_model
from famfind.plugins import (Detection, FamilyMember, HeadScore, Heuristic, Registry, Result, ScanContext,
                             Validation, default_registry, execution_order, selected_ids)
from famfind.sae import SAE, file_sha256, load_sae, sae_paths
from famfind.validation import StrictNonNegativeInt, StrictPositiveInt, first_error


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", arbitrary_types_allowed=False))
class ScanConfig:
    """Everything a scan depends on; stored as JSON in the ``scans`` table. Validated when
    made (pydantic): counts are positive integers (strict: ``"5"`` and ``5.0`` are refused),
    ``from_dict`` names the first bad key."""

    sae: tuple[str, ...] | str = ()  # SAE paths or folders of SAE folders (none: the embedded default's)
    hook: str | None = None  # blocks.L.attn.hook_z of SAEs whose format does not record it
    model: str | None = None
    # auto: famfind's own forward for GPT-2 checkpoints, TransformerBridge for other architectures
    model_backend: Literal["auto", "famfind", "bridge"] = "auto"
    corpus: str | None = None
    seq_len: StrictPositiveInt = 128  # the context length gelu-2l's attention SAEs were trained on
    max_tokens: StrictPositiveInt | None = None
    batch_size: StrictPositiveInt = 32
    top_k: StrictPositiveInt = 10
    n_samples: StrictNonNegativeInt = 20  # uniformly sampled firing positions per feature (activation quantiles)
    n_random: StrictNonNegativeInt = 256  # random corpus positions (non-activating contexts)
    shards: StrictPositiveInt = 1  # sequence ranges the pass is split into and merged (the unit of a distributed pass)
    select: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    proxies: tuple[str, ...] = ()  # local .py files of famfind.proxies.Proxy subclasses (beside the installed ones)
    strict_plugins: Annotated[bool, Field(strict=True)] = False
    detector_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: Annotated[int, Field(strict=True)] = 0
    device: Literal["cpu", "cuda", "auto"] | str = "cpu"  # "cuda:1" too; "auto": cuda when available
    autocast: Literal["none", "bf16", "fp16"] = "none"  # the pass's model forward in this precision (SAE encode fp32)
    ray: str | None = None  # "auto" or a Ray cluster address: the pass's shards run on Ray workers

    def __post_init__(self):
        if isinstance(self.sae, str):  # one path
            object.__setattr__(self, "sae", (self.sae,) if self.sae else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scan config", prefix: str = "") -> "ScanConfig":
        """A config from ``{key: value}`` (a TOML ``[scan]`` table, plus CLI values); raises
        ``FamfindError(where, "<prefix><key>: <problem>")`` for an unknown key or a bad value."""
        if not isinstance(d, dict):
            raise FamfindError(where, f"{prefix}expected a table of keys, got {type(d).__name__}")
        d = {k: tuple(str(x) for x in v) if isinstance(v, list) and k != "detector_options" else v
             for k, v in d.items()}
        if isinstance(d.get("sae"), Path):
            d["sae"] = str(d["sae"])
        names = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise FamfindError(where, f"{prefix}unknown key {unknown[0]!r}; known: {', '.join(names)}")
        try:
            return cls(**d)
        except ValidationError as e:
            raise FamfindError(where, first_error(e, prefix)) from None


@dataclass
class DetectorRun:
    id: str
    version: str
    origin: str
    status: str  # "ok" | "failed" | "skipped"
    error: str = ""
    seconds: float = 0.0
    output_type: str = ""
    sae: str = ""  # the SAE it ran on ("" for a scope="model" detector)


@dataclass
class SAEScan:
    """One SAE's part of a scan: its name (``id``, the hook name), the loaded ``sae``, its
    ``path`` and weights ``sha256``, its context (``ctx.stats`` and its typed outputs), and
    its detectors' run records and :class:`Result` rows (``results[id]``, ok runs only)."""

    id: str
    sae: SAE
    path: Path
    sha256: str
    ctx: ScanContext
    runs: dict[str, DetectorRun] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)


@dataclass
class ScanResult:
    """A finished scan of one or more SAEs of one model: ``saes`` (one :class:`SAEScan`
    each, in layer order), the model-level context and the runs and results of the
    ``scope="model"`` detectors."""

    model_ctx: ScanContext
    saes: list[SAEScan]
    model_runs: dict[str, DetectorRun]
    model_results: dict[str, Result]
    registry: Registry
    seconds: float

    def sae(self, key: str | int | None = None) -> SAEScan:
        """The part of the scan for SAE ``key``: its name, or its layer (an int), or (``None``)
        the only SAE. Raises ``KeyError`` when none or several match."""
        if key is None:
            hits = self.saes if len(self.saes) == 1 else []
        else:
            hits = [u for u in self.saes if (u.sae.layer == key if isinstance(key, int) else u.id == key)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} SAEs match {key!r}; this scan has {[u.id for u in self.saes]}")
        return hits[0]

    @property
    def ctx(self) -> ScanContext:
        """The only SAE's context (``KeyError`` for a scan of several SAEs: use ``sae(key).ctx``)."""
        return self.sae().ctx

    @property
    def runs(self) -> list[DetectorRun]:
        """Every run record: the model detectors', then each SAE's."""
        return [*self.model_runs.values(), *(r for u in self.saes for r in u.runs.values())]

    @property
    def results(self) -> dict[str, Result]:
        """The model detectors' results and the only SAE's (``KeyError`` for several SAEs)."""
        return {**self.model_results, **self.sae().results}

    def output(self, kind, sae: str | int | None = None):
        """The typed output of type ``kind`` (e.g. ``result.output(HeadRoleScores)``): a model
        detector's, or SAE ``sae``'s (name or layer; may be left out for a one-SAE scan)."""
        if kind in self.model_ctx.outputs:
            return self.model_ctx.outputs[kind]
        return self.sae(sae).ctx.output(kind)


def resolve_model_spec(sae: SAE, model: str | None, sae_path: Path) -> str:
    """``--model``, else the SAE's ``model_name`` (a path relative to the SAE is resolved)."""
    spec = model or sae.model_name
    if not spec:
        raise FamfindError(sae_path, "SAE metadata has no model_name; pass --model")
    for base in (sae_path if sae_path.is_dir() else sae_path.parent, Path.cwd()):
        cand = base / spec
        if cand.is_dir():
            return str(cand.resolve())
    return spec


def check_compatible(sae: SAE, model: AttnModel) -> None:
    """``d_in == n_heads * d_head`` and the layer exists; raises ``FamfindError`` naming the SAE."""
    c = model.cfg
    if sae.layer >= c.n_layers:
        raise FamfindError(sae.cfg_path or sae.path, f"SAE hook {sae.hook_name} is beyond the model's {c.n_layers} layers")
    if sae.d_in != c.n_heads * c.d_head:
        raise FamfindError(sae.path, f"d_in={sae.d_in} but the model's hook_z has n_heads*d_head = "
                           f"{c.n_heads}*{c.d_head} = {c.n_heads * c.d_head}")


def load_saes(specs: tuple[str, ...], model: str | None, device: str = "cpu",
              hook: str | None = None) -> tuple[list[tuple[str, Path, SAE]], str]:
    """Every SAE the specs name (paths, or folders of SAE folders; none: the embedded default's
    release folder), as ``(name, path, sae)`` in layer order, and the model spec they share.
    ``hook``: the hook of SAEs whose format does not record one (:func:`famfind.sae.load_sae`).
    Names are hook names (plus ``/file name`` when two SAEs share a hook). Raises
    ``FamfindError`` naming the SAE whose ``model_name`` disagrees with the first's (unless
    ``model`` is given)."""
    paths = [q for spec in (specs or (str(default_dir() / "saes"),)) for q in sae_paths(spec)]
    loaded = [(q, load_sae(q, hook).to(device)) for q in paths]
    spec0 = resolve_model_spec(loaded[0][1], model, loaded[0][0])
    if model is None:  # every SAE names the first one's model
        for q, sae in loaded[1:]:
            other = resolve_model_spec(sae, None, q)
            if other != spec0:
                raise FamfindError(q, f"model_name resolves to {other!r}, but the first SAE's to {spec0!r}: "
                                   "SAEs of one scan must share a model (or pass --model)")
    loaded.sort(key=lambda x: x[1].layer)
    hooks = [s.hook_name for _, s in loaded]
    names, out = set(), []
    for q, sae in loaded:
        name = sae.hook_name if hooks.count(sae.hook_name) == 1 else f"{sae.hook_name}/{q.name}"
        while name in names:
            name += "'"
        names.add(name)
        out.append((name, q, sae))
    return out, spec0


def check_result(det: Heuristic, out: Any) -> Result:
    """``out`` if it is a well-formed :class:`Result` of ``det``, else ``TypeError`` saying
    what is wrong: the output type, a row of the wrong type, an undeclared or malformed table."""
    if not isinstance(out, Result):
        raise TypeError(f"run() returned {type(out).__name__}, not famfind.plugins.Result")
    want = det.produces
    if (want is None) != (out.output is None) or (want is not None and not isinstance(out.output, want)):
        raise TypeError(f"Result.output is {type(out.output).__name__}, not "
                        f"{want.__name__ if want else 'None'} (the detector's produces)")
    for name, typ in (("detections", Detection), ("head_scores", HeadScore), ("families", FamilyMember),
                      ("validation", Validation)):
        rows = getattr(out, name)
        if not isinstance(rows, list):
            raise TypeError(f"Result.{name} is a {type(rows).__name__}, not a list")
        bad = [x for x in rows if not isinstance(x, typ)]
        if bad:
            raise TypeError(f"Result.{name} holds a {type(bad[0]).__name__}, not {typ.__name__}")
        for i, x in enumerate(rows):
            _check_row(x, f"Result.{name}[{i}]")
    if not isinstance(out.tables, dict):
        raise TypeError(f"Result.tables is a {type(out.tables).__name__}, not a dict of table name -> DataFrame")
    for d in out.detections:
        try:
            json.dumps(d.evidence)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Result.detections: evidence of feature {d.feature} is not JSON ({e})") from None
    declared = {t.name: t for t in det.tables}
    for name, df in list(out.tables.items()):
        if name not in declared:
            raise TypeError(f"table {name!r} is not declared in the detector's tables")
        out.tables[name] = declared[name].conform(df, f"detector {det.id!r}")
    return out


_FIELD_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool, np.bool_), "str": (str,),
                "dict": (dict,)}


def _check_row(row, where: str) -> None:
    """Each field of a Result row dataclass holds a value of its annotated type (``int`` also
    a numpy integer, ``float`` any real number, ``X | None`` also None, ``bool`` not an int):
    else ``TypeError`` naming the field."""
    for f in dataclasses.fields(row):
        v = getattr(row, f.name)
        ann = str(f.type).replace(" ", "")
        optional = ann.endswith("|None")
        base = ann.removesuffix("|None")
        if v is None and optional:
            continue
        ok = _FIELD_TYPES.get(base)
        if ok is None:
            continue
        if not isinstance(v, ok) or (base in ("int", "float") and isinstance(v, (bool, np.bool_))):
            raise TypeError(f"{where}.{f.name} is {v!r} ({type(v).__name__}), not {base}")


class _Runner:
    """Runs detector steps for one unit of a scan (the model, or one SAE), recording failures
    (or skips) instead of raising. ``model``: the model unit's runner (for an SAE unit)."""

    def __init__(self, reg: Registry, dets: dict[str, Heuristic], ctx: ScanContext, strict: bool, log,
                 model: _Runner | None = None, sae_units: list[_Runner] = ()):
        self.reg, self.dets, self.ctx, self.strict, self.log = reg, dets, ctx, strict, log
        self.model, self.sae_units = model, sae_units
        self.runs: dict[str, DetectorRun] = {}
        self.results: dict[str, Result] = {}
        self.spent: dict[str, float] = {}
        self.generators: dict[str, torch.Generator] = {}

    def generator(self, hid: str) -> torch.Generator:
        """Detector ``hid``'s own generator, seeded from the scan's seed and its id (so another
        detector, or another SAE in the scan, never changes its random draws)."""
        if hid not in self.generators:
            self.generators[hid] = torch.Generator().manual_seed(detector_seed(self.ctx.config.seed, hid))
        return self.generators[hid]

    def ok(self, hid: str) -> bool:
        return hid in self.runs and self.runs[hid].status == "ok"

    def dep_ok(self, hid: str) -> bool:
        """Did dependency ``hid`` run: in this unit, the model unit (a model detector), or (for the
        model unit reading per-SAE outputs) on at least one SAE."""
        if self.reg.get(hid).cls.scope == "model":
            return (self.model or self).ok(hid)
        if self.model is None:
            return any(u.ok(hid) for u in self.sae_units)
        return self.ok(hid)

    def step(self, hid: str, what: str, fn: Callable[[ScanContext], Any]) -> bool:
        """Run ``fn(view)`` for detector ``hid`` (``what`` = start/observe/merge/run)."""
        det, origin = self.dets[hid], self.reg.get(hid).origin
        cls = type(det)
        failed = [r for r in self.reg.dependencies(hid) if not self.dep_ok(r)]
        if failed:
            self.runs[hid] = DetectorRun(hid, det.version, origin, "skipped", f"requires {failed[0]!r}, which did not run",
                                         sae=self.ctx.sae_id)
            return False
        t = time.time()
        view = self.ctx.view(cls)
        view.generator = self.generator(hid)
        try:
            out = fn(view)
            if what == "run":
                out = check_result(det, out)
        except FamfindError as e:
            if e.where.startswith("detector ") and not self.strict:
                return self._fail(hid, origin, e, t)
            raise
        except Exception as e:  # one broken detector never stops a scan
            if self.strict:
                raise FamfindError(origin, f"detector {hid!r} failed in {what}(){self._on} "
                                   f"({type(e).__name__}: {e})") from e
            return self._fail(hid, origin, e, t)
        self.spent[hid] = self.spent.get(hid, 0.0) + time.time() - t
        if what == "run":
            self.results[hid] = out
            if out.output is not None:
                self.ctx.outputs[cls.produces] = out.output
        self.runs[hid] = DetectorRun(hid, det.version, origin, "ok", "", self.spent[hid],
                                     cls.produces.__name__ if cls.produces else "", self.ctx.sae_id)
        return True

    def _fail(self, hid, origin, e, t) -> bool:
        det = self.dets[hid]
        msg = f"{type(e).__name__}: {e}"
        self.runs[hid] = DetectorRun(hid, det.version, origin, "failed", msg[:300],
                                     self.spent.get(hid, 0.0) + time.time() - t, sae=self.ctx.sae_id)
        self.log(f"warning: detector {hid} ({origin}) failed{self._on}: {msg}")
        return False

    @property
    def _on(self) -> str:
        """`` on <sae>`` for messages about a per-SAE unit; empty for the model unit."""
        return f" on {self.ctx.sae_id}" if self.ctx.sae_id else ""


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cpu"``/``"cuda"``/
    ``"cuda:N"`` as given. Raises ``FamfindError("device", ...)`` for another name, or for
    cuda when torch sees no GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise FamfindError("device", f"{device!r} requested but torch sees no CUDA GPU "
                               f"(torch {torch.__version__}; use --device cpu or auto)")
        return device
    raise FamfindError("device", f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def detector_seed(seed: int, hid: str) -> int:
    """The seed of detector ``hid``'s generator in a scan seeded with ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(hid.encode())) % (1 << 62)


def shard_rows(n_seq: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ``[lo, hi)`` sequence ranges covering ``n_seq`` rows."""
    if shards < 1:
        raise FamfindError("shards", f"must be >= 1, got {shards}")
    cuts = [round(i * n_seq / shards) for i in range(shards + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def _observing(units: list[_Runner], order: list[str]) -> list[list[str]]:
    """Per unit, the ids of its ``needs="activations"`` detectors whose ``start`` succeeded
    (they observe the pass)."""
    return [[h for h in order if u.dets.get(h) is not None and u.dets[h].needs == "activations"
             and u.step(h, "start", u.dets[h].start)] for u in units]


def run_shard(units: list[_Runner], observing: list[list[str]], config: ScanConfig, lo: int, hi: int,
              progress: Callable[[int], None] | None, own: bool) -> tuple[list[PassState], list[dict[str, Heuristic]]]:
    """The activation pass over corpus rows ``[lo, hi)``: fresh accumulators per unit and the
    observing detectors' instances (``own``: the units' own, already started; else new
    instances, started here). Returns ``(states, instances)``, one per unit, to merge."""
    n_seq, T = units[0].ctx.corpus.tokens.shape
    n_heads = units[0].ctx.model.cfg.n_heads
    states = [PassState(u.ctx.sae, n_heads, n_seq, T, config.top_k, config.n_samples, config.n_random,
                        config.seed, config.device) for u in units]
    insts: list[dict[str, Heuristic]] = []
    for u, obs in zip(units, observing):
        mine = {}
        for h in obs:
            if own:
                mine[h] = u.dets[h]
            elif u.ok(h):
                mine[h] = type(u.dets[h])(u.dets[h].options)
                u.step(h, "start", mine[h].start)
        insts.append(mine)

    def observer(u, h, inst):
        return lambda batch: u.ok(h) and u.step(h, "observe", lambda c: inst.observe(batch, c))

    activation_pass(units[0].ctx.model, [u.ctx.sae for u in units], units[0].ctx.corpus.tokens, states,
                    config.batch_size, [[observer(u, h, inst) for h, inst in mine.items()]
                                        for u, mine in zip(units, insts)],
                    progress, config.device, (lo, hi), config.autocast)
    return states, insts


def merge_shard(units: list[_Runner], totals: list[PassState], states: list[PassState],
                insts: list[dict[str, Heuristic]]) -> None:
    """Fold one shard's accumulators into ``totals`` and its detector instances into the
    units' own (``states is totals``: only the detectors)."""
    for u, tot, st, mine in zip(units, totals, states, insts):
        if st is not tot:
            tot.merge(st)
        for h, inst in mine.items():
            if u.ok(h) and inst is not u.dets[h]:
                u.step(h, "merge", lambda c, u=u, h=h, inst=inst: u.dets[h].merge(inst))


def _pass(units: list[_Runner], order: list[str], config: ScanConfig, progress_factory,
          requested_device: str) -> list[FeatureStats]:
    """The activation pass over every shard: one forward per batch for all SAEs; each SAE
    (unit) has its own accumulators and observing detector instances per shard, merged in
    corpus order (shards on Ray workers with ``config.ray``:
    :func:`famfind.distributed.ray_pass`). Returns each unit's :class:`FeatureStats`."""
    n_seq = units[0].ctx.corpus.tokens.shape[0]
    observing = _observing(units, order)
    adv = progress_factory("activation pass", n_seq) if progress_factory else None
    if config.ray:
        from famfind.distributed import ray_pass

        totals = ray_pass(units, observing, config, adv, requested_device)
        return [t.finalize() for t in totals]
    totals: list[PassState] | None = None
    done = 0
    for lo, hi in shard_rows(n_seq, config.shards):
        states, insts = run_shard(units, observing, config, lo, hi,
                                  (lambda n, d=done: adv(d + n)) if adv else None, own=totals is None)
        done += hi - lo
        totals = totals or states
        merge_shard(units, totals, states, insts)
    return [t.finalize() for t in totals]


def run_scan(config: ScanConfig, registry: Registry | None = None,
             progress_factory=None, log: Callable[[str], None] = lambda m: None) -> ScanResult:
    """Run a scan of one or more SAEs of one model (nothing written).
    ``progress_factory(description, total)`` returns an ``advance(n_done)`` callback, e.g. a
    rich progress bar.

    Order: ``scope="model"`` detectors that read no per-SAE output; per SAE, the detectors
    that need no activations; one activation pass for all SAEs; per SAE, the activation
    detectors (and what reads them); the model detectors that read per-SAE outputs.

    Raises ``FamfindError`` for bad input (SAEs/model/corpus/detector selection/options) and,
    with ``strict_plugins``, for a failing detector.
    """
    t0 = time.time()
    requested_device = config.device
    config = dataclasses.replace(config, device=resolve_device(config.device))
    torch.manual_seed(config.seed)
    reg = registry or default_registry(config.plugins, config.strict_plugins)
    ids = selected_ids(reg, config.select, config.skip)  # a bad selection fails before anything loads
    order = execution_order(reg, ids)
    unknown_opts = sorted(set(config.detector_options) - set(ids))
    if unknown_opts:
        raise FamfindError("detector options", f"no selected detector {unknown_opts[0]!r}; "
                           f"selected: {', '.join(sorted(ids))}")
    options = {h: reg.get(h).cls.Options.from_dict(config.detector_options.get(h, {}), h) for h in order}
    for f in config.proxies:  # read by proxy_marks; a missing file is bad input, found before any loading
        if not Path(f).is_file():
            raise FamfindError(f, "proxy file not found")
    loaded, spec = load_saes(config.sae, config.model, config.device, config.hook)
    model = load_model(spec, config.device, config.model_backend)
    for _, _, sae in loaded:
        check_compatible(sae, model)
    if config.seq_len > model.cfg.n_ctx:
        raise FamfindError("seq_len", f"{config.seq_len} exceeds the model's context length n_ctx={model.cfg.n_ctx}")
    corpus = load_corpus(config.corpus, model.tokenizer, config.seq_len, config.max_tokens, model.cfg.d_vocab)
    scope = {h: reg.get(h).cls.scope for h in order}

    def make(hid):
        return reg.get(hid).cls(options[hid])

    late: set[str] = set()  # model detectors that read per-SAE outputs (directly or through another)
    post: set[str] = set()  # per-SAE detectors after the pass: activation detectors and their readers
    for hid in order:
        deps = reg.dependencies(hid)
        if scope[hid] == "model" and any(scope[r] == "sae" or r in late for r in deps):
            late.add(hid)
        if scope[hid] == "sae":
            bad = [r for r in deps if r in late]
            if bad:
                raise FamfindError(f"detector {hid!r}", f"requires {bad[0]!r}, a scope='model' detector that "
                                   "reads per-SAE outputs: it runs after every SAE's detectors")
            if reg.get(hid).cls.needs == "activations" or any(r in post for r in deps):
                post.add(hid)
    saes = {name: sae for name, _, sae in loaded}
    by_sae: dict[str, dict] = {name: {} for name in saes}
    mctx = ScanContext(None, model, corpus, config, generator=torch.Generator().manual_seed(config.seed), log=log,
                       saes=saes, by_sae=by_sae)
    munit = _Runner(reg, {h: make(h) for h in order if scope[h] == "model"}, mctx, config.strict_plugins, log)
    units = []
    for name, path, sae in loaded:
        ctx = ScanContext(sae, model, corpus, config, generator=torch.Generator().manual_seed(config.seed), log=log,
                          outputs=by_sae[name], sae_id=name, saes=saes, shared=mctx.outputs, by_sae=by_sae)
        units.append(_Runner(reg, {h: make(h) for h in order if scope[h] == "sae"}, ctx, config.strict_plugins,
                             log, model=munit))
    munit.sae_units = units
    steps = [h for h in order if scope[h] == "model" and h not in late]
    det_adv = progress_factory("detectors", len(munit.dets) + len(units) * (len(order) - len(munit.dets))) \
        if progress_factory else (lambda n: None)
    done = 0

    def tick():
        nonlocal done
        done += 1
        det_adv(done)

    for hid in steps:
        munit.step(hid, "run", munit.dets[hid].run)
        tick()
    for u in units:
        for hid in (h for h in order if scope[h] == "sae" and h not in post):
            u.step(hid, "run", u.dets[hid].run)
            tick()
    for u, stats in zip(units, _pass(units, order, config, progress_factory, requested_device)):
        u.ctx.feature_stats = stats
    for u in units:
        for hid in (h for h in order if h in post):
            if hid not in u.runs or u.ok(hid):
                u.step(hid, "run", u.dets[hid].run)
            tick()
    for hid in (h for h in order if h in late):
        munit.step(hid, "run", munit.dets[hid].run)
        tick()
    parts = [SAEScan(name, sae, path, file_sha256(path), u.ctx, {h: u.runs[h] for h in order if h in u.runs},
                     u.results) for (name, path, sae), u in zip(loaded, units)]
    return ScanResult(mctx, parts, {h: munit.runs[h] for h in order if h in munit.runs}, munit.results, reg,
                      time.time() - t0)


class _CallableModule(types.ModuleType):
    """``famfind.scan`` is this module and, called, the notebook API's :func:`famfind.api.scan`."""

    def __call__(self, *args, **kwargs):
        from famfind.api import scan

        return scan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
