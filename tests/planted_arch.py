"""Hand-wired Llama, GPT-NeoX/Pythia and Gemma-2 checkpoints with a known previous-token
head in layer 0, and a layer-0 hook_z SAE with planted previous-token features: the
rotary/GQA counterpart of :mod:`planted` (issue #15: "a full scan of each with a planted SAE
finds the planted family").

Rotary attention scores depend only on the relative position when q and k do not depend on
the input: q and k come from the projections' biases (weights zero). With q's rotary pair
``i`` = ``(1, 0)`` and k's = ``(cos θ_i, sin θ_i)`` the score of query m on key n is
``Σ_i cos((m - n - 1) θ_i)``, largest at ``n = m - 1``; ``rope_theta`` is chosen so the
runner-up (any other n within 130 positions) is at least 0.28 of the peak below it
(``ROPE_THETA``, by a grid search). Query/kv heads (GQA: 4 query heads, 2 kv heads):

- 0.0 previous-token head (kv head 0); 0.1 uniform over the prefix (q = 0, same kv head,
  so the same values: only the query differs);
- 0.2 uniform (kv head 1); 0.3 attends to itself (q pair ``(1, 0)``, kv head 1's k pairs
  ``(1, 0)``: peak at n = m).

Values: the token embedding is one-hot in the first ``V`` dims, so after the layer's norm
each kv head's value is the (scaled) one-hot of the key's token: ``z[0.0] ~ e_{previous
token}``, ``z[0.3] ~ e_{current token}``.

SAE (``d_in = 4 * 32``): ``PREV`` features read and write head 0.0's dim t (fire right
after token t; a previous-token family by construction); ``DECOYS`` write head 0.0 (so they
are selected) but read head 0.3 (fire *on* t, fail the test); ``CONTROLS`` read and write
head 0.3; ``DEAD`` never fire.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

V, D, H, KV, DH = 32, 128, 4, 2, 32
ROPE_THETA = {"llama": 1.525, "gemma2": 1.525, "pythia": 2.19}  # 16 pairs / 4 pairs (partial rotary 0.25)
PEAK = {"llama": 120.0, "gemma2": 40.0, "pythia": 400.0}  # attention logit at the peak (Gemma-2 caps at 50)
PREV = list(range(0, 12))  # feature f: fires right after token f + 1
DECOYS = list(range(12, 18))
CONTROLS = list(range(18, 28))
DEAD = list(range(28, 32))


def _config(arch: str):
    import transformers as t

    common = dict(vocab_size=V, hidden_size=D, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=H, max_position_embeddings=256, tie_word_embeddings=False)
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA[arch]}
    if arch == "llama":
        return t.LlamaConfig(num_key_value_heads=KV, attention_bias=True, rope_parameters=rope, **common), \
            t.LlamaForCausalLM
    if arch == "gemma2":
        return t.Gemma2Config(num_key_value_heads=KV, head_dim=DH, attention_bias=True, query_pre_attn_scalar=DH,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_parameters=rope,
                              **common), t.Gemma2ForCausalLM
    if arch == "pythia":
        return t.GPTNeoXConfig(use_parallel_residual=True, attention_bias=True,
                               rope_parameters={**rope, "partial_rotary_factor": 0.25}, **common), \
            t.GPTNeoXForCausalLM
    raise ValueError(arch)


def _qk(arch: str, shift: bool) -> torch.Tensor:
    """``[DH]`` bias of a query (``shift`` False: pairs (1, 0)) or key (True: pairs rotated by θ_i)."""
    rot = DH // 4 if arch == "pythia" else DH
    half = rot // 2
    theta = 1.0 / ROPE_THETA[arch] ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    v = torch.zeros(DH, dtype=torch.float64)
    v[:half] = torch.cos(theta) if shift else 1.0
    v[half:rot] = torch.sin(theta) if shift else 0.0
    return v.float()


def build_model(out: Path, arch: str) -> Path:
    """Write the planted ``arch`` checkpoint (``config.json``, weights, a word-level
    tokenizer ``w0 .. w{V-1}``) to ``out``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg, cls = _config(arch)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    scale = 1 / math.sqrt(DH)  # each architecture's logit scale (Gemma-2: query_pre_attn_scalar = DH)
    n_pairs = (DH // 4 if arch == "pythia" else DH) // 2
    s = math.sqrt(PEAK[arch] / (n_pairs * scale))  # q.k * scale = PEAK at the peak
    q_prev = q_self = k_self = s * _qk(arch, False)  # pairs (1, 0): q_self . k_self peaks at n = m
    k_prev = s * _qk(arch, True)  # pairs rotated by θ_i: q_prev . k_prev peaks at n = m - 1
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, :V] = torch.eye(V)
        if arch == "pythia":
            attn = model.gpt_neox.layers[0].attention
            W, b = attn.query_key_value.weight, attn.query_key_value.bias  # per head: [q | k | v]
            W.zero_()
            b.zero_()
            per = 3 * DH
            for h in range(H):  # no GQA: one kv per head, so heads 0/1 and 2/3 get the same k and v
                kq = (k_prev, q_prev if h == 0 else torch.zeros(DH)) if h < 2 else \
                    (k_self, q_self if h == 3 else torch.zeros(DH))
                b[h * per:h * per + DH] = kq[1]
                b[h * per + DH:h * per + 2 * DH] = kq[0]
                W[h * per + 2 * DH:h * per + 2 * DH + V, :V] = torch.eye(V)
            ln = model.gpt_neox.layers[0].input_layernorm
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        else:
            attn = model.model.layers[0].self_attn
            for m in (attn.q_proj, attn.k_proj, attn.v_proj):
                m.weight.zero_()
                m.bias.zero_()
            attn.q_proj.bias[:DH] = q_prev  # query head 0 (kv head 0); head 1: q = 0
            attn.q_proj.bias[3 * DH:4 * DH] = q_self  # query head 3 (kv head 1); head 2: q = 0
            attn.k_proj.bias[:DH] = k_prev
            attn.k_proj.bias[DH:2 * DH] = k_self
            for kv in range(KV):
                attn.v_proj.weight[kv * DH:kv * DH + V, :V] = torch.eye(V)
            norm = model.model.layers[0].input_layernorm
            norm.weight.fill_(0.0 if arch == "gemma2" else 1.0)  # Gemma's RMSNorm scales by 1 + weight
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(out)
    return out


