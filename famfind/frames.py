"""A finished scan as table rows: every table of a :class:`famfind.runner.ScanResult` as a
polars DataFrame (:func:`scan_frames`: the scan and its SAEs, per-feature statistics,
top-activating examples and samples with their windows of text, histograms, and every
detector's rows), the tables it declares (:func:`scan_declarations`), and
:func:`write_scan`, which stores them through :func:`famfind.db.write_frames` in one
transaction.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from famfind.activations import WINDOW
from famfind.db import write_frames
from famfind.plugins import stored_tables
from famfind.schema import CORE, CORE_BY_NAME, SCANS, Table, View
from famfind.version import __version__


class _Pieces:
    """Token id -> its text (decoded alone, cached); ids as strings without a tokenizer."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = str(i) + " " if self.tok is None else self.tok.decode([i])
        return s


def _window(pieces: _Pieces, toks: np.ndarray, pos: int) -> tuple[str, list[str], int]:
    """``(context with the token at pos in [[ ]], window tokens, index of pos in them)``,
    over offsets :data:`famfind.activations.WINDOW` clipped to the sequence."""
    lo, hi = max(0, pos + WINDOW[0]), min(len(toks), pos + WINDOW[1])
    words = [pieces(int(t)) for t in toks[lo:hi]]
    j = pos - lo
    return "".join(words[:j]) + f"[[{words[j]}]]" + "".join(words[j + 1:]), words, j


def _example_frame(table, key: dict, pieces: _Pieces, toks: np.ndarray, acts: np.ndarray, seqs: np.ndarray,
                   poss: np.ndarray, wins: np.ndarray | None, live: np.ndarray) -> pl.DataFrame:
    """``table``'s rows (examples or activation samples), one per (live feature, rank) with
    seq >= 0, ordered by feature then rank: the window (offsets :data:`famfind.activations.WINDOW`
    clipped to the sequence) as text with the position's token in [[ ]], its tokens, and the
    feature's activation on each. ``toks [n_seq, T]``; ``acts/seqs/poss [k, d_sae]``; ``wins
    [k, d_sae, 16]``. Vectorised: each distinct token is decoded once, the list columns are
    built from offsets (no Python object per row but the context string)."""
    import pyarrow as pa

    sub = seqs[:, live] >= 0  # [k, n_live]
    f_i, r_i = np.nonzero(sub.T)  # ordered by feature, then rank
    f, r = live[f_i], r_i
    s, p = seqs[r, f].astype(np.int64), poss[r, f].astype(np.int64)
    T, Wn = toks.shape[1], WINDOW[1] - WINDOW[0]
    lo, hi = np.maximum(0, p + WINDOW[0]), np.minimum(T, p + WINDOW[1])
    n, j = hi - lo, p - np.maximum(0, p + WINDOW[0])
    slot = np.arange(Wn)
    valid = slot[None, :] < n[:, None]  # [rows, 16]
    ids = toks[s[:, None], np.minimum(lo[:, None] + slot[None, :], T - 1)][valid]
    uniq, inv = np.unique(ids, return_inverse=True)
    words = np.array([pieces(int(t)) for t in uniq], dtype=object)[inv]  # flat, row after row
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    wl = words.tolist()
    ctx = ["".join(wl[o:o + jj]) + "[[" + wl[o + jj] + "]]" + "".join(wl[o + jj + 1:o + nn])
           for o, jj, nn in zip(offsets[:-1].tolist(), j.tolist(), n.tolist())]
    a0 = -j - WINDOW[0]  # window slot of each row's first token
    cols = {**{k: [v] * len(f) for k, v in key.items()},
            "feature": f.astype(np.int32), "rank": r.astype(np.int32), "seq": s.astype(np.int32),
            "pos": p.astype(np.int32), "act": acts[r, f].astype(np.float64), "context": ctx,
            "tokens": pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets), pa.array(wl, pa.string())))}
    if wins is not None:
        w = wins[r[:, None], f[:, None], np.clip(a0[:, None] + slot[None, :], 0, Wn - 1)][valid]
        cols["acts"] = pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets),
                                                              pa.array(np.round(w.astype(np.float64), 4), pa.float32())))
    else:
        cols["acts"] = [None] * len(f)
    return table.frame(cols)


