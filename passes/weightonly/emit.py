"""The nodes that compute x·W from a quantized weight, for ``sites.replace``:
  * ``nbits``: com.microsoft.MatMulNBits(x, B, scales[, zero_points]) with K, N, bits, block_size, accuracy_level
    (symmetric weights carry no zero points: the kernel's implied one is 2^(bits−1));
  * ``qdq``: DequantizeLinear(q, scale[, zero_point]; axis 0, block_size B) → MatMul (opset 21: int4/uint4 and
    blocked scales), which onnxruntime fuses into MatMulNBits at its default optimization level;
  * ``dynamic``: DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp) → Cast → Mul(x_scale·w_scale) (per
    output column), the standard ops onnxruntime fuses into its DynamicQuantizeMatMul kernel (measured equal to
    emitting com.microsoft.DynamicQuantizeMatMul directly, docs/quantize-dynamic.md; the standard form is portable).
    Its int8 weight (``dynamic_weight``): symmetric, one scale per output column or one per tensor. The kernel pays
    0.5-2 µs per call for per-column scales (MNIST MLP at 1 row: 21.4 vs 18.9 µs, equal at 64 rows; Zen 4), so
    ``auto`` takes one scale per tensor unless its rounding error ‖W − Ŵ‖ exceeds ``MAX_PER_TENSOR_ERROR`` of ‖W‖
    (``quantization.weights.per_tensor_weights``, the rule quantize's per-channel=auto uses too).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import MS_DOMAIN
from graphopt.passes.base import constant
from graphopt.passes.lowrank.sites import unique_name
from graphopt.passes.quantization.weights import (MAX_PER_TENSOR_ERROR, nearest_weights, per_tensor_weights,
                                                  weight_qparams)

from .blockwise import BlockQuant
from .sites import WeightSite



def nbits_nodes(graph: gs.Graph, site: WeightSite, bq: BlockQuant, accuracy_level: int, y: gs.Variable,
                shared: dict[tuple, list[gs.Constant]]) -> list[gs.Node]:
    name = site.source.name
    if site.key not in shared:
        consts = [constant(unique_name(graph, f"{name}_q{bq.bits}"), bq.nbits_blob()),
                  constant(unique_name(graph, f"{name}_scales"), bq.scale.astype(np.float32))]
        if bq.dtype.startswith("uint"):
            consts.append(constant(unique_name(graph, f"{name}_zero_points"), bq.nbits_zero_points()))
        shared[site.key] = consts
    k, n = bq.k, bq.q.shape[0]
    return [gs.Node("MatMulNBits", name=unique_name(graph, f"{site.node.name or name}_nbits"), domain=MS_DOMAIN,
                    attrs={"K": k, "N": n, "bits": bq.bits, "block_size": bq.block, "accuracy_level": accuracy_level},
                    inputs=[site.x, *shared[site.key]], outputs=[y])]


def qdq_nodes(graph: gs.Graph, site: WeightSite, bq: BlockQuant, y: gs.Variable,
              shared: dict[tuple, list[gs.Tensor]]) -> list[gs.Node]:
    name = site.source.name
    nodes: list[gs.Node] = []
    if site.key not in shared:
        q, scale, zp = bq.qdq_weight()
        inputs = [constant(unique_name(graph, f"{name}_q{bq.bits}"), q),
                  constant(unique_name(graph, f"{name}_scales"), scale.astype(np.float32))]
        if bq.dtype.startswith("uint"):
            inputs.append(constant(unique_name(graph, f"{name}_zero_points"), zp))
        w = gs.Variable(unique_name(graph, f"{name}_dequantized"), dtype=np.float32)
        nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{name}_dq"), inputs=inputs, outputs=[w],
                             attrs={"axis": 0, "block_size": bq.block}))
        shared[site.key] = [w]
    nodes.append(gs.Node("MatMul", name=unique_name(graph, site.node.name or f"{name}_matmul"),
                         inputs=[site.x, shared[site.key][0]], outputs=[y]))
    return nodes


def dynamic_nodes(graph: gs.Graph, site: WeightSite, q: np.ndarray, scale: np.ndarray, y: gs.Variable,
                  shared: dict[tuple, list[gs.Tensor]], quantized_x: dict[str, list[gs.Variable]]) -> list[gs.Node]:
    """x·W with W ≈ q·scale (int8 symmetric, ``scale`` per output column [N]); one DynamicQuantizeLinear per
    activation tensor, shared by every site that reads it."""
    name, base = site.source.name, y.name      # new tensors are named for the output, new constants for the weight
    nodes: list[gs.Node] = []
    if site.x.name not in quantized_x:
        xq = [gs.Variable(unique_name(graph, f"{site.x.name}_{s}"), dtype=t)
              for s, t in (("quantized", np.uint8), ("scale", np.float32), ("zero_point", np.uint8))]
        nodes.append(gs.Node("DynamicQuantizeLinear", name=unique_name(graph, f"{site.x.name}_dynamic_quantize"),
                             inputs=[site.x], outputs=xq))
        quantized_x[site.x.name] = xq
    xq, xs, xz = quantized_x[site.x.name]
    if site.key not in shared:
        shared[site.key] = [constant(unique_name(graph, f"{name}_int8"), q.astype(np.int8)),
                        constant(unique_name(graph, f"{name}_weight_scale"), scale.astype(np.float32))]
    wq, ws = shared[site.key]
    acc, acc_f, sc = (gs.Variable(unique_name(graph, f"{base}_{s}"), dtype=t)
                      for s, t in (("int32", np.int32), ("float", np.float32), ("rescale", np.float32)))
    nodes += [gs.Node("MatMulInteger", name=unique_name(graph, f"{base}_integer"), inputs=[xq, wq, xz],
                      outputs=[acc]),
              gs.Node("Cast", name=unique_name(graph, f"{base}_cast"), attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
              gs.Node("Mul", name=unique_name(graph, f"{base}_scales"), inputs=[xs, ws], outputs=[sc]),
              gs.Node("Mul", name=unique_name(graph, f"{base}_apply_scale"), inputs=[acc_f, sc], outputs=[y])]
    return nodes


def dynamic_weight(w: np.ndarray, per_channel: str, reduce: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [K, N], scale [N] or a scalar) for ``dynamic_nodes``; ``per_channel`` "true", "false" or "auto" (module
    docstring)."""
    def make(per_col: bool) -> tuple[np.ndarray, np.ndarray]:
        scale, zp, axis = weight_qparams(w, 1, per_col, reduce)
        return nearest_weights(w, scale, zp, axis), np.asarray(scale, np.float32)

    if per_channel == "auto":
        q, scale, error = per_tensor_weights(w, reduce)      # rounded once: kept unless it errs too much
        if error <= MAX_PER_TENSOR_ERROR:
            return q, np.asarray(scale, np.float32)
    return make(per_channel != "false")
