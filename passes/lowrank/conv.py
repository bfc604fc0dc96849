"""The low-rank factorizations of a k×k Conv weight W [C_out, C_in, kh, kw] (group 1) the ``svd`` pass offers, their
costs and their errors.

Spatial (Jaderberg et al. 2014, scheme 2): ``W̃[(c,a),(o,b)] = W[o,c,a,b]`` is a (C_in·kh)×(C_out·kw) matrix; its
truncated SVD ``W̃ ≈ Σ_{i<r} σᵢ uᵢ vᵢᵀ`` gives a vertical kh×1 Conv ``V[i,c,a] = √σᵢ uᵢ[(c,a)]`` (C_in -> r) and then a
horizontal 1×kw Conv ``H[o,i,b] = √σᵢ vᵢ[(o,b)]`` (r -> C_out), whose composite kernel is ``Σᵢ V[i,c,a]·H[o,i,b]``,
the rank-r truncation of W̃: ``‖W − W'‖_F² = Σ_{i≥r} σᵢ²`` exactly (Eckart–Young).
Tucker-2 (HOSVD on the two channel modes): U_out (C_out×r2) and U_in (C_in×r1) are the leading left singular vectors
of W unfolded along its output and input channels, the core ``G = W ×_out U_outᵀ ×_in U_inᵀ`` [r2, r1, kh, kw];
the Convs are 1×1 (C_in -> r1, U_inᵀ), kh×kw (r1 -> r2, G) and 1×1 (r2 -> C_out, U_out). At full ranks U_in, U_out
are orthogonal and the product is W exactly.

Data-aware: with X the im2col patch rows of the layer's input (C_in·kh·kw, ordered (c,a,b), padding included) and
M = XᵀX/n, the layer computes ``X·Wm``, ``Wm[(c,a,b),o] = W[o,c,a,b]``. Given the first factor(s), both
factorizations are linear in the rest: spatial ``W'm = P·Hm`` with ``P[(c,a,b'),(i,b)] = V[i,c,a]·δ(b,b')``;
Tucker ``W'm = A·Gm·U_outᵀ`` with ``A = U_in ⊗ I_(kh·kw)``. So the last factor minimizing the output error
``‖X(Wm − W'm)‖`` is a weighted least-squares solution: ``Hm = (PᵀM̃P)⁻¹PᵀM̃·Wm``; ``Gm = (AᵀM̃A)⁻¹AᵀM̃·Wm·U_out``
(U_out orthonormal: the part of Wm outside its span is lost whatever Gm is). M̃ = M + λ·mean(diag M)·I, λ the
pass's ``damping``, as for Gemm. Zero padding commutes with the first factor (no bias maps padded zeros to zeros),
so the factored pair computes exactly ``X·W'm`` on the same patches. The output error of any W' follows from M
(``factor.relative_output_error``).

Cost per output pixel (MACs), strides (s_h, s_w): dense ``C_out·C_in·kh·kw``; spatial ``r·C_in·kh·s_w + C_out·r·kw``
(the vertical Conv runs at the full input width); Tucker ``r1·C_in·s_h·s_w + r2·r1·kh·kw + C_out·r2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .factor import relative_output_error

SPATIAL, TUCKER = "spatial", "tucker"


@dataclass
class ConvFactors:
    """One factorization of a conv weight: ``kind``, its ranks, the factor kernels (first to last), its composite
    weight as the patch matrix Wm' [(c,a,b), o], and its costs."""

    kind: str
    ranks: tuple[int, ...]
    kernels: tuple[np.ndarray, ...]
    approx: np.ndarray
    params: int
    macs: float             # per output pixel

    @property
    def rank_text(self) -> str:
        return "x".join(map(str, self.ranks))


def patch_matrix(w: np.ndarray) -> np.ndarray:
    """W [C_out, C_in, kh, kw] as the patch matrix Wm [(c,a,b), o] (the layer computes X·Wm)."""
    return np.asarray(w, np.float64).reshape(w.shape[0], -1).T


def dense_macs(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape))


