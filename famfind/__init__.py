"""famfind: find and quantify feature families in attention-output (hook_z) SAEs.

Implements the automated induction-family analysis of Kissane, Krzyzanowski, Conmy &
Nanda (2024), "Interpreting Attention Layer Outputs with Sparse Autoencoders", as a scan
over pluggable detectors whose results land in DuckDB.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``famfind.scan(...)`` and ``famfind.open(db)`` (the notebook API, :mod:`famfind.api`),
    imported on first use so ``import famfind`` stays light. ``famfind.scan`` is also the
    module :mod:`famfind.scan`, made callable."""
    if name == "scan":
        import importlib

        return importlib.import_module("famfind.scan")
    if name == "open":
        from famfind.api import open as open_

        return open_
    raise AttributeError(f"module 'famfind' has no attribute {name!r}")
