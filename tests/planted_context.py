"""A 1-layer GPT-2-format model whose one head attends to itself (``z ~ e_{current token}``),
a word-level tokenizer whose tokens decode to exactly their text, synthetic Python and reST
documents, and an SAE on ``blocks.0.attn.hook_z`` with features that fire exactly inside
Python comments, inside string literals and inside reST literal blocks (known by
construction: each reads only words that occur there and nowhere else).

Code documents (kind ``code``)::

    def fn(x):
        \"\"\"dw dw\"\"\"
        # cw cw cw          <- comment words occur only here (and in top-level comments)
        y = "sw sw"         <- string words only inside string literals
        return x + y

Prose documents (kind ``prose``, reST)::

    pw pw pw example::

        kw kw kw            <- literal-block words only inside literal blocks

    pw pw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

COMMENT_WORDS = [f" cw{i}" for i in range(8)]
STRING_WORDS = [f" sw{i}" for i in range(8)]
BLOCK_WORDS = [f" kw{i}" for i in range(8)]
DOC_WORDS = [f" dw{i}" for i in range(3)]
PROSE_WORDS = [f" pw{i}" for i in range(8)]
PIECES = (["<|endoftext|>", "\n", "    ", "def", " fn", "(", "x", ")", ":", "#", " y", " =", ' "', '"', " return",
           " x", " +", ' """', '"""', " example", "::", "."]
          + COMMENT_WORDS + STRING_WORDS + BLOCK_WORDS + DOC_WORDS + PROSE_WORDS)
ID = {p: i for i, p in enumerate(PIECES)}
V = 128
CTX = 64
D = V + CTX  # one-hot token | one-hot position
DH = 64

# planted features: (family proxy, token ids read by the encoder)
N_PER = 6
F_COMMENT = list(range(0, N_PER))
F_STRING = list(range(N_PER, 2 * N_PER))
F_BLOCK = list(range(2 * N_PER, 3 * N_PER))
F_CONTROL = list(range(3 * N_PER, 3 * N_PER + 12))  # token features on prose / code words
F_PROSE = list(range(3 * N_PER + 12, 3 * N_PER + 20))  # token features on prose words: in no family
D_SAE = 48


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="."))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(out / "tokenizer.json"))


def build_model(out: Path) -> Path:
    """``config.json`` + ``model.safetensors`` + ``tokenizer.json``: head 0.0 attends to the
    current position and copies its token one-hot into hook_z (every piece id is below
    d_head = 64)."""
    from safetensors.torch import save_file

    assert len(PIECES) <= DH
    out.mkdir(parents=True, exist_ok=True)
    wte, wpe = torch.zeros(V, D), torch.zeros(CTX, D)
    wte[:, :V] = torch.eye(V)
    wpe[:, V:] = torch.eye(CTX)
    W, b = torch.zeros(D, 3 * D), torch.zeros(3 * D)
    n_heads = D // DH  # 3 heads; only head 0 is wired
    W[V:, 0:CTX] = torch.eye(CTX) * 2.0  # query: position
    W[V:, D:D + CTX] = torch.eye(CTX) * 2.0  # key: position -> attends to itself
    W[:DH, 2 * D:2 * D + DH] = torch.eye(DH)  # value: token one-hot
    sd = {"wte.weight": wte, "wpe.weight": wpe, "ln_f.weight": torch.ones(D), "ln_f.bias": torch.zeros(D),
          "h.0.ln_1.weight": torch.ones(D), "h.0.ln_1.bias": torch.zeros(D),
          "h.0.ln_2.weight": torch.ones(D), "h.0.ln_2.bias": torch.zeros(D),
          "h.0.attn.c_attn.weight": W, "h.0.attn.c_attn.bias": b,
          "h.0.attn.c_proj.weight": torch.eye(D), "h.0.attn.c_proj.bias": torch.zeros(D),
          "h.0.mlp.c_fc.weight": torch.zeros(D, 4), "h.0.mlp.c_fc.bias": torch.zeros(4),
          "h.0.mlp.c_proj.weight": torch.zeros(4, D), "h.0.mlp.c_proj.bias": torch.zeros(D)}
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": CTX,
        "n_embd": D, "n_layer": 1, "n_head": n_heads, "n_inner": 4, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}))
    write_tokenizer(out)
    return out


def build_sae(out: Path, model_dir: str = "../model", seed: int = 0) -> Path:
    """The planted SAE (SAELens format): each context feature reads a random half of its
    context's words (comment features also read ``#``, string features the quotes)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    rng = np.random.default_rng(seed)
    d_in = (D // DH) * DH
    W_enc, W_dec = torch.zeros(d_in, D_SAE), torch.zeros(D_SAE, d_in)
    b_enc = torch.full((D_SAE,), -3.0)

    def feat(f, pieces):
        for p in pieces:
            W_enc[ID[p], f] = 1.0
            W_dec[f, ID[p]] = 1.0
        W_dec[f] /= W_dec[f].norm()

    for f in F_COMMENT:
        feat(f, ["#", *rng.choice(COMMENT_WORDS, 4, replace=False)])
    for f in F_STRING:
        feat(f, [' "', '"', *rng.choice(STRING_WORDS, 4, replace=False)])
    for f in F_BLOCK:
        feat(f, list(rng.choice(BLOCK_WORDS, 4, replace=False)))
    for i, f in enumerate(F_CONTROL):
        feat(f, [PROSE_WORDS[i % 8], [" return", " x", " y", "def", "(", ")"][i % 6]])
    for i, f in enumerate(F_PROSE):
        feat(f, [PROSE_WORDS[i]])
    for f in range(F_PROSE[-1] + 1, D_SAE):  # dead
        W_dec[f, 0] = 1.0
        b_enc[f] = -100.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(d_in), hook_name="blocks.0.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


def code_doc(rng) -> list[str]:
    def words(ws, k):
        return list(rng.choice(ws, k))

    out = ["#", *words(COMMENT_WORDS, 3), "\n"]  # a top-level comment
    for _ in range(int(rng.integers(2, 4))):
        out += ["def", " fn", "(", "x", ")", ":", "\n",
                "    ", ' """', *words(DOC_WORDS, 2), '"""', "\n",
                "    ", "#", *words(COMMENT_WORDS, int(rng.integers(2, 6))), "\n",
                "    ", " y", " =", ' "', *words(STRING_WORDS, int(rng.integers(2, 6))), '"', "\n",
                "    ", " return", " x", " +", " y", "\n"]
    return out


def prose_doc(rng) -> list[str]:
    out = []
    for _ in range(int(rng.integers(1, 3))):
        out += [*rng.choice(PROSE_WORDS, 4), " example", "::", "\n", "\n"]
        for _ in range(int(rng.integers(1, 3))):
            out += ["    ", *rng.choice(BLOCK_WORDS, int(rng.integers(2, 5))), "\n"]
        out += ["\n", *rng.choice(PROSE_WORDS, 5), ".", "\n", "\n"]
    return out


def build_corpus(out: Path, n_docs: int = 400, seed: int = 0, sidecar: bool = True) -> Path:
    """``out`` (``.npy`` token ids, documents joined by ``<|endoftext|>``) and, with
    ``sidecar``, ``<stem>.docs.json`` giving each document's kind."""
    rng = np.random.default_rng(seed)
    ids, docs = [], []
    for i in range(n_docs):
        kind = "code" if rng.random() < 0.5 else "prose"
        pieces = code_doc(rng) if kind == "code" else prose_doc(rng)
        ids += [ID[p] for p in pieces] + [ID["<|endoftext|>"]]
        docs.append({"name": f"doc{i}", "kind": kind})
    np.save(out, np.array(ids, dtype=np.uint16))
    if sidecar:
        out.with_suffix(".docs.json").write_text(json.dumps({"documents": docs}))
    return out


def build_all(root: Path) -> dict[str, Path]:
    return {"model": build_model(root / "model"), "sae": build_sae(root / "sae"),
            "corpus": build_corpus(root / "corpus.npy")}
