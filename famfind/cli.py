"""famfind's command line (typer). Results go to stdout; progress and diagnostics to stderr.

Exit codes: 0 ok; 1 bad input or runtime error (one line, no traceback unless ``--debug``);
2 usage error.
"""

from __future__ import annotations

import functools
import json
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from famfind import _typer_compat
from famfind.errors import FamfindError, Interrupted
from famfind.llm import LLMConfig


def _literal(text: str) -> str:
    """Help text shown as written: the apps render help as rich markup (``rich_markup_mode``
    set explicitly, as typer 0.12.5 would otherwise ignore its own default), where
    ``famfind[tl]`` or ``[scan]`` would vanish as unknown style tags."""
    from rich.markup import escape

    return escape(text)


class _OneLineErrors(TyperGroup):
    """The command group with usage errors as one line on stderr (``famfind: usage error:
    ...``, naming the option), exit code 2, instead of click's boxed message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as e:  # click's exceptions (typer may vendor its own click: match by class name)
            kinds = {c.__name__ for c in type(e).__mro__}
            if "NoArgsIsHelpError" in kinds:
                typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
                sys.exit(2)
            if "UsageError" in kinds:
                cmd = f" {e.ctx.command_path}:" if getattr(e, "ctx", None) else ""
                _line(f"famfind: usage error:{cmd} {e.format_message()} (see --help)")
                sys.exit(2)
            if "Abort" in kinds:
                _line("famfind: aborted")
                sys.exit(130)
            if "ClickException" in kinds:
                _line(f"famfind: error: {e.format_message()}")
                sys.exit(e.exit_code)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


_typer_compat.patch()  # an old typer (sae-dashboard pins < 0.13) under click >= 8.2

app = typer.Typer(cls=_OneLineErrors, help="Find and quantify feature families in attention-output (hook_z) SAEs.",
                  context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")
heur_app = typer.Typer(help="Installed detectors (heuristics).", no_args_is_help=True,
                       context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode="rich")
app.add_typer(heur_app, name="heuristics")
err = Console(stderr=True)
_state = {"debug": False}

DbOpt = Annotated[Path, typer.Option("--db", help="DuckDB file with the scan tables.")]
HookOpt = Annotated[Optional[str], typer.Option(help="blocks.L.attn.hook_z: the hook of an SAE whose format does not "
                                                "record it (Gemma Scope params.npz, dictionary_learning ae.pt, "
                                                "sparsify).")]
LLM_PANEL = "LLM labelling"
BaseUrlOpt = Annotated[Optional[str], typer.Option(
    "--llm-base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama, "
    "llama.cpp). Default: the openai client's (OPENAI_BASE_URL or api.openai.com).", rich_help_panel=LLM_PANEL)]
ModelOpt = Annotated[str, typer.Option("--llm-model", help="Model name sent to the endpoint.", rich_help_panel=LLM_PANEL)]
KeyEnvOpt = Annotated[str, typer.Option("--llm-api-key-env", help="Environment variable holding the API key.",
                                        rich_help_panel=LLM_PANEL)]
MaxCallsOpt = Annotated[int, typer.Option("--llm-max-calls", min=0, help="At most this many LLM requests "
                                          "(cached replies are free).", rich_help_panel=LLM_PANEL)]
ConcOpt = Annotated[int, typer.Option("--llm-concurrency", min=1, help="Requests in flight at once.",
                                      rich_help_panel=LLM_PANEL)]
TimeoutOpt = Annotated[float, typer.Option("--llm-timeout", min=0.01, help="Seconds per attempt.",
                                           rich_help_panel=LLM_PANEL)]
RetriesOpt = Annotated[int, typer.Option("--llm-retries", min=0, help="Retries (with backoff) of a timeout, "
                                         "429 or 5xx.", rich_help_panel=LLM_PANEL)]
FeaturesOpt = Annotated[Optional[str], typer.Option("--label-features", help="Also label these single "
                                                    "features, e.g. 3,17,42.", rich_help_panel=LLM_PANEL)]


def _line(msg: str) -> None:
    """One unwrapped line on stderr (rich would wrap it at the terminal width)."""
    typer.echo(" ".join(msg.split()), err=True)


def guarded(fn):
    """Turn FamfindError (and other failures) into one stderr line + exit 1, unless --debug."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (typer.Exit, typer.Abort):
            raise
        except FamfindError as e:
            if _state["debug"]:
                raise
            _line(f"famfind: error: {e}")
            raise typer.Exit(1) from None
        except Interrupted as e:
            _line(f"famfind: interrupted; {e}")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            _line("famfind: interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            if type(e).__name__ == "InterruptException":  # DuckDB turned Ctrl-C into a query error
                _line("famfind: interrupted")
                raise typer.Exit(130) from None
            if _state["debug"]:
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            _line(f"famfind: error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)")
            raise typer.Exit(1) from None
    return wrapper


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False):
    """famfind: find feature families in attention SAEs.

    Example: famfind scan && famfind sql "SELECT * FROM validation"
    """
    _state["debug"] = debug