def _sae_frames(u, tokens: np.ndarray, pieces: _Pieces) -> dict[str, list[pl.DataFrame]]:
    """One SAE's rows (:class:`famfind.runner.SAEScan` ``u``): features, examples, samples,
    random contexts, histogram, and its detectors' rows, each with ``sae`` and ``layer``."""
    st, F, layer = u.ctx.stats, u.sae.d_sae, u.sae.layer
    key = {"sae": u.id, "layer": layer}
    out: dict[str, list[pl.DataFrame]] = {}

    def add(name, df):
        out.setdefault(name, []).append(df)

    fc = st.fire_count.numpy()
    add("features", CORE_BY_NAME["features"].frame({
        "sae": [u.id] * F, "layer": np.full(F, layer, dtype=np.int32),
        "feature": np.arange(F, dtype=np.int32), "fire_count": fc, "density": st.density.numpy(),
        "mean_act": (st.act_sum.numpy() / np.maximum(fc, 1)), "max_act": st.act_max.double().numpy(),
        "dead": st.dead.numpy()}))
    live = np.nonzero(fc > 0)[0]
    for name, acts, seqs, poss, wins in (("examples", st.top_acts, st.top_seq, st.top_pos, st.top_win),
                                          ("activation_samples", st.sample_acts, st.sample_seq, st.sample_pos,
                                           st.sample_win)):
        add(name, _example_frame(CORE_BY_NAME[name], key, pieces, tokens, acts.numpy(), seqs.numpy(), poss.numpy(),
                                 wins.float().numpy(), live))
    rc = []
    for s_, p_, a_ in zip(st.random_seq.tolist(), st.random_pos.tolist(), st.random_active):
        c, words, _ = _window(pieces, tokens[s_], p_)
        rc.append({**key, "seq": s_, "pos": p_, "context": c, "tokens": words, "active": a_})
    add("random_contexts", CORE_BY_NAME["random_contexts"].frame(rc))
    e = [0.0] + st.hist_edges.tolist() + [float("inf")]
    f_idx, b_idx = np.nonzero(st.hist.numpy())
    add("activation_histogram", CORE_BY_NAME["activation_histogram"].frame({
        "sae": [u.id] * len(f_idx), "layer": np.full(len(f_idx), layer, dtype=np.int32),
        "feature": f_idx, "bin": b_idx, "lo": np.array(e)[b_idx], "hi": np.array(e)[b_idx + 1],
        "count": st.hist.numpy()[f_idx, b_idx]}))
    _result_frames(u.results, u.id, layer, add)
    return out


def _result_frames(results: dict, sae: str | None, layer: int | None, add) -> None:
    """Detector rows (heads, detections, families, validation, declared tables) of one unit of
    a scan: an SAE (``sae``, ``layer``; its detectors' own tables gain ``sae``, see
    :func:`famfind.plugins.stored_tables`) or the model detectors (``sae=None``)."""
    heads, dets, fams, vals = [], [], [], {}
    key = {"sae": sae, "layer": layer}
    for hid, res in results.items():
        heads += [{"sae": sae, "layer": h.layer, "head": h.head, "metric": h.metric, "score": h.score}
                  for h in res.head_scores]
        dets += [{**key, "detector": hid, "feature": d.feature, "score": d.score, "passed": d.passed,
                  "evidence": json.dumps(d.evidence)} for d in res.detections]
        fams += [{**key, "family": m.family, "feature": m.feature, "confidence": m.confidence, "detector": hid,
                  "test": m.test} for m in res.families]
        for v in res.validation:
            row = vals.setdefault(v.family, {**key, "family": v.family})
            for k, val in vars(v).items():
                if val is not None:
                    row[k] = val
        for name, df in res.tables.items():  # declared and conformed when the detector returned
            add(name, df if sae is None else df.with_columns(pl.lit(sae, dtype=pl.Utf8).alias("sae")))
    add("heads", CORE_BY_NAME["heads"].frame(heads))
    add("detections", CORE_BY_NAME["detections"].frame(dets))
    primary: dict[int, int] = {}  # feature -> its primary row (behaviour/proxy first, then confidence, family name)

    def rank(r):
        return r["test"] == "necessity", -r["confidence"], r["family"]

    for i, r in enumerate(fams):
        j = primary.get(r["feature"])
        if j is None or rank(r) < rank(fams[j]):
            primary[r["feature"]] = i
    for i, r in enumerate(fams):
        r["is_primary"] = primary[r["feature"]] == i
    add("families", CORE_BY_NAME["families"].frame(fams))
    vt = CORE_BY_NAME["validation"]
    add("validation", vt.frame([{c.name: r.get(c.name) for c in vt.columns} for r in vals.values()]))


