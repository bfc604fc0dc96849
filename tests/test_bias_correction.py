"""Bias correction of the weights' rounding: the streamed mean input patch against onnxruntime's own Conv, and the
quantize pass removing the rounding's mean output error (in onnxruntime, integer kernels intact)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from calibration.bias_correction import PatchMeanObserver, rounding_offset
from passes.quantize import _conv_geometry
from tests.graphs import session
from tests.test_gptq import GEOMETRIES, _conv_model
from tests.test_quantize import ort_kernels


@pytest.mark.parametrize("xs, ws, group, strides, pads, dil", GEOMETRIES)
def test_mean_patch_gives_onnxruntimes_mean_conv_output(xs, ws, group, strides, pads, dil):
    """For any weights w, w_o · E[patch] (``rounding_offset`` with w as the difference) is the mean over samples
    and positions of onnxruntime's Conv output channel o: the mean patch counts padding as the zeros the Conv
    reads (the Conv's own pads, SAME's, none for VALID). Fed in two pieces."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(xs) + rng.uniform(-2, 2, (1, xs[1]) + (1,) * (len(xs) - 2))).astype(np.float32)
    attrs = dict(group=group, strides=strides, dilations=dil)
    attrs.update(auto_pad=pads) if isinstance(pads, str) else attrs.update(pads=pads)
    geometry = _conv_geometry(gs.import_onnx(_conv_model(xs, np.zeros(ws, np.float32), **attrs)).nodes[0])
    obs = PatchMeanObserver(geometry)
    obs.update(x[:1])
    obs.update(x[1:])
    for seed in range(3):
        w = np.random.default_rng(seed).standard_normal(ws).astype(np.float32)
        y = session(_conv_model(xs, w, **attrs)).run(None, {"x": x})[0].astype(np.float64)
        expected = y.mean(axis=(0,) + tuple(range(2, y.ndim)))
        assert np.allclose(rounding_offset(w, obs.mean(), group), expected, rtol=1e-5, atol=1e-6)
        assert obs.count == y.shape[0] * int(np.prod(y.shape[2:]))


def test_row_inputs_mean_over_every_row():
    x = np.random.default_rng(1).standard_normal((3, 7, 5)).astype(np.float32) + 2
    obs = PatchMeanObserver()
    obs.update(x[:2])
    obs.update(x[2:])
    assert np.allclose(obs.mean(), x.reshape(-1, 5).mean(axis=0)) and obs.count == 21
    d = np.random.default_rng(2).standard_normal((4, 5))
    assert np.allclose(rounding_offset(d, obs.mean()), d @ x.reshape(-1, 5).mean(axis=0))
    assert PatchMeanObserver().mean() is None


