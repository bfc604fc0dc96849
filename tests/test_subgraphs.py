"""The weight passes descend into If branches and Loop bodies that stay dynamic (passes/subgraphs.py): fold-constants,
fold-bn, quantize-dynamic and quantize-weights rewrite the weights there (an outer-scope weight read inside a body,
a Constant node of a branch); quantize says per subgraph why it stays float. Each: it fires (golden op lists in the
bodies), onnxruntime computes the same (exact passes) or within a stated bound (lossy), it declines a weight two
branches share, a second run changes nothing, names stay unique across scopes, onnx.checker (full) passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.calibration.readers import IterableSource, model_inputs
from graphopt.passes.base import PassContext
from graphopt.passes.quantization.branches import NO_DATA
from graphopt.passes.subgraphs import unique_names
from graphopt.pipeline import make_spec, run_pipeline
from graphs import (assert_same_outputs, declined, if_matmul_model, loop_lstm_model, rand, run_passes,
                    same_graph)

IF_FEEDS = [{"x": rand(3, 8, seed=7), "b": np.array(b)} for b in (True, False)]
LOOP_FEEDS = [{"h0": rand(1, 1, 8, seed=8), "n": np.array(3, np.int64)}]


def body(model: onnx.ModelProto, attr: str) -> onnx.GraphProto:
    """The subgraph ``attr`` (then_branch, else_branch, body) of the model's one If or Loop."""
    return next(a.g for n in model.graph.node for a in n.attribute if a.name == attr)


def body_ops(model: onnx.ModelProto, attr: str) -> list[str]:
    return [n.op_type for n in body(model, attr).node]


def check(model: onnx.ModelProto, out: onnx.ModelProto, feeds: list[dict], rtol: float) -> None:
    onnx.checker.check_model(out, full_check=True)
    for f in feeds:
        assert_same_outputs(model, out, f, rtol=rtol)


def rerun_is_noop(out: onnx.ModelProto, passes: list) -> None:
    again, records = run_passes(out, passes)
    assert not any(r.result.changed for r in records) and same_graph(again, out)


def test_fold_constants_in_a_branch_and_a_loop_body():
    model = if_matmul_model()
    out, records = run_passes(model, ["fold-constants"])
    assert body_ops(out, "else_branch") == ["MatMul"]        # Constant lowered, its Transpose folded: a weight
    assert [t.dims for t in body(out, "else_branch").initializer] == [[8, 4]]
    assert records[0].result.counts == {"Constant nodes lowered": 1, "nodes folded": 1}
    # the folded weight is bit-identical; onnxruntime's MatMul on a constant weight (prepacked) sums in another
    # order than on a computed one, hence not rtol=0
    assert np.array_equal(onnx.numpy_helper.to_array(body(out, "else_branch").initializer[0]),
                          onnx.numpy_helper.to_array(body(model, "else_branch").node[0].attribute[0].t).T)
    check(model, out, IF_FEEDS, rtol=1e-6)
    rerun_is_noop(out, ["fold-constants"])
    loop = loop_lstm_model()
    out, _ = run_passes(loop, ["fold-constants"])            # the loop-invariant Transpose of an outer weight
    assert body_ops(out, "body") == ["Identity", "MatMul", "LSTM", "Squeeze"]
    check(loop, out, LOOP_FEEDS, rtol=1e-6)
    rerun_is_noop(out, ["fold-constants"])


@pytest.mark.parametrize("shared", [False, True])
def test_fold_bn_in_a_branch(shared):
    model = if_matmul_model(shared)
    out, records = run_passes(model, ["fold-bn"])
    if shared:       # the weight both branches read is one tensor (graphopt.scopes): declined as in a main graph
        assert body_ops(out, "then_branch") == ["MatMul", "Mul"]
        assert records[-1].result.declined == [{"site": "Mul 't'",
                                                "reason": "MatMul 'm': weight 'wa' is shared with other nodes"}]
        assert [n.input[1] for b in ("then_branch", "else_branch") for n in body(out, b).node[:1]] == ["wa", "wa"]
    else:            # MatMul·s: s folded into the weight, in the branch
        assert body_ops(out, "then_branch") == ["Gemm"]
        assert records[-1].result.counts == {"Mul folded into MatMul": 1}
    check(model, out, IF_FEEDS, rtol=1e-5)
    rerun_is_noop(out, ["fold-bn"])


