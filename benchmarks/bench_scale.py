"""Scale benchmark (issue #14, first part): the activation pass at GPT-2-small shape.

Builds, offline and seeded, a random-init GPT-2-small-shaped model (12 layers x 12 heads x
d_head 64, d_model 768, vocab 50,257, n_ctx 1024; a Hugging Face ``GPT2LMHeadModel`` saved as
``model.safetensors``) and 12 hook_z SAEs of 24,576 features (one per layer, d_in 768) whose
encoder biases are calibrated so each feature fires on ~20/24,576 of the calibration
positions (L0 ~ 20), then prints in one run, for three corpus sizes (sequences of 128 random
tokens):

- activation-pass tokens/s with the layer-5 SAE alone and with all 12 SAEs in one pass
  (:func:`famfind.activations.activation_pass`, every accumulator: counts, histogram, top-k,
  reservoir, random contexts);
- peak RSS, and on a GPU peak GPU memory (both should stay flat as the corpus grows);
- the pass's achieved FLOP/s (model forward to the deepest SAE's layer + every SAE's encode,
  counted analytically) as a fraction of the device's measured dense fp32 matmul FLOP/s.

Not yet here (issue #14): the full scan's wall time, DuckDB and HTML report sizes at this shape.

Run: ``python benchmarks/bench_scale.py [--device cpu|cuda|auto] [--quick]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

D_MODEL, N_HEADS, N_LAYERS, VOCAB, N_CTX, D_SAE, SEQ = 768, 12, 12, 50257, 1024, 24576, 128


def build_model(out: Path, n_layers: int, d_model: int, n_heads: int, vocab: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=N_CTX)
    GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    return out


@torch.no_grad()
def build_saes(model, d_sae: int, calib: torch.Tensor, target_l0: float, device: str) -> list:
    """One SAE per layer: random unit-norm decoder rows, encoder = decoder^T, ``b_enc`` set to
    minus each feature's ``1 - target_l0 / d_sae`` quantile of its pre-activation on ``calib``."""
    from famfind.sae import SAE

    g = torch.Generator().manual_seed(1)
    d_in = model.cfg.n_heads * model.cfg.d_head
    zs = model.run_hook_zs(calib, list(range(model.cfg.n_layers)))
    saes = []
    for lyr in range(model.cfg.n_layers):
        W_dec = torch.randn(d_sae, d_in, generator=g).to(device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.contiguous()
        z = zs[lyr].flatten(0, 1).flatten(-2)
        b_dec = z.mean(0)
        pre = (z - b_dec) @ W_enc  # [n, d_sae]
        q = 1 - target_l0 / d_sae
        k = max(1, int(round((1 - q) * pre.shape[0])))
        b_enc = -pre.topk(k, dim=0).values[-1]  # fires on ~k of the n calibration positions
        saes.append(SAE(W_enc, W_dec, b_enc, b_dec, hook_name=f"blocks.{lyr}.attn.hook_z"))
        del pre
    return saes


def matmul_flops(device: str, n: int) -> float:
    """Measured dense fp32 matmul FLOP/s (``n x n`` by ``n x n``), best of 5."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pass_flops_per_token(cfg, layers: list[int], d_sae: int) -> float:
    """Forward to ``max(layers)`` (QKV, attention over SEQ positions, W_O, 4x MLP) + the encodes."""
    d = cfg.d_model
    per_layer = 2 * (3 * d * d + d * d + 8 * d * d) + 2 * 2 * SEQ * d  # matmuls + scores/pattern@V (avg pos/2 x2)
    return (max(layers) + 1) * per_layer + len(layers) * 2 * d * d_sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--quick", action="store_true", help="a small configuration (2 layers, d_model 256, d_sae 2048)")
    ap.add_argument("--sizes", default=None, help="comma-separated corpus token counts")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    n_layers, d_model, n_heads, d_sae, vocab = (2, 256, 4, 2048, 4096) if args.quick else \
        (N_LAYERS, D_MODEL, N_HEADS, D_SAE, VOCAB)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else (
        [8_192, 16_384, 32_768] if args.quick else
        ([1_048_576, 3_145_728, 10_485_760] if device == "cuda" else [131_072, 262_144, 1_048_576]))
    bs = args.batch_size or (256 if device == "cuda" else 32)
    from famfind.activations import PassState, activation_pass
    from famfind.model import HFGPT2Model

    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp) / "model", n_layers, d_model, n_heads, vocab)
        model = HFGPT2Model(Path(tmp) / "model", device)
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, vocab, (64, SEQ), generator=g).to(device)
    t0 = time.time()
    saes = build_saes(model, d_sae, calib, 20.0, device)
    mid = saes[min(5, n_layers - 1)]  # layer 5 at GPT-2-small shape
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}); "
          f"model {cfg.n_layers} layers x {cfg.n_heads} heads x d_head {cfg.d_head}, vocab {cfg.d_vocab}; "
          f"{len(saes)} SAEs x {d_sae} features (built in {time.time() - t0:.0f} s); batch {bs} x {SEQ} tokens")
    peak = matmul_flops(device, 8192 if device == "cuda" else 2048)
    print(f"measured dense fp32 matmul: {peak / 1e12:.2f} TFLOP/s")
    for n_tok in sizes:
        toks = torch.randint(0, vocab, (n_tok // SEQ, SEQ), generator=g)
        for name, ss in ((f"layer-{mid.layer} SAE", [mid]), (f"all {len(saes)} SAEs", saes)):
            states = [PassState(s, cfg.n_heads, toks.shape[0], SEQ, device=device) for s in ss]
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t = time.perf_counter()
            activation_pass(model, ss, toks, states, bs, device=device)
            _sync(device)
            dt = time.perf_counter() - t
            st = states[0].finalize()
            flops = pass_flops_per_token(cfg, [s.layer for s in ss], d_sae) * toks.numel() / dt
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
            print(f"{toks.numel():>11,} tokens, {name:>14}: {toks.numel() / dt:>10,.0f} tok/s ({dt:7.1f} s), "
                  f"L0 {st.l0:.1f}, {flops / 1e12:.2f} TFLOP/s = {flops / peak:.1%} of matmul peak, "
                  f"peak RSS {rss:,.0f} MiB{gpu}")
            del states, st


if __name__ == "__main__":
    main()
