"""Bias correction of the weights' rounding: the streamed mean input patch against onnxruntime's own Conv, and the
quantize pass removing the rounding's mean output error (in onnxruntime, integer kernels intact)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration.bias_correction import PatchMeanObserver, rounding_offset
from graphopt.passes.quantization.calibrate import conv_geometry
from graphopt.passes.quantization.report import BIASES_CORRECTED
from graphs import GEOMETRIES, conv_only_model, ort_kernels, session

Q = "quantize:objective=size"   # int8 wherever the targets hold, as these tests expect (objective=latency times it)


@pytest.mark.parametrize("xs, ws, group, strides, pads, dil", GEOMETRIES)
def test_mean_patch_gives_onnxruntimes_mean_conv_output(xs, ws, group, strides, pads, dil):
    """For any weights w, w_o · E[patch] (``rounding_offset`` with w as the difference) is the mean over samples
    and positions of onnxruntime's Conv output channel o: the mean patch counts padding as the zeros the Conv
    reads (the Conv's own pads, SAME's, none for VALID). Fed in two pieces."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(xs) + rng.uniform(-2, 2, (1, xs[1]) + (1,) * (len(xs) - 2))).astype(np.float32)
    attrs = dict(group=group, strides=strides, dilations=dil)
    attrs.update(auto_pad=pads) if isinstance(pads, str) else attrs.update(pads=pads)
    geometry = conv_geometry(gs.import_onnx(conv_only_model(xs, np.zeros(ws, np.float32), **attrs)).nodes[0])
    obs = PatchMeanObserver(geometry)
    obs.update(x[:1])
    obs.update(x[1:])
    for seed in range(3):
        w = np.random.default_rng(seed).standard_normal(ws).astype(np.float32)
        y = session(conv_only_model(xs, w, **attrs)).run(None, {"x": x})[0].astype(np.float64)
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
    spec = f"{Q},method=minmax,min-cosine=0,min-top1=0"
    plain, _ = graphopt.optimize(m, [spec + ",bias-correction=false"], calib_data=data, latency_runs=0)
    fixed, rep = graphopt.optimize(m, [spec], calib_data=data, latency_runs=0)
    onnx.checker.check_model(fixed)
    before, after = np.abs(_mean_error(m, plain, data)), np.abs(_mean_error(m, fixed, data))
    assert before.max() > 0.015, before                  # the rounding's mean error is real
    assert after.max() < 0.1 * before.max(), (before, after)
    assert rep.passes[-1]["counts"][BIASES_CORRECTED] == 1
    layer = next(n for n in fixed.graph.node if n.name == "layer")
    assert len(layer.input) == 3 and len(next(n for n in plain.graph.node if n.name == "layer").input) == 2
    assert ("QLinearConv" if op == "Conv" else "QGemm") in ort_kernels(fixed, tmp_path)


def test_no_bias_is_added_where_the_correction_rounds_to_zero():
    """Weights on the int8 grid (multiples of their scale) round without error: a bias-free layer stays bias-free
    (the full mean correction adjusts only biases that are there)."""
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
    out, rep = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0"], calib_data=data, latency_runs=0)
    fc1 = next(n for n in out.graph.node if n.name == "fc1")
    assert len(fc1.input) == 2
    plain, _ = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    assert [len(n.input) for n in out.graph.node] == [len(n.input) for n in plain.graph.node]


def test_loaded_ranges_without_data_skip_the_correction_and_say_so(tmp_path):
    m, data = _highpass_model("Conv")
    _, first = graphopt.optimize(m, [f"{Q},method=minmax,min-cosine=0,min-top1=0"], calib_data=data,
                                 latency_runs=0)
    ranges = first.passes[-1]["artifacts"]["calibration"]["ranges"]
    out, rep = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0"], calibration_ranges=ranges,
                                 latency_runs=0, validate_output=False)
    assert BIASES_CORRECTED not in rep.passes[-1]["counts"]
    assert any(n.startswith("bias correction skipped: no calibration data") for n in rep.passes[-1]["notes"])
    assert len(next(n for n in out.graph.node if n.name == "layer").input) == 2


