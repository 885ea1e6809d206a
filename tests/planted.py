"""A hand-wired 2-layer GPT-2-format model with a known induction circuit, and an SAE on its
``blocks.1.attn.hook_z`` with planted features whose families are known by construction.

Residual stream (d_model = 256): dims [0, 64) one-hot token, [64, 128) one-hot position,
[128, 192) "previous token" written by head 0.0, [192, 256) unused. MLPs are zero.

- head 0.0: previous-token head (query position p matches key position p-1); OV copies the
  key's token into the previous-token dims.
- head 1.0: induction head. Query = current token t, key = previous token of each position,
  so it attends to positions that followed an earlier t; OV copies that position's token,
  so ``z[1.0] ~ e_{predicted next token}``. A query bias makes it rest on BOS (token 0,
  value 0) when there is no earlier match, so ``z[1.0] ~ 0`` at first occurrences.
- head 1.1: attends to itself, ``z ~ e_{current token}``; head 1.2: previous-token head,
  ``z ~ e_{previous token}``; head 1.3: zero.

SAE features (d_sae = 128): ``INDUCTION`` (encoder and decoder on head 1.0 dim t: fires when
induction predicts t, boosts t), ``DECOYS`` (decoder on head 1.0, so selected, but the
encoder reads head 1.1: fires on a current token, not by induction), ``CONTROLS`` (encoder
and decoder on heads 1.1 / 1.2), and ``DEAD`` features that never fire.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

V, CTX, D, H, DH = 64, 64, 256, 4, 64
TOK, POS, PREV = 0, 64, 128
SCALE = 1.5  # sharpens attention: match logit ~24 vs BOS rest logit ~10
INDUCTION = list(range(0, 20))  # feature f: induction feature for token f + 1
DECOYS = list(range(20, 40))
CONTROLS = list(range(40, 100))
DEAD = list(range(100, 128))


def _head_cols(h: int) -> slice:
    return slice(h * DH, (h + 1) * DH)


def build_model(out: Path, rdfa_head: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` of the planted model to ``out``.
    ``rdfa_head``: head 1.3 attends to itself and reads the previous-token dims head 0.0
    wrote, so ``z[1.3] ~ e_{previous token}`` comes from layer 0's attention (for RDFA)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    n = 9.2  # approximate LayerNorm gain on one-hot dims (3 ones in 256 dims)
    sd = {"wte.weight": torch.zeros(V, D), "wpe.weight": torch.zeros(CTX, D),
          "ln_f.weight": torch.ones(D), "ln_f.bias": torch.zeros(D)}
    sd["wte.weight"][:, TOK:TOK + V] = torch.eye(V)
    sd["wpe.weight"][:, POS:POS + CTX] = torch.eye(CTX)
    for lyr in range(2):
        p = f"h.{lyr}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = torch.ones(D), torch.zeros(D)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = torch.ones(D), torch.zeros(D)
        W = torch.zeros(D, 3 * D)  # columns: q | k | v, each n_heads * d_head
        b = torch.zeros(3 * D)
        Wo = torch.zeros(D, D)
        q, k, v = (lambda h, i=i: slice(i * D + h * DH, i * D + (h + 1) * DH) for i in range(3))
        for h in range(H):
            Qh, Kh, Vh = W[:, q(h)], W[:, k(h)], W[:, v(h)]
            prev_head = (lyr == 0 and h == 0) or (lyr == 1 and h == 2)
            if prev_head:  # query pos p -> e_p, key pos j -> e_{j+1}
                Qh[POS:POS + CTX, :] = torch.eye(CTX) * SCALE * 2
                Kh[POS:POS + CTX - 1, 1:CTX] = torch.eye(CTX - 1) * SCALE * 2
                Vh[TOK:TOK + V, :] = torch.eye(V) / n
                if lyr == 0:
                    Wo[_head_cols(h), PREV:PREV + V] = torch.eye(V)
            if lyr == 1 and h == 0:  # induction
                Qh[TOK + 1:TOK + V, 1:V] = torch.eye(V - 1) * SCALE
                Kh[PREV + 1:PREV + V, 1:V] = torch.eye(V - 1) * SCALE
                Kh[TOK, 0] = SCALE  # BOS key
                b[q(h)][0] = 10.0 * 8 / (n * SCALE)  # rest on BOS with logit ~10 when nothing matches
                Vh[TOK + 1:TOK + V, 1:V] = torch.eye(V - 1) / n
                Wo[_head_cols(h), TOK:TOK + V] = torch.eye(V)  # W_O W_U boosts the copied token
            if lyr == 1 and h == 3 and rdfa_head:  # attend to self, read what head 0.0 wrote
                Qh[POS:POS + CTX, :] = torch.eye(CTX) * SCALE * 2
                Kh[POS:POS + CTX, :] = torch.eye(CTX) * SCALE * 2
                Vh[PREV:PREV + V, :] = torch.eye(V) / n
            if lyr == 1 and h == 1:  # attend to self
                Qh[POS:POS + CTX, :] = torch.eye(CTX) * SCALE * 2
                Kh[POS:POS + CTX, :] = torch.eye(CTX) * SCALE * 2
                Vh[TOK:TOK + V, :] = torch.eye(V) / n
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = W, b
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = Wo, torch.zeros(D)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = torch.zeros(D, 4 * D), torch.zeros(4 * D)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = torch.zeros(4 * D, D), torch.zeros(D)
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": CTX,
        "n_embd": D, "n_layer": 2, "n_head": H, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}))
    return out


def build_sae(out: Path, model_dir: str = "../model") -> Path:
    """Write the planted SAE in SAELens format to ``out``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    F = 128
    W_enc, W_dec, b_enc = torch.zeros(D, F), torch.zeros(F, D), torch.full((F,), -0.35)
    g = torch.Generator().manual_seed(0)
    for i, f in enumerate(INDUCTION):
        t = i + 1
        W_enc[0 * DH + t, f] = 1.0
        a = (0.65, 0.75, 0.85, 1.0)[i % 4]  # head attribution on 1.0 (the rest on 1.2)
        W_dec[f, 0 * DH + t] = a
        W_dec[f, 2 * DH + t] = 1 - a
    for i, f in enumerate(DECOYS):
        s, t = 1 + (i * 7) % 63, 21 + i
        W_enc[1 * DH + s, f] = 1.0  # fires on current token s
        W_dec[f, 0 * DH + t] = 1.0  # ... but its decoder sits on the induction head
    for i, f in enumerate(CONTROLS):
        h = 1 + i % 2
        s = 1 + int(torch.randint(0, V - 1, (1,), generator=g))
        W_enc[h * DH + s, f] = 1.0
        W_dec[f, h * DH + s] = 1.0
    for f in DEAD:
        W_dec[f, 3 * DH + (f % DH)] = 1.0
        b_enc[f] = -100.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(D), hook_name="blocks.1.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