def scan_frames(result) -> dict[str, pl.DataFrame]:
    """All rows of a :class:`famfind.runner.ScanResult` (every SAE's), as DataFrames without
    ``scan_id``."""
    first, cfg, model = result.saes[0], result.model_ctx.config, result.model_ctx.model
    corpus = result.model_ctx.corpus
    st0 = first.ctx.stats
    frames: dict[str, list[pl.DataFrame]] = {}

    def add(name, df):
        frames.setdefault(name, []).append(df)

    add("scans", SCANS.frame([{
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None), "famfind_version": __version__,
        "sae_path": str(Path(first.path).resolve()), "sae_sha256": first.sha256,
        "architecture": first.sae.architecture, "d_in": first.sae.d_in, "d_sae": first.sae.d_sae,
        "model": model.cfg.name, "hook_name": first.sae.hook_name, "layer": first.sae.layer,
        "corpus": corpus.source, "n_tokens": st0.n_tokens, "seq_len": cfg.seq_len, "l0": st0.l0,
        "dead_fraction": float(st0.dead.float().mean()), "n_saes": len(result.saes), "seconds": result.seconds,
        "config": json.dumps(cfg.to_dict()),
    }]))
    add("saes", CORE_BY_NAME["saes"].frame([{
        "sae": u.id, "path": str(Path(u.path).resolve()), "sha256": u.sha256, "hook_name": u.sae.hook_name,
        "layer": u.sae.layer, "architecture": u.sae.architecture, "d_in": u.sae.d_in, "d_sae": u.sae.d_sae,
        "l0": u.ctx.stats.l0, "dead_fraction": float(u.ctx.stats.dead.float().mean()),
        "n_tokens": u.ctx.stats.n_tokens} for u in result.saes]))
    outputs = {("", h): r.output for h, r in result.model_results.items()}
    outputs.update({(u.id, h): r.output for u in result.saes for h, r in u.results.items()})
    add("detector_runs", CORE_BY_NAME["detector_runs"].frame(
        [{"sae": r.sae or None, "detector": r.id, "version": r.version, "origin": r.origin, "status": r.status,
          "error": r.error, "seconds": r.seconds, "output_type": r.output_type,
          "summary": json.dumps(o.summary() if (o := outputs.get((r.sae, r.id))) is not None else {})}
         for r in result.runs]))
    _result_frames(result.model_results, None, None, add)
    toks = corpus.tokens.numpy()
    pieces = _Pieces(model.tokenizer)
    for u in result.saes:
        for name, dfs in _sae_frames(u, toks, pieces).items():
            frames.setdefault(name, []).extend(dfs)
    return {name: pl.concat(dfs, how="diagonal_relaxed") if len(dfs) > 1 else dfs[0] for name, dfs in frames.items()}


def write_scan(db_path: str | Path, result, lock_timeout: float = 0.0) -> int:
    """Store a scan in one transaction; returns its ``scan_id``.

    Everything is computed (:func:`scan_frames`) before the database is touched; then
    :func:`write_frames` stores it. Raises ``FamfindError`` naming the file,
    :class:`~famfind.errors.Interrupted` on Ctrl-C (saying whether the scan was stored).
    """
    tables, views = scan_declarations(result)
    return write_frames(db_path, scan_frames(result), tables, views, lock_timeout)


def scan_declarations(result) -> tuple[list[Table], list[View]]:
    """The tables (core, and those of the detectors that ran, as stored) and views a scan
    writes."""
    ran = {r.id: result.registry.get(r.id).cls for r in result.runs}.values()
    tables = {t.name: t for t in (*CORE, *(t for c in ran for t in stored_tables(c)))}
    return list(tables.values()), list({v.name: v for c in ran for v in c.views}.values())

