"""Scale benchmark (issue #14): famfind at GPT-2-small shape.

Builds, offline and seeded, a random-init GPT-2-small-shaped model (12 layers x 12 heads x
d_head 64, d_model 768, vocab 50,257, n_ctx 1024; a Hugging Face ``GPT2LMHeadModel`` saved as
``model.safetensors``, with a word-level ``tokenizer.json`` of 50,257 entries) and 12 hook_z
SAEs of 24,576 features (one per layer, d_in 768) whose encoder biases are calibrated so each
feature fires on ~20/24,576 of 65,536 calibration positions (L0 ~ 20 on fresh tokens; the
pass table prints the L0 it measured), then prints in one run,
for three corpus sizes (sequences of 128 random tokens):

1. the activation pass (:func:`famfind.activations.activation_pass`, every accumulator:
   counts, histogram, top-k, reservoir, random contexts) with the layer-5 SAE alone and with
   all 12 SAEs in one pass: tokens/s, peak RSS (and on a GPU peak GPU memory), and the pass's
   achieved FLOP/s (model forward to the deepest SAE's layer + every SAE's encode, counted
   analytically) as a fraction of the device's measured dense fp32 matmul FLOP/s;
2. the full scan (``famfind scan``: every built-in detector) of the layer-5 SAE (all 12 on a
   GPU), each size in a fresh process so its peak RSS is its own: scan wall time, peak RSS,
   DuckDB write time and file size, HTML report time, main-page size and card-folder size.
   Time should grow ~linearly with the corpus, memory stay flat.

``--quick`` runs a small configuration (2 layers, d_model 256, d_sae 2048) that CI may run.

Run: ``python benchmarks/bench_scale.py [--device cpu|cuda|auto] [--quick] [--sizes N,N,N]
[--skip-pass] [--skip-scan]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

D_MODEL, N_HEADS, N_LAYERS, VOCAB, N_CTX, D_SAE, SEQ = 768, 12, 12, 50257, 1024, 24576, 128


def build_model(out: Path, n_layers: int, d_model: int, n_heads: int, vocab: int) -> Path:
    """A random-init HF GPT-2 checkpoint at ``out`` with a word-level tokenizer (``w0`` ...)
    of ``vocab`` entries, so the detectors that read token text run as on a real model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=N_CTX)
    GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    return out


@torch.no_grad()
def build_saes(model, d_sae: int, calib: torch.Tensor, target_l0: float, device: str,
               only: list[int] | None = None) -> list:
    """One SAE per layer (or per layer of ``only``): random unit-norm decoder rows, encoder =
    decoder^T, ``b_dec`` the mean hook_z, ``b_enc`` minus each feature's ``1 - target_l0 /
    d_sae`` quantile of its pre-activation on ``calib`` (a streaming top-k over 32-sequence
    chunks, so memory stays ``chunk x d_sae``). A layer's SAE is the same with or without
    ``only``."""
    from famfind.sae import SAE

    g = torch.Generator().manual_seed(1)
    d_in = model.cfg.n_heads * model.cfg.d_head
    chunks = calib.split(32)
    W_decs = []
    for _ in range(model.cfg.n_layers):  # every layer's draw, so layer L's decoder never depends on `only`
        W_dec = torch.randn(d_sae, d_in, generator=g).to(device)
        W_decs.append(W_dec / W_dec.norm(dim=1, keepdim=True))
    layers = list(range(model.cfg.n_layers)) if only is None else sorted(only)
    W_decs = dict(enumerate(W_decs))
    n = calib.numel()
    k = max(1, int(round(target_l0 / d_sae * n)))  # each feature fires on ~k of the n positions
    b_dec = {lyr: torch.zeros(d_in, device=device) for lyr in layers}
    for c in chunks:  # the mean of hook_z first, then a streaming per-feature top-k of the pre-activations
        zs = model.run_hook_zs(c, layers)
        for lyr in layers:
            b_dec[lyr] += zs[lyr].flatten(0, 1).flatten(-2).sum(0) / n
    top = dict.fromkeys(layers)
    for c in chunks:
        zs = model.run_hook_zs(c, layers)
        for lyr in layers:
            pre = (zs[lyr].flatten(0, 1).flatten(-2) - b_dec[lyr]) @ W_decs[lyr].T  # [positions, d_sae]
            both = pre if top[lyr] is None else torch.cat([top[lyr], pre])
            top[lyr] = both.topk(min(k, both.shape[0]), dim=0).values
            del pre, both
    return [SAE(W_decs[lyr].T.contiguous(), W_decs[lyr], -top[lyr][-1], b_dec[lyr], hook_name=f"blocks.{lyr}.attn.hook_z")
            for lyr in layers]


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


