"""A hand-wired 3-layer GPT-2-format model whose layer-2 heads each play one known role, an
SAE on ``blocks.2.attn.hook_z`` with planted features for every family, a word-level
tokenizer and a corpus that exercises them. The answer of every detector is known by
construction.

Residual stream (d_model = 1024, 16 blocks of 64): TOK one-hot token, POS one-hot position,
PREV (token at p-1, from head 0.0), PREV2 (token at p-2, head 0.1), DUPID (a name's identity
at its repeat, head 0.2), INHIB (the repeated name, moved to later positions by head 1.0), FLAGS
(is-BOS, is-name, is-opener, is-topic, is-bracket) and RECENCY (a position ramp). MLPs are
zero (and 4 wide).

Layer-2 heads (d_head = 128):
- 2.0 successor: attends to itself; OV maps an ordinal item to its successor (boosts it);
- 2.1 name mover: attends to names not in INHIB (at END of an IOI prompt: the IO); copies;
- 2.2 previous-token: attends to p-1; copies;
- 2.3 duplicate-token: attends to an earlier occurrence of the current token, else BOS;
- 2.4 long-prefix induction: needs the current AND previous token to match (prefix >= 2);
- 2.5 induction: current token matches a previous token (prefix 1); both boost the copy;
- 2.6 local context: attends to the most recent bracket (opener or closer); copies;
- 2.7 high-level context: attends evenly to every topic word so far, else BOS.

Decoys have their decoder on a role head (so they are selected) but read their encoder from
a head of another role (so the behaviour test must reject them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = (["<bos>", "<unk>"] + [str(i) for i in range(1, 10)]
         + ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
         + ["Mary", "John", "Alice", "Bob", "Tom", "James", "Anna", "Paul"]
         + ["When", "and", "went", "to", "the", "store", ",", "gave", "a", "drink"]
         + ["(", ")", "[", "]", "{", "}"]
         + ["river", "lake", "sea", "ocean"])
WORDS += [f"w{i}" for i in range(64 - len(WORDS))]
V, CTX, D, H, DH = 64, 64, 1024, 8, 128
N_INNER = 4  # the MLPs are zero; a narrow one keeps the forward cheap
ID = {w: i for i, w in enumerate(WORDS)}
NUMBERS = [ID[str(i)] for i in range(1, 10)]
DAYS = [ID[d] for d in WORDS[11:18]]
NAMES = [ID[n] for n in WORDS[18:26]]
OPENERS = [ID[b] for b in "([{"]
CLOSERS = [ID[b] for b in ")]}"]
TOPIC = [ID[w] for w in ("river", "lake", "sea", "ocean")]
FILLER = [i for i, w in enumerate(WORDS) if w.startswith("w")]
SUCC = {a: b for seq in (NUMBERS, DAYS) for a, b in zip(seq, seq[1:])}

TOK, POS, PREV, PREV2, DUPID, INHIB, FLAGS, RECENCY = (i * 64 for i in range(8))
IS_BOS, IS_NAME, IS_OPEN, IS_TOPIC, IS_BRACKET = (FLAGS + i for i in range(5))

# planted SAE features (d_sae = 160): family -> features, plus the token each one is about
F_SUCC = list(range(0, 14))  # successor feature for each (item, next item) pair
F_SUCC_DECOY = list(range(14, 20))  # decoder on 2.0, encoder reads the previous-token head
F_NM = list(range(20, 28))  # name mover for each name
F_NM_DECOY = list(range(28, 32))  # decoder on 2.1, encoder on the successor head
F_PREV = list(range(32, 44))  # previous-token feature per filler token
F_PREV_DECOY = list(range(44, 48))  # decoder on 2.2, encoder on the induction head
F_DUP = list(range(48, 60))  # duplicate-token feature per filler token
F_DUP_DECOY = list(range(60, 64))  # decoder on 2.3, encoder on the previous-token head
F_LONG = list(range(64, 72))  # long-prefix induction feature per filler token
F_IND = list(range(72, 80))  # ordinary induction feature per filler token
F_LOCAL = list(range(80, 83))  # inside ( ), [ ], { }
F_HIGH = list(range(83, 85))  # after river/lake, after sea/ocean
F_DEAD = list(range(150, 160))
D_SAE = 160


GAIN = (20.0, 14.0, 14.0)  # LayerNorm gain on a one-hot dim per layer (~sqrt(D / active dims))


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<bos>", "<unk>"])
    tok.save(str(out / "tokenizer.json"))


def build_model(out: Path) -> Path:
    """``config.json`` + ``model.safetensors`` + ``tokenizer.json`` of the planted model."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    wte, wpe = torch.zeros(V, D), torch.zeros(CTX, D)
    wte[:, TOK:TOK + V] = torch.eye(V)
    wte[0, IS_BOS] = 1
    wte[NAMES, IS_NAME] = 1
    wte[OPENERS, IS_OPEN] = 1
    wte[OPENERS + CLOSERS, IS_BRACKET] = 1
    wte[TOPIC, IS_TOPIC] = 1
    wpe[:, POS:POS + CTX] = torch.eye(CTX)
    wpe[:, RECENCY] = torch.arange(CTX) / CTX
    sd = {"wte.weight": wte, "wpe.weight": wpe, "ln_f.weight": torch.ones(D), "ln_f.bias": torch.zeros(D)}
    eye = torch.eye(V)
    rest = DH - 1  # q/k dim used for "rest on BOS"
    for lyr in range(3):
        g = GAIN[lyr]
        W, b, Wo = torch.zeros(D, 3 * D), torch.zeros(3 * D), torch.zeros(D, D)

        def qkv(h, i):  # head h's query (0) / key (1) / value (2) columns of W, and their bias
            s = slice(i * D + h * DH, i * D + (h + 1) * DH)
            return W[:, s], b[s]

        def rest_on_bos(h, logit):  # BOS scores `logit` from every query (query bias x BOS flag)
            qkv(h, 0)[1][rest] = 1.0
            qkv(h, 1)[0][IS_BOS, rest] = logit * DH ** 0.5 / g

        def match(h, qrows, krows, scale, off=0):  # query row i vs key row i scores `scale`
            s = (abs(scale) * DH ** 0.5) ** 0.5 / g
            n = len(qrows)
            qkv(h, 0)[0][qrows, off:off + n] = torch.eye(n) * s * (1 if scale > 0 else -1)
            qkv(h, 1)[0][krows, off:off + n] = torch.eye(n) * s

        def bias_key(h, dim, rows, logit):  # key rows score `logit` from every query
            qkv(h, 0)[1][dim] = 1.0
            qkv(h, 1)[0][rows, dim] = logit * DH ** 0.5 / g

        def copy(h, out_block=None):  # z_h = e_token of the attended position; W_O -> out_block
            qkv(h, 2)[0][TOK:TOK + V, :V] = eye / g
            if out_block is not None:
                Wo[h * DH:h * DH + V, out_block:out_block + V] = eye

        pos = list(range(POS, POS + CTX))
        toks = list(range(TOK, TOK + V))
        if lyr == 0:
            match(0, pos[1:], pos[:-1], 24)  # 0.0 previous token: query p, key p-1
            copy(0, PREV)
            match(1, pos[2:], pos[:-2], 24)  # 0.1 two back
            copy(1, PREV2)
            # 0.2: a name attends to an earlier copy of itself (not itself), else BOS
            match(2, [TOK + n for n in NAMES], [TOK + n for n in NAMES], 24)
            match(2, pos, pos, -40, off=8)
            rest_on_bos(2, 8)
            copy(2, DUPID)
        if lyr == 1:  # 1.0 S-inhibition: attend to a repeated name, move its identity to INHIB
            bias_key(0, 0, [DUPID + n for n in NAMES], 20)
            rest_on_bos(0, 8)
            qkv(0, 2)[0][[DUPID + n for n in NAMES], NAMES] = 1 / g
            Wo[:V, INHIB:INHIB + V] = eye
        if lyr == 2:
            # 2.0 successor: attends to itself, OV item -> next item, boosts it
            match(0, pos, pos, 24)
            for a, c in SUCC.items():
                qkv(0, 2)[0][TOK + a, c] = 1 / g
            Wo[:V, TOK:TOK + V] = eye
            # 2.1 name mover: names 20, a name in INHIB -25 more, BOS 8; copies and boosts
            bias_key(1, DH - 2, IS_NAME, 20)
            match(1, [INHIB + n for n in NAMES], [TOK + n for n in NAMES], -25)
            rest_on_bos(1, 8)
            copy(1, TOK)
            # 2.2 previous token; 2.3 duplicate token (earlier copy, not itself, else BOS)
            match(2, pos[1:], pos[:-1], 24)
            copy(2)
            match(3, toks[2:], toks[2:], 24)
            match(3, pos, pos, -40, off=62)
            rest_on_bos(3, 8)
            copy(3)
            # 2.4 long-prefix induction: (current, previous) vs (PREV, PREV2), 16 each; BOS 24
            match(4, toks, list(range(PREV, PREV + V)), 16)
            match(4, list(range(PREV + 1, PREV + V)), list(range(PREV2 + 1, PREV2 + V)), 16, off=64)
            rest_on_bos(4, 24)
            copy(4, TOK)
            # 2.5 induction: current vs PREV 20, BOS 8
            match(5, toks, list(range(PREV, PREV + V)), 20)
            rest_on_bos(5, 8)
            copy(5, TOK)
            # 2.6 most recent bracket: 300 + 256 * p / CTX (no BOS rest: before any bracket it
            # reads some recent ordinary token, which no context feature reads)
            bias_key(6, DH - 2, IS_BRACKET, 300)
            bias_key(6, DH - 3, RECENCY, 256)
            copy(6)
            # 2.7 every topic word so far, evenly; else BOS
            bias_key(7, DH - 2, IS_TOPIC, 9)  # close to BOS, so more topic words -> larger z
            rest_on_bos(7, 8)
            copy(7)
        p = f"h.{lyr}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = torch.ones(D), torch.zeros(D)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = torch.ones(D), torch.zeros(D)
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = W, b
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = Wo, torch.zeros(D)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = torch.zeros(D, N_INNER), torch.zeros(N_INNER)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = torch.zeros(N_INNER, D), torch.zeros(D)
    save_file({f"transformer.{k}": v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": CTX,
        "n_embd": D, "n_layer": 3, "n_head": H, "n_inner": N_INNER, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}))
    write_tokenizer(out)
    return out


