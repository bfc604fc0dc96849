"""Observers: collect a tensor's statistics as calibration batches stream; nothing else (torch.ao's split).

``MinMaxObserver`` keeps two numbers. ``HistogramObserver`` keeps a fixed-size histogram of the signed values over
[-A, A] with ``2·bins`` equal bins, plus the exact min and max. A is a power of two, the smallest strictly above every
finite value seen so far (and at least 2^-64, so that bins/A stays finite in float32 for subnormal data); when a
batch exceeds it, A doubles and each pair of neighbouring bins on either side of zero merges into one. Merging nests
exactly (bin edges A·k/bins are shared by every power-of-two A), so updating in pieces gives the same histogram as
one update with all the data — memory does not grow with the sample count. Values are binned in chunks of 2^16, so
the temporaries stay small however large a tensor is, and in the core's cache between one pass and the next.
Exact zeros are also counted on their own: zero is exactly representable after quantization, so the KL search
leaves ReLU's spike at 0 out of the distributions it compares. Range methods (``calibration.ranges``) read the
histogram; they never see the raw data.
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 1 << 16           # values binned at a time (their buffers stay in cache)
MIN_EXTENT = 2.0 ** -64   # the smallest A: bins / A must not overflow float32 (2^128) for any bin count in use


class MinMaxObserver:
    """Running min and max of the finite values."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        self._track(np.asarray(x))

    def _track(self, x: np.ndarray) -> tuple[np.ndarray, float, float] | None:
        """Fold x's finite values into min, max and count; return them with their min and max (None if none)."""
        if not x.size:
            return None
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):   # NaN/Inf present: only then copy the finite values
            x = x[np.isfinite(x)]
            if not x.size:
                return None
            lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += int(x.size)
        return x, lo, hi

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        return self.lo, self.hi


class HistogramObserver(MinMaxObserver):
    """Signed histogram over [-A, A] (A a power of two), ``bins`` bins per side; see the module docstring."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.extent = 0.0                       # A; 0 until a non-zero value is seen
        self.hist = np.zeros(2 * bins, dtype=np.int64)
        self.zeros_only = 0                     # values seen while A was 0 (all exactly zero)
        self.exact_zeros = 0                    # values exactly 0 (ReLU's spike), also counted in the histogram

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x).ravel()
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        tracked = self._track(x)
        if tracked is None:
            return
        x, lo, hi = tracked
        amax = max(-lo, hi)
        if amax >= self.extent and amax > 0:
            self._grow(amax)
        if amax == 0.0:                         # every value is exactly zero: the first bin above zero
            self.exact_zeros += int(x.size)
            if self.extent == 0.0:
                self.zeros_only += int(x.size)
            else:
                self.hist[self.bins] += int(x.size)
            return
        # bins / extent is a power of two, so x * (bins / extent) is exact in float32 and floor() bins it exactly;
        # the floored values are integers below 2·bins (< 2^24), so adding bins and casting to int32 are exact too.
        # Every value is finite and |x| < A (``_grow``), so the bins run from 0 to 2·bins − 1 with no clipping.
        # In chunks small enough that the float, index and zero-flag buffers stay in the core's cache between the
        # passes (64 Ki values: 0.6 MB), so each pass after the first reads cache, not memory.
        scale = x.dtype.type(self.bins / self.extent)
        n = min(x.size, CHUNK)
        buf, idx, zero = np.empty(n, x.dtype), np.empty(n, np.int32), np.empty(n, np.bool_)
        for start in range(0, x.size, CHUNK):
            part = x[start:start + CHUNK]
            k = part.size
            self.exact_zeros += int(np.count_nonzero(np.equal(part, 0, out=zero[:k])))
            f = np.multiply(part, scale, out=buf[:k])
            np.floor(f, out=f)
            f += self.bins
            np.copyto(idx[:k], f, casting="unsafe")
            self.hist += np.bincount(idx[:k], minlength=2 * self.bins)

    def _grow(self, amax: float) -> None:
        # The smallest power of two strictly above amax (frexp is exact: amax = m·2^e with 0.5 <= m < 1), so no
        # value sits on the top edge, where it would be clipped into the last bin and merge differently later.
        new = max(math.ldexp(1.0, math.frexp(amax)[1]), MIN_EXTENT)
        if self.extent == 0.0:
            self.extent = new
            if self.zeros_only:
                self.hist[self.bins] += self.zeros_only  # zeros fall in the first bin above zero
                self.zeros_only = 0
            return
        while self.extent < new:
            neg = self.hist[: self.bins][::-1]  # distance order from zero
            pos = self.hist[self.bins:]
            merged_neg = np.zeros(self.bins, np.int64)
            merged_pos = np.zeros(self.bins, np.int64)
            merged_neg[: self.bins // 2] = neg.reshape(-1, 2).sum(1)
            merged_pos[: self.bins // 2] = pos.reshape(-1, 2).sum(1)
            self.hist = np.concatenate([merged_neg[::-1], merged_pos])
            self.extent *= 2

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, A] in ``bins`` bins (the two sides folded), and A."""
        h = self.hist[self.bins:] + self.hist[: self.bins][::-1]
        if self.extent == 0.0:
            h = h.copy()
            h[0] += self.zeros_only
        return h, self.extent
