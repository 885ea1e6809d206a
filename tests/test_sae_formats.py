"""The SAE formats people publish beyond SAELens: Gemma Scope ``params.npz`` (JumpReLU),
``dictionary_learning`` ``ae.pt`` (AutoEncoder, AutoEncoderTopK, JumpReluAutoEncoder) and
EleutherAI ``sparsify`` folders (TopK). Each loads with ``--hook`` and encodes as its
reference: SAELens's JumpReLU SAE for Gemma Scope, the library's own module where it is
installed (``dictionary_learning``'s ``dictionary.py``, ``sparsify``), and always the
library's formula written out here. ``famfind inspect`` shows what was detected; a missing or
bad ``--hook`` is a one-line error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli_util import check
from famfind.cli import app
from famfind.errors import FamfindError
from famfind.sae import load_sae

D_IN, D_SAE, K, HOOK = 64, 96, 8, "blocks.1.attn.hook_z"


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 8, "W_dec": torch.randn(D_SAE, D_IN, generator=g) / 8,
            "b_enc": torch.randn(D_SAE, generator=g) / 10, "b_dec": torch.randn(D_IN, generator=g) / 10,
            "threshold": torch.rand(D_SAE, generator=g) / 5}


X = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(9))


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    v, i = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, i, v)


# --- Gemma Scope ---------------------------------------------------------------------------

def _gemma_scope(tmp_path) -> tuple[Path, dict]:
    p = _params()
    path = tmp_path / "layer_1" / "width_16k" / "average_l0_20" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **{k: v.numpy() for k, v in p.items()})
    return path, p


def test_gemma_scope_npz_encodes_as_gemma_scope_and_saelens(tmp_path):
    path, p = _gemma_scope(tmp_path)
    ours = load_sae(path, HOOK)
    assert (ours.architecture, ours.hook_name, ours.d_in, ours.d_sae, ours.apply_b_dec_to_input) == \
        ("jumprelu", HOOK, D_IN, D_SAE, False)
    pre = X @ p["W_enc"] + p["b_enc"]  # Gemma Scope's JumpReLUSAE.encode (its tutorial)
    ref = (pre > p["threshold"]) * torch.relu(pre)
    assert torch.allclose(ours.encode(X), ref, atol=1e-6, rtol=0) and (ref > 0).any()
    assert torch.equal(load_sae(path.parent, HOOK).encode(X), ours.encode(X))  # the folder reads the same
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the [test] extra")
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    theirs.load_state_dict({k: v.clone() for k, v in p.items()})
    assert torch.allclose(ours.encode(X), theirs.encode(X), atol=1e-6, rtol=0)


# --- dictionary_learning -------------------------------------------------------------------

def _dl_dictionary_module():
    """``dictionary_learning/dictionary.py`` loaded on its own (the package's ``__init__``
    imports nnsight), or None when dictionary_learning is not installed."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "dictionary.py"
    mspec = importlib.util.spec_from_file_location("_dl_dictionary", f)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def test_dictionary_learning_autoencoder(tmp_path):
    p = _params(1)
    sd = {"bias": p["b_dec"], "encoder.weight": p["W_enc"].T.contiguous(), "encoder.bias": p["b_enc"],
          "decoder.weight": p["W_dec"].T.contiguous()}
    (tmp_path / "trainer_0").mkdir()
    torch.save(sd, tmp_path / "trainer_0" / "ae.pt")
    (tmp_path / "trainer_0" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder",
                                                                                "lm_name": "gpt2", "layer": 1}}))
    ours = load_sae(tmp_path / "trainer_0", HOOK)
    assert (ours.architecture, ours.model_name) == ("standard", "gpt2")
    ref = torch.relu((X - p["b_dec"]) @ p["W_enc"] + p["b_enc"])  # AutoEncoder.encode: relu(encoder(x - bias))
    assert torch.allclose(ours.encode(X), ref, atol=1e-6, rtol=0) and (ref > 0).any()
    assert torch.allclose(ours.decode(ref), ref @ p["W_dec"] + p["b_dec"], atol=1e-6)
    dl = _dl_dictionary_module()
    if dl is None:
        pytest.skip("dictionary_learning not installed: checked against its formula only")
    ae = dl.AutoEncoder(D_IN, D_SAE)
    ae.load_state_dict(torch.load(tmp_path / "trainer_0" / "ae.pt", weights_only=True))
    assert torch.allclose(ours.encode(X), ae.encode(X), atol=1e-6, rtol=0)


