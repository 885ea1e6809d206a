"""famfind's TransformerLens adapter agrees with its built-in GPT-2 runner.

A ``HookedTransformer`` is built offline from the planted GPT-2 checkpoint with
TransformerLens's own ``convert_gpt2_weights`` (no hub), then wrapped by ``TLModel``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from famfind.models.gpt2 import HFGPT2Model
from famfind.models.transformer_lens import TLModel

tl = pytest.importorskip("transformer_lens", reason="TransformerLens (< 4) comes with the [test] extra via SAELens")
transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extra")


@pytest.fixture(scope="module")
def pair(planted_paths):
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(planted_paths["model"])).eval()
    c = hf.config
    cfg = tl.HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
                                     d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                                     d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN")
    ht = tl.HookedTransformer(cfg)
    ht.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return HFGPT2Model(planted_paths["model"]), TLModel.from_hooked(ht, "planted")


def test_weights_hook_z_and_patterns_agree(pair, planted_paths):
    ours, theirs = pair
    assert ours.cfg.n_heads == theirs.cfg.n_heads and ours.cfg.d_head == theirs.cfg.d_head
    for lyr in range(2):
        for w in ("W_Q", "W_K", "W_V", "W_O"):
            torch.testing.assert_close(getattr(ours, w)(lyr), getattr(theirs, w)(lyr))
    x = torch.from_numpy(np.load(planted_paths["corpus"]).astype(np.int64)[:256]).view(4, 64)
    torch.testing.assert_close(ours.run_hook_z(x, 1), theirs.run_hook_z(x, 1), atol=1e-4, rtol=1e-4)
    abl = {(1, 0): torch.ones(64)}
    torch.testing.assert_close(ours.run_hook_z(x, 1, abl), theirs.run_hook_z(x, 1, abl), atol=1e-4, rtol=1e-4)
    p1, p2 = ours.patterns(x, [0, 1]), theirs.patterns(x, [0, 1])
    torch.testing.assert_close(p1[1], p2[1], atol=1e-4, rtol=1e-4)


def test_attn_parts_and_normalized_resid_agree(pair, planted_paths):
    """The DFA inputs (hook_pattern, hook_v) and the OV-circuit input (ln1 output) match."""
    ours, theirs = pair
    x = torch.from_numpy(np.load(planted_paths["corpus"]).astype(np.int64)[:128]).view(2, 64)
    for lyr in range(2):
        (pa, va), (pb, vb) = ours.attn_parts(x, lyr), theirs.attn_parts(x, lyr)
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pa, va), ours.run_hook_z(x, lyr),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.normalized_resid(x, lyr), theirs.normalized_resid(x, lyr),
                                   atol=1e-4, rtol=1e-4)


def test_composition_scores_match_transformer_lens():
    """Q/K/V-composition (Elhage et al. 2021) on the embedded default equals TransformerLens's
    all_composition_scores on the same weights loaded with from_pretrained's processing
    (fold_ln, center_writing_weights), and on the HookedTransformer's own weights."""
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    from famfind.corpus import default_dir
    from famfind.heuristics.composition import composition_scores

    p = default_dir() / "model"
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(p)).eval()
    c = hf.config
    cfg = tl.HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
                                     d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=4 * c.n_embd,
                                     d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN")
    ht = tl.HookedTransformer(cfg)
    ht.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=True, center_writing_weights=True,
                                   center_unembed=True)
    ours, via_tl = composition_scores(HFGPT2Model(p)), composition_scores(TLModel.from_hooked(ht, "default"))
    for mode in "QKV":
        theirs = ht.all_composition_scores(mode).detach()
        torch.testing.assert_close(ours[mode], theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(via_tl[mode], theirs, atol=1e-5, rtol=1e-4)
    # the induction head 1.1 K-composes most with the previous-token head 0.0
    assert int(ours["K"][0, :, 1, 1].argmax()) == 0
