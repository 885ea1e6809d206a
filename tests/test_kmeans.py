"""famfind's torch k-means and silhouette (famfind.kmeans) against scikit-learn, the reference:
the same silhouette, inertia within 1% for every k, the same chosen k on planted clusters."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score

from famfind.kmeans import kmeans, silhouette, sweep


def planted(seed: int = 0, n: int = 600):
    rng = np.random.default_rng(seed)
    centres = np.eye(6)[[0, 1, 2, 3, 4]] * 0.8 + 0.2 / 6  # 5 clusters, each on one head of 6
    centres[4] = np.array([0.45, 0.45, 0.025, 0.025, 0.025, 0.025])  # a two-head cluster
    truth = rng.integers(0, 5, size=n)
    X = np.abs(centres[truth] + rng.normal(0, 0.03, size=(n, 6)))
    return X / X.sum(1, keepdims=True), truth


def test_silhouette_equals_sklearn():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5))
    labels = rng.integers(0, 4, size=300)
    labels[0] = 5  # a cluster of one point (silhouette 0) and an empty label in between
    D = torch.cdist(torch.from_numpy(X), torch.from_numpy(X))
    assert abs(silhouette(D, torch.from_numpy(labels)) - silhouette_score(X, labels)) < 1e-9


def test_inertia_within_one_percent_of_sklearn_for_every_k():
    X = np.random.default_rng(2).dirichlet(np.full(8, 0.3), size=2000)  # head loadings of 8 heads
    for k in (2, 5, 9, 14, 20):
        ours = kmeans(torch.from_numpy(X), k, n_init=10, seed=0).inertia
        ref = KMeans(n_clusters=k, n_init=4, random_state=0).fit(X).inertia_
        assert ours <= ref * 1.01, (k, ours, ref)


def test_sweep_chooses_the_same_k_as_sklearn_on_planted_clusters():
    from famfind.heuristics.clustering import sweep_kmeans

    X, truth = planted()
    rows, fit = sweep(torch.from_numpy(X), 2, 10, seed=0, sample=5000)
    ref_rows, ref_labels, ref_centers = sweep_kmeans(X, 2, 10, seed=0, sample=5000, backend="sklearn")
    assert int(fit.centers.shape[0]) == ref_centers.shape[0] == 5 and len(rows) == 9
    assert adjusted_rand_score(truth, fit.labels.numpy()) >= 0.9
    for r, q in zip(rows, ref_rows):
        assert r["k"] == q["k"] and r["inertia"] <= q["inertia"] * 1.01
