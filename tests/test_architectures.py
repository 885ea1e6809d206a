"""Other architectures through TransformerLens's TransformerBridge (issue #15).

Tiny random-initialised checkpoints of Llama (grouped-query attention, RMSNorm, rotary),
GPT-NeoX/Pythia (rotary, parallel attention) and Gemma-2 (GQA, attention soft-capping,
extra norms) are built offline from ``transformers`` config classes. famfind's hook_z (clean
and with a head mean-ablated upstream), its per-query-head weights and its W_U are checked
against the Hugging Face model itself (the input of each layer's output projection), and a
CLI scan of a hand-wired checkpoint of each (tests/planted_arch.py) with a planted SAE exits 0
and finds exactly the planted previous-token family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from famfind.errors import FamfindError
from famfind.models import BridgeModel, HFGPT2Model, load_model

transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extra")
pytest.importorskip("transformer_lens.model_bridge", reason="TransformerBridge needs TransformerLens >= 3.9")

VOCAB, D, H, DH = 256, 64, 4, 16


def _configs():
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=H, max_position_embeddings=128)
    return {
        "llama": (t.LlamaConfig(num_key_value_heads=2, **common), t.LlamaForCausalLM),
        "pythia": (t.GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, **common), t.GPTNeoXForCausalLM),
        "gemma2": (t.Gemma2Config(num_key_value_heads=2, head_dim=DH, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=30.0, **common), t.Gemma2ForCausalLM),
    }


def _o_proj(hf, arch: str, layer: int):
    """The module whose input is hook_z (heads concatenated) in the HF model."""
    if arch == "pythia":
        return hf.gpt_neox.layers[layer].attention.dense
    return hf.model.layers[layer].self_attn.o_proj


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    out = {}
    for arch, (cfg, cls) in _configs().items():
        d = root / arch
        model = cls(cfg)
        with torch.no_grad():  # non-trivial biases and norm gains, so any weight processing shows in hook_z
            for name, prm in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    prm.add_(0.2 * torch.randn_like(prm))
        model.save_pretrained(d)
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)
        out[arch] = d
    return out


def _hf_z(hf, arch, tokens, layer, ablate=None):
    """hook_z of ``layer`` from the HF model (the output projection's input), with
    ``ablate = (layer0, head, value)`` written into an earlier layer's heads first."""
    cap, handles = {}, []
    if ablate is not None:
        lyr, h, val = ablate

        def write(m, args):
            x = args[0].clone().view(*args[0].shape[:-1], H, DH)
            x[..., h, :] = val
            return (x.flatten(-2),)
        handles.append(_o_proj(hf, arch, lyr).register_forward_pre_hook(write))
    handles.append(_o_proj(hf, arch, layer).register_forward_pre_hook(lambda m, a: cap.__setitem__("z", a[0])))
    with torch.no_grad():
        hf(tokens)
    for x in handles:
        x.remove()
    return cap["z"].view(*tokens.shape, H, DH)


@pytest.mark.parametrize("arch", ["llama", "pythia", "gemma2"])
def test_hook_z_weights_and_ablation_match_hugging_face(checkpoints, arch):
    m = load_model(checkpoints[arch])
    assert isinstance(m, BridgeModel)  # auto: not GPT-2, so TransformerBridge
    assert (m.cfg.n_heads, m.cfg.d_head, m.cfg.d_vocab) == (H, DH, VOCAB)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[arch]).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (3, 12), generator=g)
    for lyr in range(2):
        torch.testing.assert_close(m.run_hook_z(x, lyr), _hf_z(hf, arch, x, lyr), atol=1e-4, rtol=1e-4)
        # per query head: d_in = n_heads * d_head, W_O [n_heads, d_head, d_model], K/V repeated to query heads
        # (TransformerLens centres the weights that write to a LayerNorm'd stream: compare centred)
        W_o = _o_proj(hf, arch, lyr).weight.T.reshape(H, DH, D)
        torch.testing.assert_close(_c(m.W_O(lyr)), _c(W_o), atol=1e-4, rtol=1e-4)
        assert m.W_Q(lyr).shape == m.W_K(lyr).shape == m.W_V(lyr).shape == (H, D, DH)
        pat, v = m.attn_parts(x, lyr)
        assert v.shape == (3, 12, H, DH)
        torch.testing.assert_close(torch.einsum("bhqk,bkhd->bqhd", pat, v), _hf_z(hf, arch, x, lyr),
                                   atol=1e-4, rtol=1e-4)
    val = torch.randn(DH, generator=g)
    ours = m.run_hook_z(x, 1, {(0, 2): val})
    torch.testing.assert_close(ours, _hf_z(hf, arch, x, 1, ablate=(0, 2, val)), atol=1e-4, rtol=1e-4)
    assert (ours - _hf_z(hf, arch, x, 1)).abs().max() > 1e-3  # the ablation did change layer 1
    # W_U: the direct path's token ranking; TransformerLens may centre it (a constant per row)
    # (and, after a LayerNorm, which removes the mean over d_model, the mean over d_model too)
    W_u, ours_u = hf.get_output_embeddings().weight.T, m.W_U()
    if arch == "pythia":
        W_u, ours_u = W_u - W_u.mean(0), ours_u - ours_u.mean(0)
    torch.testing.assert_close(_c(ours_u), _c(W_u), atol=1e-4, rtol=1e-4)


