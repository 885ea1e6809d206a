"""Autocast on the embedded default: do bf16 / fp16 model forwards (SAE encode in fp32) give
fp32's families?

Scans the embedded default (both layers, every shipped eval token unless ``--max-tokens``)
with ``autocast`` none, bf16 and fp16 on one device and prints, per precision, the wall time,
each family's size, and every feature whose membership differs from fp32's, with its
induction-behaviour pass rate (and eligible sequences) in both precisions: a feature one
sequence from the 0.6 bar can flip when a single near-zero activation changes sign.

Run: ``python benchmarks/bench_autocast.py [--device cpu|cuda|auto] [--max-tokens N]``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--precisions", default="none,bf16,fp16")
    args = ap.parse_args()
    from famfind.heuristics.induction import InductionBehaviourRates
    from famfind.config import ScanConfig
    from famfind.runner import resolve_device, run_scan

    device = resolve_device(args.device)
    runs = {}
    for ac in args.precisions.split(","):
        t = time.perf_counter()
        res = run_scan(ScanConfig(device=device, autocast=ac, max_tokens=args.max_tokens))
        dt = time.perf_counter() - t
        fams = {(u.id, x.family, x.feature) for u in res.saes for r in u.results.values() for x in r.families}
        rates = {u.id: u.ctx.outputs.get(InductionBehaviourRates) for u in res.saes}
        runs[ac] = (fams, rates)
        sizes = Counter((sae.split(".")[1], fam) for sae, fam, _ in fams)
        print(f"{ac:>5} on {device}: {dt:6.1f} s; families " +
              ", ".join(f"L{layer} {fam} {n}" for (layer, fam), n in sorted(sizes.items())), flush=True)
    base, base_rates = runs[args.precisions.split(",")[0]]
    for ac, (fams, rates) in runs.items():
        diff = sorted(base ^ fams)
        print(f"{ac:>5} vs fp32: {'equal families' if not diff else f'{len(diff)} memberships differ'}")
        for sae, fam, f in diff:
            side = "only fp32" if (sae, fam, f) in base else f"only {ac}"
            a, b = base_rates.get(sae), rates.get(sae)
            why = "" if a is None or b is None else (
                f": induction pass rate {float(a.pass_rate[f]):.4f} of {int(a.n_sequences[f])} (fp32) vs "
                f"{float(b.pass_rate[f]):.4f} of {int(b.n_sequences[f])} ({ac})")
            print(f"       {sae} {fam} feature {f} ({side}){why}")


if __name__ == "__main__":
    main()