def spatial_svd(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, σ, Vᵀ of W̃ [(c,a), (o,b)]."""
    o, c, kh, kw = w.shape
    wt = np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)
    return np.linalg.svd(wt, full_matrices=False)


def _regularized(moment: np.ndarray, damping: float) -> np.ndarray:
    m = (np.asarray(moment, np.float64) + np.asarray(moment, np.float64).T) / 2
    return m + damping * max(float(np.mean(np.diag(m))), 1e-30) * np.eye(m.shape[0])


def _weighted_lstsq(p: np.ndarray, m: np.ndarray, target: np.ndarray) -> np.ndarray:
    """argmin_Z ‖S(target − P·Z)‖ for SᵀS = m: (PᵀmP)⁻¹Pᵀm·target."""
    mp = m @ p
    lhs, rhs = p.T @ mp, mp.T @ target
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def spatial(w: np.ndarray, rank: int, svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            moment: np.ndarray | None = None, damping: float = 0.01, strides: tuple[int, int] = (1, 1)
            ) -> ConvFactors:
    """The rank-``rank`` spatial factorization (with ``moment``: the horizontal factor refitted on the data)."""
    o, c, kh, kw = w.shape
    u, s, vt = svd if svd is not None else spatial_svd(w)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    v = (u[:, :r] * root).T.reshape(r, c, kh)                     # V[i, c, a]
    h = (root[:, None] * vt[:r]).reshape(r, o, kw).transpose(1, 0, 2)   # H[o, i, b]
    if moment is not None:
        p = np.einsum("ica,bd->cabid", v, np.eye(kw)).reshape(c * kh * kw, r * kw)
        hm = _weighted_lstsq(p, _regularized(moment, damping), patch_matrix(w))   # [(i,b), o]
        h = hm.reshape(r, kw, o).transpose(2, 0, 1)
    approx = np.einsum("ica,oib->ocab", v, h)
    return ConvFactors(SPATIAL, (r,), (v[..., None], h[:, :, None, :]), patch_matrix(approx),
                       r * (c * kh + o * kw), spatial_macs(w.shape, r, strides))


def spatial_macs(shape: tuple[int, ...], r: int, strides: tuple[int, int]) -> int:
    """MACs per output pixel of the spatial pair at rank r (see the module docstring)."""
    o, c, kh, kw = shape
    return r * c * kh * strides[1] + o * r * kw


def tucker_macs(shape: tuple[int, ...], r1: int, r2: int, strides: tuple[int, int]) -> int:
    """MACs per output pixel of the Tucker chain at ranks r1, r2."""
    o, c, kh, kw = shape
    return r1 * c * strides[0] * strides[1] + r2 * r1 * kh * kw + o * r2


def mode_svds(w: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(U, σ) of W unfolded along its output channels and along its input channels (HOSVD)."""
    w = np.asarray(w, np.float64)
    u_out, s_out, _ = np.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    u_in, s_in, _ = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(w.shape[1], -1), full_matrices=False)
    return (u_out, s_out), (u_in, s_in)


def tucker(w: np.ndarray, r1: int, r2: int, modes: tuple | None = None, moment: np.ndarray | None = None,
           damping: float = 0.01, strides: tuple[int, int] = (1, 1)) -> ConvFactors:
    """The Tucker-2 factorization at input rank ``r1`` and output rank ``r2`` (with ``moment``: the core refitted
    on the data)."""
    w = np.asarray(w, np.float64)
    o, c, kh, kw = w.shape
    (u_out, _), (u_in, _) = modes if modes is not None else mode_svds(w)
    r1, r2 = min(r1, u_in.shape[1]), min(r2, u_out.shape[1])
    a_in, a_out = u_in[:, :r1], u_out[:, :r2]
    if moment is None:
        core = np.einsum("ocab,ot,cs->tsab", w, a_out, a_in)
    else:
        a = np.einsum("cs,ad,be->cabsde", a_in, np.eye(kh), np.eye(kw)).reshape(c * kh * kw, r1 * kh * kw)
        gm = _weighted_lstsq(a, _regularized(moment, damping), patch_matrix(w) @ a_out)   # [(s,a,b), t]
        core = gm.reshape(r1, kh, kw, r2).transpose(3, 0, 1, 2)
    approx = np.einsum("tsab,ot,cs->ocab", core, a_out, a_in)
    kernels = (a_in.T[:, :, None, None], core, a_out[:, :, None, None])
    params = c * r1 + r1 * r2 * kh * kw + r2 * o
    return ConvFactors(TUCKER, (r1, r2), kernels, patch_matrix(approx), params, tucker_macs(w.shape, r1, r2, strides))


def error_of(w: np.ndarray, f: ConvFactors, moment: np.ndarray | None) -> float:
    """The factorization's relative output error on the data (``moment``), else its relative weight error."""
    wm = patch_matrix(w)
    if moment is not None:
        return relative_output_error(wm, f.approx, moment)
    norm = float(np.linalg.norm(wm))
    return float(np.linalg.norm(wm - f.approx)) / norm if norm > 0 else 0.0


def tucker_ranks(c_in: int, c_out: int, steps: int = 32) -> list[tuple[int, int]]:
    """Tucker's rank ladder: both ranks the same fraction of their channels, ``steps`` fractions, cheapest first."""
    out: list[tuple[int, int]] = []
    for i in range(1, steps + 1):
        pair = (max(1, math.ceil(i * c_in / steps)), max(1, math.ceil(i * c_out / steps)))
        if pair not in out:
            out.append(pair)
    return out
