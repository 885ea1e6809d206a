"""famfind's user-facing error: one line naming the file (or input) and the problem."""

from __future__ import annotations

from contextlib import contextmanager


class FamfindError(Exception):
    """Bad input or a runtime failure the CLI reports as one line, exit code 1.

    ``where`` names the file, table or option at fault; ``problem`` says what is wrong.
    """

    def __init__(self, where: str, problem: str):
        self.where, self.problem = str(where), problem
        super().__init__(f"{where}: {problem}")


class DatabaseLocked(FamfindError):
    """The DuckDB file is held by another process (DuckDB allows one writer per file)."""


class Interrupted(Exception):
    """Ctrl-C, reported truthfully: the message says what was and was not written. The CLI
    prints ``famfind: interrupted; <message>`` and exits 130."""


def first_line(e: BaseException, limit: int | None = 160) -> str:
    """The first line of an exception's message, at most ``limit`` characters (``None``: all of
    it; "" when the message is empty): what a one-line error quotes of a library's exception."""
    return (str(e).splitlines() or [""])[0][:limit]


@contextmanager
def reading(where, what: str):
    """Within the block, any error a library raises (safetensors, tokenizers, transformers,
    numpy, torch, pyarrow, ...) becomes one line naming ``where``: ``FamfindError(where,
    f"cannot read {what} (Type: first line)")``. ``FamfindError`` and Ctrl-C pass through."""
    try:
        yield
    except (FamfindError, KeyboardInterrupt, Interrupted):
        raise
    except Exception as e:  # noqa: BLE001 - a loader's libraries raise many types
        msg = first_line(e)
        raise FamfindError(where, f"cannot read {what} ({type(e).__name__}{': ' + msg if msg else ''})") from None
