"""The commands that compute and store: ``famfind scan``, ``import``, ``label`` and
``build-default``."""

from __future__ import annotations

import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from famfind.cli.app import (LLM_PANEL, BaseUrlOpt, ConcOpt, DbOpt, FeaturesOpt, HookOpt, KeyEnvOpt, MaxCallsOpt,
                             ModelOpt, RetriesOpt, TimeoutOpt, _line, _literal, _parse_features, _progress_factory,
                             app, err, guarded)
from famfind.errors import FamfindError, Interrupted
from famfind.llm import LLMConfig


class Autocast(str, Enum):  # a choice: another value is a usage error (exit 2)
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"


class Backend(str, Enum):
    auto = "auto"
    famfind = "famfind"
    bridge = "bridge"


def _read_config(path: Optional[Path]) -> dict:
    """A ``--config`` TOML file, checked against :class:`famfind.validation.ConfigFile` and its
    ``[scan]`` table against :class:`famfind.config.ScanConfig` (errors name the file)."""
    from famfind.config import ScanConfig
    from famfind.validation import ConfigFile, validated

    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FamfindError(path, "config file not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise FamfindError(path, "not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise FamfindError(path, f"not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"scan", "detectors"})
    if unknown:
        raise FamfindError(path, f"unknown section [{unknown[0]}]; known: [scan], [detectors.<id>]")
    if not isinstance(data.get("scan", {}), dict):
        raise FamfindError(path, f"'scan' must be a table ([scan]), got {type(data['scan']).__name__}")
    cfg = validated(ConfigFile, data, path)
    ScanConfig.from_dict(dict(cfg.scan), str(path), "[scan] ")
    return cfg.model_dump()


@app.command()
@guarded
def scan(
    sae: Annotated[Optional[list[str]], typer.Argument(
        help="SAEs of one model, scanned in one pass: SAELens dirs, .safetensors, Kissane .pt, or a folder of "
             "SAE folders (a SAELens release, one folder per hook). Default: the embedded default's SAEs "
             "(both layers).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local HF checkpoint dir or TransformerLens model name "
                                                      "(default: from the SAE's metadata).")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="Tokens .npy, text file, directory, .jsonl or .parquet "
                                                       "(default: the shipped held-out eval tokens).")] = None,
    hook: HookOpt = None,
    db: DbOpt = Path("famfind.duckdb"),
    select: Annotated[Optional[list[str]], typer.Option(help="Run only these detector ids (and what they require).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(help="Skip these detector ids.")] = None,
    plugin: Annotated[Optional[list[Path]], typer.Option(help="A local .py file of Heuristic subclasses.")] = None,
    proxy: Annotated[Optional[list[Path]], typer.Option(help="A local .py file of Proxy subclasses (context "
                                                        "hypotheses scored against every feature).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="A detector option, DETECTOR.KEY=VALUE (repeatable; wins over --config), e.g. "
        "--set induction_selection.selection_threshold=0.7.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N corpus tokens.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or auto (cuda when torch sees a GPU). "
                                                  "Default: cpu.")] = None,
    model_backend: Annotated[Optional[Backend], typer.Option(help=_literal(
        "auto (famfind's own forward for GPT-2 checkpoints, TransformerLens's TransformerBridge for other "
        "architectures; needs famfind[tl]), famfind or bridge."))] = None,
    autocast: Annotated[Optional[Autocast], typer.Option(help="Run the activation pass's model forward in bf16 or "
                                                         "fp16 (the SAE encode stays fp32); none by default.")] = None,
    ray: Annotated[Optional[str], typer.Option(help=_literal("Shard the activation pass over a Ray cluster: auto "
                                               "(the running one, else a local one) or its ADDRESS. Needs famfind[ray]."))] = None,
    config: Annotated[Optional[Path], typer.Option(help=_literal(
        "TOML with [scan] keys and [detectors.<id>] options."))] = None,
    strict_plugins: Annotated[bool, typer.Option("--strict-plugins", help="A failing plugin stops the scan.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report, only the scan id.")] = False,
    lock_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for the database when another "
                                                "process holds it at the end of the scan; then the scan is saved "
                                                "beside it for `famfind import`.")] = 60.0,
    label: Annotated[bool, typer.Option("--label", help="After the scan, label every family and cluster "
                                        "with an LLM (see `famfind label`).", rich_help_panel=LLM_PANEL)] = False,
    llm_base_url: BaseUrlOpt = None,
    llm_model: ModelOpt = LLMConfig.model,
    llm_api_key_env: KeyEnvOpt = LLMConfig.api_key_env,
    llm_max_calls: MaxCallsOpt = LLMConfig.max_calls,
    llm_concurrency: ConcOpt = LLMConfig.concurrency,
    llm_timeout: TimeoutOpt = LLMConfig.timeout,
    llm_retries: RetriesOpt = LLMConfig.max_retries,
    label_features: FeaturesOpt = None,
):
    """Scan attention SAEs (one, or every layer's): run the detectors, store tables in DuckDB, print the report.

    Example: famfind scan                     # the embedded default model + its layer-0 and layer-1 SAEs
    Example: famfind scan path/to/sae_dir --model path/to/hf_checkpoint --db out.duckdb
    Example: famfind scan release_dir/        # every SAE folder in it, one forward pass
    Example: famfind scan --set head_roles.induction_head_threshold=0.3 --select induction_selection
    Example: famfind scan --label --llm-base-url http://127.0.0.1:8000/v1 --llm-model qwen2.5-7b
    Example: famfind scan sae_dir --device cuda --autocast bf16 --ray auto   # shards on every GPU of a Ray cluster
    """
    from famfind.config import ScanConfig
    from famfind.db import check_writable, connect
    from famfind.frames import write_scan
    from famfind.registry import default_registry
    from famfind.reports.terminal import render
    from famfind.runner import resolve_device, run_scan

    llm_cfg = LLMConfig(llm_model, llm_base_url, llm_api_key_env, llm_max_calls, llm_concurrency, llm_timeout,
                        llm_retries)
    feats = _parse_features(label_features)
    if label:
        llm_cfg.api_key()  # a missing key is an error before the scan, not after it
    cfg_file = _read_config(config)
    det_opts = {k: dict(v) for k, v in cfg_file.get("detectors", {}).items()}
    for det, key, value in map(_parse_set, set_ or ()):
        det_opts.setdefault(det, {})[key] = value
    base = dict(cfg_file.get("scan", {}))
    cli = {"sae": tuple(sae or ()), "model": model, "corpus": corpus, "max_tokens": max_tokens,
           "select": tuple(select or ()), "skip": tuple(skip or ()),
           "plugins": tuple(str(p) for p in plugin or ()), "proxies": tuple(str(p) for p in proxy or ()),
           "strict_plugins": strict_plugins or None, "device": device, "ray": ray, "hook": hook,
           "autocast": autocast.value if autocast else None,
           "model_backend": model_backend.value if model_backend else None}
    base.update({k: v for k, v in cli.items() if v not in (None, ())})
    scan_cfg = ScanConfig.from_dict({**base, "sae": base.get("sae") or (), "detector_options": det_opts})
    resolve_device(scan_cfg.device)  # an unknown or missing device fails now, not inside the scan
    if scan_cfg.ray:  # so does a Ray address where no cluster answers (and it joins the cluster now)
        from famfind.distributed import connect as ray_connect

        ray_connect(scan_cfg.ray)
    check_writable(db)  # a locked or unwritable database fails now, not after the scan
    reg = default_registry(scan_cfg.plugins, scan_cfg.strict_plugins)
    for e in reg.errors:
        _line(f"famfind: warning: plugin {e.origin} failed to load and was skipped: {e.error}")
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=quiet) as progress:
            result = run_scan(scan_cfg, reg, _progress_factory(progress),
                              log=lambda m: _line(f"famfind: {m}"))
    except KeyboardInterrupt:
        raise Interrupted("nothing was written") from None
    scan_id = write_scan(db, result, lock_timeout)
    try:
        if label:
            _label(db, scan_id, llm_cfg, feats, quiet)
        if quiet:
            typer.echo(scan_id)
            return
        con = connect(db, read_only=True)
        try:
            render(con, scan_id, Console())
        finally:
            con.close()
    except KeyboardInterrupt:
        raise Interrupted(f"scan {scan_id} was written to {db}") from None
    _line(f"famfind: wrote scan {scan_id} to {db}")


