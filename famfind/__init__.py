"""famfind: find and quantify feature families in attention-output (hook_z) SAEs.

Implements the automated induction-family analysis of Kissane, Krzyzanowski, Conmy &
Nanda (2024), "Interpreting Attention Layer Outputs with Sparse Autoencoders", as a scan
over pluggable detectors whose results land in DuckDB.

The notebook API: ``famfind.scan(...)`` and ``famfind.open(db)`` (:mod:`famfind.api`). They are
imported on first use (PEP 562 module ``__getattr__``), so ``import famfind`` stays light;
the runner itself is :mod:`famfind.runner` (there is no module ``famfind.scan``).
"""

from famfind.version import __version__

__all__ = ["__version__", "open", "scan"]


def __getattr__(name: str):
    if name in ("scan", "open"):
        from famfind import api

        return getattr(api, name)
    raise AttributeError(f"module 'famfind' has no attribute {name!r}")
