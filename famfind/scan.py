"""``famfind scan``: load an attention SAE + its model + a corpus, run the detectors.

Order: detectors that need only weights or the model run first (topologically by the
outputs they require); then one activation pass (:mod:`famfind.activations`) feeds every
``needs="activations"`` detector's ``observe``; then those detectors' ``run`` (and any
detector that requires one of their outputs). The pass may be split into ``shards``
sequence ranges whose accumulators (and observing detectors) are merged: the answer is one
pass's. A failing detector, or one returning a malformed :class:`Result`, is recorded and
skipped with its dependents, unless ``strict_plugins``. Nothing is written here;
:func:`famfind.db.write_scan` stores the result in one transaction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from famfind.activations import FeatureStats, PassState, activation_pass
from famfind.corpus import default_dir, load_corpus
from famfind.errors import FamfindError
from famfind.model import AttnModel, load_model
from famfind.plugins import (Detection, FamilyMember, HeadScore, Heuristic, Registry, Result, ScanContext,
                             Validation, default_registry, execution_order, selected_ids)
from famfind.sae import SAE, file_sha256, load_sae


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan depends on; stored as JSON in the ``scans`` table."""

    sae: str = ""
    model: str | None = None
    corpus: str | None = None
    seq_len: int = 128  # the context length gelu-2l's attention SAEs were trained on
    max_tokens: int | None = None
    batch_size: int = 32
    top_k: int = 10
    n_samples: int = 20  # uniformly sampled firing positions per feature (activation quantiles)
    n_random: int = 256  # random corpus positions (non-activating contexts)
    shards: int = 1  # sequence ranges the pass is split into and merged (the unit of a distributed pass)
    select: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    strict_plugins: bool = False
    detector_options: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FamfindError("scan config", f"unknown key {unknown[0]!r}; known: {', '.join(sorted(names))}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


@dataclass
class DetectorRun:
    id: str
    version: str
    origin: str
    status: str  # "ok" | "failed" | "skipped"
    error: str = ""
    seconds: float = 0.0
    output_type: str = ""


@dataclass
class ScanResult:
    """A finished scan: the context (with ``ctx.stats`` and every typed output), each
    detector's run record and its :class:`Result` rows (``results[id]``, ok runs only)."""

    ctx: ScanContext
    runs: list[DetectorRun]
    results: dict[str, Result]
    registry: Registry
    sae_sha256: str
    seconds: float

    def output(self, kind):
        """The typed output of type ``kind`` (e.g. ``result.output(HeadRoleScores)``)."""
        return self.ctx.output(kind)


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
        bad = [x for x in getattr(out, name) if not isinstance(x, typ)]
        if bad:
            raise TypeError(f"Result.{name} holds a {type(bad[0]).__name__}, not {typ.__name__}")
    for d in out.detections:
        json.dumps(d.evidence)
    declared = {t.name: t for t in det.tables}
    for name, df in list(out.tables.items()):
        if name not in declared:
            raise TypeError(f"table {name!r} is not declared in the detector's tables")
        out.tables[name] = declared[name].conform(df, f"detector {det.id!r}")
    return out


class _Runner:
    """Runs detector steps, recording failures (or skips) instead of raising."""

    def __init__(self, reg: Registry, dets: dict[str, Heuristic], ctx: ScanContext, strict: bool, log):
        self.reg, self.dets, self.ctx, self.strict, self.log = reg, dets, ctx, strict, log
        self.runs: dict[str, DetectorRun] = {}
        self.results: dict[str, Result] = {}
        self.spent: dict[str, float] = {}

    def ok(self, hid: str) -> bool:
        return hid in self.runs and self.runs[hid].status == "ok"

    def step(self, hid: str, what: str, fn: Callable[[ScanContext], Any]) -> bool:
        """Run ``fn(view)`` for detector ``hid`` (``what`` = start/observe/merge/run)."""
        det, origin = self.dets[hid], self.reg.get(hid).origin
        cls = type(det)
        failed = [r for r in self.reg.dependencies(hid) if not self.ok(r)]
        if failed:
            self.runs[hid] = DetectorRun(hid, det.version, origin, "skipped", f"requires {failed[0]!r}, which did not run")
            return False
        t = time.time()
        try:
            out = fn(self.ctx.view(cls))
            if what == "run":
                out = check_result(det, out)
        except FamfindError as e:
            if e.where.startswith("detector ") and not self.strict:
                return self._fail(hid, origin, e, t)
            raise
        except Exception as e:  # one broken detector never stops a scan
            if self.strict:
                raise FamfindError(origin, f"detector {hid!r} failed in {what}() ({type(e).__name__}: {e})") from e
            return self._fail(hid, origin, e, t)
        self.spent[hid] = self.spent.get(hid, 0.0) + time.time() - t
        if what == "run":
            self.results[hid] = out
            if out.output is not None:
                self.ctx.outputs[cls.produces] = out.output
        self.runs[hid] = DetectorRun(hid, det.version, origin, "ok", "", self.spent[hid],
                                     cls.produces.__name__ if cls.produces else "")
        return True

    def _fail(self, hid, origin, e, t) -> bool:
        det = self.dets[hid]
        msg = f"{type(e).__name__}: {e}"
        self.runs[hid] = DetectorRun(hid, det.version, origin, "failed", msg[:300],
                                     self.spent.get(hid, 0.0) + time.time() - t)
        self.log(f"warning: detector {hid} ({origin}) failed: {msg}")
        return False


def shard_rows(n_seq: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ``[lo, hi)`` sequence ranges covering ``n_seq`` rows."""
    if shards < 1:
        raise FamfindError("shards", f"must be >= 1, got {shards}")
    cuts = [round(i * n_seq / shards) for i in range(shards + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def _pass(run: _Runner, order: list[str], config: ScanConfig, progress_factory) -> FeatureStats:
    """The activation pass over every shard, each with its own accumulators and detector
    instances, merged in corpus order."""
    ctx = run.ctx
    tokens = ctx.corpus.tokens
    n_seq, T = tokens.shape
    observing = [h for h in order if run.dets[h].needs == "activations" and run.step(h, "start", run.dets[h].start)]
    adv = progress_factory("activation pass", n_seq) if progress_factory else None
    total, done = None, 0
    for lo, hi in shard_rows(n_seq, config.shards):
        state = PassState(ctx.sae, ctx.model.cfg.n_heads, n_seq, T, config.top_k, config.n_samples, config.n_random,
                          config.seed, config.device)
        insts = {}
        for h in observing:
            if total is None:
                insts[h] = run.dets[h]
            elif run.ok(h):
                insts[h] = type(run.dets[h])(run.dets[h].options)
                run.step(h, "start", insts[h].start)

        def observer(h):
            return lambda batch: run.ok(h) and run.step(h, "observe", lambda c: insts[h].observe(batch, c))

        activation_pass(ctx.model, ctx.sae, tokens, state, config.batch_size, [observer(h) for h in insts],
                        (lambda n, d=done: adv(d + n)) if adv else None, config.device, (lo, hi))
        done += hi - lo
        if total is None:
            total = state
        else:
            total.merge(state)
            for h, inst in insts.items():
                if run.ok(h):
                    run.step(h, "merge", lambda c, h=h, inst=inst: run.dets[h].merge(inst))
    return total.finalize()


def run_scan(config: ScanConfig, registry: Registry | None = None,
             progress_factory=None, log: Callable[[str], None] = lambda m: None) -> ScanResult:
    """Run a scan (nothing written). ``progress_factory(description, total)`` returns an
    ``advance(n_done)`` callback, e.g. a rich progress bar.

    Raises ``FamfindError`` for bad input (SAE/model/corpus/detector selection/options) and,
    with ``strict_plugins``, for a failing detector.
    """
    t0 = time.time()
    torch.manual_seed(config.seed)
    sae_path = Path(config.sae) if config.sae else default_dir() / "sae"
    sae = load_sae(sae_path).to(config.device)
    model = load_model(resolve_model_spec(sae, config.model, sae_path), config.device)
    check_compatible(sae, model)
    corpus = load_corpus(config.corpus, model.tokenizer, config.seq_len, config.max_tokens, model.cfg.d_vocab)
    reg = registry or default_registry(config.plugins, config.strict_plugins)
    ids = selected_ids(reg, config.select, config.skip)
    order = execution_order(reg, ids)
    unknown_opts = sorted(set(config.detector_options) - set(ids))
    if unknown_opts:
        raise FamfindError("detector options", f"no selected detector {unknown_opts[0]!r}; "
                           f"selected: {', '.join(sorted(ids))}")
    dets: dict[str, Heuristic] = {}
    for hid in order:
        cls = reg.get(hid).cls
        dets[hid] = cls(cls.Options.from_dict(config.detector_options.get(hid, {}), hid))
    post: set[str] = set()  # run after the pass: activation detectors and whatever reads their outputs
    for hid in order:
        if dets[hid].needs == "activations" or any(r in post for r in reg.dependencies(hid)):
            post.add(hid)
    ctx = ScanContext(sae, model, corpus, config, generator=torch.Generator().manual_seed(config.seed), log=log)
    run = _Runner(reg, dets, ctx, config.strict_plugins, log)
    det_adv = progress_factory("detectors", len(order)) if progress_factory else (lambda n: None)
    pre = [h for h in order if h not in post]
    for i, hid in enumerate(pre):
        run.step(hid, "run", dets[hid].run)
        det_adv(i + 1)
    ctx.feature_stats = _pass(run, order, config, progress_factory)
    for i, hid in enumerate(h for h in order if h in post):
        if hid not in run.runs or run.ok(hid):
            run.step(hid, "run", dets[hid].run)
        det_adv(len(pre) + i + 1)
    return ScanResult(ctx, [run.runs[h] for h in order], run.results, reg, file_sha256(sae_path), time.time() - t0)
