"""fold-constants: fires, exact in onnxruntime (optimizations off), declines, idempotent, checker-valid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphs import assert_same_outputs, conv_model, declined, parse_model, run_passes, same_graph
from graphopt.passes.fold_constants import CONSTANTS_LOWERED, NODES_FOLDED
from graphopt.passes.inline_if import IF_INLINED


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


# ------------------------------------------------------------------------------------- If with a constant condition
def _if_model(cond: bool, **extra: np.ndarray) -> onnx.ModelProto:
    """y, z = If(c): then computes from the outer x with a Constant node and a branch initializer (an outer-scope
    reference, a weight inside the branch, an output the branch does not compute); w = If(b) on a graph input."""
    return parse_model("""
    agraph (float[2] x, bool b) => (float[2] y, float[2] z, float[2] w) {
        y, z = If (c) <then_branch = g1 () => (float[2] t1, float[2] k) <float[2] k = {1.0, 2.0}> {
                           s = Constant <value = float[2] {3.0, 4.0}> ()
                           t1 = Mul(x, s) },
                       else_branch = g2 () => (float[2] e1, float[2] e2) { e1 = Add(x, x)  e2 = Sub(x, x) }>
        w = If (b) <then_branch = g3 () => (float[2] n) { n = Neg(y) },
                    else_branch = g4 () => (float[2] u) { u = Abs(y) }>
    }
    """, c=np.array(cond), **extra)


FEED = {"x": np.array([1.5, -2.0], np.float32), "b": np.array(True)}


@pytest.mark.parametrize("cond, expect", [(True, ["Mul", "Identity", "If"]), (False, ["Add", "Sub", "If"])])
def test_constant_if_is_inlined(cond, expect):
    model = _if_model(cond)
    out, records = run_passes(model, ["fold-constants"])
    assert ops(out) == expect
    assert records[0].result.counts[IF_INLINED] == 1
    onnx.checker.check_model(out, full_check=True)
    for b in (True, False):
        assert_same_outputs(model, out, {**FEED, "b": np.array(b)}, rtol=0)
    # the If on a graph input stays, with its reason; a second run changes nothing
    assert any("If 'w'" in d and "computed at run time" in d for d in declined(records))
    again, records = run_passes(out, ["fold-constants"])
    assert not records[0].result.changed and same_graph(again, out)


def test_if_on_a_computed_condition_is_untouched():
    model = parse_model("""
    agraph (float[2] x) => (float[2] y) {
        p = ReduceSum <keepdims = 0> (x)
        b = Greater(p, zero)
        y = If (b) <then_branch = g1 () => (float[2] t) { t = Neg(x) },
                    else_branch = g2 () => (float[2] u) { u = Abs(x) }>
    }
    """, zero=np.array(0.0, np.float32))
    out, records = run_passes(model, ["fold-constants"])
    assert ops(out) == ["ReduceSum", "Greater", "If"] and not records[0].result.changed
    assert declined(records) == ["If 'y': its condition 'b' is computed at run time (a constant one is inlined: "
                                 "see --fix-input)"]


def test_nested_if_and_name_clash():
    """The outer If's then-branch holds an If on an outer constant (inlined in the same sweep) and an intermediate
    't' whose name the kept If's branch also defines (renamed); the inner branch reads 'a' of the outer branch,
    which reads 'x' of the graph."""
    model = parse_model("""
    agraph (float[2] x, bool b) => (float[2] y, float[2] w) {
        y = If (c) <then_branch = g1 () => (float[2] r) {
                        t = Relu(x)
                        r = If (c2) <then_branch = g2 () => (float[2] q) { q = Mul(t, t) },
                                     else_branch = g3 () => (float[2] q2) { q2 = Add(t, t) }> },
                    else_branch = g4 () => (float[2] e) { e = Neg(x) }>
        w = If (b) <then_branch = g5 () => (float[2] o) { t = Sigmoid(y)  o = Neg(t) },
                    else_branch = g6 () => (float[2] o2) { o2 = Abs(y) }>
    }
    """, c=np.array(True), c2=np.array(False))
    out, records = run_passes(model, ["fold-constants"])
    assert ops(out) == ["Relu", "Add", "If"]
    assert records[0].result.counts[IF_INLINED] == 2
    relu = out.graph.node[0]
    assert relu.output[0] == "t__inlined"      # 't' is the kept branch's name too
    onnx.checker.check_model(out, full_check=True)
    for b in (True, False):
        assert_same_outputs(model, out, {**FEED, "b": np.array(b)}, rtol=0)


def test_if_inside_a_loop_body_is_inlined_there():
    model = parse_model("""
    agraph (float[2] x, int64 n) => (float[2] y) {
        t = Constant <value = bool {1}> ()
        y = Loop (n, t, x) <body = body (int64 i, bool cin, float[2] acc) => (bool cout, float[2] nxt) {
            cout = Identity(cin)
            nxt = If (c) <then_branch = g1 () => (float[2] m) { m = Mul(acc, two) },
                          else_branch = g2 () => (float[2] a) { a = Add(acc, two) }> }>
    }
    """, c=np.array(True), two=np.array([2.0, 2.0], np.float32))
    out, records = run_passes(model, ["fold-constants"])
    body = next(a.g for a in out.graph.node[-1].attribute if a.name == "body")
    assert [n.op_type for n in body.node] == ["Identity", "Mul"]
    assert records[0].result.counts[IF_INLINED] == 1
    assert_same_outputs(model, out, {"x": FEED["x"], "n": np.array(3, np.int64)}, rtol=0)
