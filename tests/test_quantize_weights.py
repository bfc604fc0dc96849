"""quantize-weights: weight-only blockwise quantization to MatMulNBits or blockwise DequantizeLinear.

Fires (op lists, both formats), numerically right in onnxruntime with optimizations off (the kernel computes x·Ŵ
with Ŵ the dequantized blocks exactly, at accuracy_level 0; the 4-bit error against float is bounded), declines
with reasons (shared weight, qdq below opset 21, K not a multiple of the block), idempotent, checker-valid (the
pipeline checks every output), and gptq/awq beat rtn on a layer with outlier input channels on held-out inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphopt.calibration.readers import open_source
from graphopt.passes.base import PassContext
from graphopt.passes.weightonly.blockwise import quantize_rtn
from graphopt.pipeline import make_spec, run_pipeline
from graphopt.report import count_parameters
from graphopt.runtime import count_macs
from graphs import declined, make_model, node, ops, rand, run, run_passes, same_graph

K, N = 64, 48


def mlp(opset: int = 17, k: int = K):
    """MatMul (x·W1) then Gemm (alpha 0.5, transB, bias, beta 2)."""
    inits = {"w1": rand(k, N, seed=1), "w2": rand(16, N, seed=2), "b2": rand(16, seed=3)}
    return make_model([node("MatMul", ["x", "w1"], ["h"], name="mm"),
                       node("Gemm", ["h", "w2", "b2"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=1)],
                      [("x", ["n", k])], ["y"], inits, opset=opset)


def test_nbits_fires_and_computes_the_dequantized_weights():
    model = mlp()
    out, rec = run_passes(model, [("quantize-weights", {"accuracy-level": 0})])
    assert ops(out) == ["com.microsoft.MatMulNBits", "com.microsoft.MatMulNBits", "Add"]
    x = rand(5, K, seed=4)
    w1 = quantize_rtn(rand(K, N, seed=1), 4, 32, False).dequantize()
    w2 = quantize_rtn(0.5 * rand(16, N, seed=2).T, 4, 32, False).dequantize()
    expect = (x @ w1) @ w2 + 2.0 * rand(16, seed=3)
    got = run(out, {"x": x})[0]
    assert np.abs(got - expect).max() <= 1e-4 * np.abs(expect).max()
    ref = run(model, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.15      # 4-bit blocks of 32: ~0.08 per weight
    again, rec2 = run_passes(out, ["quantize-weights"])
    assert same_graph(out, again) and not rec2[-1].result.changed


def test_macs_and_parameters_are_counted_through_matmulnbits():
    """MatMulNBits multiplies as the MatMul it replaces and its uint8 bytes hold two 4-bit weights each: the report's
    MACs and parameters must not drop with the packing."""
    model = mlp()
    out, _ = run_passes(model, [("quantize-weights", {})])
    feed = {"x": rand(3, K, seed=5)}
    assert count_macs(out, feed) == count_macs(model, feed) == 3 * N * K + 3 * 16 * N
    blocks = N * 2 + 16 * 2                 # K=64 and K=48, in blocks of 32 (the second padded to 64)
    assert count_parameters(out)[0] == blocks * 32 + blocks * 2 + 16      # weights, a scale and a zero point each, bias


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_format_matches_nbits(symmetric):
    model = mlp(opset=21)
    qdq, _ = run_passes(model, [("quantize-weights", {"format": "qdq", "symmetric": symmetric, "block-size": 16})])
    assert ops(qdq) == ["DequantizeLinear", "DequantizeLinear", "MatMul", "MatMul", "Add"]
    nb, _ = run_passes(model, [("quantize-weights", {"accuracy-level": 0, "symmetric": symmetric, "block-size": 16})])
    x = rand(3, K, seed=5)
    a, b = run(qdq, {"x": x})[0], run(nb, {"x": x})[0]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_declines_with_reasons():
    shared = make_model([node("MatMul", ["x", "w"], ["h"]), node("Add", ["h", "w"], ["y"])],
                        [("x", [K, K])], ["y"], {"w": rand(K, K)})
    out, rec = run_passes(shared, ["quantize-weights"])
    assert ops(out) == ops(shared) and "shared with Add" in declined(rec)[0]
    out, rec = run_passes(mlp(opset=17), [("quantize-weights", {"format": "qdq"})])
    assert ops(out) == ["MatMul", "Gemm"] and "needs opset 21" in declined(rec)[0]
    out, rec = run_passes(mlp(opset=21, k=40), [("quantize-weights", {"format": "qdq"})])
    assert "K=40 is not a multiple of block-size 32" in declined(rec)[0]
    assert ops(out) == ["MatMul", "Gemm"] and "K=48 is not a multiple" in declined(rec)[1]


def test_gptq_and_awq_beat_rtn_with_outlier_channels():
    """A layer whose (correlated) inputs have a few channels 30x larger than the rest: data-aware rounding wins on held-out rows."""
    rng = np.random.default_rng(0)
    k, n = 64, 32
    gain = np.ones(k, np.float32)
    gain[rng.choice(k, 4, replace=False)] = 30.0
    mix = np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k)      # correlated inputs: GPTQ has work to do
    draw = lambda *shape: ((rng.standard_normal(shape) @ mix) * gain).astype(np.float32)  # noqa: E731
    model = make_model([node("MatMul", ["x", "w"], ["y"])], [("x", ["n", 16, k])], ["y"],
                       {"w": rng.standard_normal((k, n)).astype(np.float32)})
    calib = [{"x": draw(8, 16, k)} for _ in range(8)]
    held = draw(16, 16, k)
    ref = run(model, {"x": held})[0]
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        ctx = PassContext(original=model, calib=open_source(calib, model, purpose="calibration"))
        out, _ = run_pipeline(model, [make_spec("quantize-weights", {"method": method, "accuracy-level": 0})], ctx)
        errors[method] = float(np.linalg.norm(run(out, {"x": held})[0] - ref) / np.linalg.norm(ref))
    assert errors["gptq"] < 0.9 * errors["rtn"] and errors["awq"] < 0.9 * errors["rtn"], errors


@settings(max_examples=20, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 70), st.integers(1, 5)),
              elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from([4, 8]), st.sampled_from([16, 32]), st.booleans())
def test_rtn_error_is_at_most_half_a_step(w, bits, block, symmetric):
    """Every weight is within half its block's scale of its dequantized value, and zeros stay exactly zero."""
    bq = quantize_rtn(w, bits, block, symmetric)
    step = np.repeat(bq.scale, block, axis=1)[:, :w.shape[0]].T              # [K, N]
    w_hat = bq.dequantize()
    assert np.all(np.abs(w_hat - w) <= step / 2 * (1 + 1e-5) + 1e-30)
    assert np.all(w_hat[w == 0] == 0)


