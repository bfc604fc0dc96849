"""quantize-dynamic: int8 weights, activations quantized at run time (MatMul/Gemm; LSTM as DynamicQuantizeLSTM).

Fires (op lists), numerically right in onnxruntime with optimizations off (the integer path computes
round(x/s_x)·q·s_x·s within a stated bound of float), declines with reasons, idempotent, checker-valid (the
pipeline checks every output), and the real MNIST MLP through the CLI with no data at all (seeded inputs, warned).
"""

from __future__ import annotations

import numpy as np

from graphs import MODELS, declined, make_model, node, ops, rand, run, run_passes, same_graph

K, N = 64, 48


def test_matmul_gemm_fire_and_stay_close():
    model = make_model([node("MatMul", ["x", "w1"], ["h"], name="mm"),
                        node("Gemm", ["h", "w2", "b2"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=1)],
                       [("x", ["n", K])], ["y"], {"w1": rand(K, N, seed=1), "w2": rand(16, N, seed=2),
                                                 "b2": rand(16, seed=3)})
    out, rec = run_passes(model, ["quantize-dynamic"])
    assert sorted(ops(out)) == sorted(["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"] * 2 + ["Add"])
    x = rand(7, K, seed=4)
    ref, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02     # int8 both sides: ~1% per layer
    again, rec2 = run_passes(out, ["quantize-dynamic"])
    assert same_graph(out, again) and not rec2[-1].result.changed


def test_lstm_becomes_dynamic_quantize_lstm():
    i, h, t = 8, 16, 5
    inits = {"W": rand(1, 4 * h, i, seed=1), "R": rand(1, 4 * h, h, seed=2), "B": rand(1, 8 * h, seed=3)}
    model = make_model([node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=h)], [("x", [t, 1, i])], ["y"], inits)
    out, _ = run_passes(model, ["quantize-dynamic"])
    assert ops(out) == ["com.microsoft.DynamicQuantizeLSTM"]
    x = rand(t, 1, i, seed=4)
    ref, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03
    batch_first = make_model([node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=h, layout=1)],
                             [("x", [1, t, i])], ["y"], inits)
    out, rec = run_passes(batch_first, ["quantize-dynamic"])
    assert ops(out) == ["LSTM"] and "layout=1" in declined(rec)[0]


def test_declines_with_reasons():
    shared = make_model([node("MatMul", ["x", "w"], ["h"]), node("Add", ["h", "w"], ["y"])],
                        [("x", [K, K])], ["y"], {"w": rand(K, K)})
    out, rec = run_passes(shared, ["quantize-dynamic"])
    assert ops(out) == ["MatMul", "Add"] and "shared with Add" in declined(rec)[0]
    activation = make_model([node("MatMul", ["x", "x2"], ["y"])], [("x", [4, K]), ("x2", [K, 3])], ["y"])
    out, rec = run_passes(activation, ["quantize-dynamic"])
    assert ops(out) == ["MatMul"] and "not a constant" in declined(rec)[0]
    scores = make_model([node("Relu", ["x2"], ["r"]), node("MatMul", ["x", "r"], ["y"])],
                        [("x", [4, K]), ("x2", [K, 3])], ["y"])
    out, rec = run_passes(scores, ["quantize-dynamic"])
    assert ops(out) == ["Relu", "MatMul"] and "both inputs are activations" in declined(rec)[0]


def test_mnist_mlp_cli_without_data(cli, tmp_path):
    res = cli(str(MODELS / "mnist_mlp.onnx"), str(tmp_path / "o.onnx"), "--pass", "quantize-dynamic")
    assert res.code == 0, res.err
    assert "3 MatMul/Gemm" in res.out and "synthetic" in res.out + res.err


def test_embedding_table_int8_per_row():
    v, d = 1024, 64
    table = rand(v, d, seed=1) * np.linspace(0.01, 1, v, dtype=np.float32)[:, None]   # rows of very different size
    model = make_model([node("Gather", ["table", "ids"], ["y"])], [("ids", [2, 5], np.int64)], ["y"],
                       {"table": table})
    out, _ = run_passes(model, ["quantize-dynamic"])
    assert sorted(ops(out)) == ["Cast", "Gather", "Gather", "Mul"]
    ids = np.array([[0, 1, 2, 500, 1023], [3, 3, 7, 900, 10]], np.int64)
    ref, got = run(model, {"ids": ids})[0], run(out, {"ids": ids})[0]
    assert np.all(np.abs(got - ref) <= np.abs(ref).max(axis=-1, keepdims=True) / 254 + 1e-7)   # half a step per row
    small, rec = run_passes(make_model([node("Gather", ["t", "ids"], ["y"])], [("ids", [3], np.int64)], ["y"],
                                       {"t": rand(2, 8)}), ["quantize-dynamic"])
    assert ops(small) == ["Gather"]


def test_per_channel_auto_takes_one_scale_unless_columns_differ():
    """auto: one scale per tensor for similar columns (cheaper kernel call), per column when a per-tensor scale would
    err by more than 3% of the weight (one outlier weight 30x the others sets the tensor's step)."""
    similar = rand(K, N, seed=1)
    skewed = similar.copy()
    skewed[0, 0] = 30.0
    for w, per_column in ((similar, False), (skewed, True)):
        model = make_model([node("MatMul", ["x", "w"], ["y"])], [("x", ["n", K])], ["y"], {"w": w})
        out, rec = run_passes(model, ["quantize-dynamic"])
        scales = [t for t in out.graph.initializer if t.name.endswith("weight_scale")]
        assert list(scales[0].dims) == ([N] if per_column else [])
        assert f"{int(per_column)} with a scale per column" in rec[-1].result.notes[0]
