"""Weighted k-means of scalars (the weights of one layer), deterministic for a seed.

Minimises L(c, a) = Σ_i v_i (x_i − c_{a_i})² over a codebook c of k values and an assignment a (v_i ≥ 0: 1 for plain
clustering; the mean squared input the weight multiplies for the data-aware mode, so that L is the diagonal part of
the layer's output error, the statistic GPTQ uses). Init: k-means++ (Arthur & Vassilvitskii 2007) weighted by v,
drawn with ``rng``. Lloyd: on scalars the nearest centroid is found by ``searchsorted`` on the midpoints of the
sorted codebook (O(n log k), no n×k matrix), and each centroid moves to the v-weighted mean of its points (a
centroid left without points, or with zero weight, stays where it is). Each step does not increase L (assignment
to the nearest centroid, then the weighted mean, each minimises L given the other), so iteration stops when L stops
falling (relative change below ``tol``) or after ``iters`` steps. With at most k distinct values the codebook is
those values and L = 0.
"""

from __future__ import annotations

import numpy as np


def assign(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest value of a sorted ``codebook`` for each x."""
    mid = (codebook[1:] + codebook[:-1]) / 2
    return np.searchsorted(mid, x).astype(np.int64)


def loss(x: np.ndarray, v: np.ndarray, codebook: np.ndarray, idx: np.ndarray) -> float:
    return float(np.sum(v * (x - codebook[idx]) ** 2))


def kmeans_pp(x: np.ndarray, v: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct initial centroids, sorted: k-means++ with each point's draw weight v_i · d_i²."""
    first = rng.choice(x.size, p=v / v.sum()) if v.sum() > 0 else rng.integers(x.size)
    centers = [x[first]]
    d2 = (x - centers[0]) ** 2
    for _ in range(1, k):
        p = v * d2
        if p.sum() <= 0:
            break
        c = x[rng.choice(x.size, p=p / p.sum())]
        centers.append(c)
        d2 = np.minimum(d2, (x - c) ** 2)
    return np.unique(np.array(centers, np.float64))


def kmeans(x: np.ndarray, v: np.ndarray | None, k: int, rng: np.random.Generator, iters: int = 50,
           tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(codebook [≤ k] sorted, index per x, L after the init and after each Lloyd step) of x (any shape)."""
    flat = np.asarray(x, np.float64).ravel()
    w = np.ones_like(flat) if v is None else np.broadcast_to(np.asarray(v, np.float64), x.shape).ravel()
    distinct = np.unique(flat)
    if distinct.size <= k:
        return distinct, assign(flat, distinct).reshape(np.shape(x)), [0.0]
    codebook = kmeans_pp(flat, w, k, rng)
    idx = assign(flat, codebook)
    history = [loss(flat, w, codebook, idx)]
    for _ in range(iters):
        sums = np.bincount(idx, weights=w * flat, minlength=codebook.size)
        mass = np.bincount(idx, weights=w, minlength=codebook.size)
        codebook = np.sort(np.where(mass > 0, sums / np.where(mass > 0, mass, 1), codebook))
        idx = assign(flat, codebook)
        history.append(loss(flat, w, codebook, idx))
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    return codebook, idx.reshape(np.shape(x)), history
