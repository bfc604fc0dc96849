"""The quantize pass's calibration, cheaper and the same (issue 24): the histogram binned in cache-sized chunks is the
textbook histogram of the data, and a tensor that only rearranges an observed one (Reshape, Transpose, ...) takes
its source's observer, unfetched, with the range it would have had observed on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
from graphopt.calibration import observers as observers_mod
from graphopt.calibration.observers import HistogramObserver
from graphopt.calibration.ranges import compute_range
from graphopt.calibration.readers import open_source
from graphopt.passes.base import PassContext
from graphopt.passes.quantization import calibrate as calibrate_mod
from graphopt.passes.quantization import latency
from graphopt.passes.quantization.calibrate import calibrate, same_values
from graphopt.passes.quantization.plan import candidate_tensors, make_plan
from graphopt.passes.quantize import Quantize
from graphs import parse_model, rand
from test_quantize_latency import runs

from graphopt.graph import import_graph, infer_shapes
from graphopt.runtime import run_with_outputs


def _textbook(chunks: list[np.ndarray], bins: int) -> tuple[np.ndarray, int, float]:
    """The signed histogram over [-A, A] (A the smallest power of two above every |x|) in 2·bins equal bins, counted
    in float64 one value at a time in spirit (floor of x·bins/A), and the exact zeros."""
    x = np.concatenate([c.ravel() for c in chunks]).astype(np.float64)
    amax = float(np.abs(x).max())
    extent = math.ldexp(1.0, math.frexp(amax)[1])
    idx = np.floor(x * bins / extent).astype(np.int64) + bins
    return np.bincount(idx, minlength=2 * bins), int(np.count_nonzero(x == 0)), extent


@pytest.mark.parametrize("seed", range(4))
def test_chunked_histogram_is_the_textbook_histogram_in_any_pieces(seed: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observers_mod, "CHUNK", 1000)    # many chunks, a partial last one
    rng = np.random.default_rng(seed)
    n = 7321
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    x[rng.random(n) < 0.3] = 0.0
    x[:5] = -0.0
    x[5] = -x[6]                             # a value and its negative land in mirrored bins
    x[7] = 1000.0                            # A = 1024: a value just below zero, -2^-30·A, times bins/A plus bins
    x[8] = -(2.0 ** -20)                     # rounds up to bins in float32; floored first it stays below
    pieces = np.split(x, sorted(rng.choice(np.arange(1, n), 3, replace=False)))
    bins = 64
    hist, zeros, extent = _textbook(pieces, bins)
    obs = HistogramObserver(bins)
    for p in pieces:
        obs.update(p)
    assert obs.extent == extent and obs.exact_zeros == zeros == int(np.count_nonzero(x == 0))
    np.testing.assert_array_equal(obs.hist, hist)
    assert (obs.lo, obs.hi) == (float(x.min()), float(x.max())) and obs.count == n


def _copies_model():
    """Conv → Relu → Transpose → Reshape → MaxPool → Conv, and a Flatten of the last Conv's output as the graph
    output (the MaxPool computes: not a copy)."""
    return parse_model("""g (float[N, 3, 8, 8] x) => (float[N, 96] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu(c1)
        t = Transpose <perm = [0, 1, 3, 2]> (r1)
        s = Reshape(t, shape)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (s)
        c2 = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
        y = Flatten(c2)
    }""", w1=rand(6, 3, 3, 3, seed=1), b1=rand(6, seed=2), w2=rand(6, 6, 3, 3, seed=3), b2=rand(6, seed=4),
        shape=np.array([0, 6, 8, 8], np.int64))


def test_a_copy_shares_its_source_observer_and_gets_the_range_it_would_have_had(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _copies_model()
    graph = import_graph(model)
    infer_shapes(graph, model)
    plan = make_plan(graph, ())
    wanted = candidate_tensors(plan)
    assert same_values(plan, wanted) == {"t": "r1", "s": "r1", "y": "c2"}
    data = [{"x": rand(4, 3, 8, 8, seed=10 + i) * 3} for i in range(3)]
    fetched: list[str] = []
    real_collect = calibrate_mod.collect

    def spying(m, tensors, *a, **k):
        fetched.extend(tensors)
        return real_collect(m, tensors, *a, **k)

    monkeypatch.setattr(calibrate_mod, "collect", spying)
    ctx = PassContext(original=model, calib=open_source(data, model))
    options = Quantize.Options()
    cal = calibrate(graph, model, plan, options, ctx, "quantize")
    assert "t" not in fetched and "s" not in fetched and "y" not in fetched and "p" in fetched
    ranges = cal.candidates[0][1]
    values = [run_with_outputs(model, wanted, feed, "model") for feed in data]
    for name in ("t", "s", "p", "y"):
        own = HistogramObserver(options.bins)
        for got in values:
            own.update(got[name])
        method = "minmax" if name == "y" else options.method        # a graph output keeps its min and max
        assert ranges[name] == compute_range(own, method, 99.99)
    assert ranges["y"] != ranges["c2"]          # the same observer, each with its own method


def test_the_look_at_five_rounds_decides_only_wide_gaps() -> None:
    # at 5 rounds a pair is decided only where its notches, doubled, are apart; no futility there; at 10 as before
    flt, wide, narrow = runs(1.0, 0.02, 12), runs(0.8, 0.02, 12), runs(0.9, 0.02, 12)
    table = latency.separated([(0, 1), (0, 2)], 30, 0)
    assert table([flt[:5], wide[:5], narrow[:5]]) == {0, 2}          # 1 leaves; 2 (apart at one notch) stays
    t5 = [latency.timing(x[:5]) for x in (flt, wide, narrow)]
    assert t5[2].faster(t5[0])                   # what the look at 10 would decide, not taken at 5
    assert table([flt[:10], wide[:5], narrow[:10]]) == set()
    same = latency.separated([(0, 1)], 30, 0)
    assert same([flt[:5], flt[:5]]) == {0, 1}                   # equal: futile at 10, not at 5
    assert latency.separated([(0, 1)], 30, 0)([flt[:6], wide[:6]]) is None     # no look at 6


def test_a_candidate_that_falls_short_of_the_minimum_gain_is_decided_and_moot() -> None:
    # 1 is 1% faster than float with narrow notches: apart from it, but short of 3% even with both notches; so its
    # pair with 2 (undecided: wide notches) is moot; without min_gain, 1 vs 2 keeps both timed
    flt, close, wide = runs(1.0, 0.002, 12)[:10], runs(0.99, 0.002, 12)[:10], runs(0.985, 0.05, 12)[:10]
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert latency.separated(pairs, 60, 0)([flt, close, wide]) == {0, 1, 2}
    assert latency.separated(pairs, 60, 0, latency.MIN_GAIN)([flt, close, wide]) == {0, 2}
    # within reach of 3% given its notches, and not apart: still timed, as before
    assert latency.separated([(0, 1)], 60, 0, latency.MIN_GAIN)([flt, wide]) == {0, 1}
    # per-channel=auto's pair: the per-channel build is the anchor, float (in no pair) is timed while it is
    assert latency.separated([(1, 2)], 60, 1, latency.MIN_GAIN)([flt, flt, close]) == set()


def test_the_table_takes_a_region_short_of_the_minimum_gain_at_its_median_sign() -> None:
    # region 1 gains 0.7% of float (notches 1% each): not apart, not futile at 30 rounds, but short of 3%
    flt, tiny = runs(1.0, 0.01, 12)[:10], runs(0.993, 0.01, 12)[:10]
    assert not latency.timing(tiny).faster(latency.timing(flt))
    assert latency.separated([(0, 1)], 30, 0)([flt, tiny]) == {0, 1}
    assert latency.separated([(0, 1)], 30, 0, latency.MIN_GAIN)([flt, tiny]) == set()
