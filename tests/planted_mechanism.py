"""A hand-wired 1-layer GPT-2-format model whose heads read fixed distances, and a
``blocks.0.attn.hook_z`` SAE with features whose mechanism is known by construction.

Residual stream (d_model = 512): dims [0, 64) one-hot token, [64, 127) one-hot position
(n_ctx = 63), the rest unused. Heads 0-3 attend from position ``p`` to ``p - d`` for
``d = 0, 1, 5, 40`` and copy that position's token into their value (one-hot); a query bias
makes them rest on BOS (token 0, value 0) when ``p - d`` does not exist. Head 4 attends to
itself and copies the *position* (one-hot), not the token. Heads 5-7 are zero.

SAE features (d_sae = 64):

- ``DISTANCE[d]``: for each distance, ``PER`` features; feature ``i`` reads head ``h(d)``'s
  value for a set of 3 tokens (``SOURCE_SETS[f]``): it fires when the token at ``p - d`` is
  in the set. Known answer: class (d = 0 current_token, 1 previous_token, 5 short_range,
  40 long_range), top distance d, top head 0.h, source set.
- ``POSITIONAL``: reads head 4's position one-hot for a few positions: fires there whatever
  the tokens (no token dependence): its record must not be validated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

V, CTX, D, H, DH = 64, 63, 512, 8, 64
TOK, POS = 0, 64
DISTANCES = (0, 1, 5, 40)  # head h reads distance DISTANCES[h]
CLASS_OF = {0: "current_token", 1: "previous_token", 5: "short_range", 40: "long_range"}
PER = 6  # features per distance
SCALE = 3.0
REST = 63  # the query/key dim of the BOS rest (position dims are 0..62)


def build_model(out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    n = (D / 2) ** 0.5  # LayerNorm gain on a one-hot dim (2 ones in 512 dims)
    sd = {"wte.weight": torch.zeros(V, D), "wpe.weight": torch.zeros(CTX, D),
          "ln_f.weight": torch.ones(D), "ln_f.bias": torch.zeros(D)}
    sd["wte.weight"][:, TOK:TOK + V] = torch.eye(V)
    sd["wpe.weight"][:, POS:POS + CTX] = torch.eye(CTX)
    p = "h.0."
    sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = torch.ones(D), torch.zeros(D)
    sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = torch.ones(D), torch.zeros(D)
    W, b = torch.zeros(D, 3 * D), torch.zeros(3 * D)
    q, k, v = (lambda h, i=i: slice(i * D + h * DH, i * D + (h + 1) * DH) for i in range(3))
    for h, d in enumerate(DISTANCES):
        Qh, Kh, Vh = W[:, q(h)], W[:, k(h)], W[:, v(h)]
        Qh[POS + d:POS + CTX, 0:CTX - d] = torch.eye(CTX - d) * SCALE  # query at p matches key p - d
        Kh[POS:POS + CTX - d, 0:CTX - d] = torch.eye(CTX - d) * SCALE
        Kh[TOK, REST] = 1.0  # BOS's key
        b[q(h)][REST] = 40.0  # rest on BOS (score ~ 40 n / 8) when p - d does not exist (match ~ 9 n^2 / 8)
        Vh[TOK + 1:TOK + V, 1:V] = torch.eye(V - 1) / n  # copy the token (BOS copies nothing)
    Qh, Kh, Vh = W[:, q(4)], W[:, k(4)], W[:, v(4)]  # head 4: attend to self, copy the position
    Qh[POS:POS + CTX, 0:CTX] = torch.eye(CTX) * SCALE
    Kh[POS:POS + CTX, 0:CTX] = torch.eye(CTX) * SCALE
    Vh[POS:POS + CTX, 0:CTX] = torch.eye(CTX) / n
    sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = W, b
    sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = torch.eye(D), torch.zeros(D)
    sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = torch.zeros(D, 4 * D), torch.zeros(4 * D)
    sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = torch.zeros(4 * D, D), torch.zeros(D)
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": CTX,
        "n_embd": D, "n_layer": 1, "n_head": H, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True}))
    return out


def features() -> tuple[dict[int, tuple[int, list[int]]], list[int]]:
    """``{feature: (distance, source set)}`` of the distance features, and the positional ones."""
    g = np.random.default_rng(5)
    dist, f = {}, 0
    for d in DISTANCES:
        for _ in range(PER):
            dist[f] = (d, sorted(int(x) for x in g.choice(np.arange(1, V), 3, replace=False)))
            f += 1
    return dist, list(range(f, f + 4))


POSITIONS = {0: [10, 30, 50], 1: [20, 44], 2: [15, 35, 55], 3: [25, 61]}  # positional feature -> positions


def build_sae(out: Path, model_dir: str = "../model") -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    F = 64
    W_enc, W_dec, b_enc = torch.zeros(D, F), torch.zeros(F, D), torch.full((F,), -100.0)
    dist, positional = features()
    for f, (d, toks) in dist.items():
        h = DISTANCES.index(d)
        for t in toks:
            W_enc[h * DH + t, f] = 1.0
        W_dec[f, h * DH + toks[0]] = 1.0
        b_enc[f] = -0.35
    for i, f in enumerate(positional):
        for p in POSITIONS[i]:
            W_enc[4 * DH + p, f] = 1.0
        W_dec[f, 4 * DH + POSITIONS[i][0]] = 1.0
        b_enc[f] = -0.35
    for f in range(len(dist) + len(positional), F):  # dead
        W_dec[f, 6 * DH + f] = 1.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(D), hook_name="blocks.0.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


def build_corpus(out: Path, n_seq: int = 240, seed: int = 1) -> Path:
    """Uniform random tokens 1..63 with BOS (0) first, ``uint16 [n_seq * CTX]``."""
    rng = np.random.default_rng(seed)
    seqs = rng.integers(1, V, size=(n_seq, CTX))
    seqs[:, 0] = 0
    np.save(out, seqs.reshape(-1).astype(np.uint16))
    return out


def build_all(root: Path) -> dict[str, Path]:
    return {"model": build_model(root / "model"), "sae": build_sae(root / "sae"),
            "corpus": build_corpus(root / "corpus.npy")}