def _progress_factory(progress: Progress):
    def factory(desc: str, total: int):
        task = progress.add_task(desc, total=total)
        return lambda done: progress.update(task, completed=done)
    return factory


def _read_config(path: Optional[Path]) -> dict:
    """A ``--config`` TOML file, checked against :class:`famfind.validation.ConfigFile` and its
    ``[scan]`` table against :class:`famfind.scan.ScanConfig` (errors name the file)."""
    from famfind.scan import ScanConfig
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
    model_backend: Annotated[Optional[str], typer.Option(help=_literal("auto (famfind's own forward for GPT-2 "
                                                         "checkpoints, TransformerLens's TransformerBridge for other "
                                                         "architectures; needs famfind[tl]), famfind or bridge."))] = None,
    autocast: Annotated[Optional[str], typer.Option(help="Run the activation pass's model forward in bf16 or "
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
    from famfind.db import check_writable, connect, write_scan
    from famfind.scan import ScanConfig, run_scan
    from famfind.reports.terminal import render

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
           "strict_plugins": strict_plugins or None, "device": device, "autocast": autocast, "ray": ray,
           "hook": hook, "model_backend": model_backend}
    base.update({k: v for k, v in cli.items() if v not in (None, ())})
    from famfind.plugins import default_registry

    scan_cfg = ScanConfig.from_dict({**base, "sae": base.get("sae") or (), "detector_options": det_opts})
    from famfind.scan import resolve_device

    resolve_device(scan_cfg.device)  # an unknown or missing device fails now, not inside the scan
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


def _parse_features(spec: Optional[str]) -> tuple[tuple[int | None, int], ...]:
    """``"3,17"`` or ``"1:3,0:17"`` (LAYER:FEATURE, for a scan of several SAEs) -> ``((layer, feature), ...)``."""
    if not spec:
        return ()
    try:
        out = []
        for x in filter(str.strip, spec.split(",")):
            layer, _, f = x.strip().rpartition(":")
            out.append((int(layer) if layer else None, int(f)))
        return tuple(out)
    except ValueError:
        raise FamfindError("--features", f"expected comma-separated feature ids (LAYER:FEATURE for a scan of "
                           f"several SAEs), got {spec!r}") from None


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


@app.command()
@guarded
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run, or - to read it from stdin.")],
    db: DbOpt = Path("famfind.duckdb"),
    as_json: Annotated[bool, typer.Option("--json", help="Output a JSON array of objects.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Output CSV.")] = False,
):
    """Query the scan tables (read-only), like `sqlite-utils query`.

    Example: famfind sql "SELECT family, count(*) FROM families GROUP BY family"
    """
    import duckdb

    from famfind.db import connect

    if as_json and as_csv:
        _line("famfind: usage error: --json and --csv are exclusive")
        raise typer.Exit(2)
    q = sys.stdin.read() if query == "-" else query
    con = connect(db, read_only=True)
    try:
        try:
            rel = con.sql(q)
        except duckdb.Error as e:
            raise FamfindError(db, f"SQL error: {str(e).splitlines()[0]}") from None
        if rel is None:
            return
        cols, rows = rel.columns, rel.fetchall()
    finally:
        con.close()
    if as_json:
        typer.echo(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1))
    elif as_csv:
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    else:
        from rich.table import Table
        from rich.text import Text

        t = Table()  # stored text (and column names) printed literally, never as markup
        for c in cols:
            t.add_column(Text(c))
        for r in rows:
            t.add_row(*[Text("NULL" if v is None else str(v)) for v in r])
        Console().print(t)


@app.command()
@guarded
def report(
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to report (default: the latest).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write a self-contained HTML report here.")] = None,
):
    """Print the terminal report of a stored scan (and, with --html, write the HTML one).

    Example: famfind report --db famfind.duckdb --scan-id 1 --html report.html
    """
    from famfind.db import connect, resolve_scan_id
    from famfind.reports.terminal import render

    con = connect(db, read_only=True)
    try:
        sid = resolve_scan_id(con, db, scan_id)
        render(con, sid, Console())
        if html is not None:
            from famfind.reports.html import render_html

            try:
                written = render_html(con, sid, html)
            except OSError as e:
                raise FamfindError(html, f"cannot write the HTML report ({e.strerror})") from None
            typer.echo(f"famfind: wrote {', '.join(map(str, written))}", err=True)
    finally:
        con.close()


