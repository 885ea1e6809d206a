"""Running detectors on one unit of a scan, and one shard of the activation pass.

A scan has one :class:`UnitRunner` for the model (its ``scope="model"`` detectors) and one per
SAE. A runner runs each detector step (``start``/``observe``/``merge``/``run``) on a view of
its context that lets the detector read only what it ``requires``, with the detector's own
seeded generator, and records a failure (or a skip, when a dependency did not run) instead of
raising, unless ``strict_plugins``. :func:`run_shard` is the activation pass over one range
of corpus rows with fresh accumulators and observing-detector instances; :func:`merge_shard`
folds a shard into the totals. The one-process runner (:mod:`famfind.runner`) and the Ray
path (:mod:`famfind.distributed`) both build on these, so a split pass gives one pass's answer.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from famfind.activations import PassState, activation_pass
from famfind.config import ScanConfig
from famfind.errors import FamfindError
from famfind.plugins import TESTS, Detection, FamilyMember, HeadScore, Heuristic, Result, ScanContext, Validation
from famfind.registry import Registry


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
    for name in ("families", "validation"):
        bad = [x for x in getattr(out, name) if x.test is not None and x.test not in TESTS]
        if bad:
            raise TypeError(f"Result.{name}: test {bad[0].test!r} is not one of {', '.join(TESTS)}")
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


class UnitRunner:
    """Runs detector steps for one unit of a scan (the model, or one SAE), recording failures
    (or skips) instead of raising. ``model``: the model unit's runner (for an SAE unit)."""

    def __init__(self, reg: Registry, dets: dict[str, Heuristic], ctx: ScanContext, strict: bool, log,
                 model: UnitRunner | None = None, sae_units: list[UnitRunner] = ()):
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



def detector_seed(seed: int, hid: str) -> int:
    """The seed of detector ``hid``'s generator in a scan seeded with ``seed``."""
    return (seed * 1_000_003 + zlib.crc32(hid.encode())) % (1 << 62)


def shard_rows(n_seq: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ``[lo, hi)`` sequence ranges covering ``n_seq`` rows."""
    if shards < 1:
        raise FamfindError("shards", f"must be >= 1, got {shards}")
    cuts = [round(i * n_seq / shards) for i in range(shards + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def observing_detectors(units: list[UnitRunner], order: list[str]) -> list[list[str]]:
    """Per unit, the ids of its ``needs="activations"`` detectors whose ``start`` succeeded
    (they observe the pass)."""
    return [[h for h in order if u.dets.get(h) is not None and u.dets[h].needs == "activations"
             and u.step(h, "start", u.dets[h].start)] for u in units]


def run_shard(units: list[UnitRunner], observing: list[list[str]], config: ScanConfig, lo: int, hi: int,
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
                    progress, config.device, (lo, hi), config.autocast,
                    [any(inst.reads_attention for inst in mine.values()) for mine in insts])
    return states, insts


def merge_shard(units: list[UnitRunner], totals: list[PassState], states: list[PassState],
                insts: list[dict[str, Heuristic]]) -> None:
    """Fold one shard's accumulators into ``totals`` and its detector instances into the
    units' own (``states is totals``: only the detectors)."""
    for u, tot, st, mine in zip(units, totals, states, insts):
        if st is not tot:
            tot.merge(st)
        for h, inst in mine.items():
            if u.ok(h) and inst is not u.dets[h]:
                u.step(h, "merge", lambda c, u=u, h=h, inst=inst: u.dets[h].merge(inst))

