"""Table declarations: every famfind table is declared once, here or by its detector.

A :class:`Table` names its columns with a DuckDB type and a one-line doc each. The store
creates and extends tables from the declarations (:mod:`famfind.db`), ``famfind tables``
lists them, and the README's table section is generated from them
(:func:`markdown`; ``tests/test_schema.py`` fails when the two disagree). Every per-scan
table gains a leading ``scan_id INTEGER`` column that is not declared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from famfind.errors import FamfindError, first_line

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

# DuckDB column type -> the polars dtype a frame is cast to before it is written
DTYPES: dict[str, pl.DataType] = {
    "INTEGER": pl.Int32, "BIGINT": pl.Int64, "DOUBLE": pl.Float64, "FLOAT": pl.Float32,
    "VARCHAR": pl.Utf8, "JSON": pl.Utf8, "BOOLEAN": pl.Boolean, "TIMESTAMP": pl.Datetime("us"),
    "VARCHAR[]": pl.List(pl.Utf8), "FLOAT[]": pl.List(pl.Float32), "INTEGER[]": pl.List(pl.Int32),
}


@dataclass(frozen=True)
class Column:
    """One column: ``name``, DuckDB ``type`` (a key of :data:`DTYPES`) and a one-line ``doc``."""

    name: str
    type: str
    doc: str

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise FamfindError(f"column {self.name!r}", "name must match [a-z][a-z0-9_]*")
        if self.type not in DTYPES:
            raise FamfindError(f"column {self.name!r}", f"type {self.type!r}; known: {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Table:
    """A table: ``name``, ``columns``, one-line ``doc``. A per-scan table (the default) gets
    a leading ``scan_id INTEGER``; ``primary_key`` names a declared column (or ``scan_id``)."""

    name: str
    columns: tuple[Column, ...]
    doc: str
    per_scan: bool = True
    primary_key: str | None = None

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise FamfindError(f"table {self.name!r}", "name must match [a-z][a-z0-9_]*")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or "scan_id" in names:
            raise FamfindError(f"table {self.name!r}", "duplicate column, or a declared scan_id")

    def with_sae(self) -> "Table":
        """This table with a leading ``sae`` column (the rows of a per-SAE detector)."""
        if any(c.name == "sae" for c in self.columns):
            return self
        return Table(self.name, (SAE_COLUMN, *self.columns), self.doc, self.per_scan, self.primary_key)

    def ddl(self) -> str:
        cols = ", ".join(f'"{c.name}" {c.type}' + (" PRIMARY KEY" if c.name == self.primary_key else "")
                         for c in self.columns)
        scan_id = f"scan_id INTEGER{' PRIMARY KEY' if self.primary_key == 'scan_id' else ''}, " if self.per_scan else ""
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({scan_id}{cols})"

    def polars_schema(self) -> dict[str, pl.DataType]:
        return {c.name: DTYPES[c.type] for c in self.columns}

    def frame(self, rows) -> pl.DataFrame:
        """``rows`` (a list of dicts or a dict of columns) as a frame of exactly this table's columns."""
        return pl.DataFrame(rows, schema=self.polars_schema())

    def conform(self, df: pl.DataFrame, owner: str) -> pl.DataFrame:
        """``df`` cast to the declared columns (in order); raises ``FamfindError`` naming
        ``owner`` for a column that is not declared, missing, or cannot be cast."""
        if not isinstance(df, pl.DataFrame):
            raise FamfindError(owner, f"table {self.name!r} is a {type(df).__name__}, not a polars.DataFrame")
        declared = [c.name for c in self.columns]
        extra = sorted(set(df.columns) - set(declared))
        missing = [c for c in declared if c not in df.columns]
        if extra or missing:
            what = f"undeclared column {extra[0]!r}" if extra else f"missing column {missing[0]!r}"
            raise FamfindError(owner, f"table {self.name!r}: {what}")
        try:
            return df.select([pl.col(c.name).cast(DTYPES[c.type], strict=True) for c in self.columns])
        except pl.exceptions.PolarsError as e:
            raise FamfindError(owner, f"table {self.name!r}: {first_line(e)}") from None


SAE_COLUMN = Column("sae", "VARCHAR", "the SAE (its hook name, see saes)")
LAYER_COLUMN = Column("layer", "INTEGER", "the SAE's layer")


