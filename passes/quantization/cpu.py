"""The CPU probe behind ``reduce-range=auto``: whether this CPU's onnxruntime u8·s8 integer kernel saturates.

x86 without VNNI multiplies with vpmaddubsw, which sums each adjacent pair of u8·s8 products in int16:
255·127·2 = 64770 clamps to 32767, so the kernel is not the integer product the QDQ graph describes. With 7-bit
weights (|w| <= 63) a pair is at most 255·63·2 = 32130 and always exact. VNNI (vpdpbusd) and other CPUs add in
int32. The probe runs the kernel itself (a 1x64 by 64x1 QDQ MatMul of 255s and 127s), so it holds whatever the CPU
flags or the onnxruntime build.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.runtime import make_session


@functools.lru_cache(maxsize=1)
def int8_kernel_saturates() -> bool:
    """Whether this CPU's onnxruntime u8·s8 integer kernel saturates (module docstring): the probe's output is not
    255·127·64."""
    k = 64
    inits = [numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"), numpy_helper.from_array(np.array(0, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "saturation_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = make_session(model, "saturation probe").run(None, {"x": np.full((1, k), 255, np.float32)})[0]
    return float(y.ravel()[0]) != 255.0 * 127 * k


def reduce_range_auto() -> bool:
    """7-bit weights exactly where the CPU's u8·s8 kernel saturates (``int8_kernel_saturates``)."""
    return int8_kernel_saturates()
