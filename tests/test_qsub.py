"""Static int8 (quantize) inside the branches of an If whose condition is computed at run time
(passes/quantization/branches.py): each branch is calibrated on the outer values it reads, captured per feed from
the enclosing model, and quantized as a model of its own. It fires (golden op list inside the branch, and
onnxruntime runs QLinearConv there), it is within a stated bound of float (ORT_DISABLE_ALL), it declines with a
reason a branch no feed takes and a Loop body without data, a second run changes nothing, onnx.checker (full) passes."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.readers import IterableSource, model_inputs
from graphopt.passes.base import PassContext
from graphopt.passes.quantization import standalone
from graphopt.passes.quantization.loops import NO_DATA as LOOP_NO_DATA
from graphopt.pipeline import make_spec, run_pipeline
from graphs import if_conv_model, loop_lstm_model, ort_kernels, rand, run, same_graph

SIZE = {"objective": "size"}       # int8 wherever the targets hold: no timing (objective=latency is timed)


def feeds(sides: tuple[bool, ...], n: int = 8) -> list[dict[str, np.ndarray]]:
    return [{"x": rand(4, 3, 8, 8, seed=40 + i, lo=0.0), "b": np.array(sides[i % len(sides)])} for i in range(n)]


def quantize(model: onnx.ModelProto, calib: list[dict], options: dict | None = None):
    ctx = PassContext(original=model, calib=IterableSource(calib, model_inputs(model)))
    out, records = run_pipeline(model, [make_spec("quantize", SIZE if options is None else options)], ctx)
    return out, records[-1].result


def branch_ops(model: onnx.ModelProto, attr: str) -> list[str]:
    return [n.op_type for n in next(a.g for n in model.graph.node for a in n.attribute if a.name == attr).node]


def test_both_branches_int8_within_bound_and_onnxruntime_runs_integer_kernels(tmp_path):
    model = if_conv_model()
    out, res = quantize(model, feeds((True, False)))
    golden = ["DequantizeLinear"] * 4 + ["QuantizeLinear", "DequantizeLinear", "Conv", "Relu", "QuantizeLinear",
                                         "DequantizeLinear", "Conv", "QuantizeLinear", "DequantizeLinear"]
    for attr in ("then_branch", "else_branch"):
        assert sorted(branch_ops(out, attr)) == sorted(golden), attr
    assert [o.op_type for o in out.graph.node] == ["If"]
    assert res.counts["units int8"] == 4
    assert [r["status"] for r in res.layers] == ["int8"] * 4
    assert res.layers[0]["layer"].startswith("If 'y'.then_branch / ")
    onnx.checker.check_model(out, full_check=True)
    # within a stated bound of float, each branch (onnxruntime with optimizations off): 8-bit, two layers
    for f in feeds((True, False), 4)[2:]:
        ref, got = run(model, f)[0], run(out, f)[0]
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max(), bool(f["b"])
    ort_kernels(out, tmp_path)          # onnxruntime's own graph: the QDQ pairs became integer kernels in the If
    optimized = onnx.load(tmp_path / "optimized.onnx")
    for attr in ("then_branch", "else_branch"):
        assert branch_ops(optimized, attr).count("QLinearConv") == 2, branch_ops(optimized, attr)
    # a second run finds the branches quantized and leaves the model as it is
    again, res2 = quantize(out, feeds((True, False)))
    assert same_graph(out, again)
    assert all(r["status"].startswith("float: the subgraph is already quantized") for r in res2.layers)


def test_branch_no_feed_takes_stays_float_with_reason():
    model = if_conv_model()
    out, res = quantize(model, feeds((True,), 4))
    assert branch_ops(out, "else_branch") == branch_ops(model, "else_branch")
    assert "QuantizeLinear" in branch_ops(out, "then_branch")
    rows = [r for r in res.layers if r["layer"] == "If 'y'.else_branch"]
    assert rows == [{"layer": "If 'y'.else_branch", "op": "Conv x2", "weights": "in a subgraph",
                     "status": "float: no calibration sample takes this branch (condition 'b' was true for "
                               "every feed)"}]
    onnx.checker.check_model(out, full_check=True)


def test_loop_body_without_data_stays_float_with_reason():
    """Without calibration data the body's MatMul stays float (no QDQ there, one row with the reason); its LSTM
    gets int8 weights by ``recurrent`` (DynamicQuantizeLSTM needs no calibrated range), with a row of its own.
    With data the body is quantized on its per-iteration values: tests/test_qloop.py."""
    model = loop_lstm_model()
    out, records = run_pipeline(model, [make_spec("quantize", SIZE)], PassContext(original=model))
    res = records[-1].result
    assert "QuantizeLinear" not in {n.op_type for n in out.graph.node}
    body = next(a.g for n in out.graph.node for a in n.attribute if a.name == "body")
    assert "QuantizeLinear" not in {n.op_type for n in body.node}
    assert [(r["op"], r["status"]) for r in res.layers] == [("MatMul x1", LOOP_NO_DATA), ("LSTM", "int8")]
    assert "DynamicQuantizeLSTM" in {n.op_type for n in body.node}


def test_nested_if_is_reached_through_the_enclosing_branch():
    """An If inside a branch: the branch's standalone model holds it at its top level, so the same code captures
    its outer values there (x, and c read from the outermost scope) and quantizes its branches."""
    model = if_conv_model(nested=True)
    calib = [{**f, "c": np.array(i % 4 < 2)} for i, f in enumerate(feeds((True, False), 8))]
    out, res = quantize(model, calib)
    inner = next(n for n in out.graph.node[0].attribute[0].g.node if n.op_type == "If")
    for a in inner.attribute:
        assert [n.op_type for n in a.g.node].count("QuantizeLinear") == 3, a.name
    assert res.counts["units int8"] == 6
    assert {r["layer"].rsplit(" / ", 1)[0] for r in res.layers} == {
        "If 'y'.then_branch / If 't'.then_branch", "If 'y'.then_branch / If 't'.else_branch", "If 'y'.else_branch"}
    onnx.checker.check_model(out, full_check=True)
    for f in calib[:4]:
        ref, got = run(model, f)[0], run(out, f)[0]
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()


def test_objective_latency_times_each_branch():
    """objective=latency (the default): each branch is int8 only where measured faster than its float self; the
    branch's report says which (on this tiny model, float usually wins: the QDQ pairs cost more than 8x8 Convs)."""
    model = if_conv_model()
    out, res = quantize(model, feeds((True, False)), {})
    for attr in ("then_branch", "else_branch"):
        said = [n for n in res.notes if n.startswith(f"If 'y'.{attr}") and "objective=latency" in n]
        if branch_ops(out, attr) == branch_ops(model, attr):
            assert len(said) == 1 and "kept float" in said[0], res.notes
        else:
            assert said and "QuantizeLinear" in branch_ops(out, attr), res.notes
    onnx.checker.check_model(out, full_check=True)


def test_captured_outer_values_stay_within_their_memory_budget(monkeypatch):
    """The outer values are held for every captured feed: past CAPTURE_BYTES the first feeds only (at least one),
    with a note saying how many; each branch still quantized on the feeds that take it."""
    one_feed = 4 * 3 * 8 * 8 * 4                           # x, the branches' outer value, per feed (float32)
    monkeypatch.setattr(standalone, "CAPTURE_BYTES", 4 * one_feed + one_feed // 2)
    out, res = quantize(if_conv_model(), feeds((True, False)))
    assert any("calibrated on the first 16 samples only" in n for n in res.notes), res.notes
    for attr in ("then_branch", "else_branch"):
        assert "QuantizeLinear" in branch_ops(out, attr)
    captured, whole = standalone.capture(if_conv_model(), ["x"], IterableSource(feeds((True,)), model_inputs(
        if_conv_model())), budget=1)
    assert len(captured) == 1 and not whole
