"""GPTQ weight rounding: the streamed input second moments against onnxruntime's own Conv, the rounding's
properties, and the quantize pass using it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import graphopt.calibration.gptq as gptq_mod
import graphopt
from graphopt.calibration.gptq import HessianObserver, gptq_round
from graphopt.calibration.qparams import qrange
from graphopt.passes.quantization.calibrate import conv_geometry
from graphopt.passes.quantization.report import GPTQ_ROUNDED
from graphs import GEOMETRIES, calib, conv_net, conv_only_model, ort_kernels, session

Q = "quantize:objective=size"   # int8 wherever the targets hold, as these tests expect (objective=latency times it)


@pytest.mark.parametrize("xs, ws, group, strides, pads, dil", GEOMETRIES)
def test_conv_input_second_moments_give_onnxruntimes_output_energy(xs, ws, group, strides, pads, dil, monkeypatch):
    """For any weights w, Σ_g Σ_o w_go H_g w_goᵀ equals Σ y² of the Conv that onnxruntime runs: the patches (from
    the pass's reading of the Conv's attributes) are the ones the Conv reads, in the weights' (channel, row,
    column) order. Fed in two pieces and in small chunks."""
    monkeypatch.setattr(gptq_mod, "CHUNK_BYTES", 512)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    attrs = dict(group=group, strides=strides, dilations=dil)
    attrs.update(auto_pad=pads) if isinstance(pads, str) else attrs.update(pads=pads)
    w0 = np.zeros(ws, np.float32)
    geometry = conv_geometry(gs.import_onnx(conv_only_model(xs, w0, **attrs)).nodes[0])
    assert geometry is not None
    obs = HessianObserver(geometry)
    obs.update(x[:1])
    obs.update(x[1:])
    assert obs.h is not None and obs.h.shape[0] == group
    for seed in range(3):
        w = np.random.default_rng(seed).standard_normal(ws).astype(np.float32)
        wg = w.reshape(group, ws[0] // group, -1).astype(np.float64)
        energy = float(np.einsum("god,gde,goe->", wg, obs.h, wg))
        y = session(conv_only_model(xs, w, **attrs)).run(None, {"x": x})[0].astype(np.float64)
        assert energy == pytest.approx(float((y ** 2).sum()), rel=1e-5)
        assert obs.rows == y.shape[0] * int(np.prod(y.shape[2:]))


def test_conv_with_auto_pad_same_on_an_input_of_unknown_size_has_no_geometry():
    m = conv_only_model((1, 2, "H", 5), np.zeros((3, 2, 3, 3), np.float32), auto_pad="SAME_UPPER")
    assert conv_geometry(gs.import_onnx(m).nodes[0]) is None


def test_matmul_input_second_moments_are_sum_of_row_outer_products():
    x = np.random.default_rng(1).standard_normal((3, 7, 5)).astype(np.float32)
    obs = HessianObserver()
    obs.update(x)
    flat = x.reshape(-1, 5).astype(np.float64)
    assert np.allclose(obs.h[0], flat.T @ flat, rtol=1e-5) and obs.rows == 21


def _nearest(w: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / s[..., None]), qmin, qmax)


def _layer_error(w, q, s, h):
    d = w - q * s[..., None]
    return float(np.einsum("god,gde,goe->", d, h, d))


def test_uncorrelated_inputs_give_round_to_nearest():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4, 10))
    s = np.abs(w).max(axis=2) / 127
    h = np.stack([np.diag(rng.random(10) + 0.5) for _ in range(3)])
    assert np.array_equal(gptq_round(w, s, h, -127, 127), _nearest(w, s, -127, 127))


@pytest.mark.parametrize("reduce", [False, True])
def test_gptq_lowers_the_layer_error_on_correlated_inputs(reduce):
    """Inputs with correlated features (as a layer's inputs are): the error E‖ΔW x‖² is well below rounding to
    nearest's, the scales are the same and every integer is in range."""
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((32, 32))
    x = rng.standard_normal((4000, 32)) @ mix
    h = (x.T @ x)[None]
    w = rng.standard_normal((1, 16, 32))
    qmin, qmax = qrange("int8", symmetric=True, reduce_range=reduce)
    s = np.abs(w).max(axis=2) / qmax
    q = gptq_round(w, s, h, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax
    assert _layer_error(w, q, s, h) < 0.6 * _layer_error(w, _nearest(w, s, qmin, qmax), s, h)


def test_inputs_that_were_always_zero_keep_nearest_rounding():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    x[:, 2] = 0.0
    h = (x.T @ x)[None]
    w = rng.standard_normal((1, 5, 6))
    s = np.abs(w).max(axis=2) / 127
    q = gptq_round(w, s, h, -127, 127)
    assert np.isfinite(q).all()
    assert np.array_equal(q[..., 2], _nearest(w, s, -127, 127)[..., 2])


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_quantized")}


def test_pass_rounds_by_gptq_where_the_data_determines_it(tmp_path):
    """rounding=gptq: every layer with at least 8 input vectors per dimension is GPTQ-rounded (the Gemm's 8 inputs
    seen on 32 samples are not: it is rounded to nearest and the report says so); against the default (nearest) only
    the weights change; both models are valid and onnxruntime fuses the same integer kernels."""
    data = calib(32)
    out, rep = graphopt.optimize(conv_net(), [f"{Q},rounding=gptq"], calib_data=data, latency_runs=0)
    near, rep_n = graphopt.optimize(conv_net(), [Q], calib_data=data, latency_runs=0)
    onnx.checker.check_model(out)
    counts = rep.passes[-1]["counts"]
    assert counts[GPTQ_ROUNDED] == 2 and GPTQ_ROUNDED not in rep_n.passes[-1]["counts"]
    assert any("rounded to nearest in 1 layer(s) (fc)" in n for n in rep.passes[-1]["notes"])
    a, b = _weights(out), _weights(near)
    assert a.keys() == b.keys()
    assert not np.array_equal(a["w1_quantized"], b["w1_quantized"])
    assert np.array_equal(a["fc_quantized"], b["fc_quantized"])
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in near.graph.node]
    assert sorted(ort_kernels(out, tmp_path)) == sorted(ort_kernels(near, tmp_path))
    # the rounding changes the integers by at most a few steps: the scales stay those of the weights' range
    assert np.abs(a["w2_quantized"].astype(int) - b["w2_quantized"].astype(int)).max() <= 8


def test_loaded_calibration_still_rounds_by_gptq_given_data(tmp_path):
    data = calib(64)
    out, rep = graphopt.optimize(conv_net(), [f"{Q},rounding=gptq"], calib_data=data, latency_runs=0)
    ranges = rep.passes[-1]["artifacts"]["calibration"]["ranges"]
    again, rep2 = graphopt.optimize(conv_net(), [f"{Q},rounding=gptq"], calib_data=data, latency_runs=0,
                                    calibration_ranges=ranges)
    assert rep2.passes[-1]["counts"][GPTQ_ROUNDED] == rep.passes[-1]["counts"][GPTQ_ROUNDED]
    assert _weights(again).keys() == _weights(out).keys()
    for k, v in _weights(out).items():
        assert np.array_equal(v, _weights(again)[k]), k


def test_second_moments_stop_after_max_samples():
    x = np.random.default_rng(5).standard_normal((10, 4)).astype(np.float32)
    obs = HessianObserver(max_samples=6)
    obs.update(x[:4])
    obs.update(x[4:])
    first = x[:6].astype(np.float64)
    assert obs.samples == 6 and obs.rows == 6 and np.allclose(obs.h[0], first.T @ first, rtol=1e-5)
