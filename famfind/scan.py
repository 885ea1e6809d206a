"""``famfind scan``: load an attention SAE + its model + a corpus, run the detectors.

Order: detectors that need only weights or the model run first (topologically by
``requires``); then one activation pass feeds every ``needs="activations"`` detector's
``observe``; then those detectors' ``run`` (and any detector that requires one of them).
A failing detector is recorded and skipped with its dependents, unless ``strict_plugins``.
Nothing is written here; :func:`famfind.db.write_scan` stores the result in one transaction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from famfind.activations import FeatureStats, activation_pass
from famfind.corpus import TokenCorpus, default_dir, load_corpus
from famfind.errors import FamfindError
from famfind.model import AttnModel, load_model
from famfind.plugins import Heuristic, Registry, Result, default_registry, execution_order
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
class ScanContext:
    """What a detector sees: ``sae``, ``model``, ``corpus``, ``config``, ``stats`` (after
    the pass), ``results`` of detectors run so far, and a seeded ``generator``."""

    sae: SAE
    model: AttnModel
    corpus: TokenCorpus
    config: ScanConfig
    results: dict[str, Result] = field(default_factory=dict)
    stats: FeatureStats | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    log: Callable[[str], None] = lambda msg: None

    @property
    def layer(self) -> int:
        return self.sae.layer


@dataclass
class DetectorRun:
    id: str
    version: str
    origin: str
    status: str  # "ok" | "failed" | "skipped"
    error: str = ""
    seconds: float = 0.0


@dataclass
class ScanResult:
    ctx: ScanContext
    runs: list[DetectorRun]
    sae_sha256: str
    seconds: float


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


def selected_ids(reg: Registry, select: tuple[str, ...], skip: tuple[str, ...]) -> list[str]:
    for hid in (*select, *skip):
        reg.get(hid)  # unknown ids are an error that lists the known ones
    ids = list(select) if select else reg.ids()
    if select:  # pull in requirements of selected detectors
        todo = list(ids)
        while todo:
            for r in reg.get(todo.pop()).cls.requires:
                if r not in ids:
                    ids.append(r)
                    todo.append(r)
    return [h for h in ids if h not in skip]


def run_scan(config: ScanConfig, registry: Registry | None = None,
             progress_factory=None, log: Callable[[str], None] = lambda m: None) -> ScanResult:
    """Run a scan (nothing written). ``progress_factory(description, total)`` returns an
    ``advance(n_done)`` callback, e.g. a rich progress bar.

    Raises ``FamfindError`` for bad input (SAE/model/corpus/detector selection) and, with
    ``strict_plugins``, for a failing detector.
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

    post: set[str] = set()
    for hid in order:
        if dets[hid].needs == "activations" or any(r in post for r in dets[hid].requires):
            post.add(hid)
    ctx = ScanContext(sae, model, corpus, config, generator=torch.Generator().manual_seed(config.seed), log=log)
    runs: dict[str, DetectorRun] = {}

    spent: dict[str, float] = {}

    def execute(hid: str, fn: Callable[[], Any], store: bool) -> bool:
        """Run one step of a detector; record failure (or skip) instead of raising."""
        det, origin = dets[hid], reg.get(hid).origin
        failed_req = [r for r in det.requires if runs.get(r) and runs[r].status != "ok"]
        if failed_req:
            runs[hid] = DetectorRun(hid, det.version, origin, "skipped", f"requires {failed_req[0]!r}, which did not run")
            return False
        t = time.time()
        try:
            out = fn()
            if store and not isinstance(out, Result):
                raise TypeError(f"run() returned {type(out).__name__}, not famfind.plugins.Result")
        except FamfindError:
            raise
        except Exception as e:  # one broken detector never stops a scan
            if config.strict_plugins:
                raise FamfindError(origin, f"detector {hid!r} failed ({type(e).__name__}: {e})") from e
            runs[hid] = DetectorRun(hid, det.version, origin, "failed", f"{type(e).__name__}: {e}"[:300],
                                    spent.get(hid, 0.0) + time.time() - t)
            log(f"warning: detector {hid} ({origin}) failed: {type(e).__name__}: {e}")
            return False
        spent[hid] = spent.get(hid, 0.0) + time.time() - t
        if store:
            ctx.results[hid] = out
        runs[hid] = DetectorRun(hid, det.version, origin, "ok", "", spent[hid])
        return True

    det_adv = progress_factory("detectors", len(order)) if progress_factory else (lambda n: None)
    done = 0
    for hid in order:
        if hid not in post:
            execute(hid, lambda hid=hid: dets[hid].run(ctx), True)
            done += 1
            det_adv(done)
    observers = []
    for hid in order:
        if dets[hid].needs == "activations" and execute(hid, lambda hid=hid: dets[hid].start(ctx), False):
            observers.append(hid)

    def make_observer(hid):
        def obs(batch):
            if runs[hid].status == "ok":
                execute(hid, lambda: dets[hid].observe(batch, ctx), False)
        return obs

    adv = progress_factory("activation pass", corpus.tokens.shape[0]) if progress_factory else None
    ctx.stats = activation_pass(model, sae, corpus, config.batch_size, config.top_k,
                                [make_observer(h) for h in observers], adv, config.device,
                                config.n_samples, config.n_random, config.seed)
    for hid in order:
        if hid in post and (hid not in runs or runs[hid].status == "ok"):
            execute(hid, lambda hid=hid: dets[hid].run(ctx), True)
        if hid in post:
            done += 1
            det_adv(done)
    return ScanResult(ctx, [runs[h] for h in order], file_sha256(sae_path), time.time() - t0)