@app.command("import")
@guarded
def import_(
    folder: Annotated[Path, typer.Argument(help="A scan saved beside a locked database (DB.pending-...).")],
    db: DbOpt = Path("famfind.duckdb"),
    lock_timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for a locked database.")] = 60.0,
):
    """Store a scan that `famfind scan` saved beside a database it could not write (another
    process held it past --lock-timeout): the scan's Parquet files and table declarations.

    Example: famfind import famfind.duckdb.pending-20261122-101500-4242 --db famfind.duckdb
    """
    from famfind.db import import_pending

    sid = import_pending(folder, db, lock_timeout)
    _line(f"famfind: imported {folder} as scan {sid} in {db}")


def _parse_set(spec: str) -> tuple[str, str, str]:
    """``DETECTOR.KEY=VALUE`` -> its three parts (the value is typed by the detector's Options)."""
    head, eq, value = spec.partition("=")
    det, dot, key = head.strip().partition(".")
    if not (eq and dot and det and key):
        raise FamfindError("--set", f"expected DETECTOR.KEY=VALUE, got {spec!r}")
    return det, key.strip(), value.strip()



def _label(db: Path, scan_id: int, llm_cfg, features: tuple[int, ...], quiet: bool,
           kinds: tuple[str, ...] = ("family", "cluster", "candidate")) -> None:
    """Label a stored scan (families, clusters, requested features); one summary line."""
    from famfind.db import connect
    from famfind.labels import label_scan, summary
    from famfind.llm import LLM

    con = connect(db)
    try:
        llm = LLM(llm_cfg, con)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=quiet) as progress:
            run = label_scan(con, scan_id, llm, kinds, features, progress_factory=_progress_factory(progress))
    finally:
        con.close()
    s = summary(run.rows)
    acc = s["mean_balanced_accuracy"]
    status = ", ".join(f"{v} {k}" for k, v in sorted(s["status"].items())) or "nothing to label"
    _line(f"famfind: labelled {s['targets']} targets of scan {scan_id} ({status}); {s['scored']} scored, "
          f"mean balanced accuracy {'-' if acc is None else f'{acc:.3f}'}; {run.calls} LLM calls, "
          f"{run.hits} cached replies")