def test_dictionary_learning_jumprelu_and_topk(tmp_path):
    p = _params(2)
    torch.save(p, tmp_path / "jr.pt")
    ours = load_sae(tmp_path / "jr.pt", HOOK)
    pre = X @ p["W_enc"] + p["b_enc"]  # JumpReluAutoEncoder.encode, apply_b_dec_to_input False by default
    ref = torch.relu(pre * (pre > p["threshold"]))
    assert ours.architecture == "jumprelu" and torch.allclose(ours.encode(X), ref, atol=1e-6, rtol=0)
    tk = {"encoder.weight": p["W_enc"].T.contiguous(), "encoder.bias": p["b_enc"],
          "decoder.weight": p["W_dec"].T.contiguous(), "b_dec": p["b_dec"], "k": torch.tensor(K, dtype=torch.int),
          "threshold": torch.tensor(-1.0)}
    torch.save(tk, tmp_path / "tk.pt")
    ours_tk = load_sae(tmp_path / "tk.pt", HOOK)
    ref_tk = _topk((X - p["b_dec"]) @ p["W_enc"] + p["b_enc"], K)  # AutoEncoderTopK.encode: topk(relu(encoder(x - b_dec)))
    assert (ours_tk.architecture, ours_tk.k) == ("topk", K)
    assert torch.allclose(ours_tk.encode(X), ref_tk, atol=1e-6, rtol=0) and ((ref_tk > 0).sum(-1) == K).all()
    dl = _dl_dictionary_module()
    if dl is None:
        pytest.skip("dictionary_learning not installed: checked against its formula only")
    jr = dl.JumpReluAutoEncoder(D_IN, D_SAE)
    jr.load_state_dict(p)
    assert torch.allclose(ours.encode(X), jr.encode(X), atol=1e-6, rtol=0)


# --- sparsify --------------------------------------------------------------------------------

def _sparsify(tmp_path) -> tuple[Path, dict]:
    p = _params(3)
    d = tmp_path / "layers.1.self_attn"
    d.mkdir()
    save_file({"encoder.weight": p["W_enc"].T.contiguous(), "encoder.bias": p["b_enc"], "W_dec": p["W_dec"],
               "b_dec": p["b_dec"]}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"expansion_factor": D_SAE // D_IN, "normalize_decoder": True,
                                            "num_latents": D_SAE, "k": K, "multi_topk": False,
                                            "skip_connection": False, "d_in": D_IN}))
    return d, p


def test_sparsify_folder_encodes_as_sparsify(tmp_path):
    d, p = _sparsify(tmp_path)
    ours = load_sae(d, HOOK)
    assert (ours.architecture, ours.k, ours.d_sae) == ("topk", K, D_SAE)
    ref = _topk((X - p["b_dec"]) @ p["W_enc"] + p["b_enc"], K)  # Sae.encode: topk(relu(encoder(x - b_dec)))
    assert torch.allclose(ours.encode(X), ref, atol=1e-6, rtol=0)
    try:
        from sparsify import Sae
    except Exception as e:  # not installed, or its optional dependencies missing
        pytest.skip(f"sparsify not importable ({type(e).__name__}): checked against its formula only")
    theirs = Sae.load_from_disk(d, device="cpu")
    out = theirs.encode(X)
    dense = torch.zeros(X.shape[0], D_SAE).scatter_(-1, out.top_indices, out.top_acts)
    assert torch.allclose(ours.encode(X), dense, atol=1e-6, rtol=0)


# --- --hook and famfind inspect ----------------------------------------------------------------

def test_hook_is_required_checked_and_consistent(tmp_path, planted_paths):
    path, _ = _gemma_scope(tmp_path)
    with pytest.raises(FamfindError, match="does not record its hook: pass --hook"):
        load_sae(path)
    with pytest.raises(FamfindError, match="not an attention hook_z hook"):
        load_sae(path, "blocks.1.hook_resid_post")
    with pytest.raises(FamfindError, match="records hook 'blocks.1.attn.hook_z' but --hook says"):
        load_sae(planted_paths["sae"], "blocks.0.attn.hook_z")
    assert load_sae(planted_paths["sae"], HOOK).hook_name == HOOK  # agreeing is fine
    r = CliRunner()
    check(r.invoke(app, ["inspect", str(path)]), 1, "params.npz", "--hook blocks.L.attn.hook_z")
    check(r.invoke(app, ["inspect", str(path), "--hook", "blocks.x.attn.hook_z"]), 1, "--hook", "not an attention hook_z")
    check(r.invoke(app, ["scan", str(path), "--db", str(tmp_path / "x.duckdb")]), 1, "params.npz", "--hook")
    assert not (tmp_path / "x.duckdb").exists()


def test_inspect_prints_what_was_detected(tmp_path, planted_paths):
    npz, _ = _gemma_scope(tmp_path)
    sp, _ = _sparsify(tmp_path)
    r = CliRunner().invoke(app, ["inspect", str(npz), str(sp), str(planted_paths["sae"]), "--hook", HOOK, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [(x["format"], x["architecture"], x["hook"], x["d_in"], x["d_sae"], x["dtype"]) for x in rows] == [
        ("gemma-scope-npz", "jumprelu", HOOK, D_IN, D_SAE, "float32"),
        ("sparsify", "topk", HOOK, D_IN, D_SAE, "float32"),
        ("saelens-dir", "standard", HOOK, 256, 128, "float32")]
    assert rows[2]["model"] == "../model" and rows[1]["k"] == K
    r = CliRunner().invoke(app, ["inspect", str(npz), "--hook", HOOK], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "gemma-scope-npz" in r.stdout and "jumprelu" in r.stdout
