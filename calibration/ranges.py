"""Range methods: turn an observer's statistics into the (lo, hi) range to quantize a tensor over.

* ``minmax``: the observed min and max.
* ``percentile``: T = the p-th percentile of |x| (from the histogram's cumulative counts, at a bin's upper edge).
* ``kl`` (entropy; Migacz, "8-bit Inference with TensorRT", 2017): over the |x| histogram h of B bins (exact zeros
  left out: they quantize exactly, and ReLU's spike at 0 would otherwise decide the threshold), for every
  candidate threshold bin i in [Q, B] (Q = quantized levels): P = h[:i] with the outliers sum(h[i:]) folded into
  P[i-1]; Q-distribution = h[:i] merged into Q equal groups of i // Q bins (the last takes the remainder), each
  group's mass spread evenly over its bins where P is non-zero; both smoothed on counts (zeros get eps, taken from the
  non-zeros) and normalised; T = upper edge of the bin i minimising KL(P || Q). All candidates are evaluated at once
  with numpy, in blocks of equal group width m = i // Q (cumulative sums give every group's mass and non-empty
  count; smoothing keeps both sums, so P's zero bins add a closed-form term and only its non-zero bins are summed),
  instead of onnxruntime's Python loop over 2048 × 128.
* ``mse``: T minimising the expected squared quantization error of the tensor's values under the affine 8-bit
  quantizer of the range it gives (255 steps of s = (hi - lo) / 255 over [lo, hi] = [min, max] clipped to [-T, T],
  widened to hold 0): values inside round with error s²/12 each (exact zeros: none), values past an end are clipped
  to it, (x - end)², each histogram bin's values taken at the bin's centre. Every bin edge is a candidate; suffix
  sums of h, h·c and h·c² give each candidate's clipping error in O(1), so the search is O(bins).
For the histogram methods, the range is the observed [min, max] clipped to [-T, T]. Non-negative tensors
(post-ReLU) have the whole unsigned level count over [0, T]: Q = 256 for 8 bits instead of 128.
"""

from __future__ import annotations

import numpy as np

from .observers import HistogramObserver, MinMaxObserver

