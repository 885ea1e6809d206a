"""famfind's own GPT-2 forward against TransformerLens's TransformerBridge (issue #15).

Scans the embedded default (both layers, every shipped eval token unless ``--max-tokens``)
with ``model_backend="famfind"`` (the fast path) and ``model_backend="bridge"``
(``TransformerBridge.boot_transformers`` on the same folder, compatibility mode), on one
device, in one run; prints each wall time, the ratio, each family's size, and every feature
whose family membership differs between the two (none expected: the backends agree on hook_z
to ~1e-6; a feature one sequence from a bar could still flip on rounding).

Run: ``python benchmarks/bench_backends.py [--device cpu|cuda|auto] [--max-tokens N]``.
Needs TransformerLens >= 3.9 (``famfind[tl]``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=None)
    args = ap.parse_args()
    from famfind.config import ScanConfig
    from famfind.runner import resolve_device, run_scan

    device = resolve_device(args.device)
    runs, secs = {}, {}
    for backend in ("famfind", "bridge"):
        t = time.perf_counter()
        res = run_scan(ScanConfig(device=device, model_backend=backend, max_tokens=args.max_tokens))
        secs[backend] = time.perf_counter() - t
        fams = {(u.id, x.family, x.feature) for u in res.saes for r in u.results.values() for x in r.families}
        failed = [f"{r.id}: {r.error[:60]}" for r in res.runs if r.status != "ok"]
        runs[backend] = fams
        sizes = Counter((sae.split(".")[1], fam) for sae, fam, _ in fams)
        print(f"{backend:>7} on {device}: {secs[backend]:6.1f} s; families " +
              ", ".join(f"L{layer} {fam} {n}" for (layer, fam), n in sorted(sizes.items())) +
              (f"; not ok: {'; '.join(failed)}" if failed else ""), flush=True)
    a, b = runs["famfind"], runs["bridge"]
    print(f"wall time bridge / famfind: {secs['bridge'] / secs['famfind']:.2f}x; "
          f"family rows equal: {a == b} ({len(a)} rows; only fast path {sorted(a - b)}, only bridge {sorted(b - a)})")


if __name__ == "__main__":
    main()
