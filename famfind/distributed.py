"""Distributed activation pass on Ray (``famfind scan --ray auto|ADDRESS``).

The corpus is cut into contiguous sequence ranges (:func:`famfind.execution.shard_rows`), one Ray
task each. A task loads the scan's SAEs and model itself (from the same paths or
TransformerLens names, on its own device: the GPU Ray gave it, or the CPU), receives the
corpus and the outputs of every detector that ran before the pass (pickled once into the
object store), runs the activation pass over its rows with fresh accumulators and fresh
instances of the observing detectors, and returns them. The driver merges them in corpus
order exactly as a one-process sharded scan does (:func:`famfind.execution.merge_shard`) and runs
everything after the pass once, so the answer is one pass's: counts, histograms and top-k
examples equal, float sums to rounding.

A task whose worker dies (killed, out of memory, a lost node) is re-run by Ray
(``max_retries``); its shard is then computed from scratch, so a retry never double-counts.
A detector that raises inside a task is recorded as failed, as in one process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import tempfile
import threading
from typing import Callable

import torch

from famfind.config import ScanConfig
from famfind.errors import FamfindError, first_line
from famfind.execution import UnitRunner, merge_shard, run_shard, shard_rows
from famfind.inputs import load_saes
from famfind.models import load_model
from famfind.plugins import ScanContext
from famfind.proxies import default_proxies
from famfind.registry import default_registry

MAX_RETRIES = 3  # re-runs of a shard whose worker died
CONNECT_TIMEOUT = 30.0  # seconds before an address that does not answer as a Ray cluster is an error


def _ray():
    try:
        import ray
    except ImportError:
        raise FamfindError("--ray", "needs the ray package: pip install 'famfind[ray]'") from None
    return ray


def _answers(address: str, timeout: float) -> str | None:
    """Why nothing listens at a ``host:port`` (or ``ray://host:port``) address, or ``None`` when
    a TCP connection opens within ``timeout`` seconds."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return "not a host:port address"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to a temporary file for the duration (Ray's C++ core logs there
    directly); yields a function returning what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def connect(address: str):
    """Connect to the Ray cluster at ``address`` (``"auto"``: the running one, or a new local
    one when none runs); a no-op when this process is already connected. Returns ``ray``.
    Raises ``FamfindError`` without ray installed, or within about :data:`CONNECT_TIMEOUT`
    seconds when no Ray cluster answers at the address (one line naming it; Ray's own log
    lines are kept off the terminal)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address != "auto":
        why = _answers(address, CONNECT_TIMEOUT / 3)
        if why:
            raise FamfindError("--ray", f"no Ray cluster answered at {address!r} ({why})")
    failed: list[BaseException] = []
    # "auto" with no RAY_ADDRESS may start a local cluster: that runs in this thread, since Ray
    # starts the GCS and raylet with PR_SET_PDEATHSIG, which kills them when the *thread* that
    # started them ends. Connecting only runs in a daemon thread, since a port that accepts
    # connections but is no Ray cluster makes ray.init wait forever.
    local = address == "auto" and not os.environ.get("RAY_ADDRESS")

    def init():
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except KeyboardInterrupt:  # Ctrl-C while a local cluster starts (this thread) stays an interrupt
            raise
        except BaseException as e:  # noqa: BLE001 - ray raises many types for an address that is not a cluster
            failed.append(e)

    with _quiet_stderr() as logged:
        if local:
            init()
        else:
            t = threading.Thread(target=init, daemon=True)
            t.start()
            t.join(CONNECT_TIMEOUT)
        log = logged().strip().splitlines()
    if not local and t.is_alive():
        raise FamfindError("--ray", f"no Ray cluster answered at {address!r} within {CONNECT_TIMEOUT:g} s")
    if failed:
        e = failed[0]
        last = first_line(e) or (log or [type(e).__name__])[-1][:160]
        what = "no local Ray cluster could start" if local else f"no Ray cluster answered at {address!r}"
        raise FamfindError("--ray", f"{what} ({last})") from None
    return ray


def _to_cpu(obj, seen=None):
    """Move every tensor reachable from ``obj`` (attributes, dicts, lists, tuples) to the CPU,
    in place where possible; returns the moved object."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _to_cpu(obj[k], seen)
    elif isinstance(obj, list):
        obj[:] = [_to_cpu(x, seen) for x in obj]
    elif isinstance(obj, tuple):
        return type(obj)(*(_to_cpu(x, seen) for x in obj)) if hasattr(obj, "_fields") \
            else tuple(_to_cpu(x, seen) for x in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in list(vars(obj).items()):
            moved = _to_cpu(v, seen)
            if moved is not v:
                try:
                    setattr(obj, k, moved)
                except Exception:  # a frozen object (options): left as it is
                    pass
    return obj


def _worker_device(requested: str, ray) -> str:
    if requested == "cpu":
        return "cpu"
    if ray.get_gpu_ids():
        return "cuda"
    if requested == "auto":
        return "cpu"
    raise FamfindError("device", f"{requested!r} requested but Ray gave this worker no GPU")


def _shard_task(config: dict, requested_device: str, blob: bytes, lo: int, hi: int) -> bytes:
    """One shard on a Ray worker: returns the pickled ``(states, instances, failed runs)``."""
    import ray

    cfg = ScanConfig.from_dict({**config, "device": _worker_device(requested_device, ray), "ray": None})
    torch.manual_seed(cfg.seed)
    reg = default_registry(cfg.plugins, cfg.strict_plugins)  # plugin classes before the payload names them
    if cfg.proxies:
        default_proxies(cfg.proxies, cfg.strict_plugins)
    loaded, spec = load_saes(cfg.sae, cfg.model, cfg.device, cfg.hook)
    model = load_model(spec, cfg.device, cfg.model_backend)
    p = pickle.loads(blob)
    saes = {name: sae for name, _, sae in loaded}
    by_sae = p["by_sae"]
    mctx = ScanContext(None, model, p["corpus"], cfg, saes=saes, by_sae=by_sae, outputs=p["shared"])
    munit = UnitRunner(reg, {}, mctx, cfg.strict_plugins, lambda m: None)
    munit.runs = p["model_runs"]
    units = []
    for name, _, sae in loaded:
        ctx = ScanContext(sae, model, p["corpus"], cfg, outputs=by_sae[name], sae_id=name, saes=saes,
                          shared=p["shared"], by_sae=by_sae)
        dets = {h: reg.get(h).cls(p["options"][h]) for h in p["observing"][name]}
        u = UnitRunner(reg, dets, ctx, cfg.strict_plugins, lambda m: None, model=munit)
        u.runs = p["runs"][name]
        units.append(u)
    munit.sae_units = units
    states, insts = run_shard(units, [p["observing"][name] for name, _, _ in loaded], cfg, lo, hi, None, own=False)
    failed = [{h: r for h, r in u.runs.items() if h in u.dets and r.status != "ok"} for u in units]
    from ray import cloudpickle

    return cloudpickle.dumps((_to_cpu(states), _to_cpu(insts), failed))


def ray_pass(units, observing: list[list[str]], config, progress: Callable[[int], None] | None,
             requested_device: str) -> list:
    """Run the activation pass of ``units`` (:class:`famfind.execution.UnitRunner`, one per SAE) as
    Ray tasks, one per shard, and merge their accumulators and detector instances in corpus
    order. Shards: ``max(config.shards, workers)``, workers = the cluster's GPUs when the
    scan runs on cuda (one task per GPU), else its CPUs. Returns each unit's merged
    :class:`famfind.activations.PassState`. Raises ``FamfindError`` without ray, when the
    cluster cannot be reached, or when a task fails on bad input."""
    ray = connect(config.ray)
    from ray import cloudpickle

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = requested_device.startswith("cuda") or (requested_device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise FamfindError("device", f"{requested_device!r} requested but the Ray cluster has no GPU")
    workers = gpus if use_gpu else max(1, int(res.get("CPU", 1)))
    ctx0 = units[0].ctx
    n_seq = ctx0.corpus.tokens.shape[0]
    rows = shard_rows(n_seq, max(config.shards, workers))
    munit = units[0].model
    payload = {
        "corpus": ctx0.corpus, "shared": ctx0.shared, "by_sae": ctx0.by_sae,
        "model_runs": dict(munit.runs) if munit else {},
        "runs": {u.ctx.sae_id: dict(u.runs) for u in units},
        "observing": {u.ctx.sae_id: obs for u, obs in zip(units, observing)},
        "options": {h: u.dets[h].options for u, obs in zip(units, observing) for h in obs},
    }
    blob = ray.put(cloudpickle.dumps(payload))
    cfg = config.to_dict()
    task = ray.remote(_shard_task).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=MAX_RETRIES,
                                           retry_exceptions=False)
    refs = [task.remote(cfg, requested_device, blob, lo, hi) for lo, hi in rows]
    index = {r: i for i, r in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, done_rows = list(refs), 0
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            results[i] = ray.get(ready[0])
            done_rows += rows[i][1] - rows[i][0]
            if progress:
                progress(done_rows)
    except ray.exceptions.RayError as e:
        for r in pending:
            ray.cancel(r, force=True)
        cause = getattr(e, "cause", None)
        if isinstance(cause, FamfindError):
            raise cause from None
        what = f"{type(cause).__name__}: {cause}" if cause is not None else \
            f"{type(e).__name__} (its worker died {MAX_RETRIES + 1} times)"
        raise FamfindError("--ray", f"a shard failed on a worker: {str(what).splitlines()[0]}") from None
    totals = None
    for blob_i in results:
        states, insts, failed = pickle.loads(blob_i)
        for u, f in zip(units, failed):
            for h, run in f.items():
                if u.ok(h):
                    u.runs[h] = run
        totals = totals or states
        merge_shard(units, totals, states, insts)
    return totals