def _z(h: int, t: int) -> int:
    return h * DH + t


def build_sae(out: Path, model_dir: str = "../model") -> Path:
    """The planted SAE (SAELens format) on ``blocks.2.attn.hook_z``."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    W_enc, W_dec, b_enc = torch.zeros(H * DH, D_SAE), torch.zeros(D_SAE, H * DH), torch.full((D_SAE,), -0.35)

    def feat(f, enc, dec):
        for h, t in enc:
            W_enc[_z(h, t), f] = 1.0
        for h, t in dec:
            W_dec[f, _z(h, t)] = 1.0 / len(dec) ** 0.5

    for f, (a, c) in zip(F_SUCC, SUCC.items()):
        feat(f, [(0, c)], [(0, c)])
    for i, f in enumerate(F_SUCC_DECOY):
        feat(f, [(6, FILLER[i])], [(0, list(SUCC.values())[i])])
    for f, n in zip(F_NM, NAMES):
        feat(f, [(1, n)], [(1, n)])
    for i, f in enumerate(F_NM_DECOY):
        feat(f, [(0, list(SUCC.values())[i])], [(1, NAMES[i])])
    for f, u in zip(F_PREV, FILLER):
        feat(f, [(2, u)], [(2, u)])
    for i, f in enumerate(F_PREV_DECOY):
        feat(f, [(5, FILLER[i])], [(2, FILLER[i])])
    for f, u in zip(F_DUP, FILLER[4:]):
        feat(f, [(3, u)], [(3, u)])
    for i, f in enumerate(F_DUP_DECOY):
        feat(f, [(6, FILLER[i + 1])], [(3, FILLER[i])])
    for f, u in zip(F_LONG, FILLER[2:]):
        feat(f, [(4, u)], [(4, u)])
    for f, u in zip(F_IND, FILLER[10:]):
        feat(f, [(5, u)], [(5, u)])
    for f, o in zip(F_LOCAL, OPENERS):
        feat(f, [(6, o)], [(6, o)])
    feat(F_HIGH[0], [(7, TOPIC[0]), (7, TOPIC[1])], [(7, TOPIC[0]), (7, TOPIC[1])])
    feat(F_HIGH[1], [(7, TOPIC[2]), (7, TOPIC[3])], [(7, TOPIC[2]), (7, TOPIC[3])])
    for i, f in enumerate(range(F_HIGH[-1] + 1, F_DEAD[0])):  # controls: token features on head 2.6
        u = FILLER[i % len(FILLER)]
        feat(f, [(6, u)], [(6, u)])
    for f in F_DEAD:
        W_dec[f, _z(6, 0)] = 1.0
        b_enc[f] = -100.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(H * DH), hook_name="blocks.2.attn.hook_z", model_name=model_dir)
    save_saelens(sae, out)
    return out


def build_corpus(out: Path, n_seq: int = 600, seed: int = 0) -> Path:
    """Sequences that exercise every planted head: random filler, repeated spans, ordinal
    runs, IOI sentences, bracketed spans and (half the sequences) topic words."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_seq):
        s = [0]
        topic = rng.choice([0, 2]) if rng.random() < 0.5 else None
        while len(s) < CTX:
            kind = rng.integers(6)
            if kind == 0:
                s += list(rng.choice(FILLER, rng.integers(3, 9)))
            elif kind == 1 and len(s) > 10:
                L = int(rng.integers(3, 9))
                a = int(rng.integers(1, len(s) - L))
                s += s[a:a + L]
            elif kind == 2:
                seq = NUMBERS if rng.random() < 0.5 else DAYS
                k = int(rng.integers(3, 6))
                a = int(rng.integers(0, len(seq) - k + 1))
                s += seq[a:a + k]
            elif kind == 3:
                io, sub = rng.choice(NAMES, 2, replace=False)
                s += [ID["When"], io, ID["and"], sub, ID["went"], ID["to"], ID["the"], ID["store"], ID[","],
                      sub, ID["gave"], ID["a"], ID["drink"], ID["to"], io]
            elif kind == 4:
                j = int(rng.integers(3))
                s += [OPENERS[j]] + list(rng.choice(FILLER, rng.integers(2, 7))) + [CLOSERS[j]]
            if topic is not None and rng.random() < 0.4:
                s.append(TOPIC[topic + int(rng.integers(2))])
        rows.append(s[:CTX])
    np.save(out, np.array(rows, dtype=np.uint16).reshape(-1))
    return out


def build_all(root: Path) -> dict[str, Path]:
    return {"model": build_model(root / "model"), "sae": build_sae(root / "sae"),
            "corpus": build_corpus(root / "corpus.npy")}
