"""Static int8 (quantize) inside Loop and Scan bodies (passes/quantization/loops.py): each body is calibrated on its
values at every iteration, captured as extra scan outputs, and quantized as a model of its own. It fires (golden op
list inside the body, on a Scan whose body is the trained mnist_mlp), it is within a stated bound of float
(ORT_DISABLE_ALL, on held-out MNIST sequences), it declines with a reason (no data, no feed iterates, values whose
shape changes across iterations), a second run changes nothing, onnx.checker (full) passes, and the CLI runs it."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.calibration.readers import IterableSource, model_inputs
from graphopt.passes.base import PassContext
from graphopt.passes.quantization import loops, standalone
from graphopt.pipeline import make_spec, run_pipeline
from graphs import loop_matmul_model, mnist_scan_model, mnist_sequences, nested_loop_model, rand, run, same_graph

SIZE = {"objective": "size"}       # int8 wherever the targets hold: no timing (objective=latency is timed)
SEQ = mnist_sequences("calib")


def quantize(model: onnx.ModelProto, calib: list[dict] | None, options: dict | None = None):
    ctx = PassContext(original=model, calib=None if calib is None else IterableSource(calib, model_inputs(model)))
    out, records = run_pipeline(model, [make_spec("quantize", SIZE if options is None else options)], ctx)
    return out, records[-1].result


def body_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in next(a.g for n in model.graph.node for a in n.attribute if a.name == "body").node]


def loop_feeds(n: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": rand(1, 8, seed=50 + i), "h0": rand(1, 8, seed=60 + i, lo=0.0), "n": np.array(n, np.int64)}
            for i in range(count)]


def test_scan_over_trained_mlp_int8_within_bound_then_unchanged():
    model = mnist_scan_model()
    out, res = quantize(model, [{"seq": SEQ["seq"][i:i + 2]} for i in range(0, 16, 2)])
    # per Gemm: DQ of its int8 weight and int32 bias, a Q/DQ pair on its input and one on its output (the body's
    # outputs, Add and Identity of the logits, stay float)
    golden = ["Flatten", "Add", "Identity", *["Gemm", "DequantizeLinear", "DequantizeLinear"] * 3, "Relu", "Relu",
              *["QuantizeLinear", "DequantizeLinear"] * 6]
    assert sorted(body_ops(out)) == sorted(golden), body_ops(out)
    assert [o.op_type for o in out.graph.node] == [o.op_type for o in model.graph.node]
    assert [r["status"] for r in res.layers] == ["int8"] * 3 and res.counts["units int8"] == 3
    assert res.layers[0]["layer"].startswith("Scan 'acc'.body / ")
    assert "Scan 'acc'.body: int8 QDQ, calibrated on its inputs at 32 iterations of 8 feed(s)" in res.notes
    onnx.checker.check_model(out, full_check=True)
    # within a stated bound of float on held-out sequences (onnxruntime, optimizations off): per-step logits cosine
    # >= 0.999 and top-1 agreement >= 0.98 over 4 x 32 images
    seq = mnist_sequences("eval")["seq"][:32]
    ref, got = run(model, {"seq": seq})[1].reshape(-1, 10), run(out, {"seq": seq})[1].reshape(-1, 10)
    assert (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got) >= 0.999
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.98
    again, res2 = quantize(out, [{"seq": SEQ["seq"][:2]}])
    assert same_graph(out, again)
    assert all(r["status"].startswith("float: the subgraph is already quantized") for r in res2.layers)


def test_loop_with_carried_state_int8_within_bound():
    model = loop_matmul_model()
    out, res = quantize(model, loop_feeds(3, 8))
    # the carried input quantized, the weight int8; the MatMul's output is the body's output (stays float)
    assert body_ops(out) == ["Identity", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Relu",
                             "Identity"]
    assert "Loop 'h'.body: int8 QDQ, calibrated on its inputs at 24 iterations of 8 feed(s)" in res.notes
    onnx.checker.check_model(out, full_check=True)
    for f in loop_feeds(3, 12)[8:]:        # 8-bit, carried 3 times: within 5% of float's largest value
        ref, got = run(model, f)[1], run(out, f)[1]
        assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_a_loop_in_a_loop_body_int8_in_both_bodies():
    """The inner Loop is at the top level of the outer body's standalone model, calibrated on one row per inner
    iteration of every outer one (n = 3, k = 2: 24 and 48 rows from 8 feeds)."""
    model = nested_loop_model()
    feeds = [{**f, "k": np.array(2, np.int64)} for f in loop_feeds(3, 8)]
    out, res = quantize(model, feeds)
    outer = next(a.g for n in out.graph.node for a in n.attribute if a.name == "body")
    inner = next(a.g for n in outer.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    assert {"QuantizeLinear", "MatMul"} <= {n.op_type for n in outer.node}
    assert [n.op_type for n in inner.node] == ["Identity", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                                               "MatMul", "Relu"]
    assert "Loop 'h'.body: Loop 'g'.body: int8 QDQ, calibrated on its inputs at 48 iterations of 24 feed(s)" \
        in res.notes, res.notes
    onnx.checker.check_model(out, full_check=True)
    for f in [{**f, "k": np.array(2, np.int64)} for f in loop_feeds(3, 12)[8:]]:
        ref, got = run(model, f)[1], run(out, f)[1]
        assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_bodies_decline_with_reason():
    """No data; no feed iterates (0 iterations); a carried value that grows at every iteration (scan outputs
    cannot stack it: onnxruntime's error quoted). Each leaves the body as it was, with one row saying why."""
    for model, calib, why in [(loop_matmul_model(), None, loops.NO_DATA),
                              (loop_matmul_model(), loop_feeds(0), loops.NO_ITERATION),
                              (loop_matmul_model(grow=True), loop_feeds(3), "float: its values at each iteration "
                               "cannot be stacked as scan outputs (do their shapes change across iterations?): ")]:
        out, res = quantize(model, calib)
        assert body_ops(out) == body_ops(model)
        assert [r["layer"] for r in res.layers] == ["Loop 'h'.body"]
        assert res.layers[0]["status"].startswith(why), res.layers
        assert not res.changed


def test_captured_iterations_stay_within_their_memory_budget(monkeypatch):
    one_feed = 3 * 8 * 4 + 3 * (8 + 1 + 8) + 8 * 4       # h [3, 1, 8] f32, i int64, cond bool; x f32 once
    monkeypatch.setattr(standalone, "CAPTURE_BYTES", 2 * one_feed + 1)
    out, res = quantize(loop_matmul_model(), loop_feeds(3, 8))
    assert any(n.startswith("Loop 'h'.body: calibrated on the first 2 feed(s) only (6 iterations)") for n in res.notes)
    assert "QuantizeLinear" in body_ops(out)


def test_a_feed_is_captured_in_parts_that_hold_a_quarter_of_the_budget():
    """A feed whose values at every iteration would not fit is run in parts of fewer rows (measured on its first
    row): the parts' captured values are the whole feed's, cut along the batch axis."""
    model = mnist_scan_model()
    feeds = [{"seq": SEQ["seq"][i:i + 8]} for i in (0, 8)]
    model_copy, names = loops.iterations_model(model, 3)
    whole, _ = standalone.capture(model_copy, names, IterableSource(feeds, model_inputs(model)))
    per_row = sum(np.asarray(v).nbytes for v in whole[0][1].values()) // 8
    parts, every = standalone.capture(model_copy, names, IterableSource(feeds, model_inputs(model)),
                                      budget=8 * per_row + per_row // 2)      # a quarter: 2 rows
    assert [b.rows for b, _ in parts] == [2, 2, 2, 2] and not every         # the budget: the first feed only
    for name in names:
        assert np.array_equal(np.concatenate([v[name] for _, v in parts], axis=1), whole[0][1][name])


def test_cli_scan_over_mnist_sequences(cli, tmp_path):
    m, out = tmp_path / "scan.onnx", tmp_path / "out.onnx"
    onnx.save(mnist_scan_model(), m)
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, seq=SEQ["seq"][:32])
    np.savez(val, seq=mnist_sequences("eval")["seq"][:32])
    res = cli(m, out, "--pass", "quantize:objective=size", "--calib-data", calib, "--val-data", val,
              "--latency-runs", "0")
    assert res.code == 0, res.err
    assert "Scan 'acc'.body: int8 QDQ, calibrated on its inputs at 8 iterations of 2 feed(s)" in res.out
    assert "PASSED" in res.out and "QuantizeLinear" in body_ops(onnx.load(out))
