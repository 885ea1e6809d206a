"""famfind's release (also in ``pyproject.toml``); a leaf module so that what stamps files
with it (the store, the exports) need not import the package's ``__init__``."""

__version__ = "0.1.0"
