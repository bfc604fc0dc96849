"""AWQ (activation-aware weight quantization, Lin et al. 2023): scale each input channel of a weight before
rounding it, by how large that channel's activations are, and divide the activations by the same scale at run time.

x·W = (x / s)·(diag(s)·W): multiplying row k of W by s_k > 1 gives the salient rows (those meeting large inputs) a
finer share of their block's levels, and the quantization error of the scaled row is divided by s_k again at run
time. With a_k the RMS of input channel k on the calibration data (√(H_kk / rows), H = Σ x xᵀ), AWQ's search space is
s = a^α (normalised to geometric mean 1 over its extremes), α on a grid in [0, 1]; the α kept minimises the output
error tr(ΔWᵀ H ΔW) summed over every weight that reads the same input (Q, K and V share one scale and one division).
α = 0 is s = 1, round to nearest itself: the search never ends worse than RTN on the calibration data.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .blockwise import BlockQuant, output_error

GRID = 20     # α in 0, 1/20, ..., 1 (AWQ's own grid)


def channel_scale(h: np.ndarray, rows: int, alpha: float) -> np.ndarray:
    """s = a^α normalised, a the channels' RMS (channels never active get scale 1)."""
    a = np.sqrt(np.maximum(np.diag(h), 0.0) / max(rows, 1))
    live = a > 0
    if alpha == 0 or not live.any():
        return np.ones(len(a))
    s = np.ones(len(a))
    s[live] = a[live] ** alpha
    s[live] /= np.sqrt(s[live].max() * s[live].min())
    return s


def search(weights: Sequence[np.ndarray], h: np.ndarray, rows: int,
           quantize: Callable[[np.ndarray], BlockQuant]) -> tuple[float, np.ndarray, list[BlockQuant], float, float]:
    """(α, s, the weights' quantized diag(s)·W, error at α, error of RTN) for the weights sharing input H."""
    best: tuple[float, np.ndarray, list[BlockQuant], float] | None = None
    rtn_error = 0.0
    for i in range(GRID + 1):
        alpha = i / GRID
        s = channel_scale(h, rows, alpha)
        quants = [quantize(w * s[:, None].astype(np.float32)) for w in weights]
        err = sum(output_error(w, q.dequantize() / s[:, None], h) for w, q in zip(weights, quants))
        if i == 0:
            rtn_error = err
        if best is None or err < best[3]:
            best = (alpha, s, quants, err)
    assert best is not None
    return (*best, rtn_error)
