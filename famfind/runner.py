"""The scan runner (``famfind scan``, ``famfind.scan(...)``): load attention SAEs (one, or every
layer's) + their model + a corpus, run the detectors.

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
unless ``strict_plugins``. Nothing is written here; :func:`famfind.frames.write_scan` stores
the result in one transaction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from famfind.activations import FeatureStats, PassState
from famfind.config import ScanConfig
from famfind.corpus import load_corpus
from famfind.distributed import ray_pass
from famfind.errors import FamfindError
from famfind.execution import DetectorRun, UnitRunner, merge_shard, observing_detectors, run_shard, shard_rows
from famfind.inputs import check_compatible, load_saes
from famfind.models import load_model
from famfind.plugins import Result, ScanContext
from famfind.registry import Registry, default_registry, execution_order, selected_ids
from famfind.sae import SAE, file_sha256


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



def _pass(units: list[UnitRunner], order: list[str], config: ScanConfig, progress_factory,
          requested_device: str) -> list[FeatureStats]:
    """The activation pass over every shard: one forward per batch for all SAEs; each SAE
    (unit) has its own accumulators and observing detector instances per shard, merged in
    corpus order (shards on Ray workers with ``config.ray``:
    :func:`famfind.distributed.ray_pass`). Returns each unit's :class:`FeatureStats`."""
    n_seq = units[0].ctx.corpus.tokens.shape[0]
    observing = observing_detectors(units, order)
    adv = progress_factory("activation pass", n_seq) if progress_factory else None
    if config.ray:
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
    munit = UnitRunner(reg, {h: make(h) for h in order if scope[h] == "model"}, mctx, config.strict_plugins, log)
    units = []
    for name, path, sae in loaded:
        ctx = ScanContext(sae, model, corpus, config, generator=torch.Generator().manual_seed(config.seed), log=log,
                          outputs=by_sae[name], sae_id=name, saes=saes, shared=mctx.outputs, by_sae=by_sae)
        units.append(UnitRunner(reg, {h: make(h) for h in order if scope[h] == "sae"}, ctx, config.strict_plugins,
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