def test_quantize_dynamic_in_branches_and_a_loop_body():
    model = if_matmul_model()
    out, records = run_passes(model, ["quantize-dynamic"])
    for branch in ("then_branch", "else_branch"):
        assert body_ops(out, branch)[:2] == ["DynamicQuantizeLinear", "MatMulInteger"]
    assert records[-1].result.counts["MatMul/Gemm quantized"] == 2
    # the top level keeps 'wa_int8'; the then-branch's int8 copy of the outer 'wa' is renamed (no shadowing)
    assert {t.name for t in body(out, "then_branch").initializer} >= {"wa_int8_2"}
    check(model, out, IF_FEEDS, rtol=0.03)
    rerun_is_noop(out, ["quantize-dynamic"])
    loop = loop_lstm_model()
    out, records = run_passes(loop, ["quantize-dynamic"])
    assert "DynamicQuantizeLSTM" in body_ops(out, "body") and "MatMulInteger" in body_ops(out, "body")
    assert records[-1].result.counts["LSTM quantized"] == 1
    check(loop, out, LOOP_FEEDS, rtol=0.05)
    rerun_is_noop(out, ["quantize-dynamic"])


@pytest.mark.parametrize("name", ["quantize-dynamic", "quantize-weights"])
def test_weight_shared_by_two_branches_is_declined(name):
    model = if_matmul_model(shared=True)
    out, records = run_passes(model, [name])
    assert not records[-1].result.changed and same_graph(out, run_passes(model, ["fold-constants"])[0])
    assert "MatMul 'm': weight 'wa' is shared with MatMul 'e', which is not rewritten" in declined(records)


def test_quantize_weights_in_branches():
    model = if_matmul_model()
    out, records = run_passes(model, [("quantize-weights", {"bits": 8, "block-size": 16})])
    for branch in ("then_branch", "else_branch"):
        assert "MatMulNBits" in body_ops(out, branch)
    assert records[-1].result.counts["weights quantized"] == 2
    check(model, out, IF_FEEDS, rtol=0.03)
    rerun_is_noop(out, [("quantize-weights", {"bits": 8, "block-size": 16})])


@pytest.mark.parametrize("make, feed", [(if_matmul_model, {"x": rand(64, 8, seed=9), "b": np.array(True)}),
                                        (loop_lstm_model, LOOP_FEEDS[0])])
def test_quantize_weights_gptq_observes_what_calibration_can_see(make, feed):
    """A branch's MatMul reading the top-level x gets GPTQ from x's moments; the Loop body's MatMul reads the
    loop-carried state, which calibration cannot observe: rounded to nearest, with a note."""
    model = make()
    opts = {"bits": 8, "block-size": 16, "method": "gptq"}
    ctx = PassContext(original=model, calib=IterableSource([feed], model_inputs(model)))
    out, records = run_pipeline(model, [make_spec("quantize-weights", opts)], ctx)
    res = records[-1].result
    hidden = [n for n in res.notes if "calibration cannot observe" in n]
    assert res.counts["weights quantized"] == (2 if make is if_matmul_model else 1)
    assert [r["output_error"] is not None for r in res.layers] == [make is if_matmul_model] * len(res.layers)
    assert hidden == ([] if make is if_matmul_model else
                      ["1 weights inside If/Loop/Scan bodies read an input computed there, which calibration cannot "
                       "observe (onnxruntime exposes no subgraph value as an output): rounded to nearest"])
    check(model, out, [feed], rtol=0.03)


def test_quantize_says_per_subgraph_why_it_stays_float():
    model = if_matmul_model()
    specs = [make_spec("quantize", {})]
    out, records = run_pipeline(model, specs, PassContext(original=model))
    rows = [r for r in records[-1].result.layers if r["status"] == NO_DATA]
    # its prerequisites ran in the branches (fold-bn made the then-branch's MatMul·s a Gemm); quantize did not
    assert [(r["layer"], r["op"]) for r in rows] == [("If 'y'.then_branch", "Gemm x1"),
                                                     ("If 'y'.else_branch", "MatMul x1")]
    assert body_ops(out, "then_branch") == ["Gemm"] and body_ops(out, "else_branch") == ["MatMul"]


def test_unique_names_renames_inner_shadowing_only():
    outer = gs.Variable("t", dtype=np.float32)
    inner, sibling = gs.Variable("t", dtype=np.float32), gs.Variable("u", dtype=np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    then = gs.Graph(nodes=[gs.Node("Neg", inputs=[x], outputs=[inner])], outputs=[inner])
    other = gs.Graph(nodes=[gs.Node("Abs", inputs=[x], outputs=[sibling])], outputs=[sibling])
    b = gs.Variable("b", dtype=np.bool_, shape=[])
    y = gs.Variable("y", dtype=np.float32)
    root = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[outer]),
                           gs.Node("If", inputs=[b], outputs=[y], attrs={"then_branch": then, "else_branch": other})],
                    inputs=[x, b], outputs=[outer, y])
    assert unique_names(root) == 1 and (outer.name, inner.name, sibling.name) == ("t", "t_2", "u")
    assert unique_names(root) == 0
