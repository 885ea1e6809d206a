"""SAE loading: every format, SAELens-identical encoding, and one-line errors naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from famfind.build.train_sae import save_saelens
from famfind.errors import FamfindError
from famfind.sae import SAE, load_sae


def _random_sae(arch="standard", d_in=32, d_sae=64, hook="blocks.1.attn.hook_z") -> SAE:
    g = torch.Generator().manual_seed(0)
    return SAE(torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g),
               torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_in, generator=g) * 0.1, hook_name=hook,
               architecture=arch, k=8 if arch == "topk" else None,
               threshold=torch.rand(d_sae, generator=g) if arch == "jumprelu" else None, model_name="m")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encoding_matches_saelens(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the [test] extra")
    save_saelens(_random_sae(arch), tmp_path / "s")
    ours, theirs = load_sae(tmp_path / "s"), sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    assert type(theirs).__name__.lower().startswith(arch if arch != "standard" else "standard")
    z = torch.randn(3, 5, 4, 8)  # hook_z [batch, pos, n_heads, d_head]; SAELens flattens the heads
    torch.testing.assert_close(ours.encode(z.flatten(-2)), theirs.encode(z))
    assert torch.equal(ours.W_dec, theirs.W_dec) and torch.equal(ours.W_enc, theirs.W_enc)


def test_single_safetensors_with_cfg_beside_or_in_metadata(tmp_path):
    save_saelens(_random_sae(), tmp_path / "d")
    beside = load_sae(tmp_path / "d" / "sae_weights.safetensors")
    assert beside.hook_name == "blocks.1.attn.hook_z" and beside.d_sae == 64
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    s = _random_sae()
    save_file({"W_enc": s.W_enc, "W_dec": s.W_dec, "b_enc": s.b_enc, "b_dec": s.b_dec},
              str(tmp_path / "alone.safetensors"), metadata={"cfg": json.dumps(cfg)})
    alone = load_sae(tmp_path / "alone.safetensors")
    assert torch.equal(alone.W_dec, s.W_dec) and alone.layer == 1


def test_kissane_pt_format(tmp_path):
    s = _random_sae()
    torch.save({"W_enc": s.W_enc, "W_dec": s.W_dec, "b_enc": s.b_enc, "b_dec": s.b_dec}, tmp_path / "L1.pt")
    (tmp_path / "L1_cfg.json").write_text(json.dumps({"act_size": 32, "dict_size": 64, "act_name": "z",
                                                      "layer": 1, "model_name": "gelu-2l"}))
    sae = load_sae(tmp_path / "L1.pt")
    assert sae.hook_name == "blocks.1.attn.hook_z" and sae.model_name == "gelu-2l"
    torch.testing.assert_close(sae.encode(torch.zeros(32)), torch.relu(-s.b_dec @ s.W_enc + s.b_enc))


def _saved(tmp_path, **over):
    save_saelens(_random_sae(), tmp_path / "s")
    return tmp_path / "s"


@pytest.mark.parametrize("break_it, message", [
    (lambda p: (p / "cfg.json").unlink(), "cfg.json: file not found"),
    (lambda p: (p / "cfg.json").write_text("{"), "cfg.json: not valid JSON"),
    (lambda p: (p / "sae_weights.safetensors").write_bytes(b"junk"), "not a readable safetensors file"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 32, "architecture": "standard"})),
     "missing key 'metadata.hook_name'"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 32, "metadata": {"hook_name": "blocks.1.hook_resid_pre"}})),
     "is not an attention hook_z site"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": 99, "metadata": {"hook_name": "blocks.1.attn.hook_z"}})),
     "W_enc has d_in=32"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"architecture": "gated", "metadata": {"hook_name": "blocks.1.attn.hook_z"}})),
     "architecture: Input should be 'standard', 'topk' or 'jumprelu' (got 'gated')"),
    (lambda p: (p / "cfg.json").write_text("[1, 2]"), "cfg.json: Input should be a valid dictionary"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"d_in": "wide", "metadata": {"hook_name": "blocks.1.attn.hook_z"}})),
     "cfg.json: d_in: Input should be a valid integer"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": -3,
                                                       "metadata": {"hook_name": "blocks.1.attn.hook_z"}})),
     "cfg.json: k: Input should be greater than 0 (got -3)"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({"metadata": "blocks.1.attn.hook_z"})),
     "cfg.json: metadata: Input should be a valid dictionary"),
])
def test_bad_inputs_name_the_file(tmp_path, break_it, message):
    p = _saved(tmp_path)
    break_it(p)
    with pytest.raises(FamfindError) as e:
        load_sae(p)
    assert message in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_bad_shape_and_missing_tensor(tmp_path):
    p = _saved(tmp_path)
    s = _random_sae()
    save_file({"W_enc": s.W_enc, "W_dec": s.W_dec[:, :5].contiguous(), "b_enc": s.b_enc, "b_dec": s.b_dec},
              str(p / "sae_weights.safetensors"))
    with pytest.raises(FamfindError, match=r"W_dec has shape \[64, 5\], expected \[64, 32\]"):
        load_sae(p)
    save_file({"W_enc": s.W_enc, "b_enc": s.b_enc, "b_dec": s.b_dec}, str(p / "sae_weights.safetensors"))
    with pytest.raises(FamfindError, match="missing tensor 'W_dec'"):
        load_sae(p)


@pytest.mark.parametrize("tensor, value, count", [("W_enc", float("nan"), 3), ("W_dec", float("inf"), 1),
                                                   ("b_enc", float("-inf"), 2)])
def test_non_finite_weights_are_refused_with_the_count(tmp_path, tensor, value, count):
    p = _saved(tmp_path)
    s = _random_sae()
    t = getattr(s, tensor).clone()
    t.view(-1)[:count] = value
    setattr(s, tensor, t)
    save_file({k: getattr(s, k).contiguous() for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
              str(p / "sae_weights.safetensors"))
    with pytest.raises(FamfindError, match=rf"sae_weights.safetensors: {tensor} has {count} non-finite values"):
        load_sae(p)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(FamfindError, match="unknown SAE format"):
        load_sae(tmp_path / "x.bin")
    with pytest.raises(FamfindError, match="file not found"):
        load_sae(tmp_path / "nope")


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encode_features_equals_full_encode_columns(arch):
    sae = _random_sae(arch)
    x = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(3))
    feats = torch.tensor([3, 0, 63, 17, 17])
    full = sae.encode(x)
    assert (full > 0).any()
    torch.testing.assert_close(sae.encode_features(x, feats), full[..., feats], atol=1e-6, rtol=1e-6)
