"""Where a scan's time goes, stage by stage (issue #26).

``--default`` (the default mode): the embedded default, both SAEs, every built-in detector,
written to a DuckDB file and reported, as ``famfind scan`` does; prints one line per stage:
loading (SAEs, model, corpus), the activation pass split into the model forward, the SAE
encodes, the pass's own accumulators and each observing detector, then each detector's run
(per SAE), the DuckDB write (building the frames, writing them), the terminal report (at 80
columns, to a buffer) and the HTML report. Stages are timed by wrapping famfind's functions
from outside; nothing in famfind changes.

``--gpt2-small``: the GPT-2-small-shaped model and 24,576-feature SAEs of :mod:`bench_scale`
(random init, L0 ~ 20) over ``--tokens`` random tokens, the SAEs of ``--layers``; prints each
detector step as it ends (seconds since the start, the step's own seconds, layer, detector,
step).

Run: ``python benchmarks/profile_scan.py`` or ``python benchmarks/profile_scan.py --gpt2-small
--tokens 1048576 --layers 0,1,2 [--device cuda]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


class Clock:
    """Seconds per stage; nested stages are subtracted from their parent (exclusive times)."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        self.stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self.stack.pop()
            dt = time.perf_counter() - t
            self.spent[name] += dt - inner
            if self.stack:
                self.stack[-1][1] += dt

    def wrap(self, obj, attr: str, name):
        """Time ``obj.attr`` (a function or method) under stage ``name`` (a string, or a function of
        the call's arguments)."""
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self.stage(name(*a, **k) if callable(name) else name):
                return fn(*a, **k)

        setattr(obj, attr, timed)


def profile_default(args) -> None:
    import famfind.activations as A
    import famfind.db as D
    import famfind.execution as E
    import famfind.frames as Fr
    import famfind.runner as R
    from famfind.config import ScanConfig
    from famfind.models.gpt2 import HFGPT2Model
    from famfind.reports.html import render_html
    from famfind.reports.terminal import render
    from famfind.sae import SAE

    clock = Clock()
    for name in ("load_saes", "load_model", "load_corpus"):
        clock.wrap(R, name, f"load: {name.removeprefix('load_')}")
    clock.wrap(R, "_pass", "pass: other (batching, hooks)")
    def inside(what):  # a model run or encode is the pass's, or counted with the detector that made it
        def name(*a, **k):
            parent = clock.stack[-1][0] if clock.stack else "-"
            return f"pass: {what}" if parent.startswith("pass") else f"{parent} [{what}]"
        return name

    for m in ("run_hook_z", "run_hook_zs", "run_attention", "hook_z_spans", "hook_z_at", "prefix_cache"):
        clock.wrap(HFGPT2Model, m, inside("model forward"))
    clock.wrap(SAE, "encode", inside("SAE encode"))
    clock.wrap(A.PassState, "update", "pass: accumulators (counts, histogram, top-k, samples)")
    step = E.UnitRunner.step

    def timed_step(self, hid, what, fn):
        name = (f"pass: observe {hid}" if what == "observe" else
                f"detector {hid}" + (f" ({what})" if what != "run" else "") + (f" L{self.ctx.sae.layer}"
                                                                                if self.ctx.sae is not None else ""))
        with clock.stage(name):
            return step(self, hid, what, fn)

    E.UnitRunner.step = timed_step
    clock.wrap(Fr, "scan_frames", "write: build frames")
    clock.wrap(Fr, "write_frames", "write: DuckDB insert")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = R.run_scan(ScanConfig(max_tokens=args.tokens))
        Fr.write_scan(f"{tmp}/p.duckdb", res)
        con = D.connect(f"{tmp}/p.duckdb", read_only=True)
        with clock.stage("report: terminal (80 columns)"):
            from rich.console import Console

            render(con, 1, Console(file=io.StringIO(), width=80))
        with clock.stage("report: HTML"):
            render_html(con, 1, Path(tmp) / "r.html")
        con.close()
        wall = time.perf_counter() - t0
    n_tok = res.saes[0].ctx.stats.n_tokens
    print(f"embedded default, {len(res.saes)} SAEs, {n_tok:,} tokens, {torch.get_num_threads()} threads: "
          f"{wall:.1f} s wall")
    rows = sorted(clock.spent.items(), key=lambda x: -x[1])
    width = max(len(n) for n, _ in rows)
    for name, s in rows:
        if s >= 0.05:
            print(f"  {name:<{width}} {s:7.2f} s {s / wall:6.1%}")
    other = wall - sum(clock.spent.values())
    print(f"  {'(not in a stage)':<{width}} {other:7.2f} s {other / wall:6.1%}")
    floor = clock.spent["pass: model forward"] + clock.spent["pass: SAE encode"]
    print(f"floor inside the scan (pass forward + encodes): {floor:.1f} s; scan / that: {wall / floor:.2f}x "
          "(benchmarks/bench_scan.py measures the floor on its own)")


def profile_gpt2_small(args) -> None:
    import bench_scale as B

    import famfind.execution as E
    import famfind.runner as S
    from famfind.build.train_sae import save_saelens
    from famfind.config import ScanConfig
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt2-small", action="store_true", help="profile the GPT-2-small-shaped scan instead")
    ap.add_argument("--tokens", type=int, default=None, help="default: the whole shipped corpus (--default) or "
                                                             "1,048,576 (--gpt2-small)")
    ap.add_argument("--layers", default="5", help="comma-separated SAE layers (--gpt2-small)")
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--observe", action="store_true", help="also print the per-batch observe steps (--gpt2-small)")
    args = ap.parse_args()
    if args.gpt2_small:
        args.tokens = args.tokens or 1_048_576
        profile_gpt2_small(args)
    else:
        profile_default(args)


if __name__ == "__main__":
    main()
