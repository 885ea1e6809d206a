"""Measure the embedded default's bars on held-out tokens (issue #2) and print them.

Model bars: best layer-1 induction score (>= 0.5, :mod:`famfind.roles`); mean loss on the
second copy of repeated held-out natural text as a fraction of the first copy (<= 0.5);
held-out loss against a unigram baseline (train-split unigram frequencies, add-one).
SAE bars, per SAE (``saes/<hook>/``): L0 in [5, 40] (layer 1) or [3, 40] (layer 0); loss
recovered >= 70% (``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` with the SAE's hook_z replaced
by its reconstruction vs. zero-ablated); dead features <= 40% (never fire on the held-out set,
>= 1M tokens).

Run: ``python -m famfind.build.bars [DIR]`` (default: the installed embedded default).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from famfind.corpus import default_dir
from famfind.models.gpt2 import HFGPT2Model
from famfind.roles import head_scores
from famfind.sae import load_sae


def _ce(logits: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss, ``[batch, pos-1]`` (nats)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten(), reduction="none").view(
        toks.shape[0], -1)


def model_bars(model: HFGPT2Model, heldout: np.ndarray, train_unigram: np.ndarray | None,
               n_seqs: int = 128, seq_len: int = 128) -> dict:
    scores = head_scores(model, [0, 1], seq_len=50, n_seqs=32)
    ind = scores["induction"][1]
    rng = np.random.default_rng(0)
    starts = rng.integers(0, heldout.size - seq_len, n_seqs)
    seqs = torch.from_numpy(np.stack([heldout[s:s + seq_len] for s in starts]).astype(np.int64))
    rep = torch.cat([seqs, seqs], 1)[:, : model.cfg.n_ctx]
    ce = torch.cat([_ce(model.logits(rep[i:i + 32]), rep[i:i + 32]) for i in range(0, n_seqs, 32)])
    first, second = ce[:, : seq_len - 1].mean().item(), ce[:, seq_len:].mean().item()
    out = {
        "induction_score_best": round(float(ind.max()), 4), "induction_head": f"1.{int(ind.argmax())}",
        "induction_scores_layer1": [round(float(x), 3) for x in ind],
        "previous_token_scores_layer0": [round(float(x), 3) for x in scores["previous_token"][0]],
        "repeat_loss_first_copy": round(first, 4), "repeat_loss_second_copy": round(second, 4),
        "repeat_loss_ratio": round(second / first, 4), "heldout_loss": round(first, 4),
    }
    if train_unigram is not None:
        p = (train_unigram + 1) / (train_unigram + 1).sum()
        out["unigram_loss"] = round(float(-np.log(p[heldout]).mean()), 4)
    return out


@torch.no_grad()
def sae_bars(model: HFGPT2Model, sae, heldout: np.ndarray, seq_len: int = 128,
             loss_seqs: int = 256, batch: int = 64) -> dict:
    n = heldout.size // seq_len
    seqs = torch.from_numpy(heldout[: n * seq_len].astype(np.int64)).view(n, seq_len)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    l0, nz, mse, var = 0.0, 0, 0.0, 0.0
    for i in range(0, n, batch):
        z = model.run_hook_z(seqs[i:i + batch], sae.layer).flatten(-2)
        a = sae.encode(z)
        fired |= (a > 0).flatten(0, 1).any(0)
        l0 += (a > 0).sum().item()
        nz += z.shape[0] * z.shape[1]
        mse += (sae.decode(a) - z).pow(2).sum().item()
        var += (z - z.mean((0, 1))).pow(2).sum().item()
    H, dh = model.cfg.n_heads, model.cfg.d_head
    recon = lambda z: sae.decode(sae.encode(z.flatten(-2))).view(*z.shape[:-2], H, dh)  # noqa: E731
    ce = {"clean": [], "sae": [], "zero": []}
    for i in range(0, min(loss_seqs, n), batch):
        t = seqs[i:i + batch]
        ce["clean"].append(_ce(model.logits(t), t).mean())
        ce["sae"].append(_ce(model.logits(t, recon, sae.layer), t).mean())
        ce["zero"].append(_ce(model.logits(t, torch.zeros_like, sae.layer), t).mean())
    c = {k: torch.stack(v).mean().item() for k, v in ce.items()}
    return {"d_sae": sae.d_sae, "n_tokens": nz, "l0": round(l0 / nz, 2),
            "dead_fraction": round(1 - fired.float().mean().item(), 4),
            "explained_variance": round(1 - mse / var, 4),
            "ce_clean": round(c["clean"], 4), "ce_with_sae": round(c["sae"], 4), "ce_zero_ablated": round(c["zero"], 4),
            "loss_recovered": round((c["zero"] - c["sae"]) / (c["zero"] - c["clean"]), 4)}


L0_BARS = {0: (3, 40), 1: (5, 40)}  # layer 0: Kissane et al.'s GPT-2 small layer-0 SAE has L0 3


def check(bars: dict) -> dict[str, bool]:
    m = bars["model"]
    met = {"induction_score >= 0.5": m["induction_score_best"] >= 0.5,
           "repeat_loss_ratio <= 0.5": m["repeat_loss_ratio"] <= 0.5}
    for hook, s in bars["saes"].items():
        lo, hi = L0_BARS.get(s["layer"], (3, 40))
        met[f"{hook}: L0 in [{lo}, {hi}]"] = lo <= s["l0"] <= hi
        met[f"{hook}: loss_recovered >= 0.70"] = s["loss_recovered"] >= 0.70
        met[f"{hook}: dead_fraction <= 0.40"] = s["dead_fraction"] <= 0.40
    return met


def measure(d: Path, train_tokens: Path | None = None) -> dict:
    """All bars for an embedded-default directory (``model/``, ``saes/<hook>/``, ``eval_tokens.npy``)."""
    from famfind.sae import sae_paths

    torch.manual_seed(0)
    model = HFGPT2Model(d / "model")
    held = np.load(d / "eval_tokens.npy").astype(np.int64)
    uni = None
    if train_tokens is not None and train_tokens.exists():
        uni = np.bincount(np.load(train_tokens).astype(np.int64), minlength=model.cfg.d_vocab)
    saes = {}
    for p in sae_paths(d / "saes"):
        sae = load_sae(p)
        saes[sae.hook_name] = {"layer": sae.layer, **sae_bars(model, sae, held)}
    bars = {"model": model_bars(model, held, uni), "saes": saes}
    bars["met"] = check(bars)
    return bars


if __name__ == "__main__":
    torch.set_num_threads(2)
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir()
    print(json.dumps(measure(d, d / "train_tokens.npy" if len(sys.argv) > 1 else None), indent=1))