PREV_FEATURES = list(range(0, 20))  # layer-0 SAE: feature f fires right after token f + 1 (head 0.0)
EVERYWHERE = list(range(20, 30))  # layer-0 SAE: fire at every position, decoder on head 0.2
DEAD0 = list(range(30, 32))


def build_sae_layer0(out: Path, model_dir: str = "../model") -> Path:
    """A planted SAE on ``blocks.0.attn.hook_z``: ``PREV_FEATURES`` read and write head 0.0's
    previous-token value (a previous-token family by construction: selected on 0.0, fire right
    after their token, turned off by mean-ablating 0.0); ``EVERYWHERE`` fire at every position
    with their decoder on head 0.2 (control group, fail the behaviour test); ``DEAD0`` never fire."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    F = 32
    W_enc, W_dec, b_enc = torch.zeros(D, F), torch.zeros(F, D), torch.full((F,), -0.35)
    for i, f in enumerate(PREV_FEATURES):
        t = i + 1
        W_enc[0 * DH + t, f] = 1.0
        W_dec[f, 0 * DH + t] = 1.0
    for i, f in enumerate(EVERYWHERE):
        b_enc[f] = 0.5 + 0.01 * i
        W_dec[f, 2 * DH + i] = 1.0
    for f in DEAD0:
        W_dec[f, 3 * DH + f] = 1.0
        b_enc[f] = -100.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(D), hook_name="blocks.0.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


def build_sae_rdfa(out: Path, model_dir: str = "../model", n: int = 8) -> Path:
    """A layer-1 SAE for the ``rdfa_head`` model: feature i reads and writes head 1.3's dim
    ``i + 1`` (fires when the previous token is ``i + 1``); its upstream cause is the layer-0
    SAE's ``PREV_FEATURES[i]``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    W_enc, W_dec, b_enc = torch.zeros(D, n), torch.zeros(n, D), torch.full((n,), -0.35)
    for i in range(n):
        W_enc[3 * DH + i + 1, i] = 1.0
        W_dec[i, 3 * DH + i + 1] = 1.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(D), hook_name="blocks.1.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


def build_corpus(out: Path, n_seq: int = 400, seed: int = 0) -> Path:
    """Random-token sequences (BOS = 0 first) with repeated spans, ``uint16 [n_seq * CTX]``."""
    rng = np.random.default_rng(seed)
    seqs = rng.integers(1, V, size=(n_seq, CTX))
    seqs[:, 0] = 0
    for s in seqs:
        for _ in range(2):
            L = int(rng.integers(4, 12))
            a = int(rng.integers(1, CTX - 2 * L))
            c = int(rng.integers(a + L, CTX - L + 1))
            s[c:c + L] = s[a:a + L]
    np.save(out, seqs.reshape(-1).astype(np.uint16))
    return out


def build_all(root: Path) -> dict[str, Path]:
    """Model, SAE and corpus under ``root``; returns their paths."""
    return {"model": build_model(root / "model"), "sae": build_sae(root / "sae"),
            "sae_l0": build_sae_layer0(root / "sae_l0"), "corpus": build_corpus(root / "corpus.npy")}


def build_wide_sae(out: Path, d_sae: int = 24_576, model_dir: str = "../model") -> Path:
    """A GPT-2-small-width SAE (``d_sae`` features) on ``blocks.1.attn.hook_z`` of the planted
    model, for report-size tests: feature f reads head 1.1 (``z ~ e_{current token}``) at
    token ``1 + f % 63``, so every feature is live; decoder rows are random unit vectors."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    g = torch.Generator().manual_seed(3)
    f = torch.arange(d_sae)
    W_enc = torch.zeros(D, d_sae)
    W_enc[1 * DH + 1 + f % (V - 1), f] = 1.0
    W_dec = torch.randn(d_sae, D, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = SAE(W_enc, W_dec, torch.full((d_sae,), -0.35), torch.zeros(D), hook_name="blocks.1.attn.hook_z",
              model_name=model_dir)
    save_saelens(sae, out)
    return out


# long_prefix_features with 4 prompts per (prefix length, token) instead of 16 for the shared
# planted scans: its 9 x 16 x n_tokens prompts were half of a planted scan, and no test reads the
# planted model's long-prefix rows (the long-prefix families: tests/test_families.py)
FAST_OPTIONS = {"long_prefix_features": {"n_seqs": 4}}
