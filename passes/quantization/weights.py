"""The quantize pass's weights and biases, as arrays: int8 weights, int32 biases, and the corrections of the bias.

  * weights: int8 symmetric [-127, 127] ([-63, 63] with ``reduce-range``), per output channel on the unit's weight
    axis (or per tensor below opset 13), scale s_w = absmax / 127; rounded to nearest, or by GPTQ
    (``calibration.gptq``: each weight's rounding error moved onto the weights not yet rounded, given the second
    moments H = Σ x xᵀ of the layer's inputs; the scales are the same either way). One scale per tensor is close
    enough where its rounding error ‖W − Ŵ‖ / ‖W‖ is at most MAX_PER_TENSOR_ERROR (``per_tensor_error``; int8 per
    tensor errs ~0.5-2% on the MNIST and decoder weights, 5-40% on 8 of MiniLM's 36 whose columns differ by 10x and
    more; ~1% per column): onnxruntime's integer Gemm/MatMul kernels pay ~2 µs per call for per-column scales;
  * bias: int32, scale s_x·s_w, zero point 0. A channel whose weights are near zero but whose bias is not would need
    a bias beyond int32 at that scale: its weight scale is raised until |b| / (s_x·s_w) fits INT32_BIAS_LIMIT (its
    weights, ~0, stay ~0);
  * bias correction (``calibration.bias_correction``): the rounding ΔW = Ŵ − W moves each output's mean by
    ΔW·E[x] (E[x]: the unit's mean input patch); the bias absorbs it, b' = b − ΔW·E[x] (a Conv or Gemm without a
    bias gets one where that is not zero at the bias's scale). After the build, the full mean correction's steps
    (``refit_biases``: each int8 layer's output mean matched to float's, layer by layer) are subtracted from the
    int32 biases (``with_bias_steps``).
"""

from __future__ import annotations

import numpy as np
import onnx
from graphopt.calibration.bias_correction import rounding_offset
from graphopt.calibration.gptq import HessianObserver, gptq_round
from graphopt.calibration.qparams import qparams, qrange, quantize
from onnx import numpy_helper

INT32_BIAS_LIMIT = 2.0**30  # headroom below 2**31 for the accumulator the bias is added to
MAX_PER_TENSOR_ERROR = 0.03  # relative rounding error up to which one weight scale per tensor is taken


def weight_qparams(values: np.ndarray, axis: int, per_channel: bool, reduce_range: bool
                   ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(scale, zero point, axis of the DequantizeLinear or None per tensor) of int8 symmetric weights."""
    if per_channel:
        red = tuple(i for i in range(values.ndim) if i != axis)
        absmax = np.abs(values).max(axis=red)
        dq_axis: int | None = axis
    else:
        absmax = np.array(np.abs(values).max())
        dq_axis = None
    w_scale, w_zp = qparams(-absmax, absmax, "int8", symmetric=True, reduce_range=reduce_range)
    return w_scale, w_zp, dq_axis


def per_tensor_weights(values: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(q, scale, ‖W − Ŵ‖ / ‖W‖) of ``values`` rounded to int8 symmetric with one scale per tensor."""
    scale, zp, _ = weight_qparams(values, 0, False, reduce_range)
    q = nearest_weights(values, scale, zp, None)
    error = float(np.linalg.norm(q * np.float32(scale) - values)) / max(float(np.linalg.norm(values)), 1e-30)
    return q, scale, error


def per_tensor_error(values: np.ndarray, reduce_range: bool) -> float:
    """‖W − Ŵ‖ / ‖W‖ of ``values`` rounded to int8 symmetric with one scale per tensor (``per_tensor_weights``)."""
    return per_tensor_weights(values, reduce_range)[2]


def fit_bias(w_scale: np.ndarray, b: np.ndarray, x_scale: np.ndarray, dq_axis: int | None) -> np.ndarray:
    """The weight scale raised where the bias ``b`` would not fit INT32_BIAS_LIMIT at scale s_x·s_w."""
    need = np.abs(b) / (float(x_scale) * INT32_BIAS_LIMIT)
    need = need if dq_axis is not None else np.array(need.max())
    return np.asarray(np.maximum(w_scale, need), np.float32)    # per tensor: 0-d (np.maximum returns a scalar)


def nearest_weights(values: np.ndarray, w_scale: np.ndarray, w_zp: np.ndarray, dq_axis: int | None) -> np.ndarray:
    return quantize(values, w_scale, w_zp, "int8", axis=dq_axis)


def gptq_weights(values: np.ndarray, axis: int, scale: np.ndarray, hessian: HessianObserver,
                 reduce_range: bool) -> np.ndarray:
    """int8 weights of ``values`` (Conv [O, C/g, *k] with axis 0; Gemm/MatMul [K, O] with axis 1 or [O, K] with
    axis 0) rounded by GPTQ with per-row ``scale``, in the weight's own layout."""
    assert hessian.h is not None
    groups = hessian.h.shape[0]
    rows = values if axis == 0 else values.T                         # [O, D·groups]
    w = rows.reshape(groups, rows.shape[0] // groups, -1)
    qmin, qmax = qrange("int8", symmetric=True, reduce_range=reduce_range)
    q = gptq_round(w, scale.reshape(groups, -1), hessian.h, qmin, qmax).reshape(rows.shape)
    return (q if axis == 0 else q.T).astype(np.int8)


def bias_scale(x_scale: np.ndarray, w_scale: np.ndarray, n_out: int) -> np.ndarray:
    """s_x·s_w per output channel (1 where that is 0)."""
    b_scale = (np.float32(x_scale) * np.broadcast_to(w_scale, (n_out,))).astype(np.float32)
    return np.where(b_scale > 0, b_scale, np.float32(1.0)).astype(np.float32)


def rounding_correction(values: np.ndarray, qw: np.ndarray, w_scale: np.ndarray, axis: int, dq_axis: int | None,
                        mean: np.ndarray, group: int) -> np.ndarray:
    """ΔW·E[x] per output channel: the mean output error of rounding ``values`` to ``qw``·s_w, given the mean
    input patch ``mean``."""
    shape = [1] * values.ndim
    if dq_axis is not None:
        shape[dq_axis] = -1
    delta = qw.astype(np.float64) * np.asarray(w_scale, np.float64).reshape(shape) - values
    rows = delta if axis == 0 else delta.T                         # [O, C/g · taps] or [O, K]
    return rounding_offset(rows, mean, group)


def quantize_bias(b: np.ndarray, b_scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(b / b_scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)


def with_bias_steps(model: onnx.ModelProto, steps: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with ``steps`` (int, per channel) subtracted from the int32 bias initializers they name."""
    for t in model.graph.initializer:
        if t.name in steps and steps[t.name].any():
            b = numpy_helper.to_array(t).astype(np.int64) - steps[t.name]
            t.CopyFrom(numpy_helper.from_array(np.clip(b, -(2**31), 2**31 - 1).astype(np.int32), t.name))
    return model
