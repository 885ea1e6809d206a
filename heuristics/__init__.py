"""famfind's built-in detectors, written against the public API in ``famfind.plugins``
and registered through the ``famfind.heuristics`` entry-point group like any plugin."""
