"""Proxies: "this position is inside X", the hypotheses a context family is tested against.

Kissane et al. (2024, §4, after Bricken et al. 2023) validate a feature-family hypothesis with
a *proxy*: a rule that marks where the hypothesised context holds, scored against the
feature's activations (the specificity and expected-value plots). famfind's proxies read
the corpus's own structure: Python's ``tokenize``, reStructuredText/Markdown blocks, prose
punctuation, document kind and position.

A proxy is a subclass of :class:`Proxy` with a stable ``id`` (``[a-z][a-z0-9_]*``), a
one-line ``description``, its ``context`` (``"local"``: a span inside a document, or
``"high_level"``: a whole document or a large part of it) and the document ``kinds`` it reads
(``"code"``, ``"prose"``). ``mark(doc)`` gets one :class:`Document` (token ids, decoded text,
character offsets of each token) and returns a bool mask ``[n_tokens]``. Proxies see whole
documents because a parser cannot read a 128-token window that starts inside a string; the
scan lays the marks of every document onto the corpus's ``[n_seq, seq_len]`` grid (as bits:
:class:`Marks`). A proxy that raises on a document marks nothing there and that document is
counted as unparsed; it never fails the scan.

Built-ins register through the entry-point group ``famfind.proxies`` (``name =
"module:Class"``, see ``famfind.heuristics.proxies``); a user adds one the same way or with
``famfind scan --proxy file.py`` (every ``Proxy`` subclass defined in the file).
"""

from __future__ import annotations

import abc
import ast
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from famfind.errors import FamfindError
from famfind.registry import LoadError, load_entry_point_group, load_plugin_file

ENTRY_POINT_GROUP = "famfind.proxies"
ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_PROXIES = 63  # one bit each in an int64 per corpus position
KINDS = ("code", "prose")
MARKUPS = ("python", "rst", "markdown", "text")


@dataclass
class Document:
    """One corpus document (the tokens between two ``<|endoftext|>``).

    ``index``: its number in the corpus; ``ids`` int64 ``[n]`` its token ids; ``text`` the
    concatenated token strings; ``offsets`` int64 ``[n + 1]``: token ``i`` is
    ``text[offsets[i]:offsets[i + 1]]``; ``kind`` ``"code"`` or ``"prose"``; ``markup``
    ``"python"``, ``"rst"``, ``"markdown"`` or ``"text"``; ``name`` where it came from ("" if
    unknown); ``truncated``: the corpus (cut into whole sequences) ends inside it.
    """

    index: int
    ids: np.ndarray
    text: str
    offsets: np.ndarray
    kind: str
    markup: str
    name: str = ""
    truncated: bool = False
    cache: dict = field(default_factory=dict, repr=False)  # parses shared by several proxies

    @property
    def n_tokens(self) -> int:
        return int(self.ids.size)

    @classmethod
    def from_text(cls, text: str, kind: str | None = None, markup: str | None = None,
                  pieces: list[str] | None = None) -> "Document":
        """A document of ``text`` cut into ``pieces`` (their concatenation must be ``text``;
        default: one token per character), ids ``0..n-1``; ``kind``/``markup`` inferred
        when not given (:func:`infer_kind`). For trying a proxy on hand-written text."""
        pieces = list(text) if pieces is None else pieces
        if "".join(pieces) != text:
            raise ValueError("pieces do not make up text")
        k, m = infer_kind(text)
        kind = kind or k
        markup = markup or (m if kind == k else ("python" if kind == "code" else "rst"))
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in pieces])]).astype(np.int64)
        return cls(0, np.arange(len(pieces), dtype=np.int64), text, offsets, kind, markup)

    def mask_spans(self, spans) -> np.ndarray:
        """bool ``[n_tokens]``: tokens overlapping any character span ``(start, end)``
        (``end`` exclusive) of ``spans``."""
        L = len(self.text)
        diff = np.zeros(L + 1, dtype=np.int64)
        for s, e in spans:
            s, e = max(int(s), 0), min(int(e), L)
            if e > s:
                diff[s] += 1
                diff[e] -= 1
        marked = np.cumsum(diff[:L]) > 0  # per character
        before = np.concatenate([[0], np.cumsum(marked)])  # marked characters before offset c
        return before[self.offsets[1:]] > before[self.offsets[:-1]]

    def line_starts(self) -> np.ndarray:
        """Character offset of the start of each line (lines end at ``\\n``), int64 ``[n_lines]``."""
        return np.array([0] + [m.end() for m in re.finditer("\n", self.text)], dtype=np.int64)


class Proxy(abc.ABC):
    """Base class of a proxy: set ``id``, ``description``, ``context``, ``kinds`` and
    implement ``mark``."""

    id: ClassVar[str]
    description: ClassVar[str] = ""
    context: ClassVar[Literal["local", "high_level"]] = "local"
    kinds: ClassVar[tuple[str, ...]] = KINDS

    @abc.abstractmethod
    def mark(self, doc: Document) -> np.ndarray:
        """bool ``[doc.n_tokens]``: the tokens inside this proxy's context. May raise on a
        document it cannot parse (the document is then counted as unparsed)."""


