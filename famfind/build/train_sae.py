"""Train one of the embedded default's ReLU SAEs on ``blocks.L.attn.hook_z`` (L = ``cfg.layer``).

Objective (Bricken et al. 2023, "Towards Monosemanticity", as used for attention SAEs by
Kissane et al. 2024): ``||x - x_hat||^2 + l1_coeff * ||f||_1`` with decoder rows kept at
unit norm, Adam, ``b_dec`` initialised to the geometric-median proxy (mean). Dead features
are resampled (Bricken et al. 2023, "Neuron resampling"): at each resample step, features
that did not fire on the previous ``resample_window`` steps get an encoder/decoder direction
from an input drawn with probability proportional to its squared reconstruction loss.

The L1 coefficient is steered toward ``target_l0`` during the first ``l1_tune_frac`` of
training (multiplicative updates), then frozen; the frozen value is recorded in ``cfg.json``.
Activations come from the training split only; bars are measured on held-out tokens.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from famfind.models.gpt2 import HFGPT2Model
from famfind.sae import SAE



@dataclass(frozen=True)
class SAETrainConfig:
    expansion: int = 16
    batch: int = 4096
    steps: int = 5000
    lr: float = 1e-3
    l1_init: float = 1.0
    target_l0: float = 16.0
    l1_tune_frac: float = 0.4
    resample_every: int = 1000
    resample_until: float = 0.7  # fraction of training after which no more resampling
    seq_len: int = 128
    seed: int = 0
    layer: int = 1  # blocks.{layer}.attn.hook_z

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"


def collect_hook_z(model: HFGPT2Model, tokens: np.ndarray, layer: int, seq_len: int,
                   batch: int = 64) -> torch.Tensor:
    """hook_z for a token stream, ``[n_tokens, n_heads*d_head]`` float32."""
    n = tokens.size // seq_len
    seqs = torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len)
    out = []
    for i in range(0, n, batch):
        out.append(model.run_hook_z(seqs[i:i + batch], layer).flatten(-2).reshape(-1, model.cfg.n_heads * model.cfg.d_head))
    return torch.cat(out)


def _normalise_dec(W_dec: torch.nn.Parameter) -> None:
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def train_sae(build_dir: Path, cfg: SAETrainConfig = SAETrainConfig(), log=print) -> Path:
    """Train the layer-``cfg.layer`` SAE on the build's training split; writes
    ``build_dir/saes/<hook>/`` in SAELens format (and ``sae_history_L<layer>.json``)."""
    torch.manual_seed(cfg.seed)
    model = HFGPT2Model(build_dir / "model")
    train = np.load(build_dir / "train_tokens.npy")
    t0 = time.time()
    X = collect_hook_z(model, train, cfg.layer, cfg.seq_len)
    log(f"collected hook_z {tuple(X.shape)} in {time.time() - t0:.0f}s")
    d_in = X.shape[1]
    d_sae = cfg.expansion * d_in
    W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in))
    _normalise_dec(W_dec)
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(X[:100_000].mean(0).clone())
    sae = SAE(W_enc, W_dec, b_enc, b_dec, hook_name=cfg.hook, model_name="../../model")  # trains in place
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=cfg.lr)
    l1 = cfg.l1_init
    g = torch.Generator().manual_seed(cfg.seed)
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    history = []
    x_scale = X.norm(dim=1).mean().item()  # loss scale for logging only
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))  # linear decay, last 20%
        for grp in opt.param_groups:
            grp["lr"] = lr
        x = X[torch.randint(0, X.shape[0], (cfg.batch,), generator=g)]
        f = sae.encode(x)
        x_hat = sae.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        sparsity = f.sum(-1).mean()
        loss = mse + l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # remove the gradient component parallel to each decoder row
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        _normalise_dec(W_dec)
        fired = (f > 0).any(0)
        last_fired[fired] = step
        l0 = (f > 0).float().sum(-1).mean().item()
        if step < cfg.l1_tune_frac * cfg.steps and step % 10 == 0 and step > 200:
            l1 *= math.exp(0.02 * math.log(max(l0, 0.5) / cfg.target_l0))
        if (step + 1) % cfg.resample_every == 0 and step < cfg.resample_until * cfg.steps:
            dead = (step - last_fired) >= cfg.resample_every
            n_dead = int(dead.sum())
            if n_dead:
                _resample(X, dead, sae, opt, g)
                last_fired[dead] = step
            log(f"step {step + 1}: resampled {n_dead} dead features")
        if (step + 1) % 200 == 0:
            rec = {"step": step + 1, "mse_rel": round(mse.item() / x_scale ** 2, 4), "l0": round(l0, 1),
                   "l1_coeff": round(l1, 5), "s": round(time.time() - t0)}
            history.append(rec)
            log(json.dumps(rec))
    out = build_dir / "saes" / cfg.hook
    save_saelens(sae, out, {"l1_coefficient": l1, **asdict(cfg)})
    (build_dir / f"sae_history_L{cfg.layer}.json").write_text(json.dumps({"config": asdict(cfg), "history": history}))
    return out


@torch.no_grad()
def _resample(X, dead, sae: SAE, opt, g, n_sample: int = 65536) -> None:
    W_enc, W_dec, b_enc, b_dec = sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec
    xs = X[torch.randint(0, X.shape[0], (n_sample,), generator=g)]
    err = (xs - sae.decode(sae.encode(xs))).pow(2).sum(-1)
    idx = torch.multinomial(err / err.sum(), int(dead.sum()), replacement=False, generator=g)
    dirs = xs[idx] - b_dec
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive_norm = W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    W_dec[dead] = dirs
    W_enc[:, dead] = dirs.T * alive_norm * 0.2
    b_enc[dead] = 0.0
    for p, sl in ((W_dec, (dead,)), (W_enc, (slice(None), dead)), (b_enc, (dead,))):
        st = opt.state.get(p)
        if st:
            st["exp_avg"][sl] = 0.0
            st["exp_avg_sq"][sl] = 0.0


def save_saelens(sae: SAE, out: Path, training: dict | None = None) -> None:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` as SAELens >= 6 ``save_model`` does."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": None,
                     "model_name": sae.model_name, "hook_name": sae.hook_name, "context_size": 128,
                     "prepend_bos": False, "dataset_path": "famfind embedded default (train split)",
                     **({"famfind_training": training} if training else {})},
        "architecture": sae.architecture,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=1))


if __name__ == "__main__":
    import sys

    torch.set_num_threads(2)
    layer = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    train_sae(Path(sys.argv[1] if len(sys.argv) > 1 else "build/default"), SAETrainConfig(layer=layer),
              log=lambda m: print(m, flush=True))
