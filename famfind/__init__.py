"""famfind: find and quantify feature families in attention-output (hook_z) SAEs.

Implements the automated induction-family analysis of Kissane, Krzyzanowski, Conmy &
Nanda (2024), "Interpreting Attention Layer Outputs with Sparse Autoencoders", as a scan
over pluggable detectors whose results land in DuckDB.
"""

__version__ = "0.1.0"
