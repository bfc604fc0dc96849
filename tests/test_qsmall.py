"""The quantize pass's fixed costs on small models (issue 24): work overlapped on a worker thread gives what it gave
one after the other, the latency table's quartiles are numpy's to the bit, a model timed twice loads once."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from graphopt.calibration import bias_correction as bc
from graphopt.calibration import collector as collector_mod
from graphopt.calibration.collector import collect
from graphopt.calibration.observers import HistogramObserver
from graphopt.calibration.readers import Batch
from graphopt import runtime
from graphopt.passes import judge as judge_mod
from graphopt.passes.judge import Judge, Reference
from graphopt.passes.quantization.latency import quantile
from graphopt.runtime import LatencySessions, ahead, run_with_outputs
from graphopt.validate import Thresholds

from graphs import calib, conv_net
from test_bias_correction import Q, _sites, _two_convs
from test_qtime import _Counting, _noisy


@pytest.fixture(autouse=True)
def _a_spare_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlaps as on an idle machine with two cores, whatever this machine's load."""
    for mod in (bc, collector_mod, judge_mod):
        monkeypatch.setattr(mod, "spare_core", lambda: True)


def test_spare_core_only_where_the_runnable_threads_leave_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.runnable() >= 1                 # this thread, running
    monkeypatch.setattr(runtime, "_cores", lambda: 2)
    for running, spare in ((1, True), (2, False), (5, False)):
        monkeypatch.setattr(runtime, "runnable", lambda: running)
        assert runtime.spare_core() is spare
    monkeypatch.setattr(runtime, "_cores", lambda: 1)
    monkeypatch.setattr(runtime, "runnable", lambda: 1)
    assert not runtime.spare_core()


def test_ahead_gives_each_item_in_order_and_runs_the_next_on_a_worker() -> None:
    caller = threading.get_ident()
    where: list[int] = []

    def square(x: int) -> int:
        where.append(threading.get_ident())
        return x * x

    assert list(ahead(square, range(6))) == [(i, i * i) for i in range(6)]
    assert where and caller not in where
    assert list(ahead(square, [])) == []


