"""Head-loading k-means clustering of live features (Anthropic, "Circuits Updates — attention
features", 2025: clusters of attention-output features by which heads write them).

Each live feature is a vector of head loadings: its head attribution (``head_attribution``,
rows sum to 1) and, with ``use_dfa``, its DFA-by-head shares (``dfa_head``) concatenated.
scikit-learn ``KMeans`` (``n_init=4``) runs for every ``k`` in ``[k_min, k_max]``; each k's
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

from famfind.plugins import Heuristic, Options, Result


@dataclass(frozen=True)
class ClusterOptions(Options):
    k_min: int = 2
    k_max: int = 20
    use_dfa: bool = False
    silhouette_sample: int = 5000


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


def sweep_kmeans(X: np.ndarray, k_min: int, k_max: int, seed: int, sample: int):
    """k-means for every k; returns ``(rows, best_labels, best_model)`` with rows
    ``{"k", "silhouette", "inertia"}``; k stops below the number of distinct points.
    Raises ``ValueError`` with fewer than 3 distinct points."""
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
    return rows, best[1].labels_, best[1]


class HeadLoadingClusters(Heuristic):
    id = "clusters"
    version = "0.1"
    needs = "activations"
    requires = ("head_attribution", "dfa_head")
    description = "k-means on head loadings of live features, k chosen by silhouette; size power law"
    Options = ClusterOptions

    def run(self, ctx) -> Result:
        o = self.options
        live = torch.nonzero(~ctx.stats.dead).flatten()
        att = ctx.results["head_attribution"].data["attribution"][live]
        X = att
        if o.use_dfa:
            X = torch.cat([X, ctx.results["dfa_head"].data["share"][live]], 1)
        X = X.double().numpy()
        rows, labels, km = sweep_kmeans(X, o.k_min, o.k_max, ctx.config.seed, o.silhouette_sample)
        dist = np.linalg.norm(X - km.cluster_centers_[labels], axis=1)
        sizes = np.bincount(labels, minlength=km.n_clusters)
        H = att.shape[1]
        cent = km.cluster_centers_[:, :H]
        alpha, r2 = power_law_fit(sizes)
        return Result(
            tables={"clusters": pl.DataFrame({"feature": live.numpy().astype(np.int32),
                                              "cluster": labels.astype(np.int32), "distance": dist}),
                    "cluster_sweep": pl.DataFrame(rows),
                    "cluster_sizes": pl.DataFrame({"cluster": np.arange(km.n_clusters, dtype=np.int32),
                                                   "size": sizes.astype(np.int64),
                                                   "top_head": [f"{ctx.layer}.{h}" for h in cent.argmax(1)],
                                                   "top_head_loading": cent.max(1)})},
            data={"labels": labels, "features": live, "k": int(km.n_clusters)},
            summary={"k": int(km.n_clusters), "silhouette": max((r["silhouette"] for r in rows
                                                               if r["silhouette"] == r["silhouette"]), default=None),
                     "power_law_alpha": alpha, "power_law_r2": r2, "largest_cluster": int(sizes.max())})
