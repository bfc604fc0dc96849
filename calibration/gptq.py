"""Error-compensating weight rounding (GPTQ: Frantar et al. 2022, after Optimal Brain Quantization, Frantar & Alistarh
2022): the second moments of a layer's inputs, streamed, and the rounding that uses them.

A layer computes y = W x per output channel (x: a Conv's input patch, c·kh·kw values in (channel, row, column) order,
per group; a Gemm/MatMul's input row). Quantizing W to Ŵ = s·q costs E‖(W − Ŵ) x‖² = Σ_o Δ_o H Δ_oᵀ with
H = Σ x xᵀ over every input the calibration data gives (``HessianObserver``: summed in float64 as batches stream,
so memory is D² per layer, whatever the sample count; from the first ``MAX_SAMPLES``). Rounding each weight to
nearest ignores H. GPTQ rounds the columns one at a time (largest H_jj first, GPTQ's "act order": the inputs with
the most energy are rounded while the most columns are left to absorb their error) and moves each column's rounding
error onto the columns not yet rounded, in the proportions that minimise the error given H: with U the upper
Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),
    q_j = clip(round(w_j / s), qmin, qmax),   e_j = (w_j − s·q_j) / U_jj,   w_k −= e_j · U_jk   for k > j,
all output channels at once (each row has its own scale s; the scales are not changed). H gets λ = 1% of its mean
diagonal added (GPTQ's damping) and inputs that were always zero keep their nearest rounding. A weight that is
exactly zero (pruned: prune-weights) rounds to zero whatever the updates moved onto it, and its error moves on. When H is diagonal
the updates vanish and GPTQ is round-to-nearest.
H describes the calibration inputs only: with fewer input vectors than ~8 per dimension (a classifier's last Gemm
seen on 64 images: 64 rows for 1280 inputs) the compensation fits those inputs and hurts others, so the pass
(``passes/quantize/``) rounds such layers to nearest (``enough_rows``). With enough rows the gain per layer holds
on other data (PP-OCRv4 rec, H from 32 calibration lines: E‖ΔW x‖² 0.01–0.42× nearest's on other documents, every
one of 47 layers), but the whole model's error does not follow it predictably once some tensors stay float (rec:
leaving the first depthwise conv's output float takes the output cosine 0.990 → 0.971 with GPTQ, 0.977 → 0.988 with
nearest), and on rec and det the fallback's result with GPTQ was refused on other documents where nearest's was
written; hence the pass rounds to nearest unless asked (``rounding=gptq``).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DAMPING = 0.01
MIN_ROWS_PER_DIM = 8        # fewer input vectors per dimension than this: round to nearest (module docstring)
CHUNK_BYTES = 32 << 20      # patch matrices are built this much at a time
# H from the first 128 samples at most: EfficientNet-Lite0's depthwise patches cost ~0.1 s per sample in numpy
# (36 s of 54 for its 256 calibration crops), and H from 64 crops rounded it as well as from 256 (every layer
# int8, eval top-1 agreement 0.910 against 0.906).
MAX_SAMPLES = 128


ConvGeometry = tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(group, kernel, strides, pads at the start, pads at the end, dilations) of a 1-D or 2-D Conv."""


class Observer(Protocol):
    def update(self, x: np.ndarray) -> None: ...