@pytest.mark.parametrize("fmt,symmetric,bits", [("nbits", False, 4), ("nbits", True, 8), ("qdq", False, 4),
                                                ("qdq", True, 4)])
def test_embedding_gather_blockwise_is_exactly_dequantize_then_gather(fmt, symmetric, bits):
    """GatherBlockQuantized (uint8 packed, nbits) / DequantizeLinear -> Gather (qdq) give the dequantized rows exactly;
    a second run changes nothing."""
    v, d = 1024, 80 if fmt == "nbits" else 96              # 80: the last block padded (nbits only)
    table = rand(v, d, seed=1)
    model = make_model([node("Gather", ["table", "ids"], ["y"], name="emb")], [("ids", [2, 5], np.int64)], ["y"],
                       {"table": table}, opset=21)
    out, rec = run_passes(model, [("quantize-weights", {"format": fmt, "symmetric": symmetric, "bits": bits})])
    assert ops(out) == (["com.microsoft.GatherBlockQuantized"] if fmt == "nbits" else ["DequantizeLinear", "Gather"])
    ids = np.array([[0, 1, 2, 500, 1023], [3, 3, 7, 900, 10]], np.int64)
    expect = quantize_rtn(table.T, bits, 32, symmetric).dequantize().T[ids]
    assert np.array_equal(run(out, {"ids": ids})[0], expect)
    again, rec2 = run_passes(out, ["quantize-weights"])
    assert same_graph(out, again) and not rec2[-1].result.changed


def test_embedding_declines():
    model = make_model([node("Gather", ["table", "ids"], ["y"], name="emb")], [("ids", [3], np.int64)], ["y"],
                       {"table": rand(2048, 40, seed=1)}, opset=21)
    out, rec = run_passes(model, [("quantize-weights", {"format": "qdq"})])
    assert ops(out) == ["Gather"] and "row width 40 is not a multiple of block-size 32" in declined(rec)[0]
    out, rec = run_passes(model, [("quantize-weights", {"exclude": ("emb",)})])
    assert ops(out) == ["Gather"] and "excluded" in declined(rec)[0]
    out, _ = run_passes(model, [("quantize-weights", {"embeddings": False})])
    assert ops(out) == ["Gather"]
