"""Calibration math as properties: qparams, observers (streamed == one-shot), KL == a slow reference, readers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.observers import HistogramObserver, MinMaxObserver
from graphopt.calibration.qparams import dequantize, qparams, qrange, quantize
from graphopt.calibration.ranges import compute_range, kl_threshold_bin, percentile_range

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@given(lo=finite, hi=finite, dtype=st.sampled_from(["uint8", "int8"]), symmetric=st.booleans(),
       reduce=st.booleans())
def test_qparams_zero_exact_and_scale_positive(lo, hi, dtype, symmetric, reduce):
    lo, hi = min(lo, hi), max(lo, hi)
    scale, zp = qparams(lo, hi, dtype, symmetric, reduce)
    assert scale > 0 and np.isfinite(scale)
    qmin, qmax = qrange(dtype, symmetric, reduce)
    assert qmin <= int(zp) <= qmax
    q0 = quantize(np.zeros(1, np.float32), scale, zp, dtype)
    assert dequantize(q0, scale, zp)[0] == 0.0          # zero is exact
    # the range's ends are representable to within half a step (after widening to contain 0)
    for v in (min(lo, 0.0), max(hi, 0.0)):
        back = dequantize(quantize(np.array([v], np.float32), scale, zp, dtype), scale, zp)[0]
        assert abs(back - v) <= scale * 0.5001 + 1e-6 * abs(v)


@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-50, 50, width=32)),
       st.integers(1, 5), st.sampled_from([128, 256, 2048]))
@settings(max_examples=60, deadline=None)
def test_histogram_streamed_equals_one_shot(x, pieces, bins):
    one = HistogramObserver(bins)
    one.update(x)
    streamed = HistogramObserver(bins)
    for part in np.array_split(x, pieces):
        streamed.update(part * 1.0)
    assert one.extent == streamed.extent
    np.testing.assert_array_equal(one.hist, streamed.hist)
    assert one.range() == streamed.range()
    assert one.hist.sum() + one.zeros_only == x.size
    assert one.exact_zeros == streamed.exact_zeros == int(np.count_nonzero(x == 0))


@given(arrays(np.float32, st.integers(1, 300), elements=st.floats(-50, 50, width=32)), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_histogram_in_chunks_equals_whole(x, chunk):
    """Binning in chunks (bounded temporaries) gives the same histogram as binning everything at once."""
    import graphopt.calibration.observers as obs_mod
    whole = HistogramObserver(256)
    whole.update(x)
    saved, obs_mod.CHUNK = obs_mod.CHUNK, chunk
    try:
        chunked = HistogramObserver(256)
        chunked.update(x)
    finally:
        obs_mod.CHUNK = saved
    np.testing.assert_array_equal(whole.hist, chunked.hist)
    assert whole.exact_zeros == chunked.exact_zeros


@given(arrays(np.float32, st.integers(1, 200), elements=finite), st.integers(1, 6))
def test_minmax_streamed_equals_one_shot(x, pieces):
    a, b = MinMaxObserver(), MinMaxObserver()
    a.update(x)
    for part in np.array_split(x, pieces):
        b.update(part)
    assert a.range() == b.range() == (float(x.min()), float(x.max()))


def test_histogram_ignores_nonfinite_and_memory_is_fixed():
    obs = HistogramObserver(256)
    obs.update(np.array([np.nan, np.inf, -np.inf, 1.0], np.float32))
    assert obs.range() == (1.0, 1.0) and obs.hist.sum() == 1
    size = obs.hist.nbytes
    for i in range(50):
        obs.update(np.random.default_rng(i).standard_normal(10_000) * (i + 1))
    assert obs.hist.nbytes == size


def test_histogram_of_subnormal_values():
    """Found by hypothesis: A = 2^-145 for x = 2.1e-44 made bins/A overflow float32 (inf * 0 = NaN bin index)."""
    obs = HistogramObserver(128)
    obs.update(np.array([2.1e-44, 0.0], np.float32))
    obs.update(np.array([-1e-40, 3e-45], np.float32))
    assert obs.hist.sum() == 4 and obs.extent == 2.0 ** -64 and obs.exact_zeros == 1
    assert compute_range(obs, "percentile", 99.0)[1] > 0


def _smooth(p, eps=1e-4):
    zeros, nonzeros = p == 0, p != 0
    return p + eps * zeros - eps * zeros.sum() / max(nonzeros.sum(), 1) * nonzeros


def reference_kl_bin(hist: np.ndarray, levels: int) -> int:
    """TensorRT/MXNet entropy calibration, written as plainly as possible (the slow loop we replaced)."""
    best, best_i = np.inf, levels
    for i in range(levels, len(hist) + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[-1] += hist[i:].sum()
        nonzero = p != 0
        m = i // levels
        merged = np.array([sliced[j * m:(j + 1) * m].sum() for j in range(levels)])
        merged[-1] += sliced[levels * m:].sum()
        q = np.zeros(i)
        for j in range(levels):
            start, stop = j * m, (i if j == levels - 1 else j * m + m)
            norm = nonzero[start:stop].sum()
            if norm:
                q[start:stop] = merged[j] / norm
        q[p == 0] = 0
        p, q = _smooth(p), _smooth(q)
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))
        if kl < best:
            best, best_i = kl, i
    return best_i


@given(st.integers(0, 10_000), st.sampled_from([(64, 8), (128, 16), (256, 32)]), st.booleans())
@settings(max_examples=40, deadline=None)
def test_kl_equals_reference(seed, sizes, sparse):
    bins, levels = sizes
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, 50, bins) * (rng.random(bins) < (0.3 if sparse else 1.0))
    hist[rng.integers(0, bins)] += 1
    assert kl_threshold_bin(hist, levels) == reference_kl_bin(hist, levels)


@pytest.mark.parametrize("case", ["last-bin-only", "heavy-tail", "one-spike", "uneven-length"])
def test_kl_equals_reference_on_edge_cases(case):
    """Histograms where P has non-zero bins that Q's groups leave empty, or where nearly all mass is outliers."""
    rng = np.random.default_rng(7)
    hist = {"last-bin-only": np.eye(1, 128, 127, dtype=np.int64)[0] * 5,
            "heavy-tail": np.concatenate([rng.integers(0, 9, 120), [0, 0, 0, 0, 0, 0, 0, 4000]]),
            "one-spike": np.eye(1, 256, 40, dtype=np.int64)[0] * 300,
            "uneven-length": rng.integers(0, 30, 77) * (rng.random(77) < 0.2)}[case]
    hist[0] += 1
    for levels in (8, 16, 32):
        assert kl_threshold_bin(hist, levels) == reference_kl_bin(hist, levels), levels


