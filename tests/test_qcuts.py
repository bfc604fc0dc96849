"""quantize objective=latency's per-region table on region cuts (``quantization.cuts``): each region's float and int8
cut computes what the whole models compute at the region's outputs, the table times the cuts in (float, int8)
pairs, each on its own feed, and where no cut can be made it times whole models as before."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

import graphopt
from graphopt.passes.quantization import cuts, latency
from graphopt.passes.quantization.latency import Timing
from graphopt.runtime import latency_runs, run_with_outputs

from graphs import parse_model, rand
from test_quantize_latency import data, tiny_chain


def quantize(model: onnx.ModelProto, calib: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, list[str]]:
    out, rep = graphopt.optimize(model, ["quantize:per-channel=true"], calib_data=calib, latency_runs=0,
                                 validate_output=False)
    return out, rep.passes[-1]["notes"]


def test_each_cut_computes_what_its_whole_model_computes_at_the_region_outputs(monkeypatch):
    """tiny_chain(3): three one-MatMul int8 regions between Tanh ops. Every float cut gives the float build's values
    at its outputs, every int8 cut the values of the int8 build there (the same kernels, the region's
    quantize/dequantize pairs included) from that build's values at its inputs; the table feeds both the float
    model's values there."""
    seen: list[tuple[Any, Any]] = []
    real = latency.region_cuts

    def recorded(*args: Any) -> Any:
        got = real(*args)
        seen.append((args, got))
        return got

    monkeypatch.setattr(latency, "region_cuts", recorded)
    quantize(tiny_chain(3), data(8))
    assert seen and seen[0][1] is not None
    (float_model, int8_model, regions, feed), (models, feeds, _) = seen[0]
    assert len(models) == 2 * len(regions) == 6
    for i in range(len(regions)):
        for j, source in ((2 * i, float_model), (2 * i + 1, int8_model)):
            cut = models[j]
            onnx.checker.check_model(cut)
            entries, exits = [t.name for t in cut.graph.input], [o.name for o in cut.graph.output]
            assert set(entries) == set(feeds[j])
            given = run_with_outputs(float_model, entries, feed, "float model")     # what the table feeds it
            for t in entries:
                np.testing.assert_array_equal(feeds[j][t], given[t])
            whole = run_with_outputs(source, entries + exits, feed, "whole model")   # the cut computes the same
            got = run_with_outputs(cut, exits, {t: whole[t] for t in entries}, "cut")
            for t in exits:
                np.testing.assert_allclose(got[t], whole[t], rtol=1e-6, atol=1e-6)
        int8_ops = [n.op_type for n in models[2 * i + 1].graph.node]
        assert int8_ops.count("QuantizeLinear") >= 1 and "MatMul" in int8_ops      # the region's int8 run
        assert "QuantizeLinear" not in [n.op_type for n in models[2 * i].graph.node]    # its float twin


def test_the_table_times_each_regions_cuts_as_a_pair_on_its_own_feed(monkeypatch):
    calls: list[tuple[int, Any, Any, Any]] = []

    def time_models(models: list[Any], feed: Any, budget: float, runs: int, rewarm: int, pairs: Any,
                    anchor: Any = None, *a: Any, **k: Any) -> list[Timing]:
        calls.append((len(models), feed, pairs, anchor))
        if isinstance(feed, list):      # float cut 1 ms slower than int8 for the first region, faster for the others
            return [t for i in range(len(models) // 2) for t in (Timing(2.0, 0.01), Timing(1.0 if i == 0 else 3.0,
                                                                                           0.01))]
        return [Timing(10.0, 0.1)] + [Timing(6.0, 0.1)] * (len(models) - 1)

    monkeypatch.setattr(latency, "time_models", time_models)
    out, notes = quantize(tiny_chain(3), data(8))
    table = [c for c in calls if isinstance(c[1], list)]
    assert table, calls
    n, feeds, pairs, anchor = table[0]
    assert n == 6 and pairs == [(0, 1), (2, 3), (4, 5)] and anchor is None and len(feeds) == 6
    said = [x for x in notes if x.startswith("objective=latency")]
    assert said and "the 1 regions faster alone" in said[0], notes      # region 1 saves 1 ms, the others lose 1


def test_where_no_cut_can_be_made_the_table_times_whole_models(monkeypatch):
    calls: list[tuple[int, Any]] = []
    monkeypatch.setattr(latency, "region_cuts", lambda *a: None)
    monkeypatch.setattr(latency, "time_models", lambda models, feed, *a, **k: calls.append((len(models), a[4])) or
                        [Timing(10.0, 0.1)] + [Timing(6.0, 0.1)] * (len(models) - 1))
    quantize(tiny_chain(3), data(8))
    assert (3 + 1, 0) in calls          # float and each region alone, float the anchor


def test_a_span_is_none_where_an_op_has_no_node_or_nothing_reads_its_output():
    model = parse_model("""g (float[N, 8] x) => (float[N, 8] y) {
        m = MatMul(x, w)
        y = Tanh(m)
    }""", w=rand(8, 8, seed=0))
    assert cuts.span(model, {"no-such-tensor"}, set()) is None
    s = cuts.span(model, {"m"}, set())
    assert s is not None and s.entries == ["x"] and s.exits == ["m"]
    assert cuts.span(model, {"m", "y"}, set()).exits == ["y"]           # the graph output is read outside


def test_latency_runs_gives_each_model_its_own_feed():
    a = parse_model("g (float[N, 8] x) => (float[N, 8] y) { y = Tanh(x) }")
    b = parse_model("g (float[N, 4] z) => (float[N, 4] y) { y = Relu(z) }")
    times = latency_runs([a, b], [{"x": np.ones((1, 8), np.float32)}, {"z": np.ones((1, 4), np.float32)}], runs=5,
                         warmup=1, budget_s=1.0)
    assert [len(t) for t in times] == [5, 5]
    with pytest.raises(Exception):
        latency_runs([a, b], {"x": np.ones((1, 8), np.float32)}, runs=5, warmup=1)     # b has no input x
