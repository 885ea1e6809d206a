"""--corpus inputs: .npy tokens, a text file, a directory, .jsonl, .parquet; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from famfind.corpus import load_corpus
from famfind.errors import FamfindError
from famfind.models.gpt2 import HFTokenizer

DOCS = ["The induction head copies the token after an earlier match. " * 3,
        "def f(x):\n    return x + 1\n" * 4, "Previous-token heads attend one position back. " * 3]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    show_progress=False))
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t.save(str(p))
    return HFTokenizer(p)


def _expected(tok) -> list[int]:
    ids = []
    for d in DOCS:
        ids += tok.encode(d) + [0]
    return ids


def test_all_text_formats_give_the_same_tokens(tmp_path, tok):
    want = _expected(tok)
    (tmp_path / "d").mkdir()
    for i, d in enumerate(DOCS):
        (tmp_path / "d" / f"{i}.txt").write_text(d)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)))
    import duckdb

    duckdb.sql("SELECT * FROM (VALUES " + ", ".join(f"({i}, $${d}$$)" for i, d in enumerate(DOCS)) +
               ") t(id, text) ORDER BY id").write_parquet(str(tmp_path / "c.parquet"))
    for src in ("d", "c.jsonl", "c.parquet"):
        c = load_corpus(tmp_path / src, tok, seq_len=16)
        assert c.tokens.reshape(-1).tolist() == want[: c.n_tokens], src
        assert c.tokens.shape[1] == 16 and c.n_tokens == len(want) // 16 * 16
    one = tmp_path / "one.txt"
    one.write_text(DOCS[0])
    ids = tok.encode(DOCS[0]) + [0]
    assert load_corpus(one, tok, 8).tokens.reshape(-1).tolist() == ids[: len(ids) // 8 * 8]
    np.save(tmp_path / "t.npy", np.asarray(want, dtype=np.uint16))
    c = load_corpus(tmp_path / "t.npy", None, 16, max_tokens=40)
    assert c.tokens.shape == (2, 16) and c.tokens.reshape(-1).tolist() == want[:32]


@pytest.mark.parametrize("name, content, msg", [
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', "line 2 has no string field 'text'"),
    ("bad2.jsonl", "not json\n", "line 1 is not valid JSON"),
    ("short.txt", "hi", "fewer than one sequence"),
])
def test_bad_corpus_files(tmp_path, tok, name, content, msg):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(FamfindError, match=msg) as e:
        load_corpus(p, tok, seq_len=64)
    assert name in str(e.value)


def test_empty_directory_and_no_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FamfindError, match="no text files"):
        load_corpus(tmp_path / "empty", object(), 8)
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(FamfindError, match="model has no tokenizer"):
        load_corpus(tmp_path / "a.txt", None, 8)