def _c(w: torch.Tensor) -> torch.Tensor:
    """``w`` less its mean over the last dimension."""
    return w - w.mean(-1, keepdim=True)


def test_backend_choice_and_errors(checkpoints, planted_paths, monkeypatch):
    fast, bridge = load_model(planted_paths["model"]), load_model(planted_paths["model"], backend="bridge")
    assert isinstance(fast, HFGPT2Model) and isinstance(bridge, BridgeModel)  # GPT-2: the fast path by default
    x = torch.from_numpy(np.load(planted_paths["corpus"]).astype(np.int64)[:256]).view(4, 64)
    for lyr in range(2):  # the two backends agree on the planted GPT-2 (real induction circuit)
        torch.testing.assert_close(bridge.run_hook_z(x, lyr), fast.run_hook_z(x, lyr), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bridge.patterns(x, [lyr])[lyr], fast.patterns(x, [lyr])[lyr], atol=1e-4, rtol=1e-4)
    abl = {(0, 1): torch.ones(fast.cfg.d_head)}
    torch.testing.assert_close(bridge.run_hook_z(x, 1, abl), fast.run_hook_z(x, 1, abl), atol=1e-4, rtol=1e-4)
    P, Q = bridge.resid_parts(x, 1), fast.resid_parts(x, 1)  # GPT-2 through the bridge keeps recursive DFA
    torch.testing.assert_close(P.pattern, Q.pattern, atol=1e-4, rtol=1e-4)
    with pytest.raises(FamfindError, match="not GPT-2"):
        load_model(checkpoints["llama"], backend="famfind")
    with pytest.raises(FamfindError, match="unknown model backend"):
        load_model(checkpoints["llama"], backend="tl5")
    with pytest.raises(FamfindError, match="recursive DFA needs GPT-2"):
        load_model(checkpoints["llama"]).resid_parts(torch.zeros(1, 4, dtype=torch.long), 1)
    import famfind.models.bridge as fm

    monkeypatch.setattr(fm, "bridge_class", lambda: None)
    with pytest.raises(FamfindError, match=r"famfind\[tl\]"):
        load_model(checkpoints["llama"])


@pytest.mark.parametrize("arch", ["llama", "pythia", "gemma2"])
def test_cli_scan_of_each_architecture_finds_the_planted_family(tmp_path, arch):
    """A hand-wired checkpoint of ``arch`` with a previous-token head at query head 0.0
    (rotary, q/k from biases; GQA for Llama/Gemma-2: 0.1 shares its kv head and is not one)
    and a layer-0 SAE with planted previous-token features: the CLI scan exits 0, every
    detector runs, and the previous_token family is exactly the planted one (decoys on 0.0
    that fire *on* their token fail, controls fail, mean-ablating 0.0 turns all off)."""
    import duckdb

    import planted_arch as pa
    from famfind.cli import app

    model = pa.build_model(tmp_path / "model", arch)
    sae = pa.build_sae(tmp_path / "sae", model)
    corpus = pa.build_corpus(tmp_path / "corpus.npy")
    db = tmp_path / "s.duckdb"
    r = CliRunner().invoke(app, ["scan", str(sae), "--corpus", str(corpus),
                                 "--db", str(db), "--quiet"])
    assert r.exit_code == 0, r.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        errors = con.execute("SELECT detector, status, error FROM detector_runs WHERE status != 'ok'").fetchall()
        members = {f for (f,) in con.execute("SELECT feature FROM families WHERE family = 'previous_token'").fetchall()}
        val = con.execute("SELECT selected, passed, control, control_passed, ablation_tested, ablation_off "
                          "FROM validation WHERE family = 'previous_token'").fetchall()
        roles = con.execute("SELECT head, score FROM heads WHERE layer = 0 AND metric = 'previous_token' "
                            "ORDER BY head").fetchall()
    finally:
        con.close()
    # rdfa needs GPT-2's LayerNorm and learned positions; it says so and is the only one
    assert [e[0] for e in errors] == ["rdfa"] and "GPT-2" in errors[0][2], errors
    assert members == set(pa.PREV), roles
    n_sel = len(pa.PREV) + len(pa.DECOYS)
    assert val == [(n_sel, len(pa.PREV), len(pa.CONTROLS), 0, len(pa.PREV), len(pa.PREV))], (val, roles)
