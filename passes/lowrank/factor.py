"""The low-rank math of the ``svd`` pass: truncated SVD, optionally of the whitened weight, and its errors.

A weight seen as ``y = x·W`` with W of shape K×N (in features × out features) is replaced by two factors of its
truncated SVD ``W = U·Σ·Vᵀ``: ``A = U_r·Σ_r^½`` (K×r) and ``B = Σ_r^½·V_rᵀ`` (r×N), so ``y = (x·A)·B``. The best
rank-r approximation (Eckart–Young) has the relative Frobenius error ``√(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)``.

Data-aware: to minimize the output error ``‖X·W − X·A·B‖`` on activations X instead of ``‖W − A·B‖``, the second
moment ``M = XᵀX/n`` (K×K; streamed by ``SecondMoment``: each batch's product in the activations' precision, summed
in float64, so memory does not grow with the samples; for a 1×1 Conv a row of X is the channel vector of one pixel)
is regularized, ``M + λ·mean(diag M)·I`` (λ = ``damping``), and factored ``M = SᵀS`` (Cholesky, ``S = Lᵀ``; eigh,
``S = Λ^½Qᵀ``, if that fails). Then ``‖X·D‖² = n·‖S·D‖²`` for any D, so the SVD ``S·W = U·Σ·Vᵀ`` gives the best
factors ``A = S⁻¹·U_r·Σ_r^½``, ``B = Σ_r^½·V_rᵀ``, and its singular values measure the (regularized) output error.
The exact output error of any approximation W' follows from M alone: ``‖X(W − W')‖_F / ‖XW‖_F``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEFAULT_DAMPING = 0.01


@dataclass
class Decomposition:
    """SVD of W (plain) or of S·W (data-aware, ``s_inv`` = S⁻¹); ``factors(r)`` gives A (K×r) and B (r×N)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    s_inv: np.ndarray | None = None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root
        if self.s_inv is not None:
            a = self.s_inv @ a
        return a, root[:, None] * self.vt[:rank]


def whitening(moment: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, np.ndarray] | None:
    """(S, S⁻¹) with SᵀS = M + damping·mean(diag M)·I: Cholesky (S = Lᵀ), or eigh (S = Λ^½Qᵀ) when M is too
    ill-conditioned for it; None when M is zero (no signal: use the plain SVD)."""
    m = np.asarray(moment, np.float64)
    m = (m + m.T) / 2
    scale = float(np.mean(np.diag(m)))
    if not scale > 0:
        return None
    reg = m + damping * scale * np.eye(m.shape[0])
    try:
        chol = np.linalg.cholesky(reg)
        inv = np.linalg.inv(chol)
        if np.all(np.isfinite(inv)):
            return chol.T, inv.T
    except np.linalg.LinAlgError:
        pass
    ev, q = np.linalg.eigh(reg)
    root = np.sqrt(np.maximum(ev, 1e-12 * scale))  # an undamped singular M: keep S invertible
    return root[:, None] * q.T, q / root


def decompose(w: np.ndarray, moment: np.ndarray | None = None, damping: float = DEFAULT_DAMPING, *,
              white: tuple[np.ndarray, np.ndarray] | None = None) -> Decomposition:
    """Plain SVD of ``w`` (K×N), or with ``moment`` (K×K second moment of the inputs; or its precomputed
    ``white``-ning) the SVD of S·w."""
    w = np.asarray(w, np.float64)
    if white is None and moment is not None:
        white = whitening(moment, damping)
    if white is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Decomposition(u, s, vt)
    s_mat, s_inv = white
    u, s, vt = np.linalg.svd(s_mat @ w, full_matrices=False)
    return Decomposition(u, s, vt, s_inv)


def truncation_error(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)."""
    s2 = np.asarray(s, np.float64) ** 2
    total = float(s2.sum())
    return math.sqrt(max(float(s2[rank:].sum()), 0.0) / total) if total > 0 else 0.0


def rank_for_error(s: np.ndarray, max_error: float) -> int:
    """Smallest rank whose truncation error is at most ``max_error`` (at least 1)."""
    s2 = np.asarray(s, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[r] = Σ_{i>=r} σᵢ²
    ok = np.nonzero(tail <= (max_error ** 2) * total * (1 + 1e-12))[0]
    return max(1, int(ok[0]))


def relative_output_error(w: np.ndarray, approx: np.ndarray, moment: np.ndarray) -> float:
    """‖X(W − W')‖_F / ‖XW‖_F from the second moment M = XᵀX/n alone."""
    d = np.asarray(w, np.float64) - approx
    num = float(np.sum((moment @ d) * d))
    den = float(np.sum((moment @ w) * w))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


class SecondMoment:
    """Streaming XᵀX/n of the rows of X, a row being the vector along ``axis`` of each observed array."""

    def __init__(self, k: int, axis: int) -> None:
        self.k, self.axis = k, axis
        self.sum = np.zeros((k, k), np.float64)
        self.n = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[self.axis] != self.k:
            return
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, self.k)
        rows = rows.astype(np.float32 if x.dtype != np.float64 else np.float64)
        self.sum += (rows.T @ rows).astype(np.float64)
        self.n += rows.shape[0]

    def matrix(self) -> np.ndarray | None:
        return self.sum / self.n if self.n else None


class TensorMoments:
    """All SecondMoments of one tensor (a tensor can feed a MatMul and a transA Gemm), and any other observers of
    it (``hooks``), updated together."""

    def __init__(self) -> None:
        self.by_axis: dict[tuple[int, int], SecondMoment] = {}
        self.hooks: list[Callable[[np.ndarray], None]] = []     # other observers of the same tensor (Conv patches)

    def get(self, k: int, axis: int) -> SecondMoment:
        return self.by_axis.setdefault((k, axis), SecondMoment(k, axis))

    def update(self, x: np.ndarray) -> None:
        for m in self.by_axis.values():
            m.update(x)
        for hook in self.hooks:
            hook(x)
