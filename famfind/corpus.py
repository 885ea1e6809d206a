"""Token corpora for a scan: the shipped eval tokens, or text the user points at.

Accepted ``--corpus`` inputs: a ``.npy`` token file (1-D ``uint16``/int, documents joined by
the tokenizer's ``<|endoftext|>``; the shipped ``eval_tokens.npy`` format), a text file,
a directory (its ``.txt .md .rst .py`` files, sorted), ``.jsonl`` with a ``"text"`` field,
or ``.parquet`` with a ``text`` column. Text is tokenised with the model's tokenizer,
documents are joined with ``<|endoftext|>`` when the tokenizer has it, and the stream is cut
into ``[n_seq, seq_len]`` windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from famfind.errors import FamfindError, reading

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
EOT = "<|endoftext|>"


def default_dir() -> Path:
    """Directory of the embedded default (model/, saes/, eval_tokens.npy, cards)."""
    return Path(str(resources.files("famfind") / "data" / "default"))


def default_sae(layer: int) -> Path:
    """The embedded default's SAE folder for ``blocks.{layer}.attn.hook_z`` (a SAELens release
    layout: ``saes/<hook>/``)."""
    return default_dir() / "saes" / f"blocks.{layer}.attn.hook_z"


@dataclass
class TokenCorpus:
    """``tokens``: ``int64 [n_seq, seq_len]``; ``source``: what it was read from; ``docs``:
    per document (in order) ``{"name", "kind", "markup"}`` when the input says (a directory's
    or file's suffixes, or a ``.npy``'s ``<stem>.docs.json``), else ``None`` (proxies then infer
    each document's kind from its text: :func:`famfind.proxies.infer_kind`)."""

    tokens: torch.Tensor
    source: str
    docs: list[dict] | None = None

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


SUFFIX_KIND = {".py": ("code", "python"), ".md": ("prose", "markdown"), ".rst": ("prose", "rst")}


def _doc_meta(name: str, suffix: str) -> dict:
    kind, markup = SUFFIX_KIND.get(suffix, (None, None))
    return {"name": name, **({"kind": kind, "markup": markup} if kind else {})}


def _read_docs_json(p: Path) -> list[dict] | None:
    """``<stem>.docs.json`` beside a ``.npy``: ``{"documents": [{"kind", "markup", "name"}]}``."""
    side = p.with_suffix(".docs.json")
    if not side.is_file():
        return None
    try:
        docs = json.loads(side.read_text())["documents"]
        assert isinstance(docs, list) and all(isinstance(d, dict) and d.get("kind") in ("code", "prose")
                                              for d in docs)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise FamfindError(side, "expected {\"documents\": [{\"kind\": \"code\"|\"prose\", ...}, ...]}") from None
    return docs


def _read_named_texts(p: Path) -> list[tuple[dict, str]]:
    """``(metadata, text)`` per document of a text input (see :class:`TokenCorpus`)."""
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise FamfindError(p, f"directory has no text files ({' '.join(TEXT_SUFFIXES)})")
        return [(_doc_meta(str(f.relative_to(p)), f.suffix), f.read_text(errors="replace")) for f in files]
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise FamfindError(p, f"line {i} is not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise FamfindError(p, f"line {i} has no string field 'text'")
            texts.append(({"name": f"{p.name}:{i}"}, rec["text"]))
        return texts
    if p.suffix == ".parquet":
        import duckdb

        try:
            rel = duckdb.read_parquet(p.as_posix()).select("text")
            if str(rel.types[0]) != "VARCHAR":
                raise FamfindError(p, f"column 'text' has type {rel.types[0]}, expected strings (VARCHAR)")
            rows = rel.fetchall()
        except duckdb.Error as e:
            raise FamfindError(p, f"cannot read a 'text' column ({str(e).splitlines()[0]})") from None
        return [({"name": f"{p.name}:{i}"}, r[0]) for i, r in enumerate(rows) if r[0]]
    try:
        return [(_doc_meta(p.name, p.suffix), p.read_text())]
    except UnicodeDecodeError:
        raise FamfindError(p, "not a UTF-8 text file (expected .npy tokens, text, .jsonl or .parquet)") from None


def tokenize_texts(texts: list[str], tokenizer) -> np.ndarray:
    """Token stream ``int64 [n_tokens]``: documents joined by ``<|endoftext|>`` if known."""
    eot = tokenizer.encode(EOT)
    sep = eot if len(eot) == 1 else []
    ids: list[int] = []
    for doc in tokenizer.encode_batch(texts):
        ids.extend(doc)
        ids.extend(sep)
    return np.asarray(ids, dtype=np.int64)


def _read_npy_tokens(p: Path) -> np.ndarray:
    """A ``.npy`` token array as ``int64 [n_tokens]``. Integer arrays are taken as they are;
    a float array only when every value is a whole number (a cast would cut 3.7 to 3)."""
    try:
        a = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FamfindError(p, f"not a readable .npy token array ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(a, np.ndarray):
        raise FamfindError(p, "not a .npy array (an .npz archive?)")
    if np.issubdtype(a.dtype, np.floating):
        bad = int((~np.isfinite(a) | (a != np.round(a))).sum())
        if bad:
            raise FamfindError(p, f"token ids must be integers; {bad} of {a.size} {a.dtype} values are not whole "
                               "numbers")
    elif not np.issubdtype(a.dtype, np.integer):
        raise FamfindError(p, f"token ids must be integers, got dtype {a.dtype}")
    return a.astype(np.int64).reshape(-1)


def load_corpus(path: str | Path | None, tokenizer, seq_len: int, max_tokens: int | None = None,
                d_vocab: int | None = None) -> TokenCorpus:
    """Read, tokenise and window a corpus (``None``: the shipped eval tokens).

    Raises ``FamfindError`` naming the file for a missing or unreadable input, token ids that
    are not integers (a float ``.npy`` is read only when every value is whole) or lie outside
    ``[0, d_vocab)``, or fewer tokens than one ``seq_len`` window; naming ``max_tokens``
    when it is below 1.
    """
    p = Path(path) if path is not None else default_dir() / "eval_tokens.npy"
    if not p.exists():
        raise FamfindError(p, "file not found")
    if max_tokens is not None and max_tokens < 1:
        raise FamfindError("max_tokens", f"must be a positive number of tokens, got {max_tokens}")
    with reading(p, "it as a corpus"):
        if p.suffix == ".npy":
            stream = _read_npy_tokens(p)
            docs = _read_docs_json(p)
        else:
            named = _read_named_texts(p)  # the file's own problems first
            if tokenizer is None:
                raise FamfindError(p, "text corpus given but the model has no tokenizer")
            stream = tokenize_texts([t for _, t in named], tokenizer)
            docs = [m for m, _ in named]
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n_seq = stream.size // seq_len
    if n_seq == 0:
        raise FamfindError(p, f"only {stream.size} tokens: fewer than one sequence of {seq_len}")
    if d_vocab is not None and (stream.min() < 0 or stream.max() >= d_vocab):
        raise FamfindError(p, f"token ids must lie in [0, {d_vocab}) for this model; found {stream.max()}")
    return TokenCorpus(torch.from_numpy(stream[: n_seq * seq_len].reshape(n_seq, seq_len)), str(p), docs)
