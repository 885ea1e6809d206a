"""Corpus and BPE tokenizer for the embedded default model.

Real text that a fresh Debian bookworm machine can fetch through its package registry:

- prose: the reStructuredText sources of the Python 3.11 documentation
  (Debian package ``python3.11-doc``, ``usr/share/doc/python3.11/html/_sources/**.rst.txt``);
- code: the CPython 3.11 standard library (Debian package ``libpython3.11-stdlib``,
  ``usr/lib/python3.11/**.py``), sampled so code is ~20% of the characters, roughly the
  80/20 prose/code mix Kissane et al. (2024) trained gelu-2l on.

Documents (one file each) are split into train / held-out by a seeded permutation, so
the model and the SAE never see a held-out document. Tokens are stored as 1-D ``uint16``
arrays with documents separated by ``<|endoftext|>`` (the format of ``eval_tokens.npy``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGES = ("python3.11-doc", "libpython3.11-stdlib")
PROSE_GLOB = "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
CODE_GLOB = "usr/lib/python3.11/**/*.py"
EOT = "<|endoftext|>"
CODE_FRACTION = 0.20  # share of characters from code, as in the paper's gelu-2l mix
HELDOUT_FRACTION = 0.28  # of characters; chosen so the held-out split has >= 1M tokens


@dataclass(frozen=True)
class Document:
    source: str  # "prose" | "code"
    path: str  # path inside the Debian package
    text: str


def fetch_debian_sources(workdir: Path) -> dict[str, str]:
    """Download and unpack the source packages with ``apt-get download`` + ``dpkg -x``.

    Returns ``{package: version}``. Raises ``RuntimeError`` when apt cannot fetch them.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    versions = {}
    for pkg in PACKAGES:
        if not list(workdir.glob(f"{pkg}_*.deb")):
            r = subprocess.run(["apt-get", "download", pkg], cwd=workdir, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get download {pkg} failed: {r.stderr.strip()[-300:]}")
        deb = sorted(workdir.glob(f"{pkg}_*.deb"))[-1]
        versions[pkg] = deb.name.split("_")[1]
        subprocess.run(["dpkg", "-x", str(deb), str(workdir / "root")], check=True)
    return versions


def load_documents(root: Path) -> list[Document]:
    """All prose documents, plus code documents sampled to ``CODE_FRACTION`` of characters."""
    rng = np.random.default_rng(0)
    prose = [Document("prose", str(p.relative_to(root)), p.read_text(errors="replace"))
             for p in sorted(root.glob(PROSE_GLOB)) if p.is_file() and not p.is_symlink()]
    code_all = [Document("code", str(p.relative_to(root)), p.read_text(errors="replace"))
                for p in sorted(root.glob(CODE_GLOB)) if p.is_file() and not p.is_symlink()]
    prose_chars = sum(len(d.text) for d in prose)
    target = prose_chars * CODE_FRACTION / (1 - CODE_FRACTION)
    code, n = [], 0
    for i in rng.permutation(len(code_all)):
        if n >= target:
            break
        code.append(code_all[i])
        n += len(code_all[i].text)
    return prose + code


def split_documents(docs: list[Document], seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Seeded document-level split: (train, heldout), held-out ~``HELDOUT_FRACTION`` of chars."""
    rng = np.random.default_rng(seed)
    total = sum(len(d.text) for d in docs)
    train, held, n_held = [], [], 0
    for i in rng.permutation(len(docs)):
        if n_held < HELDOUT_FRACTION * total:
            held.append(docs[i])
            n_held += len(docs[i].text)
        else:
            train.append(docs[i])
    return train, held


def train_tokenizer(docs: list[Document], vocab_size: int, out: Path) -> None:
    """Byte-level BPE (GPT-2 style) trained on ``docs`` only; saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    tok.save(str(out))


def encode_documents(tokenizer_path: Path, docs: list[Document]) -> np.ndarray:
    """Concatenate documents, each followed by ``<|endoftext|>``; returns ``uint16 [n_tokens]``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        out.extend(enc.ids)
        out.append(eot)
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise ValueError("vocab too large for uint16 token files")
    return np.asarray(out, dtype=np.uint16)


def write_docs_json(path: Path, docs: list[dict]) -> None:
    """The ``.docs.json`` beside a token file (:func:`famfind.corpus.load_corpus`): per
    document, in order, its ``name``, ``kind`` (``code``/``prose``) and ``markup``."""
    rows = [{"name": d.get("name", ""), "kind": d["kind"],
             "markup": d.get("markup") or ("python" if d["kind"] == "code" else "rst")} for d in docs]
    path.write_text('{"documents": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n]}\n")


def docs_json_from_tokens(tokens_path: Path, tokenizer_path: Path) -> list[dict]:
    """Per-document metadata recovered from a token file alone: documents split at
    ``<|endoftext|>``, each kind from whether its text parses as Python
    (:func:`famfind.proxies.infer_kind`); names unknown. How the shipped
    ``eval_tokens.docs.json`` was made (its counts equal the data card's)."""
    from tokenizers import Tokenizer

    from famfind.proxies import infer_kind

    tok = Tokenizer.from_file(str(tokenizer_path))
    eot = tok.token_to_id(EOT)
    a = np.load(tokens_path).astype(np.int64)
    docs = [d for d in np.split(a, np.flatnonzero(a == eot) + 1) if d.size and not (d.size == 1 and d[0] == eot)]
    return [{"name": "", "kind": infer_kind(tok.decode(d[d != eot].tolist()))[0]} for d in docs]


def build_corpus(build_dir: Path, vocab_size: int = 4096, seed: int = 0) -> dict:
    """Steps 1-2 of the embedded-default build: fetch, split, tokenizer, token files.

    Writes ``build_dir/{tokenizer.json, train_tokens.npy, eval_tokens.npy, corpus.json}``
    and returns the data-card facts (sources, versions, sizes, split sizes).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        versions = fetch_debian_sources(Path(tmp))
        docs = load_documents(Path(tmp) / "root")
        lic = (Path(tmp) / "root/usr/share/doc/python3.11-doc/copyright")
        shutil.copy(lic, build_dir / "LICENSE-python-docs.txt")
    train, held = split_documents(docs, seed)
    train_tokenizer(train, vocab_size, build_dir / "tokenizer.json")
    tr = encode_documents(build_dir / "tokenizer.json", train)
    ev = encode_documents(build_dir / "tokenizer.json", held)
    np.save(build_dir / "train_tokens.npy", tr)
    np.save(build_dir / "eval_tokens.npy", ev)
    write_docs_json(build_dir / "eval_tokens.docs.json", [{"name": d.path, "kind": d.source} for d in held])

    def stats(ds: list[Document]) -> dict:
        out = {}
        for s in ("prose", "code"):
            sub = [d for d in ds if d.source == s]
            out[s] = {"documents": len(sub), "bytes": sum(len(d.text.encode()) for d in sub)}
        return out

    facts = {
        "packages": versions,
        "vocab_size": vocab_size,
        "seed": seed,
        "train": {**stats(train), "tokens": int(tr.size)},
        "heldout": {**stats(held), "tokens": int(ev.size),
                    "documents_list": sorted(d.path for d in held)},
    }
    (build_dir / "corpus.json").write_text(json.dumps(facts, indent=1))
    return facts