def peak_rss_mib() -> float:
    """This process's peak RSS (MiB). On Linux ``VmHWM`` of /proc/self/status: ``ru_maxrss``
    of a child started by ``subprocess`` also counts the parent's peak before the exec (the
    kernel carries the old address space's high-water mark over), which made an earlier run
    report the parent's 4.6 GB (12 SAEs held) as the scan's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def child_scan(spec: dict) -> None:
    """One full scan in this (fresh) process: ``famfind scan`` of ``spec["saes"]`` over
    ``spec["corpus"]``, written to DuckDB and rendered as HTML; prints one JSON line."""
    from famfind.db import connect
    from famfind.frames import write_scan
    from famfind.reports.html import cards_dir, render_html
    from famfind.config import ScanConfig
    from famfind.runner import run_scan

    dev = spec["device"]
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = run_scan(ScanConfig(sae=tuple(spec["saes"]), corpus=spec["corpus"], seq_len=SEQ, device=dev,
                              batch_size=spec["batch_size"], autocast=spec["autocast"], select=tuple(spec.get("select", ())), skip=tuple(spec.get("skip", ())),
                              detector_options=spec.get("options", {})))
    scan_s = time.perf_counter() - t
    db = Path(spec["out"]) / "scan.duckdb"
    t = time.perf_counter()
    sid = write_scan(db, res)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    con = connect(db, read_only=True)
    try:
        pages = render_html(con, sid, Path(spec["out"]) / "report.html")
        n_fam = con.execute("SELECT count(*) FROM families").fetchone()[0]
    finally:
        con.close()
    html_s = time.perf_counter() - t
    failed = [f"{r.id}: {r.error[:80]}" for r in res.runs if r.status != "ok"]
    det = sorted(((r.seconds, r.id) for r in res.runs), reverse=True)
    print(json.dumps({
        "detectors_s": sum(x for x, _ in det), "slowest": [[i, round(x, 1)] for x, i in det[:5]],
        "mechanism_s": next((x for x, i in det if i == "feature_mechanism"), None),
        "scan_s": scan_s, "write_s": write_s, "html_s": html_s, "n_families": n_fam, "failed": failed,
        "rss_mib": peak_rss_mib(),
        "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None,
        "db_mb": db.stat().st_size / 1e6, "page_mb": max(p.stat().st_size for p in pages) / 1e6,
        "cards_mb": sum(f.stat().st_size for p in pages for f in cards_dir(p).glob("*.js")) / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--quick", action="store_true", help="a small configuration (2 layers, d_model 256, d_sae 2048)")
    ap.add_argument("--sizes", default=None, help="comma-separated corpus token counts")
    ap.add_argument("--scan-sizes", default=None, help="token counts of the full scans (default: --sizes)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"))
    ap.add_argument("--skip-pass", action="store_true", help="no activation-pass table")
    ap.add_argument("--skip-scan", action="store_true", help="no full-scan table")
    ap.add_argument("--set", action="append", default=[], metavar="DETECTOR.KEY=VALUE",
                    help="a detector option for the full scans, as famfind scan --set (repeatable)")
    ap.add_argument("--skip", default="", help="comma-separated detectors the full scans leave out (with what "
                    "requires them), e.g. feature_mechanism,head_polysemanticity: the rest of the scan on its own")
    ap.add_argument("--saedashboard-python", default=None,
                    help="an interpreter with sae-dashboard installed: also time SAEDashboard's feature data "
                         "against famfind's on the same SAE and tokens")
    ap.add_argument("--compare-tokens", type=int, default=None,
                    help="tokens of the SAEDashboard comparison (default: the smallest size)")
    ap.add_argument("--child-scan", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_scan:
        return child_scan(json.loads(args.child_scan))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else (
        [8_192, 16_384, 32_768] if args.quick else
        ([1_048_576, 3_145_728, 10_485_760] if device == "cuda" else [131_072, 262_144, 1_048_576]))
    scan_sizes = [int(x) for x in args.scan_sizes.split(",")] if args.scan_sizes else sizes
    tmp = Path(tempfile.mkdtemp(prefix="famfind-bench-scale-"))
    try:
        run(args, device, sizes, scan_sizes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, device: str, sizes: list[int], scan_sizes: list[int], tmp: Path) -> None:
    from famfind.activations import PassState, activation_pass
    from famfind.build.train_sae import save_saelens
    from famfind.models.gpt2 import HFGPT2Model

    n_layers, d_model, n_heads, d_sae, vocab = (2, 256, 4, 2048, 4096) if args.quick else \
        (N_LAYERS, D_MODEL, N_HEADS, D_SAE, VOCAB)
    bs = args.batch_size or (256 if device == "cuda" else 32)
    build_model(tmp / "model", n_layers, d_model, n_heads, vocab)
    model = HFGPT2Model(tmp / "model", device)
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, vocab, (512, SEQ), generator=g).to(device)  # 65,536 positions
    t0 = time.time()
    mid_layer = min(5, n_layers - 1)  # layer 5 at GPT-2-small shape
    # only the scanned SAE when there is no pass table and the CPU scans just layer 5
    saes = build_saes(model, d_sae, calib, 20.0, device,
                      only=[mid_layer] if args.skip_pass and device != "cuda" else None)
    mid = next(s for s in saes if s.layer == mid_layer)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}); "
          f"model {cfg.n_layers} layers x {cfg.n_heads} heads x d_head {cfg.d_head}, vocab {cfg.d_vocab}; "
          f"{len(saes)} SAEs x {d_sae} features (built in {time.time() - t0:.0f} s); batch {bs} x {SEQ} tokens; "
          f"autocast {args.autocast}", flush=True)
    if not args.skip_pass:
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
                activation_pass(model, ss, toks, states, bs, device=device, autocast=args.autocast)
                _sync(device)
                dt = time.perf_counter() - t
                st = states[0].finalize()
                flops = pass_flops_per_token(cfg, [s.layer for s in ss], d_sae) * toks.numel() / dt
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
                print(f"{toks.numel():>11,} tokens, {name:>14}: {toks.numel() / dt:>10,.0f} tok/s ({dt:7.1f} s), "
                      f"L0 {st.l0:.1f}, {flops / 1e12:.2f} TFLOP/s = {flops / peak:.1%} of matmul peak, "
                      f"peak RSS {rss:,.0f} MiB{gpu}", flush=True)
                del states, st
    scanned = saes if device == "cuda" else [mid]
    paths = []
    for s in scanned:
        s.model_name = str(tmp / "model")
        save_saelens(s.to("cpu"), tmp / "saes" / f"blocks.{s.layer}.attn.hook_z")
        paths.append(str(tmp / "saes" / f"blocks.{s.layer}.attn.hook_z"))
    mid_path = paths[next(i for i, s in enumerate(scanned) if s is mid)]  # SAE's == compares tensors
    del saes, model

    def corpus_of(n_tok: int) -> Path:
        corpus = tmp / f"tokens_{n_tok}.npy"
        if not corpus.exists():
            np.save(corpus, torch.randint(0, vocab, (n_tok,), generator=g).numpy().astype(np.int32))
        return corpus

    def child(spec: dict) -> dict | str:
        r = subprocess.run([sys.executable, __file__, "--child-scan", json.dumps(spec)], capture_output=True, text=True)
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr[-3000:]

    if not args.skip_scan:
        scan_table(args, device, bs, paths, scan_sizes, tmp, corpus_of, child, mid)
    if args.saedashboard_python:
        n_tok = args.compare_tokens or min(sizes)
        corpus = corpus_of(n_tok)
        mat = tmp / f"matrix_{n_tok}.npy"
        np.save(mat, np.load(corpus)[: n_tok // SEQ * SEQ].reshape(-1, SEQ))
        out = tmp / f"famfind_feature_data_{n_tok}"
        out.mkdir()
        ff = child({"saes": [mid_path], "corpus": str(corpus), "device": device, "batch_size": bs,
                    "autocast": "none", "out": str(out), "select": ["feature_logits"]})
        r = subprocess.run([args.saedashboard_python, str(Path(__file__).with_name("saedashboard_child.py")),
                            str(tmp / "model"), mid_path, str(mat), device], capture_output=True, text=True)
        if isinstance(ff, str) or r.returncode != 0:
            print(f"SAEDashboard comparison failed:\n{ff if isinstance(ff, str) else r.stderr[-3000:]}")
            return
        sd = json.loads(r.stdout.strip().splitlines()[-1])
        fam_s = ff["scan_s"] + ff["write_s"]
        print(f"feature data for all {sd['features']:,} features of the layer-{mid.layer} SAE over {sd['tokens']:,} tokens "
              f"(top activations, quantile samples, logit tables, histograms), same SAE, tokens and device:\n"
              f"  famfind (activation pass + feature_logits + DuckDB write): {fam_s:.1f} s\n"
              f"  SAEDashboard SaeVisRunner.run ({', '.join(f'{k} {v}' for k, v in sd['versions'].items())}): "
              f"{sd['seconds']:.1f} s\n  ratio SAEDashboard / famfind: {sd['seconds'] / fam_s:.1f}x", flush=True)


def detector_options(specs: list[str]) -> dict:
    """``DETECTOR.KEY=VALUE`` strings as ``{detector: {key: value}}``, parsed as ``famfind scan
    --set`` parses them."""
    from famfind.cli.scan_cmds import _parse_set

    out: dict = {}
    for det, key, value in map(_parse_set, specs):
        out.setdefault(det, {})[key] = value
    return out


def scan_table(args, device, bs, paths, scan_sizes, tmp, corpus_of, child, mid) -> None:
    what = f"layer-{mid.layer} SAE" if len(paths) == 1 else f"all {len(paths)} SAEs"
    skip = [x for x in args.skip.split(",") if x]
    which = f"every built-in detector but {', '.join(skip)}" if skip else "every built-in detector"
    print(f"full scan of the {what} ({which}), one fresh process per size:")
    for n_tok in scan_sizes:
        out = tmp / f"scan_{n_tok}"
        out.mkdir()
        t = time.perf_counter()
        d = child({"saes": paths, "corpus": str(corpus_of(n_tok)), "device": device, "batch_size": bs,
                   "autocast": args.autocast, "out": str(out), "skip": skip, "options": detector_options(args.set)})
        if isinstance(d, str):
            print(f"{n_tok:>11,} tokens: the scan failed:\n{d}")
            continue
        gpu = f", peak GPU memory {d['gpu_gib']:.2f} GiB" if d["gpu_gib"] is not None else ""
        print(f"{n_tok:>11,} tokens: scan {d['scan_s']:7.1f} s ({n_tok / d['scan_s']:,.0f} tok/s), peak RSS "
              f"{d['rss_mib']:,.0f} MiB{gpu}; DuckDB write {d['write_s']:.1f} s, {d['db_mb']:.1f} MB; HTML "
              f"{d['html_s']:.1f} s, main page {d['page_mb']:.2f} MB + cards {d['cards_mb']:.1f} MB; "
              f"{d['n_families']} family rows; process {time.perf_counter() - t:.0f} s", flush=True)
        print(f"             of the scan: detectors {d['detectors_s']:.1f} s (slowest: "
              f"{', '.join(f'{i} {x} s' for i, x in d['slowest'])}), the rest (loading, activation pass) "
              f"{d['scan_s'] - d['detectors_s']:.1f} s", flush=True)
        if d["mechanism_s"] is not None:
            print(f"             feature_mechanism {d['mechanism_s']:.1f} s"
                  + (f" ({', '.join(args.set)})" if args.set else ""), flush=True)
        if d["failed"]:
            print(f"             detectors that did not run: {'; '.join(d['failed'])}")


if __name__ == "__main__":
    main()