def _highpass_model(op: str) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """A layer whose every weight vector sums to ~0 (edge filters: EfficientNet-Lite0's first depthwise
    convolution), on inputs with a large mean: rounding the weights moves each output's mean by ΔW·E[x] against an
    output that is itself ~0 on average. The inputs sit on the uint8 grid their min/max gives (multiples of 1/64 in
    [0, 255/64]), so activation quantization is exact and the weights' rounding is the only mean error."""
    rng = np.random.default_rng(5)
    if op == "Conv":
        w = rng.standard_normal((8, 1, 3, 3))
        w -= w.mean(axis=(1, 2, 3), keepdims=True)
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, pads=[1, 1, 1, 1], name="layer")
        shape, y_shape = ["N", 8, 12, 12], ["N", 8, 12, 12]
        x = np.round(rng.uniform(100, 180, (64, 8, 12, 12)) + rng.standard_normal((64, 8, 12, 12)) * 20)
    else:
        w = rng.standard_normal((16, 6))
        w -= w.mean(axis=0, keepdims=True)
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="layer")
        shape, y_shape = ["N", 16], ["N", 6]
        x = np.round(rng.uniform(100, 180, (1024, 16)) + rng.standard_normal((1024, 16)) * 20)
    x = np.clip(x, 0, 255)
    x.reshape(-1)[:2] = [0, 255]                       # the range is exactly [0, 255/64]
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    m = helper.make_model(helper.make_graph([node], "g", [xi], [yi], [numpy_helper.from_array(w.astype(np.float32),
                                                                                                "w")]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    data = (x / 64).astype(np.float32)
    return m, [{"x": data[i:i + 64]} for i in range(0, len(data), 64)]


def _mean_error(original: onnx.ModelProto, quantized: onnx.ModelProto, data: list[dict[str, np.ndarray]]
                ) -> np.ndarray:
    """Per output channel: mean of (int8 output - float output) over the data, onnxruntime's integer kernels."""
    ref, new = session(original), session(quantized, optimize=True)
    diff = np.concatenate([new.run(None, d)[0].astype(np.float64) - ref.run(None, d)[0] for d in data])
    return diff.mean(axis=(0,) + tuple(range(2, diff.ndim)))


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_quantize_removes_the_rounding_mean_error(op, tmp_path):
    """Without correction the worst output channel is off on average by ΔW·E[x], about half an output step here;
    with it, by less than a tenth of that (what is left is the output's own rounding, averaged), and the model
    still runs onnxruntime's integer kernel (the bias it was given is int32 at the scale s_x·s_w the kernel
    needs)."""
    m, data = _highpass_model(op)
    spec = "quantize:method=minmax,min-cosine=0,min-top1=0"
    plain, _ = graphopt.optimize(m, [spec + ",bias-correction=false"], calib_data=data, latency_runs=0)
    fixed, rep = graphopt.optimize(m, [spec], calib_data=data, latency_runs=0)
    onnx.checker.check_model(fixed)
    before, after = np.abs(_mean_error(m, plain, data)), np.abs(_mean_error(m, fixed, data))
    assert before.max() > 0.015, before                  # the rounding's mean error is real
    assert after.max() < 0.1 * before.max(), (before, after)
    assert rep.passes[0]["counts"]["biases corrected"] == 1
    layer = next(n for n in fixed.graph.node if n.name == "layer")
    assert len(layer.input) == 3 and len(next(n for n in plain.graph.node if n.name == "layer").input) == 2
    assert ("QLinearConv" if op == "Conv" else "QGemm") in ort_kernels(fixed, tmp_path)


def test_no_bias_is_added_where_the_correction_rounds_to_zero():
    """Weights on the int8 grid (multiples of their scale) round without error: a bias-free layer stays bias-free,
    one with a bias keeps its values, and neither counts as corrected."""
    w = (np.arange(-4, 4, dtype=np.float32).reshape(4, 2) / 4 * 127).round() / 127
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.eye(2, dtype=np.float32), "w2"),
             numpy_helper.from_array(np.array([0.5, -0.25], np.float32), "b2")]
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    m = helper.make_model(helper.make_graph(nodes, "g", [xi], [yi], inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    data = [{"x": np.random.default_rng(0).random((16, 4)).astype(np.float32) + 1}]
    out, rep = graphopt.optimize(m, ["quantize:min-cosine=0,min-top1=0"], calib_data=data, latency_runs=0)
    fc1 = next(n for n in out.graph.node if n.name == "fc1")
    assert len(fc1.input) == 2 and "biases corrected" not in rep.passes[0]["counts"]
    plain, _ = graphopt.optimize(m, ["quantize:min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    assert out.SerializeToString() == plain.SerializeToString()


def test_loaded_ranges_without_data_skip_the_correction_and_say_so(tmp_path):
    m, data = _highpass_model("Conv")
    _, first = graphopt.optimize(m, ["quantize:method=minmax,min-cosine=0,min-top1=0"], calib_data=data,
                                 latency_runs=0)
    ranges = first.passes[0]["artifacts"]["calibration"]["ranges"]
    out, rep = graphopt.optimize(m, ["quantize:min-cosine=0,min-top1=0"], calibration_ranges=ranges,
                                 latency_runs=0, validate_output=False)
    assert "biases corrected" not in rep.passes[0]["counts"]
    assert any(n.startswith("bias correction skipped: no calibration data") for n in rep.passes[0]["notes"])
    assert len(next(n for n in out.graph.node if n.name == "layer").input) == 2
