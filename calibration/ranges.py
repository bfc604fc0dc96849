"""Range methods: turn an observer's statistics into the (lo, hi) range to quantize a tensor over.

* ``minmax``: the observed min and max.
* ``percentile``: T = the p-th percentile of |x| (from the histogram's cumulative counts, at a bin's upper edge).
* ``kl`` (entropy; Migacz, "8-bit Inference with TensorRT", 2017): over the |x| histogram h of B bins (exact zeros
  left out: they quantize exactly, and ReLU's spike at 0 would otherwise decide the threshold), for every
  candidate threshold bin i in [Q, B] (Q = quantized levels): P = h[:i] with the outliers sum(h[i:]) folded into
  P[i-1]; Q-distribution = h[:i] merged into Q equal groups of i // Q bins (the last takes the remainder), each
  group's mass spread evenly over its bins where P is non-zero; both smoothed on counts (zeros get eps, taken from the
  non-zeros) and normalised; T = upper edge of the bin i minimising KL(P || Q). All candidates are evaluated at once with numpy
  (cumulative sums give every group's mass and non-empty count; candidates are processed in blocks to bound
  memory), instead of onnxruntime's Python loop over 2048 × 128.
For both histogram methods, the range is the observed [min, max] clipped to [-T, T]. Non-negative tensors
(post-ReLU) have the whole unsigned level count over [0, T]: Q = 256 for 8 bits instead of 128.
"""

from __future__ import annotations

import numpy as np

from .observers import HistogramObserver, MinMaxObserver

EPS = 1e-4
BLOCK = 128


def minmax_range(obs: MinMaxObserver) -> tuple[float, float]:
    return obs.range()


def _clip(obs: MinMaxObserver, t: float) -> tuple[float, float]:
    lo, hi = obs.range()
    return max(lo, -t), min(hi, t)


def percentile_range(obs: HistogramObserver, percentile: float) -> tuple[float, float]:
    h, extent = obs.abs_histogram()
    total = h.sum()
    if total == 0 or extent == 0:
        return obs.range()
    cdf = np.cumsum(h) / total
    i = int(np.searchsorted(cdf, percentile / 100.0))
    t = (min(i, len(h) - 1) + 1) * extent / len(h)
    return _clip(obs, t)


def quantized_levels(obs: MinMaxObserver, bits: int = 8) -> int:
    """Levels available to |x|: all of them for a non-negative tensor, half for a signed one."""
    lo, _ = obs.range()
    return 2 ** bits if lo >= 0 else 2 ** (bits - 1)


def kl_range(obs: HistogramObserver, bits: int = 8) -> tuple[float, float]:
    h, extent = obs.abs_histogram()
    # Exact zeros quantize without error whatever the threshold; left in bin 0, ReLU's spike there (often half the
    # values) dominates the KL of every candidate that merges bin 0 with its neighbours and drags the threshold
    # down to the candidates that merge nothing.
    h = h.copy()
    h[0] -= obs.exact_zeros
    if h.sum() == 0 or extent == 0:
        return obs.range()
    levels = quantized_levels(obs, bits)
    width = extent / len(h)
    # Thresholds past the last non-empty bin all clip to the observed max: search up to it only.
    last = int(np.nonzero(h)[0][-1]) + 1
    i = kl_threshold_bin(h[:last], levels)
    return _clip(obs, i * width)


def kl_threshold_bin(hist: np.ndarray, levels: int) -> int:
    """The candidate i (threshold at the upper edge of bin i-1) minimising KL(P || Q); see the module docstring."""
    h = np.asarray(hist, dtype=np.float64)
    nbins = len(h)
    if nbins <= levels:
        return nbins
    cs = np.concatenate([[0.0], np.cumsum(h)])
    nz = np.concatenate([[0], np.cumsum(h > 0)])
    total = cs[-1]
    best_i, best_kl = levels, np.inf
    candidates = np.arange(levels, nbins + 1)
    for start in range(0, len(candidates), BLOCK):
        cand = candidates[start:start + BLOCK]
        kl = _kl_block(h, cs, nz, total, cand, levels, int(cand[-1]))
        j = int(np.argmin(kl))  # first minimum, as the reference's argmin over ascending candidates
        if kl[j] < best_kl:
            best_kl, best_i = float(kl[j]), int(cand[j])
    return best_i


def _kl_block(h: np.ndarray, cs: np.ndarray, nz: np.ndarray, total: float, cand: np.ndarray, levels: int,
              width: int) -> np.ndarray:
    n = len(cand)
    rows = np.arange(n)
    k = np.arange(width)[None, :]                       # bin index, (1, W)
    i = cand[:, None]                                   # candidate, (n, 1)
    inside = k < i                                      # bins kept by candidate i
    hk = np.broadcast_to(h[:width][None, :], (n, width))
    # P: kept bins, outliers folded into the last kept bin.
    outliers = total - cs[cand]
    p = np.where(inside, hk, 0.0)
    p[rows, cand - 1] += outliers
    p_nonzero = inside & (p > 0)
    # Q: group g of candidate i spans [g·m, (g+1)·m), m = i // levels; the last group ends at i. Each group's mass
    # (of h, without outliers) is spread over the bins where P is non-zero.
    m = (cand // levels)[:, None]
    g = np.minimum(k // m, levels - 1)
    g_start = np.minimum(g * m, i)
    g_end = np.minimum(np.where(g == levels - 1, i, g * m + m), i)
    mass = cs[g_end] - cs[g_start]
    count = (nz[g_end] - nz[g_start]).astype(np.float64)
    # bin i-1 is non-zero in P when outliers landed in an empty bin: it belongs to the last group
    extra = ((h[cand - 1] == 0) & (outliers > 0)).astype(np.float64)[:, None]
    count = count + np.where(g == levels - 1, extra, 0.0)
    q = np.where(p_nonzero, mass / np.maximum(count, 1.0), 0.0)
    p = _smooth(p, inside)
    q = _smooth(q, inside)
    p = p / p.sum(1, keepdims=True)
    q = q / q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(inside & (p > 0), p * np.log(p / q), 0.0)
    kl = terms.sum(1)
    kl[~np.isfinite(kl)] = np.inf
    return kl


def _smooth(p: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Give zero bins (within each candidate's length) eps, taken evenly from the non-zero bins (on counts)."""
    zeros = inside & (p == 0)
    nonzeros = inside & (p != 0)
    n_zero = zeros.sum(1, keepdims=True)
    n_nonzero = nonzeros.sum(1, keepdims=True)
    eps1 = EPS * n_zero / np.maximum(n_nonzero, 1)
    return p + EPS * zeros - eps1 * nonzeros


def compute_range(obs: MinMaxObserver, method: str, percentile: float = 99.999, bits: int = 8
                  ) -> tuple[float, float]:
    """The one entry point: ``method`` is minmax, percentile or kl."""
    if method == "minmax" or not isinstance(obs, HistogramObserver):
        return minmax_range(obs)
    if method == "percentile":
        return percentile_range(obs, percentile)
    if method == "kl":
        return kl_range(obs, bits)
    raise ValueError(f"unknown range method {method}")
