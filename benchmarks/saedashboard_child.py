"""SAEDashboard's side of ``bench_scale.py --saedashboard-python PY`` (run by that interpreter,
an environment with ``sae-dashboard``: it pins typer 0.12.5, so it may not be famfind's).

Loads the benchmark's HF GPT-2 checkpoint into a TransformerLens ``HookedSAETransformer``
(offline: config from the checkpoint, weights through TransformerLens's own GPT-2 converter,
no weight processing, so hook_z equals the checkpoint's), the SAELens SAE folder, and the
token matrix, and times ``SaeVisRunner(cfg).run`` (SAEDashboard's feature-data generator:
top activations, quantile samples, logit tables, histograms) over every feature. Prints one
JSON line: ``{"seconds", "features", "tokens", "versions"}``.

Usage: ``PY saedashboard_child.py MODEL_DIR SAE_DIR TOKENS.npy DEVICE``.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version

import numpy as np
import torch


def main() -> None:
    model_dir, sae_dir, tokens_npy, device = sys.argv[1:5]
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE, HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir)
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon,
                                  original_architecture="GPT2LMHeadModel", device=device)
    model = HookedSAETransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.to(device)
    sae = SAE.load_from_disk(sae_dir, device=device)
    tokens = torch.from_numpy(np.load(tokens_npy).astype(np.int64))
    d_sae = sae.cfg.d_sae
    vis = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=list(range(d_sae)), minibatch_size_features=256,
                       minibatch_size_tokens=64, device=device, verbose=False)
    t = time.perf_counter()
    SaeVisRunner(vis).run(encoder=sae, model=model, tokens=tokens)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "features": d_sae, "tokens": int(tokens.numel()),
                      "versions": {p: version(p) for p in ("sae-dashboard", "sae-lens", "transformer-lens", "torch")}}))


if __name__ == "__main__":
    main()
