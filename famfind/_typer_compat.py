"""Make an old typer work with click >= 8.2 (issue #15, "living beside the ecosystem").

``pip install sae-dashboard`` pins ``typer<0.13`` while its own dependencies (wandb) need
``click>=8.2``. typer 0.12-0.15 predate click 8.2/8.3's API changes, and with click 8.5 every
famfind command failed: typer passes ``flag_value=None`` to every option to mean "none",
which click 8.3 reads as "this option is a flag whose value is None" (so ``--db F`` took no
value, and ``--x/--no-x`` raised "Secondary flag is not valid for non-boolean flag"), and its
help calls ``make_metavar()``/``get_metavar()`` without the ``ctx`` argument click 8.2 added
(on typer's parameters and on click's own ``--help``).

:func:`patch` fixes exactly those places (``flag_value=None`` becomes click's own "not given"
default; ``make_metavar`` gains an optional ``ctx``, taken from the current context), and
only when they need it (detected from the installed signatures, never from version
numbers), so a typer that supports click 8.2 (>= 0.16), or that vendors its own click
(recent ones), is left untouched.
"""

from __future__ import annotations

import functools
import inspect


def needed() -> bool:
    """True when the installed typer predates click 8.2's ``make_metavar(ctx)`` and click is >= 8.2."""
    import click
    from typer.core import TyperArgument

    if not issubclass(TyperArgument, click.core.Argument):  # typer >= 0.20 vendors its own click
        return False
    click_82 = "ctx" in inspect.signature(click.core.Parameter.make_metavar).parameters
    return click_82 and "ctx" not in inspect.signature(TyperArgument.make_metavar).parameters


def patch() -> bool:
    """Apply the fixes when :func:`needed`; returns whether anything was patched. Idempotent."""
    import click
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_famfind_patched", False) or not needed():
        return False

    def _ctx(ctx):
        return ctx if ctx is not None else click.get_current_context(silent=True)

    def argument_metavar(self, ctx=None) -> str:  # typer 0.12's TyperArgument.make_metavar, with ctx
        if self.metavar is not None:
            return self.metavar
        var = (self.name or "").upper()
        if not self.required:
            var = f"[{var}]"
        type_var = self.type.get_metavar(self, _ctx(ctx))
        if type_var:
            var += f":{type_var}"
        if self.nargs != 1:
            var += "..."
        return var

    def optional_ctx(method):  # typer's rich help calls make_metavar() on click's own options too
        @functools.wraps(method)
        def make_metavar(self, ctx=None):
            return method(self, _ctx(ctx))
        return make_metavar

    init = TyperOption.__init__
    unset = inspect.signature(click.core.Option.__init__).parameters["flag_value"].default  # click's own "not given"

    @functools.wraps(init)
    def option_init(self, *args, **kwargs):
        if kwargs.get("flag_value", unset) is None:  # typer's "no flag_value"; click >= 8.3 reads None as one
            kwargs["flag_value"] = unset
        init(self, *args, **kwargs)

    TyperArgument.make_metavar = argument_metavar
    click.core.Option.make_metavar = optional_ctx(click.core.Option.make_metavar)
    click.core.Argument.make_metavar = optional_ctx(click.core.Argument.make_metavar)
    TyperOption.__init__ = option_init
    TyperOption._famfind_patched = True
    return True
