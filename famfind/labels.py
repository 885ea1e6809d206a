"""LLM labels for families, clusters and single features, scored by a detection test.

Method (after delphi's explain-then-score loop, Paulo et al. 2024, "Automatically
Interpreting Millions of Features in LLMs", sections 3.1-3.2, and OpenAI's neuron-explainer,
Bills et al. 2023):

1. *Explain.* For each target (a family, a cluster, a candidate family or one feature) up to ``n_features``
   exemplar features are shown (family: highest confidence; cluster: nearest the centroid),
   each with its top-activating contexts (table ``examples``), examples from lower activation
   quantiles (even ranks of ``activation_samples``), its top boosted logits (direct path,
   table ``feature_logits``) and its head attribution (``head_attribution``). Tokens where the
   feature is active are marked ``<<like this>>``. The LLM returns ``{label, description}``
   (strict JSON schema).
2. *Score (detection).* The LLM is given only the label and its description and classifies
   held-out contexts, unmarked and shuffled: activating ones (odd ranks of
   ``activation_samples``, never shown in step 1) and non-activating ones (``random_contexts``
   where no feature of the target fires). Score: balanced accuracy
   ``(TP / n_pos + TN / n_neg) / 2``, 0.5 = chance.

Results: table ``labels`` (scan_id, kind, target, feature, label, description, status,
score, n_pos, n_neg, tp, tn, score_status, llm_model, label_key, score_key, error); calls are
cached in ``llm_cache`` (see :mod:`famfind.llm`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import polars as pl

from famfind.db import table_exists
from famfind.errors import FamfindError
from famfind.llm import LLM, Reply, Request, strict_json
from famfind.schema import LABELS

LABELS_SCHEMA = LABELS.ddl()

LABEL_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "description"],
                "properties": {"label": {"type": "string", "description": "at most 8 words"},
                               "description": {"type": "string", "description": "one sentence"}}}

SYSTEM = ("You are a meticulous interpretability researcher. You study sparse-autoencoder features "
          "trained on the attention output (hook_z) of a transformer language model, and name what a "
          "group of features responds to. Reply with JSON only.")


@dataclass
class Target:
    """What gets one label: ``kind`` in {"family", "cluster", "candidate", "feature"}, its name, and the
    exemplar features shown (at most ``n_features``) and the features it stands for."""

    kind: str
    target: str
    exemplars: list[int]
    members: list[int]
    feature: int | None = None
    sae: str = ""  # the SAE whose features these are


def balanced_accuracy(truth: list[bool], guess: list[bool]) -> tuple[float, int, int]:
    """``(balanced accuracy, TP, TN)`` of boolean guesses; raises ValueError if lengths differ
    or a class is empty. Balanced accuracy = (TP/P + TN/N) / 2, in [0, 1], 0.5 = chance."""
    if len(truth) != len(guess):
        raise ValueError(f"{len(guess)} answers for {len(truth)} contexts")
    pos, neg = sum(truth), len(truth) - sum(truth)
    if not pos or not neg:
        raise ValueError("need both activating and non-activating contexts")
    tp = sum(t and g for t, g in zip(truth, guess))
    tn = sum((not t) and (not g) for t, g in zip(truth, guess))
    return (tp / pos + tn / neg) / 2, tp, tn


def _marked(tokens: list[str], acts: list[float] | None) -> str:
    if acts is None:
        return "".join(tokens)
    return "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(tokens, acts))


def _plain(tokens: list[str]) -> str:
    return "".join(tokens).replace("\n", "\\n")


def targets(con, scan_id: int, kinds: tuple[str, ...] = ("family", "cluster", "candidate"),
            features: tuple[tuple[int | None, int], ...] = (), n_features: int = 6) -> list[Target]:
    """The families, clusters and candidate families of every SAE of a scan (those with at
    least one live member)
    plus the requested single ``features`` as ``(layer, feature)`` (layer ``None``: the scan's
    only SAE); raises ``FamfindError`` for a feature or layer the scan lacks."""
    out: list[Target] = []
    saes = con.execute("SELECT sae, layer, d_sae FROM saes WHERE scan_id = ? ORDER BY layer, sae", [scan_id]).fetchall()
    for sae, _, _ in saes:
        if "family" in kinds:
            rows = con.execute("SELECT family, feature FROM families WHERE scan_id = ? AND sae = ? "
                               "ORDER BY family, confidence DESC, feature", [scan_id, sae]).fetchall()
            fams: dict[str, list[int]] = {}
            for fam, f in rows:
                fams.setdefault(fam, []).append(int(f))
            out += [Target("family", fam, fs[:n_features], fs, sae=sae) for fam, fs in fams.items()]
        if "cluster" in kinds and table_exists(con, "clusters"):
            rows = con.execute("SELECT cluster, feature FROM clusters WHERE scan_id = ? AND sae = ? "
                               "ORDER BY cluster, distance, feature", [scan_id, sae]).fetchall()
            cl: dict[int, list[int]] = {}
            for c, f in rows:
                cl.setdefault(int(c), []).append(int(f))
            out += [Target("cluster", str(c), fs[:n_features], fs, sae=sae) for c, fs in sorted(cl.items())]
        if "candidate" in kinds and table_exists(con, "candidate_families"):
            rows = con.execute("SELECT candidate, features FROM candidate_families WHERE scan_id = ? AND sae = ? "
                               "ORDER BY candidate", [scan_id, sae]).fetchall()
            out += [Target("candidate", str(c), list(fs)[:n_features], list(fs), sae=sae) for c, fs in rows]
    for layer, f in features:
        hits = [r for r in saes if layer is None or r[1] == layer]
        if len(hits) != 1:
            raise FamfindError("--features", f"{'the scan has several SAEs: name one as LAYER:FEATURE' if layer is None else f'the scan has no SAE at layer {layer}'}"
                               f" (layers: {', '.join(str(r[1]) for r in saes)})")
        sae, _, d_sae = hits[0]
        if not 0 <= f < d_sae:
            raise FamfindError("--features", f"feature {f} is not in 0..{d_sae - 1}")
        out.append(Target("feature", str(f), [f], [f], feature=f, sae=sae))
    return out


def _examples(con, scan_id: int, sae: str, table: str, feats: list[int]) -> dict[int, list[tuple]]:
    if not feats or not table_exists(con, table):
        return {}
    rows = con.execute(f"SELECT feature, rank, seq, pos, act, tokens, acts FROM {table} WHERE scan_id = ? AND sae = ? "
                       f"AND feature IN (SELECT unnest(?)) ORDER BY feature, rank", [scan_id, sae, feats]).fetchall()
    d: dict[int, list[tuple]] = {}
    for r in rows:
        d.setdefault(int(r[0]), []).append(r[1:])
    return d


def label_request(con, scan_id: int, t: Target, n_top: int = 3, n_quantile: int = 2) -> Request:
    """The explain prompt for one target (see the module docstring)."""
    single = t.kind == "feature"
    n_top, n_quantile = (8, 4) if single else (n_top, n_quantile)
    top = _examples(con, scan_id, t.sae, "examples", t.exemplars)
    samp = _examples(con, scan_id, t.sae, "activation_samples", t.exemplars)
    logits: dict[int, list[str]] = {}
    if table_exists(con, "feature_logits"):
        for f, s in con.execute("SELECT feature, token_str FROM feature_logits WHERE scan_id = ? AND sae = ? AND "
                                "direction = 'boost' AND feature IN (SELECT unnest(?)) ORDER BY feature, rank",
                                [scan_id, t.sae, t.exemplars]).fetchall():
            logits.setdefault(int(f), []).append(s)
    heads: dict[int, list[str]] = {}
    if table_exists(con, "head_attribution"):
        for f, layer, h, a in con.execute("SELECT feature, layer, head, attribution FROM head_attribution WHERE "
                                          "scan_id = ? AND sae = ? AND feature IN (SELECT unnest(?)) ORDER BY "
                                          "feature, attribution DESC", [scan_id, t.sae, t.exemplars]).fetchall():
            heads.setdefault(int(f), []).append(f"{layer}.{h} ({a:.2f})")
    what = {"family": f"the feature family '{t.target}' found by famfind ({len(t.members)} features)",
            "cluster": f"cluster {t.target} of a k-means clustering of features by head attribution "
                       f"({len(t.members)} features)",
            "candidate": f"candidate family {t.target}: features in no known family, clustered by head loading, "
                         f"DFA source distance, context proxies and token classes ({len(t.members)} features)",
            "feature": f"feature {t.target}"}[t.kind]
    parts = [f"Below are examples for {what}. Tokens where a feature is active are marked <<like this>>."]
    for f in t.exemplars:
        parts.append(f"\nFeature {f}:")
        ex = top.get(f, [])[:n_top]
        parts += [f"  top (activation {r[3]:.3g}): {_marked(r[4], r[5])!r}" for r in ex]
        lower = [r for r in samp.get(f, []) if r[0] % 2 == 0][1:]  # even ranks (odd ones are held out)
        for q in range(n_quantile):
            if lower:
                r = lower[min(len(lower) - 1, (q + 1) * len(lower) // (n_quantile + 1))]
                parts.append(f"  lower quantile (activation {r[3]:.3g}): {_marked(r[4], r[5])!r}")
        if logits.get(f):
            parts.append("  top boosted next tokens: " + ", ".join(repr(s) for s in logits[f][:8]))
        if heads.get(f):
            parts.append("  head attribution: " + ", ".join(heads[f][:3]))
    parts.append('\nWhat do these features respond to? Reply as JSON {"label": <at most 8 words>, '
                 '"description": <one sentence>}.')
    return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(parts)}],
                   "feature_label", LABEL_SCHEMA, _parse_label)


def _parse_label(text):
    obj = strict_json(text, {"label": str, "description": str})
    if not obj["label"].strip() or len(obj["label"]) > 120:
        raise ValueError("label empty or longer than 120 characters")
    return obj["label"].strip(), obj["description"].strip()


def held_out(con, scan_id: int, t: Target, n: int, seed: int, n_feat: int = 32) -> tuple[list[str], list[bool]]:
    """Up to ``n`` activating contexts (odd ranks of ``activation_samples``, round-robin over
    the target's first ``n_feat`` features: for a cluster those nearest its centroid, for a
    family the most confident) and as many non-activating ones (``random_contexts`` where
    none of those features is active), shuffled with ``seed``; returns (texts, truth)."""
    feats = t.members[:n_feat]
    samp = _examples(con, scan_id, t.sae, "activation_samples", feats)
    queues = [[r for r in samp.get(f, []) if r[0] % 2 == 1] for f in feats]
    pos: list[str] = []
    while len(pos) < n and any(queues):
        for q in queues:
            if q and len(pos) < n:
                pos.append(_plain(q.pop(0)[4]))
    neg: list[str] = []
    if pos and table_exists(con, "random_contexts"):
        rows = con.execute("SELECT tokens FROM random_contexts WHERE scan_id = ? AND sae = ? "
                           "AND NOT list_has_any(active, ?) ORDER BY seq, pos", [scan_id, t.sae, feats]).fetchall()
        rng = random.Random(seed)
        neg = [_plain(r[0]) for r in rng.sample(rows, min(len(pos), len(rows)))]
    items = [(p, True) for p in pos] + [(q, False) for q in neg]
    random.Random(seed + 1).shuffle(items)
    return [p for p, _ in items], [b for _, b in items]


def score_request(label: str, description: str, texts: list[str]) -> Request:
    """The detection prompt: the label and description only, then the numbered contexts."""
    n = len(texts)
    schema = {"type": "object", "additionalProperties": False, "required": ["answers"],
              "properties": {"answers": {"type": "array", "items": {"type": "boolean"}, "minItems": n,
                                         "maxItems": n}}}
    body = "\n".join(f"{i + 1}. {t!r}" for i, t in enumerate(texts))
    user = (f"A feature of a language model is described as:\nlabel: {label}\ndescription: {description}\n\n"
            f"For each of the {n} text excerpts below, answer true if the feature is active somewhere in it, "
            f'false otherwise. Reply as JSON {{"answers": [{n} booleans, in order]}}.\n\n{body}')

    def parse(text):
        obj = strict_json(text, {"answers": list})
        a = obj["answers"]
        if len(a) != n or not all(isinstance(x, bool) for x in a):
            raise ValueError(f"expected {n} booleans, got {len(a)} items")
        return a
    return Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                   "detection", schema, parse)


@dataclass
class LabelRun:
    rows: list[dict]
    calls: int
    hits: int


def label_scan(con, scan_id: int, llm: LLM, kinds=("family", "cluster", "candidate"), features: tuple = (),
               n_score: int = 10, seed: int = 0, progress_factory=None) -> LabelRun:
    """Explain and score every target of a scan; writes table ``labels`` (the scan's rows for
    these targets replaced in one transaction). Raises ``FamfindError`` if the scan lacks the
    example tables (scanned by an older famfind: rescan)."""
    if not table_exists(con, "activation_samples"):
        raise FamfindError("database", "has no activation_samples table; rescan with this famfind version")
    ts = targets(con, scan_id, kinds, features)
    pf = progress_factory or (lambda d, n: (lambda k: None))
    lab = llm.ask([label_request(con, scan_id, t) for t in ts], pf("LLM labels", len(ts)))
    score_reqs, score_idx, truths = [], [], []
    for i, (t, r) in enumerate(zip(ts, lab)):
        if r.status == "ok":
            texts, truth = held_out(con, scan_id, t, n_score, seed + i)
            if truth and any(truth) and not all(truth):
                score_reqs.append(score_request(*r.value, texts))
                score_idx.append(i)
                truths.append(truth)
    sc = llm.ask(score_reqs, pf("LLM detection scores", len(score_reqs)))
    scores: dict[int, tuple[Reply, list[bool]]] = {i: (s, tr) for i, s, tr in zip(score_idx, sc, truths)}
    rows = []
    for i, (t, r) in enumerate(zip(ts, lab)):
        row = {"scan_id": scan_id, "sae": t.sae, "kind": t.kind, "target": t.target, "feature": t.feature,
               "label": r.value[0] if r.status == "ok" else None,
               "description": r.value[1] if r.status == "ok" else None, "status": r.status, "score": None,
               "n_pos": None, "n_neg": None, "tp": None, "tn": None, "score_status": None,
               "llm_model": llm.cfg.model, "label_key": r.key, "score_key": None,
               "error": r.error + (f"; raw reply: {r.raw[:200]!r}" if r.status == "malformed" else "")}
        if i in scores:
            s, truth = scores[i]
            row.update(score_status=s.status, score_key=s.key, n_pos=sum(truth), n_neg=len(truth) - sum(truth))
            if s.status == "ok":
                row["score"], row["tp"], row["tn"] = balanced_accuracy(truth, s.value)
            elif s.error:
                row["error"] = (row["error"] + "; " if row["error"] else "") + "score: " + s.error
        elif r.status == "ok":
            row["score_status"] = "no held-out contexts"
        rows.append(row)
    write_labels(con, scan_id, rows)
    return LabelRun(rows, llm.calls, llm.hits)


def write_labels(con, scan_id: int, rows: list[dict]) -> None:
    """Replace the scan's ``labels`` rows for these targets, in one transaction."""
    df = pl.DataFrame(rows, schema={"scan_id": pl.Int32, **LABELS.polars_schema()})
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(LABELS_SCHEMA)
        con.register("_famfind_labels", df)
        con.execute("DELETE FROM labels WHERE scan_id = ? AND (sae, kind, target) IN "
                    "(SELECT (sae, kind, target) FROM _famfind_labels)", [scan_id])
        con.execute("INSERT INTO labels BY NAME SELECT * FROM _famfind_labels")
        con.unregister("_famfind_labels")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def summary(rows: list[dict]) -> dict:
    """Counts by status and the mean balanced accuracy of the scored labels."""
    sc = [r["score"] for r in rows if r["score"] is not None]
    st: dict[str, int] = {}
    for r in rows:
        st[r["status"]] = st.get(r["status"], 0) + 1
    return {"targets": len(rows), "status": st, "scored": len(sc),
            "mean_balanced_accuracy": (sum(sc) / len(sc)) if sc else None}


__all__ = ["Target", "targets", "label_request", "score_request", "held_out", "balanced_accuracy",
           "label_scan", "write_labels", "summary"]
