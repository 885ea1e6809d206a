"""Devices and precision: ``--device`` resolution, and the activation pass under autocast
(bf16/fp16 model forward, fp32 SAE encode) finds the planted families exactly as fp32 does.
(The same comparison on the embedded default, where a borderline feature can flip, is
``benchmarks/bench_autocast.py``.)"""

from __future__ import annotations

import pytest
import torch

from famfind.errors import FamfindError


def test_resolve_device():
    from famfind.runner import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(FamfindError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(FamfindError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def _families(res) -> list[tuple]:
    return sorted((u.id, x.family, x.feature, x.confidence) for u in res.saes for r in u.results.values()
                  for x in r.families)


@pytest.fixture(scope="module")
def induction_scans(planted_paths):
    """The planted SAE's induction family (selection + behaviour) in fp32, bf16 and fp16."""
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    return {ac: run_scan(ScanConfig(sae=str(planted_paths["sae"]), corpus=str(planted_paths["corpus"]), seq_len=64,
                                    select=("induction_selection", "induction_behaviour"), autocast=ac))
            for ac in ("none", "bf16", "fp16")}


@pytest.mark.heavy  # slow end-to-end: .ci/run runs it after the README's command (-m heavy)
@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_pass_finds_the_planted_families_of_fp32(induction_scans, planted_paths, autocast):
    from famfind.activations import PassState, activation_pass
    from famfind.models import load_model
    from famfind.sae import load_sae

    fp32, res = induction_scans["none"], induction_scans[autocast]
    assert _families(res) == _families(fp32) and _families(fp32)
    a, b = fp32.sae().ctx.stats, res.sae().ctx.stats
    assert torch.equal(a.fire_count, b.fire_count)  # (top-k order may differ: planted ties break by rounding)
    assert torch.allclose(a.top_acts, b.top_acts, rtol=2e-2)
    assert not torch.equal(a.act_sum, b.act_sum)  # the forward really ran in low precision ...
    assert torch.allclose(a.act_sum, b.act_sum, rtol=2e-2)  # ... to its rounding

    sae = load_sae(planted_paths["sae"])  # observers see fp32 hook_z and activations
    model = load_model(str(planted_paths["model"]))
    seen = []
    activation_pass(model, sae, torch.randint(0, 64, (4, 64)), PassState(sae, 4, 4, 64), 2,
                    [lambda batch: seen.append((batch.z.dtype, batch.acts.dtype))], autocast=autocast)
    assert seen == [(torch.float32, torch.float32)] * 2
