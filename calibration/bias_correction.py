"""Bias correction of the weights' rounding (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", §4.2, in its empirical form): the mean input patch of a layer, streamed, and the bias shift it
gives.

A layer computes y_o = W_o · x + b_o per output channel o (x: a Conv's input patch, c·k₁·k₂ values in (channel, row,
column) order per group, zero where the patch reads padding; a Gemm/MatMul's input row). Rounding W to Ŵ (nearest or
GPTQ) adds ΔW_o · x to the output, ΔW = Ŵ − W. Its mean over the data, ΔW_o · E[x], is a constant offset per channel
that every later layer reads as a shifted activation; the zero-mean rest is noise. Subtracting the offset from the
bias, b'_o = b_o − ΔW_o · E[x], removes the mean error (exactly, on the calibration data) at no cost at run time.
High-pass kernels are where it matters: EfficientNet-Lite0's first depthwise convolution holds derivative filters
whose nine weights sum to ~0 against a largest weight of 8–16, so rounding each weight by up to half a step moves
the filter's response to flat image regions by several steps; every weight int8, rounded to nearest, its top-1
agreement with float on other photos is 0.836, and 0.895 with the offsets removed.

E[x] is the mean input patch (``PatchMeanObserver``): for each input channel and kernel tap, the mean over every
output position of the padded input that tap reads, so padding counts as the zeros the convolution sees and the
offset is exactly the mean of ΔW·x over the data (a per-channel mean is not, wherever a tap reads padding: on
PP-OCRv4 rec's maps, 1–3 rows high after its downsampling, that is a third of the taps). Memory is one patch vector
per layer input whatever the sample count; the sum over output positions of a tap is a product with two 0/1
selection matrices (two matrix products per batch), so no patch is ever built.

It removes one error of several, not all: the activations' rounding and clipping shift the means too, and what the
weights' shift had partly offset shows. With every layer int8, on the evaluation data (AMD EPYC Zen 4; 7-bit weights
as ``reduce-range`` gives on x86 without VNNI): EfficientNet-Lite0 top-1 agreement 0.836 → 0.895 (7-bit: 0.688 →
0.820), PP-OCRv4 rec cosine 0.965 → 0.981 (7-bit: 0.979 → 0.977, the one loss measured); det, PP-OCR cls, MTCNN and
Magika move by at most 0.0011 either way (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import numpy as np

from .gptq import ConvGeometry


def _taps(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> np.ndarray | None:
    """[kernel, size] 0/1 matrix: row t marks the input positions (of the unpadded axis) that tap t reads over all
    output positions; None when the padded axis is shorter than the kernel's span (the Conv has no output)."""
    span = (kernel - 1) * dilation + 1
    out = (size + begin + end - span) // stride + 1
    if out <= 0:
        return None
    sel = np.zeros((kernel, size))
    for t in range(kernel):
        pos = t * dilation + stride * np.arange(out) - begin       # positions in the unpadded input
        pos = pos[(pos >= 0) & (pos < size)]                        # the rest read padding: zeros
        np.add.at(sel[t], pos, 1.0)
    return sel


class PatchMeanObserver:
    """Σ x over every input vector a layer reads, and how many: ``sum`` float64 [C, *kernel] (Conv: per input
    channel and tap) or [K] (Gemm/MatMul: one vector per row), ``count`` the vectors (output positions) seen.

    ``conv``: the Conv's geometry (``ConvGeometry``), its input [N, C, *spatial]; None: a row input [..., K]."""

    def __init__(self, conv: ConvGeometry | None = None) -> None:
        self.conv = conv
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim < 2 or x.size == 0:
            return
        if self.conv is None:
            flat = x.reshape(-1, x.shape[-1])
            self._add(flat.sum(axis=0, dtype=np.float64), flat.shape[0])
            return
        _, kernel, strides, pb, pe, dil = self.conv
        spatial = x.shape[2:]
        if len(spatial) != len(kernel):
            return
        sels = [_taps(*args) for args in zip(spatial, kernel, strides, pb, pe, dil)]
        if any(s is None for s in sels):
            return
        xs = x.sum(axis=0, dtype=np.float64)                               # [C, *spatial]
        s = xs @ sels[-1].T                                                # [C, (H,) k_last]
        if len(kernel) == 2:
            s = np.matmul(sels[0], s)                                      # [k0, H] @ [C, H, k1] -> [C, k0, k1]
        positions = int(np.prod([(n + b + e - (k - 1) * d - 1) // st + 1
                                 for n, k, st, b, e, d in zip(spatial, kernel, strides, pb, pe, dil)]))
        self._add(s, x.shape[0] * positions)

    def _add(self, s: np.ndarray, n: int) -> None:
        self.sum = s if self.sum is None else self.sum + s
        self.count += n

    def mean(self) -> np.ndarray | None:
        """E[x]: [C, *kernel] or [K]; None before any data."""
        return None if self.sum is None or self.count == 0 else self.sum / self.count


def rounding_offset(delta: np.ndarray, mean: np.ndarray, group: int = 1) -> np.ndarray:
    """ΔW_o · E[x] for every output channel o: the mean output error of the rounded weights.

    ``delta``: Ŵ − W as [O, C/group, *kernel] (Conv) or [O, K] (rows); ``mean``: ``PatchMeanObserver.mean()``,
    [C, *kernel] or [K]. Output channel o of a grouped Conv reads input channels of group o // (O / group)."""
    d = np.asarray(delta, dtype=np.float64)
    m = np.asarray(mean, dtype=np.float64)
    if d.ndim == 2 and m.ndim == 1:
        return d @ m
    out_per_group = d.shape[0] // group
    per_group = m.reshape(group, -1)                                   # [G, C/G · taps]
    rows = d.reshape(group, out_per_group, -1)                         # [G, O/G, C/G · taps]
    return np.einsum("god,gd->go", rows, per_group).reshape(-1)