def value_scale(model_dir: Path) -> float:
    """The value a one-hot token has in hook_z after the layer-0 norm (the HF model's own
    output-projection input at a position that attends to itself, head 0.3)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    o = hf.gpt_neox.layers[0].attention.dense if hf.config.model_type == "gpt_neox" else \
        hf.model.layers[0].self_attn.o_proj
    cap = {}
    h = o.register_forward_pre_hook(lambda m, a: cap.__setitem__("z", a[0]))
    with torch.no_grad():
        hf(torch.tensor([[5, 7, 9, 11]]))
    h.remove()
    z = cap["z"].view(1, 4, H, DH)
    return float(z[0, 3, 3, 11])


def build_sae(out: Path, model_dir: Path) -> Path:
    """The planted layer-0 SAE (SAELens format) for ``model_dir``."""
    from famfind.build.train_sae import save_saelens
    from famfind.sae import SAE

    F = 32
    a = value_scale(model_dir)
    W_enc, W_dec, b_enc = torch.zeros(H * DH, F), torch.zeros(F, H * DH), torch.full((F,), -0.5)
    for i, f in enumerate(PREV):
        W_enc[0 * DH + i + 1, f] = 1.0 / a
        W_dec[f, 0 * DH + i + 1] = 1.0
    for i, f in enumerate(DECOYS):
        W_enc[3 * DH + i + 1, f] = 1.0 / a
        W_dec[f, 0 * DH + i + 20] = 1.0
    for i, f in enumerate(CONTROLS):
        W_enc[3 * DH + i + 8, f] = 1.0 / a
        W_dec[f, 3 * DH + i + 8] = 1.0
    for f in DEAD:
        W_dec[f, 2 * DH + f - 20] = 1.0
        b_enc[f] = -100.0
    sae = SAE(W_enc, W_dec, b_enc, torch.zeros(H * DH), hook_name="blocks.0.attn.hook_z",
              model_name=str(model_dir))
    save_saelens(sae, out)
    return out


def build_corpus(out: Path, n_seq: int = 100, seq_len: int = 128, seed: int = 0) -> Path:
    """Random tokens ``1 .. V-1`` (``uint16 [n_seq * seq_len]``)."""
    rng = np.random.default_rng(seed)
    np.save(out, rng.integers(1, V, size=n_seq * seq_len).astype(np.uint16))
    return out