@heur_app.command("list")
@guarded
def heuristics_list(
    plugin: Annotated[Optional[list[Path]], typer.Option(help="Also load this local plugin file.")] = None,
    skip: Annotated[Optional[list[str]], typer.Option(help="Show these ids as disabled.")] = None,
):
    """List installed detectors: id, version, needs, what they produce and require (typed
    outputs), their tables, origin, enabled.

    Example: famfind heuristics list --plugin my_detector.py
    """
    from rich.table import Table
    from rich.text import Text

    from famfind.plugins import default_registry

    reg = default_registry(plugin or ())
    t = Table()
    t.add_column("id", no_wrap=True)
    for c in ("version", "needs", "produces", "requires", "tables"):
        t.add_column(c)
    t.add_column("origin", overflow="fold")
    t.add_column("enabled")
    t.add_column("description", ratio=1)
    for hid in reg.ids():
        e = reg.get(hid)
        c = e.cls
        t.add_row(hid, c.version, c.needs if c.scope == "sae" else f"{c.needs} (once per model)",
                  c.produces.__name__ if c.produces else "-",
                  ", ".join(r.__name__ for r in c.requires) or "-",
                  ", ".join(x.name for x in (*c.tables, *c.views)) or "-", Text(e.origin),
                  "no" if hid in (skip or ()) else "yes", Text(c.description))
    for e in reg.errors:
        t.add_row("?", "-", "-", "-", "-", "-", Text(e.origin), Text("failed to load", style="red"), Text(e.error))
    Console().print(t)


@app.command()
@guarded
def inspect(
    sae: Annotated[list[str], typer.Argument(help="SAE paths or folders of SAE folders, as `famfind scan` takes.")],
    hook: HookOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Output a JSON array of objects.")] = False,
):
    """Print what famfind detects in SAEs: format, architecture, hook, d_in, d_sae, dtype, and the model each names.

    Example: famfind inspect gemma-scope/layer_5/params.npz --hook blocks.5.attn.hook_z
    """
    import json

    from famfind.sae import detect_format, load_sae, sae_paths

    rows = []
    for spec in sae:
        for p in sae_paths(spec):
            fmt = detect_format(p)
            s = load_sae(p, hook)
            rows.append({"path": str(p), "format": fmt, "architecture": s.architecture,
                         "k": s.k, "hook": s.hook_name, "layer": s.layer, "d_in": s.d_in, "d_sae": s.d_sae,
                         "dtype": str(s.W_enc.dtype).removeprefix("torch."), "apply_b_dec_to_input": s.apply_b_dec_to_input,
                         "model": s.model_name})
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.table import Table as RTable
    from rich.text import Text

    for r in rows:
        t = RTable(title=Text(r["path"]), show_header=False)
        t.add_column("field")
        t.add_column("value", overflow="fold")
        for k, v in list(r.items())[1:]:
            t.add_row(k, Text("-" if v is None else str(v)))
        Console().print(t)


@app.command()
@guarded
def export(
    parquet: Annotated[Path, typer.Option("--parquet", help="Folder to write (new or empty): one <table>.parquet "
                                          "per table of the scan, and SCHEMA.md.")],
    db: DbOpt = Path("famfind.duckdb"),
    scan_id: Annotated[Optional[int], typer.Option(help="Scan to export (default: the latest).")] = None,
    plugin: Annotated[Optional[list[Path]], typer.Option(help="A local plugin file whose tables' docs to use.")] = None,
):
    """Export every table of one stored scan as Parquet (DuckDB COPY), with the schema beside it.

    Example: famfind export --db famfind.duckdb --parquet scan_1/ --scan-id 1
    """
    from famfind.export import export_parquet

    written = export_parquet(db, parquet, scan_id, tuple(str(p) for p in plugin or ()))
    _line(f"famfind: wrote {len(written)} tables and SCHEMA.md to {parquet}")


@app.command()
@guarded
def tables(
    plugin: Annotated[Optional[list[Path]], typer.Option(help="Also load this local plugin file.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's table section.")] = False,
):
    """List every table famfind writes, from the declarations: core tables and those of each
    installed detector (with its columns, types and docs).

    Example: famfind tables --plugin my_detector.py
    """
    from famfind.plugins import default_registry
    from famfind.schema import CORE, LABELS, LLM_CACHE, markdown as md

    reg = default_registry(plugin or ())
    det_tables, views = reg.declared_tables()
    all_tables = [*CORE, *det_tables, LABELS, LLM_CACHE]
    if markdown:
        typer.echo(md(all_tables, views))
        return
    from rich.table import Table as RTable
    from rich.text import Text

    t = RTable()
    for c in ("table", "declared by", "column", "type", "doc"):
        t.add_column(c)
    for tab in all_tables:
        cols = ([] if not tab.per_scan else [("scan_id", "INTEGER", "the scan (scans.scan_id)")]) + \
            [(c.name, c.type, c.doc) for c in tab.columns]
        for i, (n, ty, doc) in enumerate(cols):
            t.add_row(Text(tab.name if i == 0 else ""), Text((reg.table_owner(tab.name) or "core") if i == 0 else ""),
                      Text(n), Text(ty), Text(doc))
    for v in views:
        t.add_row(Text(v.name + " (view)"), Text(reg.table_owner(v.name) or ""), Text("-"), Text("-"), Text(v.doc))
    Console().print(t)


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


def run() -> None:
    app()


if __name__ == "__main__":
    run()
