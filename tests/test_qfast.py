"""The quantize fallback's switchable model on constant weights (issue 24, the pass's own time): each weighted op
sits in If(switch) with its weights as the branches' own initializers, which onnxruntime prepacks, and the
fake-quantized weights are the values DequantizeLinear gives, to the bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt.graph import import_graph, infer_shapes
from graphopt.passes.quantization.build import Builder
from graphopt.passes.quantization.switch import dequantized
from graphopt.passes.quantization.plan import candidate_tensors, make_plan
from onnx import TensorProto, helper, numpy_helper

from graphs import calib, conv_net, run


def switchable_builder(per_channel: bool = True) -> tuple[onnx.ModelProto, Builder]:
    model = conv_net()
    graph = import_graph(model)
    infer_shapes(graph, model)
    plan = make_plan(graph, ())
    builder = Builder(graph, plan, {t: (-4.0, 4.0) for t in candidate_tensors(plan)}, model, per_channel=per_channel,
                      reduce_range=False, activations="uint8")
    return model, builder


def test_switchable_weighted_ops_read_constant_weights_in_both_branches() -> None:
    model, builder = switchable_builder()
    sw = builder.build(switchable=True).model
    weighted = {n.op_type for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert weighted and not weighted & {n.op_type for n in sw.graph.node}     # every one moved into an If
    ifs = [n for n in sw.graph.node if n.op_type == "If"
           and any(x.op_type in weighted for x in helper.get_attribute_value(n.attribute[0]).node)]
    assert ifs
    for n in ifs:
        for attr in n.attribute:
            branch = helper.get_attribute_value(attr)
            own = {t.name for t in branch.initializer}
            (op,) = [x for x in branch.node if x.op_type in weighted]
            assert all(name in own for name in op.input[1:] if name)   # weights and bias: constants
    # no DequantizeLinear computes a weight any more (only activations pass through QDQ)
    inits = {t.name for t in sw.graph.initializer}
    for n in sw.graph.node:
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for x in helper.get_attribute_value(attr).node:
                    assert x.op_type != "DequantizeLinear" or x.input[0] not in inits
    assert builder.build(switchable=True).model.SerializeToString() == sw.SerializeToString()   # reproducible


@pytest.mark.parametrize("dtype, axis", [(np.int8, 0), (np.int8, None), (np.int32, 0), (np.uint8, 1)])
def test_dequantized_equals_onnxruntime_dequantize_linear_to_the_bit(dtype: type, axis: int | None) -> None:
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    q = rng.integers(max(info.min, -(2**30)), min(info.max, 2**30), size=(5, 4, 3), endpoint=True).astype(dtype)
    n = q.shape[axis] if axis is not None else 1
    scale = (rng.random(n) * 1e-2 + 1e-5).astype(np.float32)
    zp = (np.zeros(n) if dtype == np.int32 else rng.integers(-3, 4, n) + (128 if dtype == np.uint8 else 0)
          ).astype(dtype)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **({"axis": axis} if axis is not None else {}))
    graph = helper.make_graph([node], "dq", [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(
        np.dtype(dtype)), list(q.shape))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(q.shape))],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (ref,) = run(model, {"q": q})
    assert np.array_equal(dequantized(q, scale, zp, axis), ref)



def test_switchable_per_tensor_weights_all_on_match_the_real_build_unfused() -> None:
    _, builder = switchable_builder(per_channel=False)
    sw = builder.build(switchable=True)
    on = {name: np.array(True) for name in sw.switches.values()}
    feed = calib(8)[0]
    for a, b in zip(run(sw.model, {**feed, **on}), run(builder.build().model, feed)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)