@dataclass(frozen=True)
class View:
    """A view over tables (``sql`` is its ``SELECT``), created once its tables exist."""

    name: str
    sql: str
    doc: str
    needs: tuple[str, ...] = ()  # tables that must exist first


def _c(spec: str) -> tuple[Column, ...]:
    """Columns from ``"name TYPE: doc"`` lines (a compact way to declare the core tables)."""
    out = []
    for line in filter(str.strip, spec.strip().splitlines()):
        head, doc = line.split(":", 1)
        name, typ = head.split(None, 1)
        out.append(Column(name, typ.strip(), doc.strip()))
    return tuple(out)


_SAE = """
sae VARCHAR: the SAE (its hook name, see saes)
layer INTEGER: the SAE's layer
"""

_EXAMPLE = _SAE + """
feature INTEGER: SAE feature index
rank INTEGER: 0 = highest activation
seq INTEGER: corpus sequence (row of the token matrix)
pos INTEGER: position in the sequence
act DOUBLE: the feature's activation there
context VARCHAR: the window's text with the active token in [[ ]]
tokens VARCHAR[]: window tokens, 12 before the position to 3 after
acts FLOAT[]: the feature's activation on each window token
"""

SCANS = Table("scans", _c("""
created_at TIMESTAMP: when the scan was written (UTC)
famfind_version VARCHAR: famfind release that wrote it
sae_path VARCHAR: resolved path of the (first) SAE; every SAE is in saes
sae_sha256 VARCHAR: sha256 of the (first) SAE's weights
architecture VARCHAR: standard, topk or jumprelu (first SAE)
d_in INTEGER: SAE input width, n_heads * d_head
d_sae INTEGER: number of features of the (first) SAE
model VARCHAR: model name or path
hook_name VARCHAR: TransformerLens hook of the (first) SAE, blocks.L.attn.hook_z
layer INTEGER: the (first) SAE's layer
corpus VARCHAR: corpus source
n_tokens BIGINT: positions scanned
seq_len INTEGER: tokens per sequence
l0 DOUBLE: mean active features per position (L0) of the (first) SAE
dead_fraction DOUBLE: share of the (first) SAE's features that never fired
n_saes INTEGER: SAEs scanned in one pass
seconds DOUBLE: scan wall time
config JSON: the full scan configuration
"""), "one row per scan", primary_key="scan_id")

SAES = Table("saes", _c("""
sae VARCHAR: the SAE's name in this scan: its hook name (plus /file name when two share a hook)
path VARCHAR: resolved path of the SAE
sha256 VARCHAR: sha256 of its weights file(s)
hook_name VARCHAR: TransformerLens hook, blocks.L.attn.hook_z
layer INTEGER: the hook's layer
architecture VARCHAR: standard, topk or jumprelu
d_in INTEGER: input width, n_heads * d_head
d_sae INTEGER: number of features
l0 DOUBLE: mean active features per position (L0) on the scanned corpus
dead_fraction DOUBLE: share of features that never fired
n_tokens BIGINT: positions scanned
"""), "one row per SAE of the scan (a scan may hold every layer's SAE)")

