"""Per-detector wall times of one scan at GPT-2-small shape (issue #14).

Builds the model and SAEs of :mod:`bench_scale` (same seeds: random-init GPT-2-small shape,
24,576-feature hook_z SAEs calibrated to L0 ~ 20), writes ``--tokens`` random tokens, and runs
``famfind.runner.run_scan`` over the SAEs of ``--layers``, printing one line per detector step
as it ends: seconds since the scan started, the step's own seconds, the SAE's layer ('-' for a
model-scope detector), the detector id and the step (``start``/``observe`` run before or
during the activation pass, ``run`` after it; ``observe`` lines are per batch and left out
unless ``--observe``). Nothing is written to DuckDB or HTML.

Run: ``python benchmarks/profile_scan.py --tokens 1048576 --layers 0,1,...,11 [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_scale as B  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_048_576)
    ap.add_argument("--layers", default="5", help="comma-separated SAE layers")
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--observe", action="store_true", help="also print the per-batch observe steps")
    args = ap.parse_args()
    import famfind.execution as E
    import famfind.runner as S
    from famfind.config import ScanConfig
    from famfind.build.train_sae import save_saelens
    from famfind.models.gpt2 import HFGPT2Model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = [time.perf_counter()]
    step = E.UnitRunner.step

    def timed(self, hid, what, fn):
        t = time.perf_counter()
        r = step(self, hid, what, fn)
        if what != "observe" or args.observe:
            print(f"{time.perf_counter() - t0[0]:7.1f} {time.perf_counter() - t:7.1f} s "
                  f"L{getattr(self.ctx.sae, 'layer', '-')} {hid} {what}", flush=True)
        return r

    E.UnitRunner.step = timed
    tmp = Path(tempfile.mkdtemp(prefix="famfind-profile-"))
    B.build_model(tmp / "model", B.N_LAYERS, B.D_MODEL, B.N_HEADS, B.VOCAB)
    model = HFGPT2Model(tmp / "model", device)
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, B.VOCAB, (512, B.SEQ), generator=g).to(device)
    saes = B.build_saes(model, B.D_SAE, calib, 20.0, device, only=[int(x) for x in args.layers.split(",")])
    paths = []
    for s in saes:
        s.model_name = str(tmp / "model")
        p = tmp / f"sae{s.layer}"
        save_saelens(s.to("cpu"), p)
        paths.append(str(p))
    np.save(tmp / "tokens.npy", torch.randint(0, B.VOCAB, (args.tokens,), generator=g).numpy().astype(np.int32))
    del saes, model
    t0[0] = time.perf_counter()
    S.run_scan(ScanConfig(sae=tuple(paths), corpus=str(tmp / "tokens.npy"), seq_len=B.SEQ, device=device,
                            batch_size=args.batch_size or (256 if device == "cuda" else 32)), log=print)
    print(f"scan {time.perf_counter() - t0[0]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
