"""Which weights prune-weights zeroes (the masks) and the least-squares refit of the weights it keeps.

Scores: |w| (magnitude pruning, Han et al. 2015); with the layer's input second moments H = Σ x xᵀ (n input
vectors), |w_j|·√(H_jj / n), the weight times the RMS of the input it multiplies: its typical contribution to the
output (Wanda, Sun et al. 2023). Masks zero exactly ``round(s·n)`` weights of lowest score (ties broken by
position, so a run is reproducible): per layer (``scope=layer``), or over all layers' weights together
(``scope=global``: every layer gives up what scores below one common threshold); ``2:4`` zeroes the 2 lowest of
every 4 consecutive input channels at each kernel tap (what sparse tensor cores accelerate; needs the channels per
group to be a multiple of 4).

Refit (OBS / SparseGPT one-shot, exact per row): the kept weights S of a row w minimise the output error on the
calibration inputs, ‖X(w' − w)‖² = (w' − w)ᵀH(w' − w) with w'_P = 0 on the pruned P; setting the gradient on S to
zero gives H_SS w'_S = H_SS w_S + H_SP w_P, i.e. w'_S = w_S + H_SS⁻¹ H_SP w_P. H is damped (GPTQ's 1% of its mean
diagonal, ``calibration.gptq.DAMPING``) so directions the data never excites keep their weights. Rows are solved in
batches of padded systems (pads: identity rows, zero right-hand side). A row already zero on P gets w'_S = w_S:
refitting a refitted layer changes nothing.
"""

from __future__ import annotations

import numpy as np

from graphopt.calibration.gptq import DAMPING

CHUNK_BYTES = 64 << 20


def scores(rows: np.ndarray, h: np.ndarray | None) -> np.ndarray:
    """Per-weight scores of rows [G, O, D] given the mean second moment H/n [G, D, D] (module docstring)."""
    if h is None:
        return np.abs(rows)
    diag = np.diagonal(h, axis1=1, axis2=2)                        # [G, D]
    return np.abs(rows) * np.sqrt(np.maximum(diag, 0.0))[:, None, :]


def lowest(score: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask (True: pruned) of the ``count`` lowest entries of ``score`` (ties by position)."""
    flat = score.ravel()
    mask = np.zeros(flat.size, bool)
    if count > 0:
        mask[np.argsort(flat, kind="stable")[:count]] = True
    return mask.reshape(score.shape)


def global_masks(all_scores: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Masks of several layers pruned together: the round(s·N) lowest scores of all N weights."""
    sizes = [s.size for s in all_scores]
    joint = lowest(np.concatenate([s.ravel() for s in all_scores]), round(sparsity * sum(sizes)))
    return [m.reshape(s.shape) for m, s in zip(np.split(joint, np.cumsum(sizes)[:-1]), all_scores)]


def two_four_mask(score: np.ndarray, taps: int) -> np.ndarray:
    """2:4 mask of rows [G, O, D] whose D is (channels × taps), channels a multiple of 4: the 2 lowest of every
    4 consecutive channels at each tap."""
    g, o, d = score.shape
    quads = score.reshape(g, o, d // (4 * taps), 4, taps)
    order = np.argsort(quads, axis=3, kind="stable")
    mask = np.zeros(quads.shape, bool)
    np.put_along_axis(mask, order[:, :, :, :2, :], True, axis=3)
    return mask.reshape(score.shape)


def refit(rows: np.ndarray, mask: np.ndarray, h: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """Rows [G, O, D] with the pruned entries (``mask``) zero and the kept ones refitted (module docstring)."""
    out = np.where(mask, 0.0, rows)
    for g in range(rows.shape[0]):
        hg = np.array(h[g], np.float64)
        diag = np.diagonal(hg).copy()
        idx = np.arange(len(diag))
        hg[idx, idx] = np.where(diag > 0, diag, 1.0) + damping * diag.mean()
        out[g] = _refit_rows(rows[g], mask[g], hg)
    return out


def _refit_rows(w: np.ndarray, pruned: np.ndarray, h: np.ndarray) -> np.ndarray:
    """w'_S = w_S + H_SS⁻¹ (H w_P)_S for each row of w [O, D] (its pruned entries ``pruned``), batched."""
    out = np.where(pruned, 0.0, w)
    kept = ~pruned
    counts = kept.sum(axis=1)
    m = int(counts.max(initial=0))
    if m == 0 or not pruned.any():
        return out
    pull = (np.where(pruned, w, 0.0) @ h)                              # (H w_P) for every row, [O, D]
    step = max(1, CHUNK_BYTES // (8 * m * m))
    for lo in range(0, w.shape[0], step):
        rows = np.arange(lo, min(lo + step, w.shape[0]))
        rows = rows[(counts[rows] > 0) & pruned[rows].any(axis=1)]
        if rows.size == 0:
            continue
        # indices of each row's kept entries, padded to m with index 0 (masked out below)
        order = np.argsort(~kept[rows], axis=1, kind="stable")[:, :m]
        valid = np.arange(m)[None, :] < counts[rows][:, None]
        a = h[order[:, :, None], order[:, None, :]]
        both = valid[:, :, None] & valid[:, None, :]
        a = np.where(both, a, np.eye(m)[None])
        rhs = np.where(valid, np.take_along_axis(pull[rows], order, axis=1), 0.0)
        delta = np.linalg.solve(a, rhs[:, :, None])[:, :, 0]
        upd = out[rows]
        np.put_along_axis(upd, order, np.take_along_axis(upd, order, axis=1) + np.where(valid, delta, 0.0), axis=1)
        out[rows] = upd
    return out


def output_error(rows: np.ndarray, new: np.ndarray, h: np.ndarray) -> float:
    """Relative output error ‖X(w' − w)‖ / ‖X w‖ over all rows, from H."""
    d = new - rows
    num = float(np.sum((d @ h) * d))           # Σ_rows dᵀ H d, through BLAS (an einsum of three ran 2 s a layer)
    den = float(np.sum((rows @ h) * rows))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0
