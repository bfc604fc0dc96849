"""The quantize fallback on big models (issue 24, the pass's own time): the contiguous candidate's float run is
lengthened with real builds where the search's k fails its check (``Fallback.climb``: doubling),
not re-searched on the switchable model, whose lack of the full mean correction misleads it there; a real check
that only has to say whether a candidate fails stops its runs once the top-1 check cannot hold (``Judge.passing``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from graphopt.calibration.readers import Batch
from graphopt.passes import judge as judge_mod
from graphopt.passes.judge import Judge
from graphopt.passes.quantization import fallback as fallback_mod
from graphopt.passes.quantization.fallback import Fallback
from graphopt.validate import Thresholds
from graphs import calib, conv_net
from onnx import numpy_helper
from test_qtime import _Counting, _noisy


def _climber(n: int, need: int, int8_below: int | None = None) -> tuple[Fallback, list[int]]:
    """A Fallback over n sites whose real build with the first k float meets the targets exactly when k >= need
    (and runs a layer int8 while k < ``int8_below``, by default n); each real build's k."""
    fb = Fallback.__new__(Fallback)
    fb.order = [f"t{i}" for i in range(n)]
    built: list[int] = []
    limit = n if int8_below is None else int8_below

    def build(keep_float: set[str]) -> SimpleNamespace:
        k = len(keep_float)
        assert keep_float == set(fb.order[:k])
        built.append(k)
        return SimpleNamespace(int8_units=("u",) if k < limit else (), model=k)

    fb.builder = SimpleNamespace(build=build)
    fb.judge = SimpleNamespace(passing=lambda model: model if model >= need else None)
    return fb, built


@pytest.mark.parametrize("n", [2, 5, 13, 61])
def test_climb_doubles_until_a_real_build_meets_the_targets(n: int) -> None:
    for start in range(1, n):
        for need in range(1, n + 2):
            fb, built = _climber(n, need)
            got = fb.climb(start)
            assert n not in built                                   # never the all-float build
            assert all(b == min(n - 1, 2 * a) for a, b in zip(built, built[1:]))     # doubling, no bisection
            if need <= start:
                assert got is not None and got[0] == start and built == [start]
            elif need >= n:
                assert got is None
            else:
                assert got is not None and got[0] == built[-1] and got[2] == got[0] and need <= got[0] < 2 * need


def test_climb_stops_where_no_layer_runs_int8() -> None:
    fb, built = _climber(10, need=9, int8_below=8)
    assert fb.climb(2) is None and max(built) <= 9


def test_climb_on_efficientnet_like_answers() -> None:
    """The fourth session's trace: the search's k = 2 fails its real check, real builds meet the targets from 7."""
    fb, built = _climber(61, need=7)
    k, _, _ = fb.climb(2)
    assert k == 8 and built == [2, 4, 8]


def _flipped(model):
    """``model`` with its classifier's weights negated: its top-1 disagrees with the original's on most rows."""
    m = type(model)()
    m.CopyFrom(model)
    fc = next(t for t in m.graph.initializer if t.name == "fc")
    fc.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(fc), "fc"))
    return m


def test_passing_stops_where_the_top1_check_is_lost_and_agrees_with_quality(monkeypatch: pytest.MonkeyPatch) -> None:
    f = conv_net()
    batches = [Batch({"x": x[i:i + 1]}, None) for feed in calib(32) for x in [feed["x"]] for i in range(8)]
    sessions: list[_Counting] = []
    make = judge_mod.make_session
    monkeypatch.setattr(judge_mod, "make_session", lambda *a, **k: sessions.append(_Counting(make(*a, **k)))
                        or sessions[-1])
    judge = Judge(f, f, batches, Thresholds(0.0, 0.95))
    bad, fine = _flipped(f), _noisy(f)
    assert judge.passing(bad) is None
    assert 0 < sessions[-1].runs < len(batches) // 4        # 32 rows at 0.95 allow one miss: lost after a few
    assert not judge.meets(judge.quality(bad)) and sessions[-1].runs == len(batches)
    q = judge.quality(fine)
    assert judge.meets(q) and judge.passing(fine) == q and sessions[-1].runs == len(batches)
