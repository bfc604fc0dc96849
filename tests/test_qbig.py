"""The quantize fallback on big models (issue 24, the pass's own time): a real check that only has to say whether a
candidate fails stops its runs once the top-1 check cannot hold (``Judge.passing``), with the answers and figures of
a full check."""

from __future__ import annotations

import pytest
from graphopt.calibration.readers import Batch
from graphopt.passes import judge as judge_mod
from graphopt.passes.judge import Judge
from graphopt.validate import Thresholds
from graphs import calib, conv_net
from onnx import numpy_helper
from test_qtime import _Counting, _noisy


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