def test_ahead_raises_at_the_failing_item_and_stops_early() -> None:
    def fail_at_two(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    got = []
    with pytest.raises(ValueError, match="two"):
        for _, y in ahead(fail_at_two, range(5)):
            got.append(y)
    assert got == [0, 1]
    pulled: list[int] = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i

    for i, _ in ahead(lambda x: x, items()):
        if i == 3:
            break
    assert len(pulled) <= 5                  # at most one item past the one the caller stopped at


def test_quantile_is_numpys_percentile_to_the_bit() -> None:
    rng = random.Random(7)
    for _ in range(300):
        runs = [rng.random() * rng.choice([1e-3, 0.1, 1.0, 30.0]) for _ in range(rng.randint(1, 70))]
        for q in (0.25, 0.75):
            assert quantile(runs, q) == float(np.percentile(runs, 100 * q))


def test_a_failing_feed_fails_the_mean_correction_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeds wait for the earlier ones at each cut (``_Turns``): one that fails makes the others fail, not hang."""
    import graphopt
    m, data = _two_convs()
    plain, _ = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    real = bc._Segments.run

    def second_fails(self, feed, at_cut):
        if feed is data[1] and at_cut.__name__ == "correct":     # the quantized side, on a worker thread
            raise ValueError("feed 1")
        return real(self, feed, at_cut)

    monkeypatch.setattr(bc._Segments, "run", second_fails)
    with pytest.raises(ValueError, match="feed 1"):
        bc.refit_biases(plain, m, _sites(plain), data, {})


def test_full_mean_correction_overlapped_equals_one_after_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt
    m, data = _two_convs()
    plain, _ = graphopt.optimize(m, [f"{Q},min-cosine=0,min-top1=0,bias-correction=false"], calib_data=data,
                                 latency_runs=0)
    sites = _sites(plain)
    workers: list[int] = []
    pool = bc.ThreadPoolExecutor
    monkeypatch.setattr(bc, "ThreadPoolExecutor", lambda n, **kw: (workers.append(n), pool(n, **kw))[1])
    overlapped: dict[str, list[np.ndarray]] = {}
    steps = bc.refit_biases(plain, m, sites, data, overlapped)
    assert workers == [2] and len(data) > 2
    monkeypatch.setattr(bc, "OVERLAP_FEED_BYTES", 0)
    alone: dict[str, list[np.ndarray]] = {}
    again = bc.refit_biases(plain, m, sites, data, alone)
    assert workers == [2, 1]
    assert steps.keys() == again.keys() and all(np.array_equal(steps[k], again[k]) for k in steps)
    assert overlapped.keys() == alone.keys()
    assert all(len(overlapped[k]) == len(data) and all(np.array_equal(a, b) for a, b in zip(overlapped[k], alone[k]))
               for k in alone)


def test_collector_overlapped_equals_one_after_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    f = conv_net()
    batches = [Batch(feed, None) for feed in calib(40)]
    names = [n.output[0] for n in f.graph.node]
    one = run_with_outputs(f, names, {"x": batches[0].feed["x"][:1]}, "probe")
    per_row = sum(v.nbytes for v in one.values())

    overlaps: list[bool] = []
    monkeypatch.setattr(collector_mod, "ahead", lambda fn, items: (overlaps.append(True), ahead(fn, items))[1])
    rows: list[int] = []
    run = collector_mod._run
    monkeypatch.setattr(collector_mod, "_run", lambda sess, names, feed: (rows.append(len(feed["x"])),
                                                                          run(sess, names, feed))[1])

    def histograms(budget: int, spare: bool) -> list[tuple[np.ndarray, float, int]]:
        monkeypatch.setattr(collector_mod, "spare_core", lambda: spare)
        obs = {t: HistogramObserver(256) for t in names}
        rows.clear()
        assert collect(f, names, batches, obs, threads=1, budget_bytes=budget) == 40
        return [(o.hist, o.extent, o.exact_zeros) for o in obs.values()]

    # with a spare core: whole 8-row batches overlapped where 16 rows take under a quarter of the budget, and runs of
    # 4 rows (a quarter) overlapped where 16 fill it; without one: whole batches one after the other
    overlapped = histograms(1 << 30, True)
    assert rows == [1] + [8] * 5 and overlaps == [True]          # the probe row, then the batches
    quarters = histograms(collector_mod.MAX_RUN_ROWS * per_row, True)
    assert rows == [1] + [4] * 10 and overlaps == [True, True]
    alone = histograms(collector_mod.MAX_RUN_ROWS * per_row, False)
    assert rows == [1] + [8] * 5 and overlaps == [True, True]
    for (h1, e1, z1), (h2, e2, z2), (h3, e3, z3) in zip(overlapped, quarters, alone):
        assert np.array_equal(h1, h3) and np.array_equal(h2, h3) and e1 == e2 == e3 and z1 == z2 == z3


def test_judge_computes_float_ahead_once_with_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    f = conv_net()
    batches = [Batch(feed, None) for feed in calib(48)]
    candidate = _noisy(f)
    judge = Judge(f, f, batches, Thresholds(0.98, 0.95))
    counting = _Counting(judge.ref.sess)
    judge.ref.sess = counting
    judge.start()                                   # as the pass does before calibration
    judge.start()
    first = judge.quality(candidate)
    assert counting.runs == len(batches) and judge.ref.held > 0
    assert judge.quality(candidate) == first and counting.runs == len(batches)
    monkeypatch.setattr(Reference, "ahead", lambda self, feeds: None)     # one after the other
    assert Judge(f, f, batches, Thresholds(0.98, 0.95)).quality(candidate) == first


def test_latency_sessions_load_a_kept_model_once() -> None:
    f, g = conv_net(), _noisy(conv_net())
    kept = LatencySessions([f])
    assert kept.get(f, 1) is kept.get(f, 1)
    assert kept.get(g, 1) is not kept.get(g, 1)       # not kept: a session per call
    assert kept.get(f, 2) is not kept.get(f, 1)
