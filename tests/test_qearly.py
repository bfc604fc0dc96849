"""quantize objective=latency's early decision (issue 24): right after calibration the all-int8 build, without the
mean correction, is timed against float; where int8 does not pay, the model is written float without running the
fallback or the correction; where it pays the pass goes on as before, reusing the early choice where the fallback
leaves every tensor int8. Timings are faked (``latency.time_models``), so the tests do not depend on this CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import graphopt
import graphopt.passes.quantize as quantize_module
from graphopt.passes.quantization import build as build_module
from graphopt.passes.quantization import latency
from graphopt.passes.quantization.latency import Timing

from graphs import calib, conv_net, ops
from test_quantize_latency import data, outlier_mlp, tiny_chain


class Calls:
    """How often the pass timed models, ran the fallback and the full mean correction, with the timings faked:
    float (index 0; each region's float cut) at 10 ms, every int8 model (each int8 cut) at ``int8`` ms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, int8: float) -> None:
        self.timed: list[int] = []
        self.fallbacks = 0
        self.refits = 0
        fall_back, refit = quantize_module.fall_back, build_module.refit_biases

        def time_models(models: list[Any], feed: Any, *args: Any, **kwargs: Any) -> list[Timing]:
            self.timed.append(len(models))
            if isinstance(feed, list):      # the table's region cuts: a float and an int8 cut per region
                return [Timing(10.0, 0.1), Timing(int8, 0.1)] * (len(models) // 2)
            return [Timing(10.0, 0.1)] + [Timing(int8, 0.1)] * (len(models) - 1)

        def counted_fall_back(*args: Any, **kwargs: Any) -> Any:
            self.fallbacks += 1
            return fall_back(*args, **kwargs)

        def counted_refit(*args: Any, **kwargs: Any) -> Any:
            self.refits += 1
            return refit(*args, **kwargs)

        monkeypatch.setattr(latency, "time_models", time_models)
        monkeypatch.setattr(quantize_module, "fall_back", counted_fall_back)
        monkeypatch.setattr(build_module, "refit_biases", counted_refit)


def quantize(model: Any, data: list[dict[str, np.ndarray]], options: str = "") -> tuple[Any, list[str]]:
    out, rep = graphopt.optimize(model, [f"quantize:per-channel=true{options}"], calib_data=data, latency_runs=0,
                                 validate_output=False)
    return out, rep.passes[-1]["notes"]


def test_kept_float_early_skips_the_fallback_and_the_mean_correction(monkeypatch):
    calls = Calls(monkeypatch, int8=10.2)              # all int8 slower than float: int8 cannot pay
    out, notes = quantize(conv_net(), calib(16))
    assert "QuantizeLinear" not in ops(out) and ops(out) == ops(conv_net())
    assert (calls.fallbacks, calls.refits) == (0, 0)
    assert calls.timed == [2]                          # one region: all int8 against float, once
    said = [n for n in notes if "objective=latency: kept float" in n]
    assert len(said) == 1 and "decided before the fidelity search" in said[0], notes
    assert "all int8 10.2 ms" in said[0] and "float 10 ms" in said[0] and "bias correction were not run" in said[0]


def test_where_int8_pays_early_the_pass_goes_on_and_reuses_the_choice(monkeypatch):
    calls = Calls(monkeypatch, int8=6.0)
    out, notes = quantize(conv_net(), calib(16))
    assert ops(out).count("QuantizeLinear") >= 2
    assert calls.fallbacks == 1 and calls.refits == 1  # the fidelity search and the correction, as before
    assert calls.timed == [2]                          # the fallback left every tensor int8: not timed again
    said = [n for n in notes if n.startswith("objective=latency: 1 of 1 int8 regions kept")]
    assert len(said) == 1 and "timed before the fidelity search, which left every tensor int8" in said[0], notes


def test_where_the_fallback_leaves_tensors_float_the_choice_is_timed_again(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[:, 0] *= 300                                     # an outlier column: all int8 misses min-cosine
    calls = Calls(monkeypatch, int8=6.0)
    out, notes = quantize(outlier_mlp(), [{"x": x}], ",min-top1=0,min-cosine=0.9999")
    assert calls.fallbacks == 1 and len(calls.timed) >= 2
    assert ops(out).count("QuantizeLinear") >= 1
    assert not any("timed before the fidelity search" in n for n in notes), notes


def test_objective_size_times_nothing(monkeypatch):
    calls = Calls(monkeypatch, int8=10.2)
    out, notes = quantize(conv_net(), calib(16), ",objective=size")
    assert calls.timed == [] and calls.fallbacks == 1 and ops(out).count("QuantizeLinear") >= 2


def test_with_several_regions_int8_paying_alone_skips_the_early_table(monkeypatch):
    """tiny_chain: 3 one-layer int8 regions. All int8 against float first: where it pays, the early decision is
    taken on those two alone (the per-region table is left to the choice after the search, which times it once)."""
    calls = Calls(monkeypatch, int8=6.0)
    out, notes = quantize(tiny_chain(3), data(8))
    assert calls.timed[0] == 2                         # the early decision: all int8 against float only
    assert 2 * 3 in calls.timed[1:]                    # the table after the search: each region's two cuts
    assert ops(out).count("QuantizeLinear") >= 1


def test_with_several_regions_int8_not_paying_alone_times_the_regions_early(monkeypatch):
    calls = Calls(monkeypatch, int8=10.2)              # nothing pays: the table decides early, float written
    out, notes = quantize(tiny_chain(3), data(8))
    assert calls.timed[:2] == [2, 2 * 3] and calls.fallbacks == 0
    assert "QuantizeLinear" not in ops(out)
    assert any("decided before the fidelity search" in n for n in notes), notes
