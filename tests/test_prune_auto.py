"""prune-channels:ratio=auto's allocation (passes/pruning/allocate.py) and the pipeline's share of the targets
among several lossy passes (pipeline.share)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from graphopt.passes.base import PassContext
from graphopt.passes.judge import Quality
from graphopt.passes.pruning.allocate import Level, loss_share, path
from graphopt.pipeline import make_spec, run_pipeline, share
from graphopt.calibration.readers import open_source
from graphopt.validate import DEFAULT_TARGETS, Thresholds
from graphs import assert_one_line_error, calib, conv_net, parse_model, rand, run_passes

levels = st.lists(st.builds(Level, st.sampled_from("abcd"), st.sampled_from((0.25, 0.5, 0.75)), st.integers(1, 8),
                            st.floats(0, 3), st.floats(0, 10)), max_size=12,
                  unique_by=lambda lv: (lv.group, lv.ratio))


@settings(max_examples=60, deadline=None)
@given(levels)
def test_the_path_grows_from_nothing_and_never_takes_a_level_over_budget_or_without_gain(found):
    steps = path(found, {g: 8 for g in "abcd"})
    assert steps[0].ratios == () and steps[0].removed == 0
    allowed = {(lv.group, lv.ratio) for lv in found if lv.loss < 1 and lv.saving > 0}
    for before, after in zip(steps, steps[1:]):
        b, a = dict(before.ratios), dict(after.ratios)
        assert set(b) <= set(a) and all(a[g] >= r for g, r in b.items())      # each step prunes a superset
        assert sum(a[g] != b.get(g) for g in a) == 1                            # one group moves per step
        assert all((g, r) in allowed for g, r in a.items())


def test_the_path_takes_the_cheapest_loss_per_saving_first():
    found = [Level("costly", 0.5, 4, 0.8, 10.0), Level("cheap", 0.5, 4, 0.1, 10.0), Level("useless", 0.5, 4, 0.0, 0.0)]
    steps = path(found, {"costly": 8, "cheap": 8, "useless": 8})
    assert [dict(s.ratios) for s in steps] == [{}, {"cheap": 0.5}, {"cheap": 0.5, "costly": 0.5}]
    assert [s.removed for s in steps] == [0, 4 / 24, 8 / 24]


def test_loss_share_is_the_part_of_the_budget_used():
    t = Thresholds(min_cosine=0.98, min_top1=0.9)
    assert loss_share(Quality(0.99, 1.0, 0, 0.99), t) == pytest.approx(0.5)
    assert loss_share(Quality(1.0, 0.85, 0, 1.0), t) == pytest.approx(1.5)
    assert loss_share(Quality(0.5, 0.5, 0, 0.5), Thresholds()) == 0


@given(st.integers(1, 5), st.floats(0.5, 0.999), st.floats(0.5, 0.999), st.floats(0, 5))
def test_shares_of_the_targets_add_up_to_the_targets(n, cos, top1, drop):
    t = Thresholds(min_cosine=cos, min_top1=top1, max_accuracy_drop=drop)
    s = share(t, n)
    assert n * (1 - s.min_cosine) == pytest.approx(1 - cos) and n * (1 - s.min_top1) == pytest.approx(1 - top1)
    assert n * s.max_accuracy_drop == pytest.approx(drop)


def test_ratio_auto_then_quantize_searches_against_half_the_budget():
    model = conv_net()
    specs = [make_spec("prune-channels", {"ratio": "auto", "round_to": 1, "objective": "macs"}),
             make_spec("quantize", {})]
    ctx = PassContext(original=model, calib=open_source(calib(32), model), targets=DEFAULT_TARGETS)
    _, records = run_pipeline(model, specs, ctx)
    lossy = [r for r in records if r.spec.startswith(("prune", "quantize"))]
    for r in lossy:
        assert "this pass searched against 1/2 of the room below perfect (min-cosine 0.99, min-top1 0.975, " \
               "max-accuracy-drop 0.5)" in r.result.notes[0]
    note = next(n for n in lossy[0].result.notes if n.startswith("ratio=auto: "))
    assert "keeps min-cosine 0.99 and min-top1 0.975" in note


def test_objective_is_read_by_ratio_auto_only(cli, tmp_path, model_path):
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "prune-channels:ratio=0.3,objective=macs")
    assert_one_line_error(res, 2, "objective", "ratio=auto only")
    assert not (tmp_path / "o.onnx").exists()


def test_a_transformer_layer_is_declined_with_its_reason():
    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 5, 8] x) => (float[1, 5, 8] y) <float[8, 16] w1, float[16, 8] w2> {
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }""", w1=rand(8, 16), w2=rand(16, 8, seed=1))
    _, records = run_passes(model, [("prune-channels", {"ratio": 0.5})])
    declined = [f"{d['site']}: {d['reason']}" for d in records[-1].result.declined]
    assert any("last axis of a rank-3 tensor" in d for d in declined), declined
    assert "no prunable group" in " ".join(records[-1].result.notes)