EPS = 1e-4


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
    """The candidate i (threshold at the upper edge of bin i-1) minimising KL(P || Q); see the module docstring.

    Candidates are evaluated together, in blocks sharing m = i // levels: within a block every group but the last
    has the same bins, so group masses and non-empty counts are computed once per block, not per bin."""
    h = np.asarray(hist, dtype=np.float64)
    nbins = len(h)
    if nbins <= levels:
        return nbins
    cs = np.concatenate([[0.0], np.cumsum(h)])
    nz = np.concatenate([[0], np.cumsum(h > 0)])
    best_i, best_kl = levels, np.inf
    for m in range(1, nbins // levels + 1):
        cand = np.arange(m * levels, min((m + 1) * levels, nbins + 1))
        kl = _kl_block(h, cs, nz, cand, levels, m)
        j = int(np.argmin(kl))  # first minimum, as the reference's argmin over ascending candidates
        if kl[j] < best_kl:
            best_kl, best_i = float(kl[j]), int(cand[j])
    return best_i


def _kl_block(h: np.ndarray, cs: np.ndarray, nz: np.ndarray, cand: np.ndarray, levels: int, m: int) -> np.ndarray:
    """KL(P || Q) of the candidates ``cand``, all with i // levels == m.

    Smoothing moves EPS onto each zero bin and takes it evenly from the non-zero bins, so it keeps each sum (S_P =
    the total, S_Q = the mass of h[:i]) unless everything is zero; then both have the same zero bins (Q is zero
    where P is) except where a group has no mass under a non-zero P bin. The zero bins of P each add
    (EPS/S_P)·log(S_Q/S_P), so only P's non-zero bins are summed bin by bin."""
    total = cs[-1]
    n, width = len(cand), int(cand[-1])
    rows = np.arange(n)
    k = np.arange(width)
    inside = k[None, :] < cand[:, None]
    hk = h[:width]
    outliers = total - cs[cand]
    p = np.where(inside, hk[None, :], 0.0)
    p[rows, cand - 1] += outliers
    pnz = p > 0
    # Q per group: groups 0..levels-2 span [g·m, (g+1)·m) for every candidate here; the last ends at i.
    g = np.minimum(k // m, levels - 1)
    edges = np.arange(levels) * m
    mass = np.broadcast_to(np.append(cs[edges[1:]] - cs[edges[:-1]], 0.0), (n, levels)).copy()
    count = np.broadcast_to(np.append(nz[edges[1:]] - nz[edges[:-1]], 0), (n, levels)).astype(np.float64)
    mass[:, -1] = cs[cand] - cs[edges[-1]]
    # bin i-1 is non-zero in P when outliers landed in an empty bin: it counts in the last group
    count[:, -1] = nz[cand] - nz[edges[-1]] + ((h[cand - 1] == 0) & (outliers > 0))
    q = np.where(pnz, (mass / np.maximum(count, 1.0))[:, g], 0.0)
    qnz = q > 0
    n_in = cand.astype(np.float64)
    n_p = pnz.sum(1).astype(np.float64)
    n_q = qnz.sum(1).astype(np.float64)
    e_p = EPS * (n_in - n_p) / np.maximum(n_p, 1.0)
    e_q = EPS * (n_in - n_q) / np.maximum(n_q, 1.0)
    s_p = np.where(n_p > 0, p.sum(1), n_in * EPS)
    s_q = np.where(n_q > 0, q.sum(1), n_in * EPS)
    a = np.where(pnz, (p - e_p[:, None]) / s_p[:, None], 0.0)
    b = np.where(qnz, (q - e_q[:, None]) / s_q[:, None], (EPS / s_q)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(a / b), 0.0)
        zero_bins = (n_in - n_p) * (EPS / s_p) * np.log(s_q / s_p)
    kl = terms.sum(1) + zero_bins
    kl[~np.isfinite(kl)] = np.inf
    return kl


def mse_range(obs: HistogramObserver, steps: int = 255) -> tuple[float, float]:
    lo, hi = obs.range()
    extent, n = obs.extent, obs.bins
    if obs.count == 0 or extent == 0 or lo == hi:
        return lo, hi
    h = obs.hist.astype(np.float64)
    centers = (np.arange(2 * n) - n + 0.5) * (extent / n)
    t = np.arange(1, n + 1) * (extent / n)
    top = np.maximum(np.minimum(hi, t), 0.0)
    bottom = np.minimum(np.maximum(lo, -t), 0.0)
    # suffix sums (bins at and above k) and prefix sums (bins below k) of h, h·c, h·c²
    moments = np.stack([h, h * centers, h * centers**2])
    suffix = np.concatenate([np.cumsum(moments[:, ::-1], axis=1)[:, ::-1], np.zeros((3, 1))], axis=1)
    prefix = np.concatenate([np.zeros((3, 1)), np.cumsum(moments, axis=1)], axis=1)
    up = np.searchsorted(centers, top, side="right")       # first bin clipped down to ``top``
    down = np.searchsorted(centers, bottom, side="left")   # bins below it are clipped up to ``bottom``
    s0, s1, s2 = suffix[:, up]
    p0, p1, p2 = prefix[:, down]
    clipped = (s2 - 2 * top * s1 + top**2 * s0) + (p2 - 2 * bottom * p1 + bottom**2 * p0)
    inside = np.maximum(h.sum() - s0 - p0 - obs.exact_zeros, 0.0)
    err = np.maximum(clipped, 0.0) + inside * ((top - bottom) / steps) ** 2 / 12.0
    return _clip(obs, float(t[int(np.argmin(err))]))


def compute_range(obs: MinMaxObserver, method: str, percentile: float = 99.99, bits: int = 8
                  ) -> tuple[float, float]:
    """The one entry point: ``method`` is minmax, percentile, kl or mse (``percentile`` is read by percentile only)."""
    if method == "minmax" or not isinstance(obs, HistogramObserver):
        return minmax_range(obs)
    if method == "percentile":
        return percentile_range(obs, percentile)
    if method == "kl":
        return kl_range(obs, bits)
    if method == "mse":
        return mse_range(obs, 2**bits - 1)
    raise ValueError(f"unknown range method {method}")
