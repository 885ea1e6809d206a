"""famfind against SAEDashboard on the embedded default (issue #26, item 3).

One SAE of the embedded default (``--layer``, default 1: 2,048 features, d_in 128) over the
first ``--tokens`` tokens of the default corpus (default 131,072 = 1,024 sequences of 128),
on the same device, timed alternately ``--repeats`` times, each run in a fresh process:

1. SAEDashboard's feature data: ``SaeVisRunner(cfg).run`` over every feature
   (``saedashboard_child.py``, run by ``--saedashboard-python``, an interpreter with
   sae-dashboard installed; it loads the same HF checkpoint into a TransformerLens
   ``HookedSAETransformer`` and the same SAELens folder);
2. famfind's full scan of that SAE (every built-in detector, mechanism records included),
   then its DuckDB write;
3. famfind's dashboard-equivalent detectors (``--select head_attribution --select
   feature_logits``: the activation pass with its top-k / quantile / histogram accumulators,
   head attribution and logit tables), then its DuckDB write.

Prints each run's seconds and, from the medians, the ratios SAEDashboard / famfind. The
issue's targets: the full scan >= 5x faster, the dashboard-equivalent detectors >= 10x.
Import time and HTML are outside every number (SAEDashboard's HTML is not rendered either).

Run: ``python benchmarks/bench_dashboard.py --saedashboard-python /path/to/venv/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def child(spec: dict) -> None:
    """One famfind scan in this fresh process; prints ``{"scan_s", "write_s"}``."""
    from famfind.config import ScanConfig
    from famfind.frames import write_scan
    from famfind.runner import run_scan

    t = time.perf_counter()
    res = run_scan(ScanConfig(sae=(spec["sae"],), max_tokens=spec["tokens"], device=spec["device"],
                              select=tuple(spec["select"])))
    scan_s = time.perf_counter() - t
    t = time.perf_counter()
    write_scan(Path(spec["out"]) / "scan.duckdb", res)
    failed = [r.id for r in res.runs if r.status != "ok"]
    print(json.dumps({"scan_s": scan_s, "write_s": time.perf_counter() - t, "failed": failed,
                      "detectors": len(res.runs)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saedashboard-python", required=False, default=None,
                    help="an interpreter with sae-dashboard installed")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not args.saedashboard_python:
        ap.error("--saedashboard-python is required (an interpreter with sae-dashboard installed)")

    from famfind.corpus import default_dir, default_sae, load_corpus

    sae = str(default_sae(args.layer))
    model_dir = str(default_dir() / "model")
    corpus = load_corpus(None, None, 128, max_tokens=args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="famfind-bench-dashboard-"))
    try:
        mat = tmp / "tokens.npy"
        np.save(mat, corpus.tokens.numpy().astype(np.int64))
        n_tok = corpus.tokens.numel()
        print(f"embedded default, layer-{args.layer} SAE, {n_tok:,} tokens ({corpus.tokens.shape[0]} x 128), "
              f"device {args.device}, {args.repeats} alternated repeat(s), each run a fresh process", flush=True)
        runs: dict[str, list[float]] = {"SAEDashboard": [], "famfind full": [], "famfind dashboard": []}
        versions = None
        for rep in range(args.repeats):
            r = subprocess.run([args.saedashboard_python, str(HERE / "saedashboard_child.py"), model_dir, sae,
                                str(mat), args.device], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"SAEDashboard run failed:\n{r.stderr[-3000:]}")
            sd = json.loads(r.stdout.strip().splitlines()[-1])
            versions = sd["versions"]
            runs["SAEDashboard"].append(sd["seconds"])
            print(f"  [{rep + 1}] SAEDashboard SaeVisRunner.run, {sd['features']:,} features: {sd['seconds']:.1f} s",
                  flush=True)
            for name, select in (("famfind full", []), ("famfind dashboard", ["head_attribution", "feature_logits"])):
                out = tmp / f"{name.replace(' ', '_')}_{rep}"
                out.mkdir()
                spec = {"sae": sae, "tokens": args.tokens, "device": args.device, "select": select, "out": str(out)}
                r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
                ff = json.loads(r.stdout.strip().splitlines()[-1])
                if ff["failed"]:
                    sys.exit(f"{name}: detectors failed: {ff['failed']}")
                s = ff["scan_s"] + ff["write_s"]
                runs[name].append(s)
                print(f"  [{rep + 1}] {name} ({ff['detectors']} detectors): scan {ff['scan_s']:.1f} s + "
                      f"DuckDB write {ff['write_s']:.1f} s = {s:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"versions: {', '.join(f'{k} {v}' for k, v in (versions or {}).items())}")
        for name, target in (("famfind full", 5.0), ("famfind dashboard", 10.0)):
            ratio = med["SAEDashboard"] / med[name]
            print(f"SAEDashboard / {name}: {med['SAEDashboard']:.1f} s / {med[name]:.1f} s = {ratio:.1f}x "
                  f"(target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