def test_kl_clips_outliers_of_a_bell_curve():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]]).astype(np.float32)
    obs = HistogramObserver(2048)
    obs.update(x)
    lo, hi = compute_range(obs, "kl")
    assert 2.0 < hi < 10.0 and -10.0 < lo < -2.0       # the two outliers do not set the range
    assert compute_range(obs, "minmax") == (-35.0, 40.0)
    plo, phi = percentile_range(obs, 99.9)
    assert 2.5 < phi < 4.5 and plo == -phi


def test_kl_uses_unsigned_levels_for_nonnegative():
    from graphopt.calibration.ranges import quantized_levels

    pos, signed = HistogramObserver(256), HistogramObserver(256)
    pos.update(np.abs(np.random.default_rng(0).standard_normal(1000)))
    signed.update(np.random.default_rng(0).standard_normal(1000))
    assert quantized_levels(pos) == 256 and quantized_levels(signed) == 128
    assert compute_range(pos, "kl")[0] == pytest.approx(pos.range()[0])


class _Recorder(MinMaxObserver):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def update(self, x: np.ndarray) -> None:
        self.rows.append(x.shape[0])
        super().update(x)


@pytest.mark.parametrize("budget, expected", [(256 << 20, 16), (3 * 8 * 4, 3)])
def test_collector_runs_are_bounded_whatever_the_batch(budget, expected):
    """A 40-row batch runs in pieces of at most 16 rows (fewer when the byte budget says so), and the observed
    range is the same as one pass over all rows."""
    from graphopt.calibration.collector import collect
    from graphopt.calibration.readers import Batch
    from graphs import make_model, node

    model = make_model([node("Relu", ["x"], ["y"])], [("x", ["N", 8])], [("y", ["N", 8])])
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    rec = {"y": _Recorder()}
    seen = collect(model, ["y"], [Batch({"x": x}, None)], rec, budget_bytes=budget)
    assert seen == 40 and max(rec["y"].rows) == expected and sum(rec["y"].rows) == 40
    assert (rec["y"].lo, rec["y"].hi) == (0.0, float(np.maximum(x, 0).max()))


