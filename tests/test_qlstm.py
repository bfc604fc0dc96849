"""quantize gives LSTMs int8 weights (com.microsoft.DynamicQuantizeLSTM), at the top level and in Loop bodies, where
the targets hold and (objective=latency) it measures faster; GRU stays float (no integer kernel in onnxruntime).

Fires (op lists), numerically within a stated bound with optimizations off, declines with its reason (GRU, a target
missed, exclude, measured not faster, not run by the calibration samples), a second run changes nothing, and every
output passes onnx.checker (the pipeline checks each pass's output; here once more on the written model).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.errors import UsageError
from graphopt.graph import graph_protos
from graphopt.passes.quantization import recurrent
from graphopt.passes.quantization.latency import Timing
from graphs import loop_lstm_model, make_model, node, ops, parse_model, rand, rel_error, run, same_graph

T, I, H = 6, 8, 16


def lstm_model(op: str = "LSTM") -> onnx.ModelProto:
    """y, h = LSTM(x) (or GRU: 3 gates) over T steps, one sequence; weights an LSTM trained on nothing would have."""
    g = 4 if op == "LSTM" else 3
    return make_model([node(op, ["x", "W", "R", "B"], ["y", "h"], name="rnn", hidden_size=H)], [("x", [T, 1, I])],
                      ["y", "h"], {"W": rand(1, g * H, I, seed=1) * 0.5, "R": rand(1, g * H, H, seed=2) * 0.5,
                                   "B": rand(1, 2 * g * H, seed=3) * 0.1})


def calib(n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((T, 1, I)).astype(np.float32)} for _ in range(n)]


def quantize(model: onnx.ModelProto, options: str = "objective=size", data: list | None = None):
    """The quantize pass through the API, no validation gate (the tests check the outputs themselves)."""
    out, rep = graphopt.optimize(model, [f"quantize:{options}"], calib_data=data or calib(), latency_runs=0,
                                 validate_output=False)
    onnx.checker.check_model(out)
    return out, rep.passes[-1]


def test_lstm_fires_and_stays_within_bound():
    model = lstm_model()
    out, step = quantize(model)
    assert ops(out) == ["com.microsoft.DynamicQuantizeLSTM"]
    assert step["counts"][recurrent.LSTM_INT8] == 1
    assert [r["status"] for r in step["layers"]] == ["int8"]
    assert any("targets hold (cosine" in n for n in step["notes"])
    x = calib(1, seed=7)[0]
    for ref, got in zip(run(model, x), run(out, x)):     # int8 W and R, X and h quantized each step: ~1% here
        assert rel_error(ref, got) < 0.03
    again, step2 = quantize(out)
    assert not step2["changed"] and same_graph(out, again)


def test_in_a_loop_body():
    model = loop_lstm_model()
    data = [{"h0": rand(1, 1, 8, seed=s), "n": np.array(3, np.int64)} for s in range(8)]
    # the body's MatMul left float: this is the LSTM's error alone (test_qloop.py: the body's QDQ)
    out, step = quantize(model, "objective=size,min-top1=0,exclude=MatMul", data)
    body = [n.op_type for n in out.graph.node[-1].attribute[0].g.node]
    assert "DynamicQuantizeLSTM" in body and "LSTM" not in body
    assert "in Loop" in step["layers"][-1]["layer"] and step["layers"][-1]["status"] == "int8"
    for ref, got in zip(run(model, data[0]), run(out, data[0])):
        assert rel_error(ref, got) < 0.05


def test_gru_declines_with_its_reason():
    model = lstm_model("GRU")
    out, step = quantize(model)
    assert ops(out) == ["GRU"] and not step["changed"]
    assert "no integer GRU kernel" in step["layers"][0]["status"]


@pytest.mark.parametrize("options, reason", [("objective=size,min-cosine=0.99999999", "fidelity: int8 misses"),
                                             ("objective=size,exclude=LSTM", "excluded by option")])
def test_stays_float_where_it_must(options, reason):
    model = lstm_model()
    out, step = quantize(model, options)
    assert same_graph(out, model) and not step["changed"]
    assert reason in step["layers"][0]["status"] and step["counts"][recurrent.RECURRENT_FLOAT] == 1


@pytest.mark.parametrize("faster", [True, False, "slightly"])
def test_latency_keeps_it_only_where_measured_faster(monkeypatch, faster):
    """objective=latency follows the with/without timing (faked: the real one depends on the machine's load); a
    gain beyond the noise but under latency.MIN_GAIN (2%) does not pay."""
    timed = []

    def fake(models, feed, budget_s, runs, rewarm, pairs, anchor=None):
        timed.append((len(models), pairs, anchor))
        return [Timing(1.0, 0.001), Timing({True: 0.5, False: 1.0, "slightly": 0.98}[faster], 0.001)]

    monkeypatch.setattr(recurrent, "time_models", fake)
    out, step = quantize(lstm_model(), "objective=latency")
    assert timed == [(2, [(0, 1)], 0)]
    assert ops(out) == (["com.microsoft.DynamicQuantizeLSTM"] if faster is True else ["LSTM"])
    said = step["layers"][0]["status"] + " | " + " | ".join(step["notes"])
    assert ("measured faster: 500.0 µs int8 vs 1000.0 µs float" if faster is True else "float: targets hold") in said
    assert faster is True or "speed: not measured 3% faster" in step["layers"][0]["status"]


@pytest.mark.parametrize("shared", [False, True])
def test_branch_the_samples_do_not_take_is_said(monkeypatch, shared):
    """An LSTM in an If branch the calibration samples never take changes no output bit: under objective=latency it
    stays float, said so, and nothing is timed for it; where it reads the weights of one made int8, it goes int8 with
    it (float, it would keep them stored beside their int8 copy)."""
    model = parse_model(f"""
    agraph (float[{T}, 1, {I}] x, bool b) => (float[{T}, 1, 1, {H}] y) {{
        y = If (b) <then_branch = g1 () => (float[{T}, 1, 1, {H}] t) {{ t, th = LSTM <hidden_size = {H}> (x, W, R) }},
                    else_branch = g2 () => (float[{T}, 1, 1, {H}] e) {{ e, eh = LSTM <hidden_size = {H}> (x, W2, R2) }}>
    }}""", W=rand(1, 4 * H, I, seed=1), R=rand(1, 4 * H, H, seed=2), W2=rand(1, 4 * H, I, seed=1 if shared else 3),
        R2=rand(1, 4 * H, H, seed=2 if shared else 4))
    data = [{**d, "b": np.array(True)} for d in calib(8)]
    timed = []
    monkeypatch.setattr(recurrent, "time_models", lambda models, *a, **k: timed.append(len(models)) or
                        [Timing(1.0, 0.01), Timing(0.5, 0.01)])
    out, step = quantize(model, "objective=latency,min-top1=0", data)
    assert timed == [2]                       # base and the then-branch LSTM; the else one is not timed
    statuses = [r["status"] for r in step["layers"]]
    assert statuses[0] == "int8" and (statuses[1] == "int8" if shared else "not run by the calibration" in statuses[1])
    assert shared == any("int8 as LSTM" in n for n in step["notes"])   # equal W2/R2: one tensor (graphopt.scopes)
    float_w = [t for g in graph_protos(out.graph) for t in g.initializer
               if t.data_type == onnx.TensorProto.FLOAT and list(t.dims) == [1, 4 * H, I]]
    assert len(float_w) == (0 if shared else 1)     # shared: no float copy kept for the unrun LSTM


def test_quantize_dynamic_after_quantize_is_refused_with_the_reason():
    with pytest.raises(UsageError, match="LSTMs included"):
        graphopt.optimize(lstm_model(), ["quantize", "quantize-dynamic"], calib_data=calib(), validate_output=False)