class Fanout:
    """Several observers of one tensor (its histogram and the second moments of the layers reading it)."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = list(observers)

    def update(self, x: np.ndarray) -> None:
        for o in self.observers:
            o.update(x)


class HessianObserver:
    """H = Σ x xᵀ of a layer's input vectors, per group: ``h`` [groups, D, D] float64, ``rows`` vectors seen, from
    the first ``max_samples`` samples.

    ``conv``: the Conv's (group, kernel, strides, pads, dilations), its input [N, C, *spatial] cut into patches as
    the Conv reads them; None: a Gemm/MatMul input [..., K], one vector per row."""

    def __init__(self, conv: ConvGeometry | None = None, max_samples: int = MAX_SAMPLES) -> None:
        self.conv = conv
        self.h: np.ndarray | None = None
        self.rows = 0
        self.samples = 0            # along axis 0 (the batch)
        self.max_samples = max_samples

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or self.samples >= self.max_samples:
            return
        x = x[:self.max_samples - self.samples]
        self.samples += x.shape[0]
        if self.conv is None:
            flat = x.reshape(-1, x.shape[-1])
            step = max(1, CHUNK_BYTES // max(flat.shape[1] * 4, 1))
            for i in range(0, flat.shape[0], step):
                self._add(flat[None, i:i + step])
            return
        group, kernel, strides, pb, pe, dil = self.conv
        if x.ndim == 3:         # 1-D conv as 2-D with height 1
            x = x[:, :, None, :]
            kernel, strides, pb, pe, dil = ((1,) + kernel, (1,) + strides, (0,) + pb, (0,) + pe, (1,) + dil)
        n, c = x.shape[:2]
        x = np.pad(x, ((0, 0), (0, 0), (pb[0], pe[0]), (pb[1], pe[1])))
        span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
        if x.shape[2] < span[0] or x.shape[3] < span[1]:
            return
        win = sliding_window_view(x, span, axis=(2, 3))[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
        ho, wo = win.shape[2:4]
        d = (c // group) * kernel[0] * kernel[1]
        rows_per_chunk = max(1, CHUNK_BYTES // max(group * wo * d * 4, 1))
        for i in range(n):
            for r in range(0, ho, rows_per_chunk):
                part = win[i, :, r:r + rows_per_chunk]                    # C, h, Wo, kh, kw
                hh = part.shape[1]
                p = part.reshape(group, c // group, hh, wo, kernel[0] * kernel[1])
                p = p.transpose(0, 2, 3, 1, 4).reshape(group, hh * wo, d)
                self._add(p)

    def _add(self, p: np.ndarray) -> None:
        """Add the vectors p [groups, P, D]."""
        h = np.matmul(p.transpose(0, 2, 1), p).astype(np.float64)
        self.h = h if self.h is None else self.h + h
        self.rows += p.shape[1]

    def enough_rows(self) -> bool:
        return self.h is not None and self.rows >= MIN_ROWS_PER_DIM * self.h.shape[-1]


def gptq_round(w: np.ndarray, scale: np.ndarray, h: np.ndarray, qmin: int, qmax: int,
               damping: float = DAMPING, zero_point: np.ndarray | None = None) -> np.ndarray:
    """Integer weights q [G, O, D] (int64) for w [G, O, D] with per-row scales [G, O] and zero point 0, or (blockwise
    weight-only quantization) per-weight scales and zero points [G, O, D], and H [G, D, D] (module docstring):
    q_j = clip(round(w_j / s_j) + z_j, qmin, qmax), error e_j = (w_j − s_j·(q_j − z_j)) / U_jj. The scales are
    fixed beforehand from the unrounded weights (GPTQ's "static groups" with act order)."""
    d = w.shape[2]
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(*w.shape[:2], -1), w.shape)
    z = np.zeros(w.shape) if zero_point is None else np.broadcast_to(
        np.asarray(zero_point, dtype=np.float64).reshape(*w.shape[:2], -1), w.shape)
    idx = np.arange(d)
    h = np.array(h, dtype=np.float64)
    energy = h[:, idx, idx].copy()                                     # [G, D]
    perm = np.argsort(-energy, axis=1, kind="stable")                  # act order: most energy first
    w = np.take_along_axis(np.array(w, dtype=np.float64), perm[:, None, :], axis=2)
    s = np.take_along_axis(s, perm[:, None, :], axis=2)
    z = np.take_along_axis(z, perm[:, None, :], axis=2)
    h = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    energy = np.take_along_axis(energy, perm, axis=1)
    # Inputs that were always zero have all-zero rows and columns: a unit diagonal keeps H invertible and their
    # weights uncoupled (rounded to nearest). Then GPTQ's damping.
    h[:, idx, idx] = np.where(energy > 0, energy, 1.0) + damping * energy.mean(axis=1)[:, None]
    try:
        u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)    # upper: H⁻¹ = UᵀU
    except np.linalg.LinAlgError:
        u = np.broadcast_to(np.eye(d), h.shape)                        # no usable H: round to nearest
    pruned = w == 0                                                    # zero weights stay zero (prune-weights)
    q = np.empty(w.shape, dtype=np.int64)
    for j in range(d):
        col = w[:, :, j]
        qj = np.where(pruned[:, :, j], z[:, :, j], np.clip(np.rint(col / s[:, :, j]) + z[:, :, j], qmin, qmax))
        q[:, :, j] = qj
        err = (col - (qj - z[:, :, j]) * s[:, :, j]) / u[:, j, j][:, None]       # [G, O]
        w[:, :, j + 1:] -= err[:, :, None] * u[:, None, j, j + 1:]
    out = np.empty_like(q)
    np.put_along_axis(out, np.broadcast_to(perm[:, None, :], q.shape), q, axis=2)
    return out