def _two_convs() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Conv+Relu, then Conv: the second layer reads the first's int8 output, whose clipped range (mse clips the
    long tail of these inputs) shifts its mean, a shift no correction of the second layer's own weights sees."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.4
    w2 = rng.standard_normal((4, 6, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(6).astype(np.float32) * 0.1
    b2 = rng.standard_normal(4).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 10])
    m = helper.make_model(helper.make_graph(nodes, "g", [xi], [yi], inits), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = rng.lognormal(0.0, 1.0, (64, 3, 10, 10)).astype(np.float32)      # a long right tail
    return m, [{"x": x[i:i + 16]} for i in range(0, 64, 16)]


def _sites(quantized: onnx.ModelProto) -> list:
    """Every Conv with an int32 bias behind a DequantizeLinear, as a BiasSite; a graph output's producer writes
    '<name>_float' in the quantized model (its quantized copy takes the name), '<name>' in the float one."""
    from graphopt.calibration.bias_correction import BiasSite
    producer = {o: n for n in quantized.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    sites = []
    for n in quantized.graph.node:
        if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in producer:
            dq = producer[n.input[2]]
            sites.append(BiasSite(n.output[0], n.output[0].removesuffix("_float"), dq.input[0],
                                  np.broadcast_to(inits[dq.input[1]], (inits[dq.input[0]].shape[0],))))
    return sites


def test_full_mean_correction_matches_every_layers_mean_to_float():
    """refit_biases, on a model built without any correction: after its steps, each int8 layer's output mean per
    channel on the data is float's to within half its bias step when the data comes as one feed (within one and a
    half as four: each feed's residual is measured under the corrections upstream as they stood), downstream of the
    shift that the first layer's clipped output gives the second; before, the second layer was off by far more."""
    from graphopt.calibration.bias_correction import refit_biases
    from graphopt.passes.quantization.weights import with_bias_steps
    m, data = _two_convs()
    plain, _ = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    sites = _sites(plain)
    assert [s.output for s in sites] == ["c1", "y_float"]
    whole = [{"x": np.concatenate([f["x"] for f in data])}]

    def mean_errors(model: onnx.ModelProto) -> list[np.ndarray]:
        """|mean int8 - mean float| per channel of each site's output (before its own output quantization)."""
        probe, ref = onnx.load_from_string(model.SerializeToString()), onnx.load_from_string(m.SerializeToString())
        for p, names in ((probe, [s.output for s in sites]), (ref, [s.reference for s in sites])):
            p.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
        d = [a.astype(np.float64) - b for a, b in zip(session(probe).run(None, whole[0])[1:],
                                                      session(ref).run(None, whole[0])[1:])]
        return [np.abs(e.mean(axis=(0, 2, 3))) for e in d]

    def refit(feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
        return with_bias_steps(onnx.load_from_string(plain.SerializeToString()), refit_biases(plain, m, sites, feeds))

    before, exact, streamed = mean_errors(plain), mean_errors(refit(whole)), mean_errors(refit(data))
    for site, err in zip(sites, exact):                   # all rows at once: the bias grid is the only error left
        assert (err <= 0.5 * site.scale + 1e-6).all(), (err, site.scale)
    for site, err in zip(sites, streamed):                # four feeds, folded in one after the other
        assert (err <= 1.5 * site.scale).all(), (err, site.scale)
    assert before[1].max() > 10 * max(exact[1].max(), streamed[1].max()), (before, exact, streamed)


def test_segments_run_an_unsorted_model_as_the_whole_model_does():
    """A rewrite's export need not list its nodes in topological order: the segments sort them, and the values at
    every cut are the whole model's."""
    from graphopt.calibration.bias_correction import _Segments
    m, data = _two_convs()
    shuffled = onnx.load_from_string(m.SerializeToString())
    nodes = list(shuffled.graph.node)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes[::-1])
    seg = _Segments(shuffled, ["y", "c1"])
    assert seg.cuts == ["c1", "y"]
    probe = onnx.load_from_string(m.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    whole = session(probe).run(None, data[0])
    got: dict[str, np.ndarray] = {}

    def at_cut(k: int, value: np.ndarray) -> np.ndarray:
        got[seg.cuts[k]] = value.copy()
        return value

    seg.run(data[0], at_cut)
    assert np.allclose(got["c1"], whole[1], atol=1e-5) and np.allclose(got["y"], whole[0], atol=1e-5)


def test_segments_run_on_one_thread():
    """Each segment is a few layers run once per feed, hundreds of runs per build: its session has one intra-op
    thread, since a pool's start and spin per run cost more CPU than the parallel work saves (PP-OCR cls: 0.9 s of
    CPU per build with one thread, 11-19 s with the default two on a loaded 2-core machine)."""
    from graphopt.calibration.bias_correction import _Segments
    m, _ = _two_convs()
    seg = _Segments(m, ["c1", "y"])
    assert [sess.get_session_options().intra_op_num_threads for sess, *_ in seg.parts] == [1, 1]


def test_a_model_the_mean_matching_cannot_run_keeps_the_weights_offsets(monkeypatch):
    """Where the layer-by-layer matching fails (a model onnxruntime cannot run cut in pieces), the pass still
    quantizes, with the weights' rounding offsets corrected, and says why."""
    import graphopt.passes.quantization.build as q

    def broken(*args, **kwargs):
        raise RuntimeError("cannot cut this model")

    monkeypatch.setattr(q, "refit_biases", broken)
    m, data = _highpass_model("Conv")
    out, rep = graphopt.optimize(m, [f"{Q},method=minmax,min-cosine=0,min-top1=0"], calib_data=data,
                                 latency_runs=0)
    onnx.checker.check_model(out)
    assert rep.passes[-1]["counts"][BIASES_CORRECTED] == 1
    assert any("mean matching skipped (RuntimeError: cannot cut this model)" in n for n in rep.passes[-1]["notes"])


def test_the_float_side_is_run_once_across_builds(monkeypatch):
    """The float model's channel means, kept in ``reference_means``, serve a second call on the same feeds: only
    the quantized model is cut and run again, and the steps are the same."""
    import graphopt.calibration.bias_correction as bc
    m, data = _two_convs()
    plain, _ = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    sites = _sites(plain)
    cache: dict[str, list[np.ndarray]] = {}
    first = bc.refit_biases(plain, m, sites, data, cache)
    assert set(cache) == {"c1", "y"} and all(len(v) == len(data) for v in cache.values())
    cut: list[onnx.ModelProto] = []
    real = bc._Segments

    def counting(model: onnx.ModelProto, cuts: list[str]) -> bc._Segments:
        cut.append(model)
        return real(model, cuts)

    monkeypatch.setattr(bc, "_Segments", counting)
    second = bc.refit_biases(plain, m, sites, data, cache)
    assert cut == [plain] and all((first[k] == second[k]).all() for k in first)