def test_collector_skips_an_empty_batch():
    """A batch with zero rows (an iterable's last, empty slice) has nothing to observe and is skipped; it once made
    the run-size arithmetic divide by zero and crash the quantize pass."""
    from graphopt.calibration.collector import collect
    from graphopt.calibration.readers import Batch
    from graphs import make_model, node

    model = make_model([node("Relu", ["x"], ["y"])], [("x", ["N", 8])], [("y", ["N", 8])])
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    rec = {"y": _Recorder()}
    seen = collect(model, ["y"], [Batch({"x": x[:3]}, None), Batch({"x": x[:0]}, None), Batch({"x": x[3:]}, None)],
                   rec)
    assert seen == 5 and rec["y"].rows == [3, 2]


def reference_mse_threshold(obs: HistogramObserver, steps: int = 255) -> float:
    """The mse method's objective, one candidate and one bin at a time."""
    lo, hi = obs.range()
    width = obs.extent / obs.bins
    best, best_t = np.inf, 0.0
    for j in range(1, obs.bins + 1):
        t = j * width
        top, bottom = max(min(hi, t), 0.0), min(max(lo, -t), 0.0)
        err = 0.0
        for k, count in enumerate(obs.hist):
            c = (k - obs.bins + 0.5) * width
            if c > top:
                err += count * (c - top) ** 2
            elif c < bottom:
                err += count * (c - bottom) ** 2
            else:
                err += count * ((top - bottom) / steps) ** 2 / 12
        err -= obs.exact_zeros * ((top - bottom) / steps) ** 2 / 12    # zeros round exactly
        if best == np.inf or err < best - 1e-9 * abs(best):
            best, best_t = err, t
    return best_t


@given(st.integers(0, 10_000), st.sampled_from(["normal", "laplace", "relu", "skewed"]))
@settings(max_examples=30, deadline=None)
def test_mse_equals_reference(seed, kind):
    rng = np.random.default_rng(seed)
    x = {"normal": rng.standard_normal(3000), "laplace": rng.laplace(size=3000) ** 3,
         "relu": np.maximum(rng.standard_normal(3000), 0), "skewed": rng.exponential(size=3000) - 0.3}[kind]
    obs = HistogramObserver(64)
    obs.update(x.astype(np.float32))
    t = reference_mse_threshold(obs)
    lo, hi = obs.range()
    assert compute_range(obs, "mse") == pytest.approx((max(lo, -t), min(hi, t)))


@pytest.mark.parametrize("kind", ["normal", "laplace", "heavy"])
def test_mse_range_is_near_the_best_clip_on_the_raw_values(kind):
    """The histogram's error model picks a clip whose real 8-bit error is within 5% of the best of 400 tried."""
    rng = np.random.default_rng(3)
    x = {"normal": rng.standard_normal(200_000), "laplace": rng.laplace(size=200_000),
         "heavy": rng.standard_t(2, 200_000)}[kind].astype(np.float32)
    obs = HistogramObserver(2048)
    obs.update(x)

    def error(lo: float, hi: float) -> float:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = (hi - lo) / 255
        return float(np.mean((np.clip(np.round((x - lo) / s), 0, 255) * s + lo - x) ** 2))

    best = min(error(max(x.min(), -t), min(x.max(), t)) for t in np.linspace(0.05, np.abs(x).max(), 400))
    assert error(*compute_range(obs, "mse")) <= 1.05 * best


def test_first_row_feed_keeps_a_feed_whose_first_dims_disagree():
    """Silero VAD's state [2, 1, 128] beside its audio [1, 576]: axis 0 is no batch axis for the state, so the probe
    feed stays whole (cutting it made quantize's fallback crash with exit 3); a batch is cut, 0-d values kept."""
    vad = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32)}
    assert {k: v.shape for k, v in first_row_feed(vad).items()} == {"input": (1, 576), "state": (2, 1, 128)}
    batch = {"x": np.zeros((4, 3), np.float32), "m": np.zeros((4, 7), np.int64), "flag": np.array(True)}
    assert {k: v.shape for k, v in first_row_feed(batch).items()} == {"x": (1, 3), "m": (1, 7), "flag": ()}
