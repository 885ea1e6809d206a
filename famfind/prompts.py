"""Synthetic prompts for head roles and feature families: ordinal task lists (successor
heads, Gould et al. 2024), IOI prompts (Wang et al. 2022) and long-prefix repeats
(Kissane et al. 2024, §4.2). Everything is tokenised with the scanned model's tokenizer;
items that are not a single token in its vocabulary are dropped, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Gould et al. (2024), "Successor Heads", §2: the ordinal sequences they test
ORDINAL_TASKS: dict[str, list[str]] = {
    "numbers": [str(i) for i in range(1, 21)],
    "number_words": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                     "eleven", "twelve"],
    "ordinals": ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"],
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December"],
    "letters": [chr(c) for c in range(ord("A"), ord("Z") + 1)],
    "roman": ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X"],
}


@dataclass(frozen=True)
class OrdinalTask:
    """One task's items as token ids in order; ``None`` where an item is not one token."""

    name: str
    items: list[str]
    ids: list[int | None]

    def pairs(self) -> list[tuple[int, int]]:
        """(item, next item) token-id pairs where both are single tokens."""
        return [(a, b) for a, b in zip(self.ids, self.ids[1:]) if a is not None and b is not None]

    @property
    def token_ids(self) -> list[int]:
        return [i for i in self.ids if i is not None]


def _single(tokenizer, text: str) -> int | None:
    """The token id if ``text`` is one token that decodes back to it (an unknown-word token
    does not count), else ``None``."""
    ids = tokenizer.encode(text)
    if len(ids) != 1 or tokenizer.decode(ids).strip() != text.strip():
        return None
    return ids[0]


def ordinal_tasks(tokenizer, min_pairs: int = 2) -> list[OrdinalTask]:
    """The tasks of :data:`ORDINAL_TASKS` in the spelling (leading space or not, as written or
    lower-case) that gives the most single-token items; tasks with fewer than ``min_pairs``
    consecutive single-token pairs are dropped. Needs a tokenizer (``None`` -> ``[]``)."""
    if tokenizer is None:
        return []
    out = []
    for name, items in ORDINAL_TASKS.items():
        best = None
        for space in (" ", ""):
            for case in (str, str.lower):
                ids = [_single(tokenizer, space + case(x)) for x in items]
                if best is None or sum(i is not None for i in ids) > sum(i is not None for i in best):
                    best = ids
        task = OrdinalTask(name, items, best)
        if len(task.pairs()) >= min_pairs and len(set(task.token_ids)) == len(task.token_ids):
            out.append(task)
    return out


def successor_map(tasks: list[OrdinalTask]) -> dict[int, list[tuple[str, int]]]:
    """token id of an item -> [(task, token id of its predecessor)] over all tasks."""
    out: dict[int, list[tuple[str, int]]] = {}
    for t in tasks:
        for a, b in t.pairs():
            out.setdefault(b, []).append((t.name, a))
    return out


# Wang et al. (2022), "Interpretability in the Wild", App. templates (ABBA / BABA forms)
IOI_TEMPLATES = [
    "When [A] and [B] went to the store, [B] gave a drink to",
    "When [A] and [B] went to the park, [B] gave a ball to",
    "After [A] and [B] went to the office, [B] gave a book to",
    "Then, [A] and [B] had a long argument, and afterwards [B] said to",
    "While [A] and [B] were working at the house, [B] gave a key to",
    "Friends [A] and [B] found a bone at the garden. [B] gave it to",
    "When [A] and [B] got a snack at the school, [B] decided to give it to",
    "After the lunch, [A] and [B] went to the station. [B] gave a ring to",
]
IOI_NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Dan", "Sarah", "Anna", "Michael", "David",
             "Paul", "Mark", "Kate", "Lisa", "Peter", "Jane", "Jack", "Sam", "Max", "Ben", "Emma", "Lucy",
             "Adam", "Eve", "Tim", "Joe", "Amy", "Ann", "Carl"]


@dataclass
class IOIBatch:
    """IOI prompts of one template (equal length). ``tokens [n, pos]``; ``io``, ``s``
    (token ids) and ``io_pos`` (position of the indirect object's only occurrence) ``[n]``;
    the END position is the last one."""

    template: str
    tokens: torch.Tensor
    io: torch.Tensor
    s: torch.Tensor
    io_pos: torch.Tensor

    def io_minus_s(self, W_U: torch.Tensor) -> torch.Tensor:
        """Unembedding directions ``W_U[:, IO] - W_U[:, S]`` per prompt, ``[n, d_model]``
        (``W_U [d_model, d_vocab]``): a residual vector's dot product is its logit diff."""
        return (W_U[:, self.io.to(W_U.device)] - W_U[:, self.s.to(W_U.device)]).T