def validate_proxy(cls: type, origin: str) -> None:
    """Check a proxy class's metadata; raises ``FamfindError`` naming ``origin``."""
    if not (inspect.isclass(cls) and issubclass(cls, Proxy)):
        raise FamfindError(origin, "does not name a famfind.proxies.Proxy subclass")
    pid = getattr(cls, "id", None)
    if not isinstance(pid, str) or not ID_RE.match(pid):
        raise FamfindError(origin, f"proxy id {pid!r} must match [a-z][a-z0-9_]*")
    if cls.context not in ("local", "high_level"):
        raise FamfindError(origin, f"proxy {pid!r}: context={cls.context!r}; must be 'local' or 'high_level'")
    if not cls.kinds or any(k not in KINDS for k in cls.kinds):
        raise FamfindError(origin, f"proxy {pid!r}: kinds={cls.kinds!r}; each must be one of {', '.join(KINDS)}")
    if inspect.isabstract(cls):
        raise FamfindError(origin, f"proxy {pid!r} does not implement mark(doc)")


@dataclass
class ProxyEntry:
    cls: type[Proxy]
    origin: str


class ProxyRegistry:
    """Proxy classes by id, in registration order (entry points sorted by name, then files)."""

    def __init__(self):
        self.entries: dict[str, ProxyEntry] = {}
        self.errors: list[LoadError] = []

    def register(self, cls: type[Proxy], origin: str) -> None:
        validate_proxy(cls, origin)
        if cls.id in self.entries:
            raise FamfindError(origin, f"proxy id {cls.id!r} is already registered by {self.entries[cls.id].origin}")
        if len(self.entries) >= MAX_PROXIES:
            raise FamfindError(origin, f"more than {MAX_PROXIES} proxies")
        self.entries[cls.id] = ProxyEntry(cls, origin)

    def load_entry_points(self, strict: bool = False) -> None:
        """Register every ``famfind.proxies`` entry point; a broken one is recorded."""
        self.errors += load_entry_point_group(ENTRY_POINT_GROUP, self.register, strict, "proxy")

    def load_file(self, path: str | Path, strict: bool = True) -> list[str]:
        """Register every Proxy subclass defined in a local ``.py`` file; returns their ids.
        A missing file is always an error; an unloadable one only with ``strict``."""
        return load_plugin_file(path, Proxy, self.register, strict, "proxy", self.errors)

    def ids(self) -> list[str]:
        return list(self.entries)


def default_proxies(files=(), strict: bool = False) -> ProxyRegistry:
    """The installed proxies (entry points) plus those of the given ``.py`` files."""
    reg = ProxyRegistry()
    reg.load_entry_points(strict)
    for f in files:
        reg.load_file(f, strict)
    return reg


def infer_kind(text: str) -> tuple[str, str]:
    """``(kind, markup)`` of a document with no metadata: ``("code", "python")`` when the
    text parses as Python (:func:`ast.parse`), else prose: ``"markdown"`` when it has an ATX
    heading or a fenced code block, else ``"rst"``."""
    try:
        ast.parse(text)
        if text.strip():
            return "code", "python"
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        pass
    if re.search(r"^(#{1,6} \S|```)", text, re.M):
        return "prose", "markdown"
    return "prose", "rst"


def token_strings(tokenizer, d_vocab: int) -> tuple[list[str], np.ndarray]:
    """Each vocabulary entry's decoded string and its length (int64 ``[d_vocab]``); empty
    strings when there is no tokenizer."""
    strs = [tokenizer.token_str(i) for i in range(d_vocab)] if tokenizer is not None else [""] * d_vocab
    return strs, np.fromiter((len(s) for s in strs), dtype=np.int64, count=d_vocab)


