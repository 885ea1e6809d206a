"""Proxies for tests/planted_families.py's high-level planted features, loaded as a user's
``--proxy`` file: "this sequence has mentioned river/lake (or sea/ocean) so far"."""

import numpy as np

from famfind.proxies import Proxy

from planted_families import ID

BOS = ID["<bos>"]
WATER = {w: ID[w] for w in ("river", "lake", "sea", "ocean")}


def _after_first(ids: np.ndarray, words: set[int]) -> np.ndarray:
    """Positions at or after the first of ``words`` since the last <bos>."""
    seg = np.cumsum(ids == BOS)  # segment number of each position
    hit = np.isin(ids, list(words)).astype(np.int64)
    seen = np.zeros_like(hit)
    for s in np.unique(seg):
        m = seg == s
        seen[m] = np.cumsum(hit[m])
    return seen > 0


class RiverLake(Proxy):
    id = "topic_river_lake"
    description = "after river or lake in the same sequence"
    context = "high_level"

    def mark(self, doc):
        return _after_first(doc.ids, {WATER["river"], WATER["lake"]})


class SeaOcean(Proxy):
    id = "topic_sea_ocean"
    description = "after sea or ocean in the same sequence"
    context = "high_level"

    def mark(self, doc):
        return _after_first(doc.ids, {WATER["sea"], WATER["ocean"]})


def _after_opener(ids: np.ndarray, opener: int, brackets: set[int]) -> np.ndarray:
    """Positions whose most recent bracket token since the last <bos> is ``opener`` (what
    head 2.6 of the planted model reads: it attends to the most recent bracket)."""
    out = np.zeros(ids.size, dtype=bool)
    last = -1
    for i, t in enumerate(ids.tolist()):
        if t == BOS:
            last = -1
        elif t in brackets:
            last = t
        out[i] = last == opener
    return out


def _bracket_proxy(name: str, word: str):
    from planted_families import ID as _ID

    brackets = {_ID[b] for b in "()[]{}"}

    class _P(Proxy):
        id = name
        description = f"after {word} and before the next bracket, in the same sequence"

        def mark(self, doc):
            return _after_opener(doc.ids, _ID[word], brackets)

    return _P


RoundBracket = _bracket_proxy("after_round_opener", "(")
SquareBracket = _bracket_proxy("after_square_opener", "[")
CurlyBracket = _bracket_proxy("after_curly_opener", "{")
