"""Head-loading k-means clustering of live features (Anthropic, "Circuits Updates — attention
features", 2025: clusters of attention-output features by which heads write them).

Each live feature is a vector of head loadings: its head attribution (``head_attribution``,
rows sum to 1) and, with ``use_dfa``, its DFA-by-head shares (``dfa_head``) concatenated.
k-means (:mod:`famfind.kmeans` in torch on the scan's device, 10 seeds per k; or scikit-learn's
``KMeans``, ``n_init=4``, with ``backend="sklearn"``) runs for every ``k`` in ``[k_min, k_max]``; each k's
silhouette score (on a random sample of ``silhouette_sample`` features) and inertia go to
table ``cluster_sweep``; the best silhouette picks k. Tables ``clusters`` (feature, cluster,
distance to its centroid) and ``cluster_sizes`` (cluster, size, centroid's top head and its
loading). The size distribution gets a power-law fit ``size ~ rank^-alpha`` (least squares
in log-log; ``alpha`` and ``r2`` in the summary). Which clusters the families explain is a
join of ``clusters`` with ``families`` (README: "features in no family, by cluster").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from famfind.heuristics.attribution import HeadAttributionMatrix
from famfind.heuristics.dfa import DFAHeadShares
from famfind.plugins import Column, Heuristic, Options, Output, Result, Table, View


@dataclass(frozen=True)
class HeadLoadingClusterSet(Output):
    """``features [n_live]`` (long) the clustered live features and ``labels [n_live]`` their
    cluster; ``k`` clusters chosen by ``silhouette``; size ~ rank^-``power_law_alpha``
    (fit ``power_law_r2``); ``largest_cluster`` its size."""

    features: torch.Tensor
    labels: np.ndarray
    k: int
    silhouette: float | None
    power_law_alpha: float
    power_law_r2: float
    largest_cluster: int


@dataclass(frozen=True)
class ClusterOptions(Options):
    k_min: int = 2
    k_max: int = 20
    use_dfa: bool = False
    silhouette_sample: int = 5000
    backend: str = "torch"  # famfind.kmeans on the scan's device; "sklearn": scikit-learn on the CPU (the reference)


def power_law_fit(sizes: np.ndarray) -> tuple[float, float]:
    """``(alpha, r2)`` of ``log size = c - alpha log rank`` over sizes sorted descending."""
    s = np.sort(np.asarray(sizes, dtype=float))[::-1]
    s = s[s > 0]
    if s.size < 3:
        return float("nan"), float("nan")
    x, y = np.log(np.arange(1, s.size + 1)), np.log(s)
    slope, icpt = np.polyfit(x, y, 1)
    resid = y - (slope * x + icpt)
    r2 = 1 - resid.var() / y.var() if y.var() > 0 else 1.0
    return float(-slope), float(r2)


def sweep_kmeans(X: np.ndarray, k_min: int, k_max: int, seed: int, sample: int, backend: str = "torch",
                 device: str = "cpu"):
    """k-means for every k; returns ``(rows, labels [n], centers [k, d])`` (numpy) with rows
    ``{"k", "silhouette", "inertia"}``, labels and centres of the best silhouette; k stops below
    the number of distinct points. ``backend``: ``"torch"`` (:mod:`famfind.kmeans`, on ``device``,
    one silhouette distance matrix for the sweep) or ``"sklearn"`` (scikit-learn's ``KMeans``
    and ``silhouette_score``, the reference). Raises ``ValueError`` with fewer than 3 distinct
    points or an unknown backend."""
    if backend == "torch":
        from famfind.kmeans import sweep

        rows, fit = sweep(torch.from_numpy(np.asarray(X, dtype=np.float64)).to(device), k_min, k_max, seed, sample)
        return rows, fit.labels.cpu().numpy(), fit.centers.cpu().numpy()
    if backend != "sklearn":
        raise ValueError(f"backend must be torch or sklearn, got {backend!r}")
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = X.shape[0]
    distinct = np.unique(np.round(X, 6), axis=0).shape[0]
    if distinct < 3:
        raise ValueError(f"k-means needs at least 3 distinct head-loading vectors, got {distinct}")
    rows, best = [], None
    for k in range(max(2, k_min), min(k_max, distinct - 1) + 1):  # k below the distinct points
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(X)
        if len(np.unique(km.labels_)) < 2:
            sil = float("nan")
        else:
            sil = float(silhouette_score(X, km.labels_, sample_size=min(sample, n), random_state=seed))
        rows.append({"k": k, "silhouette": sil, "inertia": float(km.inertia_)})
        if best is None or (sil == sil and sil > best[0]):
            best = (sil, km)
    return rows, best[1].labels_, best[1].cluster_centers_


class HeadLoadingClusters(Heuristic):
    id = "clusters"
    version = "0.3"
    needs = "activations"
    produces = HeadLoadingClusterSet
    requires = (HeadAttributionMatrix, DFAHeadShares)
    tables = (
        Table("clusters", (Column("feature", "INTEGER", "SAE feature index (live features only)"),
                           Column("cluster", "INTEGER", "k-means cluster"),
                           Column("distance", "DOUBLE", "distance to the cluster's centroid")),
              "head-loading k-means cluster of each live feature"),
        Table("cluster_sizes", (Column("cluster", "INTEGER", "k-means cluster"),
                                Column("size", "BIGINT", "features in it"),
                                Column("top_head", "VARCHAR", "the centroid's largest head, layer.head"),
                                Column("top_head_loading", "DOUBLE", "that head's loading")),
              "one row per cluster"),
        Table("cluster_sweep", (Column("k", "INTEGER", "number of clusters"),
                                Column("silhouette", "DOUBLE", "silhouette score (sampled)"),
                                Column("inertia", "DOUBLE", "k-means inertia")),
              "the k sweep that chose k"),
    )
    views = (View("cluster_family_crosstab", """
