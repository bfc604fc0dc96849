"""fold-constants: fires, exact in onnxruntime (optimizations off), declines, idempotent, checker-valid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphs import conv_model
from graphopt.passes.fold_constants import CONSTANTS_LOWERED, NODES_FOLDED


def run_plain(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def fold(model: onnx.ModelProto):
    return graphopt.optimize(model, ["fold-constants"], latency_runs=0)


def test_fires_and_is_exact():
    model = conv_model(constant_nodes=True)
    out, report = fold(model)
    assert ops(out) == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    counts = report.passes[0]["counts"]
    assert counts == {CONSTANTS_LOWERED: 2, NODES_FOLDED: 1}
    onnx.checker.check_model(out)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_plain(out, {"x": x})[0], run_plain(model, {"x": x})[0])
    assert report.validation is not None and report.validation.passed
    w2 = next(t for t in out.graph.initializer if t.name == "w2")
    assert numpy_helper.to_array(w2).shape == (4, 3, 3, 3)


def test_idempotent():
    once, _ = fold(conv_model())
    twice, report = fold(once)
    assert report.passes[0]["counts"] == {}
    assert not report.passes[0]["changed"]
    assert once.graph.SerializeToString() == twice.graph.SerializeToString()


def _graph(nodes, inputs, outputs, inits=()):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_declines_graph_output_random_and_growth():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "y", "big_sum")]
    outs[0] = helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])
    outs[1] = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    outs[2] = helper.make_tensor_value_info("big_sum", TensorProto.FLOAT, [1024, 1024, 4])
    nodes = [
        # a Constant that is a graph output stays a node
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32))),
        # random values must not be frozen
        helper.make_node("RandomUniform", [], ["r"], shape=[4], seed=1.0),
        helper.make_node("Add", ["x", "r"], ["y"]),
        # an Expand to 16 MiB from 16 bytes would grow the file
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1024, 1024, 4]))),
        helper.make_node("Constant", [], ["v"], value=numpy_helper.from_array(np.ones(4, dtype=np.float32))),
        helper.make_node("Expand", ["v", "shape"], ["big"]),
        helper.make_node("Add", ["big", "x"], ["big_sum"]),
    ]
    model = _graph(nodes, [x], outs)
    out, report = fold(model)
    assert sorted(ops(out)) == sorted(["Constant", "RandomUniform", "Add", "Expand", "Add"])
    reasons = " | ".join(d["reason"] for d in report.passes[0]["declined"])
    assert "graph output" in reasons
    assert "grow the model" in reasons
    onnx.checker.check_model(out)


def test_unknown_domain_not_folded():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    a = numpy_helper.from_array(np.ones((2, 3), np.float32), "a")
    nodes = [helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"), helper.make_node("Add", ["x", "g"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [a]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    out, _ = fold(m)
    assert ops(out) == ["Gelu", "Add"]


def test_initializer_that_is_graph_input_is_not_constant():
    """IR 3 models list initializers as inputs: they are defaults the caller may override, not constants."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    init = numpy_helper.from_array(np.ones(3, np.float32), "b")
    nodes = [helper.make_node("Neg", ["b"], ["nb"]), helper.make_node("Add", ["x", "nb"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x, b], [y], [init]), opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    out, _ = fold(m)
    assert ops(out) == ["Neg", "Add"]
    assert [i.name for i in out.graph.input] == ["x", "b"]
    feed = {"x": np.ones(3, np.float32), "b": np.full(3, 5, np.float32)}
    np.testing.assert_array_equal(run_plain(out, feed)[0], np.full(3, -4, np.float32))


def test_dead_nodes_and_initializers_removed():
    model = conv_model(constant_nodes=False)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1000, np.float32), "unused"))
    model.graph.node.append(helper.make_node("Relu", ["x"], ["dead"]))
    out, report = fold(model)
    assert "unused" not in {t.name for t in out.graph.initializer}
    assert "dead" not in {o for n in out.graph.node for o in n.output}
    assert report.after.parameters < report.before.parameters


def test_quantized_model_stays_quantized():
    """DequantizeLinear of an int8 weight has constant inputs, but folding it would undo the quantization."""
    w = numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(3, 4), "w_q")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    out, report = fold(_graph(nodes, [x], [y], [w, s]))
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    assert {t.name for t in out.graph.initializer} == {"w_q", "w_scale"}