@app.command()
@guarded
def label(
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to label (default: the latest).")] = None,
    llm_base_url: BaseUrlOpt = None,
    llm_model: ModelOpt = LLMConfig.model,
    llm_api_key_env: KeyEnvOpt = LLMConfig.api_key_env,
    llm_max_calls: MaxCallsOpt = LLMConfig.max_calls,
    llm_concurrency: ConcOpt = LLMConfig.concurrency,
    llm_timeout: TimeoutOpt = LLMConfig.timeout,
    llm_retries: RetriesOpt = LLMConfig.max_retries,
    features: Annotated[Optional[str], typer.Option("--features", help="Label these single features "
                                                    "(comma-separated ids).")] = None,
    only_features: Annotated[bool, typer.Option("--only-features", help="Skip families and clusters.")] = False,
):
    """Label the families and clusters of a stored scan with an LLM, and score each label.

    Each label comes with a detection score (balanced accuracy of the LLM classifying held-out
    activating vs non-activating contexts from the label alone). Replies are cached in the
    database (table llm_cache): a re-run makes no calls. Results: table labels.

    Example: famfind label --llm-base-url http://127.0.0.1:11434/v1 --llm-model llama3.1
    Example: famfind label --features 3,17 --only-features
    """
    from famfind.db import connect, resolve_scan_id

    con = connect(db, read_only=True)
    try:
        sid = resolve_scan_id(con, db, scan_id)
    finally:
        con.close()
    cfg = LLMConfig(llm_model, llm_base_url, llm_api_key_env, llm_max_calls, llm_concurrency, llm_timeout,
                    llm_retries)
    _label(db, sid, cfg, _parse_features(features), False,
           () if only_features else ("family", "cluster", "candidate"))



@app.command("build-default")
@guarded
def build_default(
    build_dir: Annotated[Path, typer.Option(help="Working directory for the build.")] = Path("build/default"),
    install: Annotated[bool, typer.Option("--install", help="Copy the artefacts into famfind/data/default.")] = False,
):
    """Rebuild the embedded default from scratch (corpus, tokenizer, model, SAE, cards).

    Not run by CI: about 1.2 h on 2 CPU cores (model ~55 min, SAE ~10 min). Fixed seeds;
    resumes from checkpoints.
    Example: famfind build-default --build-dir build/default --install
    """
    from famfind.build.pipeline import build_all

    build_all(build_dir, install=install, log=lambda m: err.print(m, markup=False))