SELECT c.scan_id, c.sae, c.cluster, coalesce(f.family, '(none)') AS family, count(*) AS features
FROM clusters c LEFT JOIN families f ON f.scan_id = c.scan_id AND f.sae = c.sae AND f.feature = c.feature
     AND f.is_primary
GROUP BY ALL""", "clusters x primary families over every scan: scan_id, sae, cluster, family ((none) = no family), "
                 "features",
                  ("clusters", "families")),)
    description = "k-means on head loadings of live features, k chosen by silhouette; size power law"
    Options = ClusterOptions

    def run(self, ctx) -> Result:
        o = self.options
        live = torch.nonzero(~ctx.stats.dead).flatten()
        att = ctx.output(HeadAttributionMatrix).attribution[live]
        X = att
        if o.use_dfa:
            X = torch.cat([X, ctx.output(DFAHeadShares).share[live]], 1)
        X = X.double().numpy()
        distinct, inverse = np.unique(np.round(X, 6), axis=0, return_inverse=True)
        if distinct.shape[0] < 3:  # nothing for k-means to choose: each distinct loading is a cluster
            rows, labels, centers = [], inverse.reshape(-1).astype(np.int64), distinct
        else:
            rows, labels, centers = sweep_kmeans(X, o.k_min, o.k_max, ctx.config.seed, o.silhouette_sample,
                                                 o.backend, ctx.config.device)
        k = centers.shape[0]
        dist = np.linalg.norm(X - centers[labels], axis=1)
        sizes = np.bincount(labels, minlength=k)
        H = att.shape[1]
        cent = centers[:, :H]
        alpha, r2 = power_law_fit(sizes)
        return Result(
            tables={"clusters": pl.DataFrame({"feature": live.numpy().astype(np.int32),
                                              "cluster": labels.astype(np.int32), "distance": dist}),
                    "cluster_sweep": pl.DataFrame(rows, schema={"k": pl.Int32, "silhouette": pl.Float64,
                                                                "inertia": pl.Float64}),
                    "cluster_sizes": pl.DataFrame({"cluster": np.arange(k, dtype=np.int32),
                                                   "size": sizes.astype(np.int64),
                                                   "top_head": [f"{ctx.layer}.{h}" for h in cent.argmax(1)],
                                                   "top_head_loading": cent.max(1)})},
            output=HeadLoadingClusterSet(live, labels, int(k),
                                         max((r["silhouette"] for r in rows if r["silhouette"] == r["silhouette"]),
                                             default=None), alpha, r2, int(sizes.max())))

    @classmethod
    def render_terminal(cls, section) -> None:
        rows = section.query("""
            SELECT c.cluster, count(*) AS size, any_value(z.top_head), any_value(z.top_head_loading),
                   count(*) FILTER (WHERE p.family IS NOT NULL) AS explained, mode(p.family) AS top_family
            FROM clusters c
            JOIN cluster_sizes z ON z.scan_id = c.scan_id AND z.sae = c.sae AND z.cluster = c.cluster
            LEFT JOIN families p ON p.scan_id = c.scan_id AND p.sae = c.sae AND p.feature = c.feature AND p.is_primary
            WHERE c.scan_id = ? AND c.sae = ? GROUP BY c.cluster ORDER BY size DESC""")
        if not rows:
            return
        sm = section.summary
        sil = sm.get("silhouette")
        title = (f"Head-loading clusters: k = {sm.get('k')} by silhouette ({sil:.3f}); size ~ rank^-alpha, "
                 f"alpha = {sm.get('power_law_alpha', float('nan')):.2f} (r2 {sm.get('power_law_r2', float('nan')):.2f})"
                 if sil is not None else "Head-loading clusters")
        section.table(title, ("cluster", "size", "top head", "loading", "in a family", "main family", "unexplained"),
                      [(str(cl), str(n), head, f"{load:.2f}", str(expl), fam or "-", str(n - expl))
                       for cl, n, head, load, expl, fam in rows])

    @classmethod
    def html_part(cls, section) -> dict:
        return {"features": section.per_feature("SELECT feature, cluster FROM clusters WHERE scan_id = ? AND sae = ?",
                                                lambda r, card: card.__setitem__("cluster", r["cluster"])),
                "clusters": section.rows("SELECT cluster, size, top_head, round(top_head_loading, 3) AS loading "
                                         "FROM cluster_sizes WHERE scan_id = ? AND sae = ? ORDER BY size DESC")}
