"""The command-line app itself: the typer app (``famfind``) and its ``heuristics`` group,
one-line errors (exit 1; usage errors exit 2; no traceback unless ``--debug``), the options
several commands share, and small helpers. The commands are in :mod:`famfind.cli.scan_cmds`
and :mod:`famfind.cli.read_cmds`. Results go to stdout; progress and diagnostics to stderr.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from typer.core import TyperGroup

from famfind import _typer_compat
from famfind.errors import FamfindError, Interrupted, first_line


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
            msg = first_line(e, None)
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