CORE: tuple[Table, ...] = (
    SCANS,
    SAES,
    Table("detector_runs", _c("""
sae VARCHAR: the SAE it ran on (NULL: a scope=model detector, run once per scan)
detector VARCHAR: detector id
version VARCHAR: detector version
origin VARCHAR: package[entry] or plugin file
status VARCHAR: ok, failed or skipped
error VARCHAR: why it failed or was skipped
seconds DOUBLE: time spent in the detector
output_type VARCHAR: class of its typed output
summary JSON: its typed output's serialisation (scalar fields)
"""), "one row per detector and SAE of the scan"),
    Table("features", _c(_SAE + """
feature INTEGER: SAE feature index
fire_count BIGINT: positions with activation > 0
density DOUBLE: fire_count / n_tokens
mean_act DOUBLE: mean activation where it fires
max_act DOUBLE: largest activation
dead BOOLEAN: never fired on the corpus
"""), "per-feature statistics of the activation pass"),
    Table("heads", _c("""
sae VARCHAR: the SAE whose detector wrote it (NULL: a scope=model detector)
layer INTEGER: layer of the head
head INTEGER: head index
metric VARCHAR: e.g. induction, previous_token, successor, name_mover_logit_diff
score DOUBLE: the metric's value (range per detector)
"""), "per-head scores from every detector"),
    Table("detections", _c(_SAE + """
detector VARCHAR: detector id
feature INTEGER: SAE feature index
score DOUBLE: the detector's score (e.g. head attribution, pass rate)
passed BOOLEAN: passed the detector's test
evidence JSON: per-detector evidence; group = selected or control for families
"""), "one feature's verdict from one detector"),
    Table("families", _c(_SAE + """
family VARCHAR: family name
feature INTEGER: SAE feature index
confidence DOUBLE: e.g. the behaviour test's pass rate, or the necessity rate
detector VARCHAR: detector that assigned it
is_primary BOOLEAN: the feature's primary family (per SAE and feature): behaviour and proxy families before necessity families, then the highest confidence
test VARCHAR: what the family tested: behaviour (corpus or planted prompts), proxy (held-out proxy precision) or necessity (causal token substitution)
"""), "family members"),
    Table("validation", _c(_SAE + """
family VARCHAR: family name
selected INTEGER: features selected (head attribution; a mechanism family: tested records of its class and head)
passed INTEGER: selected features passing the family's test
control INTEGER: control features tested (a mechanism family: the same features, a random other source substituted)
control_passed INTEGER: control features passing
ablation_tested INTEGER: family features tested by ablation
ablation_off INTEGER: of those, turned off by mean-ablating the role heads
test VARCHAR: what passed means: behaviour, proxy or necessity (see families.test)
"""), "one row per family and SAE, the shape of the paper's induction table"),
    Table("examples", _c(_EXAMPLE), "top-activating examples per live feature"),
    Table("activation_samples", _c(_EXAMPLE), "uniform random sample of 20 firing positions per feature "
          "(rank = order by act): examples from every activation quantile"),
    Table("random_contexts", _c(_SAE + """
seq INTEGER: corpus sequence
pos INTEGER: position
context VARCHAR: window text, the position's token in [[ ]]
tokens VARCHAR[]: window tokens
active INTEGER[]: features firing there
"""), "256 random positions, the non-activating contexts of label scoring"),
    Table("activation_histogram", _c(_SAE + """
feature INTEGER: SAE feature index
bin INTEGER: bin index
lo DOUBLE: bin's lower edge
hi DOUBLE: bin's upper edge
count BIGINT: positive activations in the bin
"""), "per-feature histogram of positive activations, log-spaced bins; empty bins left out"),
)

LABELS = Table("labels", _c("""
sae VARCHAR: the SAE of the family, cluster, candidate family or feature
kind VARCHAR: family, cluster, candidate or feature
target VARCHAR: family name, cluster id or feature id
feature INTEGER: the feature, for kind = feature
label VARCHAR: the LLM's label (at most 8 words)
description VARCHAR: the LLM's one-sentence description
status VARCHAR: ok, malformed, error or skipped
score DOUBLE: detection balanced accuracy (0.5 = chance)
n_pos INTEGER: held-out activating contexts scored
n_neg INTEGER: non-activating contexts scored
tp INTEGER: activating contexts classified as activating
tn INTEGER: non-activating contexts classified as not
score_status VARCHAR: status of the scoring call
llm_model VARCHAR: model name sent to the endpoint
label_key VARCHAR: llm_cache key of the label reply
score_key VARCHAR: llm_cache key of the scoring reply
error VARCHAR: what failed
"""), "LLM labels of families, clusters and features (famfind label)")

LLM_CACHE = Table("llm_cache", _c("""
key VARCHAR: sha256 of model + messages + response format
model VARCHAR: model name
request JSON: the request body
response VARCHAR: the raw reply
status VARCHAR: ok or malformed
error VARCHAR: parse error
retries INTEGER: retries before the reply
seconds DOUBLE: time of the call
created_at TIMESTAMP: when it was cached
"""), "every LLM reply, shared by every scan in the file", per_scan=False, primary_key="key")

CORE_NAMES = frozenset(t.name for t in (*CORE, LABELS, LLM_CACHE))
CORE_BY_NAME = {t.name: t for t in CORE}


def markdown(tables: list[Table], views: list[View]) -> str:
    """The README's table section: one row per table and view."""
    out = ["| table | what | columns |", "|---|---|---|"]
    for t in tables:
        cols = ", ".join(f"`{c.name}` {c.doc}" for c in t.columns)
        out.append(f"| `{t.name}` | {t.doc} | {cols} |")
    for v in views:
        out.append(f"| `{v.name}` (view) | {v.doc} | |")
    return "\n".join(out)
