"""The shipped embedded default: loads offline, matches SAELens, meets its bars on a slice,
and the scan finds the induction family end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from famfind.corpus import default_dir, default_sae
from famfind.heuristics.head_roles import HeadRoleScores
from famfind.heuristics.induction import InductionBehaviourRates, InductionFamily
from famfind.models.gpt2 import HFGPT2Model
from famfind.roles import head_scores
from famfind.sae import load_sae

D = default_dir()
pytestmark = pytest.mark.skipif(not (default_sae(1) / "cfg.json").exists(),
                                reason="embedded default artefacts are not built (famfind build-default --install)")


@pytest.fixture(scope="module")
def model():
    return HFGPT2Model(D / "model")


@pytest.fixture(scope="module")
def sae():
    return load_sae(default_sae(1))


def test_shapes_hook_and_offline_load(model, sae):
    c = model.cfg
    assert (c.n_layers, c.n_heads, c.d_head) == (2, 4, 32)  # issue #2: 2 layers, >= 4 heads
    assert sae.hook_name == "blocks.1.attn.hook_z" and sae.layer == 1
    assert sae.d_in == c.n_heads * c.d_head and sae.d_sae >= 16 * sae.d_in
    assert sae.W_enc.shape == (sae.d_in, sae.d_sae) and sae.W_dec.shape == (sae.d_sae, sae.d_in)
    cfg = json.loads((default_sae(1) / "cfg.json").read_text())
    assert cfg["reshape_activations"] == "hook_z" and cfg["metadata"]["hook_name"] == sae.hook_name
    tok = np.load(D / "eval_tokens.npy")
    assert tok.dtype == np.uint16 and tok.size >= 1_000_000 and tok.max() < c.d_vocab
    assert model.tokenizer.decode(model.tokenizer.encode("def induction(x):")) == "def induction(x):"


def test_hf_transformers_and_saelens_read_the_same_weights(model, sae):
    transformers = pytest.importorskip("transformers", reason="transformers is in the [test] extra")
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the [test] extra")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(D / "model")).eval()
    x = torch.from_numpy(np.load(D / "eval_tokens.npy")[:256].astype(np.int64)).view(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    for layer in (0, 1):  # the release folder: one SAE per hook, each read by SAELens
        ours = load_sae(default_sae(layer))
        theirs = sae_lens.SAE.load_from_disk(str(default_sae(layer)))
        assert theirs.cfg.metadata.hook_name == ours.hook_name == f"blocks.{layer}.attn.hook_z"
        assert torch.equal(theirs.W_dec, ours.W_dec) and torch.equal(theirs.b_enc, ours.b_enc)
        z = model.run_hook_z(x, layer)
        torch.testing.assert_close(theirs.encode(z), ours.encode(z.flatten(-2)))


def test_induction_head_remeasured(model):
    ind = head_scores(model, [0, 1], seq_len=50, n_seqs=16)["induction"][1]
    assert ind.max() >= 0.5, ind


def test_l0_on_a_slice(model, sae):
    x = torch.from_numpy(np.load(D / "eval_tokens.npy")[: 128 * 64].astype(np.int64)).view(64, 128)
    acts = sae.encode(model.run_hook_z(x, 1).flatten(-2))
    l0 = (acts > 0).float().sum(-1).mean().item()
    assert 5 <= l0 <= 40, l0


def test_scan_runs_end_to_end_and_reports_what_it_finds(default_scan_result):
    """Every built-in detector runs on the real default and writes its rows."""
    import duckdb

    res, db, sid = default_scan_result  # the test run's one scan of the default: both SAEs, 128k tokens
    assert sid == 1
    assert [u.id for u in res.saes] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert all(r.status == "ok" for r in res.runs), [(r.id, r.sae, r.error) for r in res.runs if r.status != "ok"]
    assert len(res.sae(1).runs) >= 19  # every built-in detector, on each SAE
    con = duckdb.connect(str(db), read_only=True)
    fams = set(con.execute("SELECT layer, family FROM validation WHERE test <> 'necessity'").fetchall())
    # a head-role family is validated only where its layer has such a head: previous-token heads in
    # layer 0, induction heads in layer 1; no successor, name-mover or duplicate-token head in either
    assert fams == {(0, "previous_token"), (1, "induction"), (1, "long_prefix_induction"),
                    (0, "local_context"), (0, "high_level_context"), (1, "local_context"), (1, "high_level_context")}
    # mechanism families (necessity tests) in both layers, each gated by its control
    mech = con.execute("SELECT layer, sum(passed), sum(control_passed), sum(selected) FROM validation "
                       "WHERE test = 'necessity' GROUP BY layer ORDER BY layer").fetchall()
    assert [m[0] for m in mech] == [0, 1] and all(p >= 0.9 * s and c <= 0.1 * p for _, p, c, s in mech), mech
    for t in ("heads", "head_attribution", "feature_logits", "dfa_head", "dfa_source", "head_successor",
              "head_prefix_curve", "context_runs", "clusters", "cluster_sizes", "cluster_sweep", "examples"):
        assert con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] > 0, t
    con.close()
    beh = res.output(InductionBehaviourRates, sae=1)
    assert int((beh.n_sequences > 0).sum()) > 100  # the behaviour test reached many features
    assert res.sae(1).ctx.stats.n_tokens == res.sae(0).ctx.stats.n_tokens == 128_000


def test_scan_finds_the_induction_family(default_scan_result):
    res = default_scan_result[0]  # the layer-1 SAE of the shared scan
    fam = res.output(InductionFamily, sae=1)
    passed = res.output(InductionBehaviourRates, sae=1).passed
    assert res.output(HeadRoleScores).induction_heads, "no induction head found"
    sel, ctrl = fam.selected, fam.control
    assert int((sel & passed).sum()) >= 1 and int(ctrl.sum()) >= 1
    sel_rate = (sel & passed).sum().item() / max(sel.sum().item(), 1)
    ctrl_rate = (ctrl & passed).sum().item() / max(ctrl.sum().item(), 1)
    assert sel_rate >= 5 * ctrl_rate, (sel_rate, ctrl_rate)
