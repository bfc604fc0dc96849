"""The low-rank math of the ``svd`` pass: truncated SVD, optionally of the whitened weight, and its errors.

A weight seen as ``y = x·W`` with W of shape K×N (in features × out features) is replaced by two factors of its
truncated SVD ``W = U·Σ·Vᵀ``: ``A = U_r·Σ_r^½`` (K×r) and ``B = Σ_r^½·V_rᵀ`` (r×N), so ``y = (x·A)·B``. The best
rank-r approximation (Eckart–Young) has the relative Frobenius error ``√(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)``. U (or V) and
σ come from the eigen-decomposition of the smaller Gram matrix W·Wᵀ (or WᵀW) in float64 (``gram_svd``: an order of
magnitude cheaper than a full SVD of a 1024x16384 weight, and as exact as a float32 weight is stored); the other
factor is the projection Σ_r·V_rᵀ = U_rᵀ·W.

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
    """The singular values ``s`` of a K×N matrix M (W, or S·W in data-aware mode with ``s_inv`` = S⁻¹), descending,
    and the eigenvectors ``basis`` of its Gram matrix on the smaller side (``left``: U of M·Mᵀ, K×K; else V of
    MᵀM, N×N). ``factors(r)`` gives A (K×r) and B (r×N) with A·B = U_r·U_rᵀ·M = M·V_r·V_rᵀ (data-aware: S⁻¹ on A)."""

    s: np.ndarray
    basis: np.ndarray
    left: bool
    m: np.ndarray
    s_inv: np.ndarray | None = None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        vecs = self.basis[:, :rank]
        inner = vecs.T @ self.m if self.left else self.m @ vecs      # Σ_r·V_rᵀ (r×N), or U_r·Σ_r (K×r)
        sigma = np.linalg.norm(inner, axis=1 if self.left else 0)    # σ of the exact projection, not from ev
        root = np.where(sigma > 0, np.sqrt(sigma), 1.0)
        if self.left:
            a, b = vecs * root, inner / root[:, None]
        else:
            a, b = inner / root, root[:, None] * vecs.T
        return (a if self.s_inv is None else self.s_inv @ a), b


def gram_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(σ descending, the Gram matrix's eigenvectors, left) of M through the eigen-decomposition of the smaller
    Gram matrix, M·Mᵀ (left) or MᵀM, in float64: K·N·min(K, N) + min(K, N)³ flops instead of a full SVD's larger
    constant (0.55 s against 6.1 s for 1024x16384 here). Squaring M loses the singular values below about
    √ε·σ₁ ≈ 1e-8·σ₁ (ε of float64); the truncation error of a projection is stationary at the optimal subspace, so
    the factors' relative error differs from the SVD's by at most about that (measured: 7e-9 on a spectrum falling
    to 1e-13·σ₁, 2e-15 on a flat one; tests/test_big_models.py): below a float32 weight's own rounding (6e-8)."""
    left = m.shape[0] <= m.shape[1]
    gram = m @ m.T if left else m.T @ m
    ev, vecs = np.linalg.eigh(gram)
    order = np.argsort(ev)[::-1]
    return np.sqrt(np.maximum(ev[order], 0.0)), vecs[:, order], left


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
    """Truncated-SVD factors of ``w`` (K×N) (``gram_svd``), or with ``moment`` (K×K second moment of the inputs;
    or its precomputed ``white``-ning) of S·w."""
    w = np.asarray(w, np.float64)
    if white is None and moment is not None:
        white = whitening(moment, damping)
    m = w if white is None else white[0] @ w
    s, basis, left = gram_svd(m)
    return Decomposition(s, basis, left, m, None if white is None else white[1])


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