def documents(tokens: torch.Tensor, tokenizer, d_vocab: int, meta: list[dict] | None = None,
              eot: int | None = None):
    """The corpus's documents, in order: yields ``(start, end, Document)`` with ``[start,
    end)`` the document's positions in the flattened ``tokens [n_seq, seq_len]`` (the
    ``eot`` separators belong to no document; ``None``: the corpus is one document).
    ``meta``: per document ``{"kind", "markup", "name"}`` (the corpus's own metadata, in
    order; ignored when it lists fewer documents than the corpus has); a document without a
    ``kind`` gets one from its text (:func:`infer_kind`)."""
    flat = tokens.reshape(-1).numpy()
    cuts = np.zeros(0, dtype=np.int64) if eot is None else np.flatnonzero(flat == eot)
    bounds = np.concatenate([[-1], cuts, [flat.size]])
    segs = [(int(a) + 1, int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if segs and segs[-1][0] == flat.size:  # the stream ends with a separator
        segs.pop()
    needed = max((i + 1 for i, (a, b) in enumerate(segs) if b > a), default=0)  # trailing empty segments aside
    meta = meta if meta is not None and (len(meta) >= needed if eot is not None else len(meta) == 1) else None
    strs, lens = token_strings(tokenizer, d_vocab)
    for i, (s, e) in enumerate(segs):
        if e <= s:
            continue
        ids = flat[s:e].astype(np.int64)
        text = "".join(strs[j] for j in ids)
        offsets = np.concatenate([[0], np.cumsum(lens[ids])])
        m = meta[i] if meta is not None else {}
        kind, markup = (m["kind"], m.get("markup") or ("python" if m["kind"] == "code" else "rst")) \
            if m.get("kind") in KINDS else infer_kind(text)
        yield s, e, Document(i, ids, text, offsets, kind, markup, m.get("name", ""), e == flat.size)


@dataclass
class Marks:
    """The proxies' marks on the corpus grid.

    ``ids``: the proxies, bit ``i`` of ``bits`` is ``ids[i]``; ``bits`` int64 ``[n_seq,
    seq_len]``; ``half`` bool ``[n_seq, seq_len]``: the position's document is in the second
    half (held-out split: every other document of each kind, so both halves hold code and
    prose alike; odd sequences when the corpus has fewer than 4 documents); ``doc`` int32 ``[n_seq, seq_len]`` document number (-1: a separator);
    ``positions`` int64 ``[n_proxies]`` marked positions; ``docs_read`` /
    ``docs_unparsed`` int64 ``[n_proxies]`` documents of the proxy's kinds it read / could
    not parse; ``errors``: the first error message per proxy ("" if none); ``n_docs``;
    ``doc_kinds``: documents per kind.
    """

    ids: list[str]
    bits: torch.Tensor
    half: torch.Tensor
    doc: torch.Tensor
    positions: np.ndarray
    docs_read: np.ndarray
    docs_unparsed: np.ndarray
    errors: list[str]
    n_docs: int
    doc_kinds: dict[str, int] = field(default_factory=dict)

    def mask(self, pid: str) -> torch.Tensor:
        """bool ``[n_seq, seq_len]``: the positions proxy ``pid`` marks."""
        return (self.bits >> self.ids.index(pid)) & 1 == 1


def mark_corpus(tokens: torch.Tensor, tokenizer, d_vocab: int, proxies: list[Proxy],
                meta: list[dict] | None = None, eot: int | None = None) -> Marks:
    """Run every proxy over every document of ``tokens [n_seq, seq_len]`` (see
    :func:`documents`) and pack the marks into bits. A proxy that raises, or returns a mask
    of the wrong shape, marks nothing in that document and counts it as unparsed."""
    n_seq, T = tokens.shape
    N = n_seq * T
    P = len(proxies)
    if P > MAX_PROXIES:
        raise FamfindError("proxies", f"{P} proxies; at most {MAX_PROXIES}")
    bits = np.zeros(N, dtype=np.int64)
    doc_of = np.full(N, -1, dtype=np.int32)
    read = np.zeros(P, dtype=np.int64)
    unparsed = np.zeros(P, dtype=np.int64)
    errors = [""] * P
    half_of = np.zeros(N, dtype=bool)
    kinds: dict[str, int] = {}
    n_docs = 0
    for s, e, doc in documents(tokens, tokenizer, d_vocab, meta, eot):
        n_docs += 1
        half_of[s:e] = kinds.get(doc.kind, 0) % 2 == 1  # alternate within each kind: halves alike in kind
        kinds[doc.kind] = kinds.get(doc.kind, 0) + 1
        doc_of[s:e] = doc.index
        for i, px in enumerate(proxies):
            if doc.kind not in px.kinds:
                continue
            read[i] += 1
            try:
                m = np.asarray(px.mark(doc))
                if m.shape != (doc.n_tokens,):
                    raise ValueError(f"mask shape {m.shape}, expected ({doc.n_tokens},)")
            except Exception as ex:  # an unparseable document marks nothing; the scan goes on
                unparsed[i] += 1
                if not errors[i]:
                    errors[i] = f"document {doc.index}: {type(ex).__name__}: {str(ex)[:120]}"
                continue
            bits[s:e] |= m.astype(bool).astype(np.int64) << i
    docs = doc_of.reshape(n_seq, T)
    if n_docs >= 4:
        half = half_of.reshape(n_seq, T)
    else:  # too few documents to split: alternate sequences
        half = np.broadcast_to((np.arange(n_seq) % 2 == 1)[:, None], (n_seq, T)).copy()
    positions = np.array([int(((bits >> i) & 1).sum()) for i in range(P)], dtype=np.int64)
    return Marks([p.id for p in proxies], torch.from_numpy(bits.reshape(n_seq, T)), torch.from_numpy(half),
                 torch.from_numpy(docs), positions, read, unparsed, errors, n_docs, kinds)
