"""The one function that turns a range into (scale, zero_point); nothing else in graphopt computes a scale.

For an integer type (int8, uint8, int4, uint4, int32) with levels [qmin, qmax] (reduce-range drops one bit: 7-bit weights avoid the u8·s8 pair-sum
saturation of AVX2 without VNNI):
  * the range is first widened to contain 0, so that real 0 (padding, ReLU zeros) is exactly representable;
  * symmetric:  scale = max(|lo|, |hi|) / ((qmax - qmin) / 2),  zero_point = (qmin + qmax + 1) // 2
    (0 for int8 restricted to [-127, 127], 128 for uint8);
  * asymmetric: scale = (hi - lo) / (qmax - qmin),  zero_point = round(qmin - lo / scale) clipped to [qmin, qmax].
Then x ≈ (q - zero_point) · scale with q = clip(round(x / scale) + zero_point, qmin, qmax). A degenerate range
(all zeros) gets scale 1 so that dequantization stays exact for the zeros it holds.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# int4/uint4 (weight-only blockwise quantization) as ml_dtypes' numpy types, which onnx and onnx-graphsurgeon pack.
INT_TYPES = {"int8": (np.int8, -128, 127), "uint8": (np.uint8, 0, 255), "int32": (np.int32, -(2**31), 2**31 - 1),
             "int4": (ml_dtypes.int4, -8, 7), "uint4": (ml_dtypes.uint4, 0, 15)}


def qrange(dtype: str, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """[qmin, qmax] used for ``dtype``: int8 (int4) symmetric is restricted to [-127, 127] ([-7, 7]); reduce-range
    halves it."""
    _, qmin, qmax = INT_TYPES[dtype]
    if dtype in ("int8", "int4") and symmetric:
        qmin = -qmax
    if reduce_range:
        if dtype == "int8":
            qmin, qmax = (-63, 63) if symmetric else (-64, 63)
        else:
            qmin, qmax = 0, 127
    return qmin, qmax


def qparams(lo: np.ndarray | float, hi: np.ndarray | float, dtype: str = "uint8", symmetric: bool = False,
            reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``dtype``) for ranges [lo, hi]; works per tensor or per channel."""
    np_type, _, _ = INT_TYPES[dtype]
    qmin, qmax = qrange(dtype, symmetric, reduce_range)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(-lo, hi)
        scale = absmax / ((qmax - qmin) / 2.0)
        zp = np.full(np.shape(scale), (qmin + qmax + 1) // 2, dtype=np.int64)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax).astype(np.int64)
    scale = np.where(scale > np.finfo(np.float32).tiny, scale, 1.0).astype(np.float32)
    return scale, zp.astype(np_type)


def _along(scale: np.ndarray, zero_point: np.ndarray, ndim: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64), shaped to broadcast along ``axis`` of an ``ndim``-d tensor when
    they are per channel."""
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point).astype(np.int64)
    if axis is not None and s.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str, axis: int | None = None
             ) -> np.ndarray:
    """QuantizeLinear in numpy (round half to even, as onnxruntime), per tensor or along ``axis``."""
    np_type, qmin, qmax = INT_TYPES[dtype]
    s, z = _along(scale, zero_point, x.ndim, axis)
    q = np.rint(np.asarray(x, dtype=np.float32) / s) + z
    return np.clip(q, qmin, qmax).astype(np_type)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    s, z = _along(scale, zero_point, q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)