def ioi_names(tokenizer) -> list[tuple[str, int]]:
    """Names of :data:`IOI_NAMES` that are one token after a space: ``[(name, id)]``."""
    if tokenizer is None:
        return []
    return [(n, i) for n in IOI_NAMES if (i := _single(tokenizer, " " + n)) is not None]


def ioi_prompts(tokenizer, n_per_template: int, generator: torch.Generator,
                templates: list[str] = IOI_TEMPLATES) -> list[IOIBatch]:
    """``n_per_template`` prompts per template with random distinct single-token names, half
    ABBA (IO first) and half BABA; templates whose prompts do not tokenise to a fixed length
    with the IO name found once are skipped. Fewer than 2 names -> ``[]``."""
    names = ioi_names(tokenizer)
    if len(names) < 2:
        return []
    out = []
    for tpl in templates:
        rows, ios, ss, pos = [], [], [], []
        for j in range(n_per_template):
            a, b = torch.randperm(len(names), generator=generator)[:2].tolist()
            (io, io_id), (s, s_id) = names[a], names[b]
            text = _ioi_text(tpl, io, s, abba=j % 2 == 0)
            ids = tokenizer.encode(text)
            where = [k for k, t in enumerate(ids) if t == io_id]
            if len(where) != 1 or (rows and len(ids) != len(rows[0])):
                continue
            rows.append(ids)
            ios.append(io_id)
            ss.append(s_id)
            pos.append(where[0])
        if len(rows) >= 2:
            out.append(IOIBatch(tpl, torch.tensor(rows), torch.tensor(ios), torch.tensor(ss), torch.tensor(pos)))
    return out


def _ioi_text(tpl: str, io: str, s: str, abba: bool) -> str:
    """``[A] and [B]`` introduce both names (IO first if ``abba``), the later ``[B]`` is S."""
    head, sep, tail = tpl.partition("[B]")
    first, second = (io, s) if abba else (s, io)
    return head.replace("[A]", first) + second + tail.replace("[B]", s)


def bos_id(tokenizer) -> int | None:
    """The BOS token id: ``<|endoftext|>`` (GPT-2 and the embedded default), ``<bos>`` or
    ``<s>`` when one of them is a single token of the vocabulary, else ``None``."""
    if tokenizer is None:
        return None
    for t in ("<|endoftext|>", "<bos>", "<s>"):
        ids = tokenizer.encode(t)  # special tokens decode to "", so no round trip here
        if len(ids) == 1:
            return ids[0]
    return None


def long_prefix_prompts(d_vocab: int, prefix_len: int, n: int, generator: torch.Generator,
                        filler: int = 20, exclude: tuple[int, ...] = (),
                        bos: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Repeats of a prefix of ``prefix_len`` random tokens, for a head's induction score as a
    function of the matching prefix (Kissane et al. 2024, heads 5.1 vs 5.5 of GPT-2 small).

    Sequence: ``[BOS] F1 [p_1..p_k] B F2 [p_1..p_k]``, all uniform random tokens (never one
    of ``exclude``), ``F1``/``F2`` ``filler`` tokens each, so the token before the second copy
    differs from the one before the first; BOS first when ``bos`` is given (as TransformerLens
    prepends it). Returns ``(tokens [n, pos], dest, src)``: the last position (second
    ``p_k``) should attend to ``src`` (the ``B`` after the first copy) if the head does
    induction on a ``k``-token prefix.
    """
    k = prefix_len
    L = filler + k + 1 + filler + k
    toks = torch.randint(0, d_vocab, (n, L), generator=generator)
    for e in (*exclude, *(() if bos is None else (bos,))):
        toks[toks == e] = (e + 1) % d_vocab
    toks[:, filler + k + 1 + filler:] = toks[:, filler:filler + k]
    # the token before each copy must differ, or the effective prefix would be k + 1
    same = toks[:, filler - 1] == toks[:, filler + k + filler]
    toks[same, filler + k + filler] = (toks[same, filler - 1] + 1) % d_vocab
    if bos is None:
        return toks, L - 1, filler + k
    return torch.cat([torch.full((n, 1), bos), toks], 1), L, filler + k + 1
