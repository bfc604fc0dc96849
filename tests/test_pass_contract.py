"""The pass contract the pipeline enforces (passes/base.py): a precondition declines the whole pass with its reason
and leaves the graph as it was; declared prerequisites run right before the pass unless the pipeline runs them
earlier; a pass's own targets become validation's thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphopt.passes.base as base
from graphopt.api import pass_targets
from graphopt.pipeline import make_spec, run_pipeline, with_prerequisites
from graphopt.validate import Thresholds
from graphs import ops, parse_model, same_graph


@dataclass(frozen=True)
class _NoOptions:
    pass


class _Refuses(base.Pass):
    """Declines every graph that has a Relu; would remove every node if it ran."""
    name = "test-refuses"
    summary = "test"
    Options = _NoOptions

    def requires(self, graph: gs.Graph, ctx: base.PassContext) -> str | None:
        return "the graph has a Relu" if any(n.op == "Relu" for n in graph.nodes) else None

    def run(self, graph: gs.Graph, ctx: base.PassContext) -> base.PassResult:
        graph.nodes.clear()
        return base.PassResult(changed=True)


class _NeedsFolding(base.Pass):
    """Counts the Constant nodes it sees: none once its prerequisite fold-constants has run."""
    name = "test-needs-folding"
    summary = "test"
    Options = _NoOptions
    prerequisites = ("fold-constants",)

    def run(self, graph: gs.Graph, ctx: base.PassContext) -> base.PassResult:
        res = base.PassResult()
        res.count("constant nodes seen", sum(n.op == "Constant" for n in graph.nodes))
        return res


class _Targets(base.Pass):
    name = "test-targets"
    summary = "test"
    Options = _NoOptions
    exact = False

    def run(self, graph: gs.Graph, ctx: base.PassContext) -> base.PassResult:
        return base.PassResult()

    def targets(self) -> Thresholds:
        return Thresholds(min_cosine=0.99, min_top1=0.9)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    for cls in (_Refuses, _NeedsFolding, _Targets):
        monkeypatch.setitem(base._REGISTRY, cls.name, cls)


def _relu_model() -> onnx.ModelProto:
    return parse_model("""
        graph (float[1, 4] x) => (float[1, 4] y) {
            w = Constant <value = float[2, 2] {1.0, 2.0, 3.0, 4.0}> ()
            w4 = Tile(w, reps)
            m = MatMul(x, w4)
            y = Relu(m)
        }""", reps=np.array([2, 2], np.int64))


def test_a_precondition_declines_the_pass_and_leaves_the_graph():
    model = _relu_model()
    out, records = run_pipeline(model, [make_spec("test-refuses", {})], base.PassContext(original=model))
    assert records[0].result.declined == [{"site": "model", "reason": "the graph has a Relu"}]
    assert not records[0].result.changed
    assert same_graph(model, out)


def test_a_precondition_that_holds_lets_the_pass_run():
    model = parse_model("graph (float[1, 4] x) => (float[1, 4] y) { y = Neg(x) }")
    _, records = run_pipeline(model, [make_spec("test-refuses", {})], base.PassContext(original=model),
                              verify=False)
    assert records[0].result.changed and not records[0].result.declined


def test_prerequisites_run_right_before_unless_already_earlier():
    model = _relu_model()
    out, records = run_pipeline(model, [make_spec("test-needs-folding", {})], base.PassContext(original=model))
    assert [r.spec for r in records] == ["fold-constants", "test-needs-folding"]
    assert records[1].result.counts == {"constant nodes seen": 0}
    assert ops(out) == ["MatMul", "Relu"]     # the Constant and the Tile of constants folded
    given = [make_spec("fold-constants", {}), make_spec("fold-bn", {}), make_spec("test-needs-folding", {})]
    assert [s.name for s in with_prerequisites(given)] == ["fold-constants", "fold-bn", "test-needs-folding"]


def test_validation_thresholds_come_from_the_passes_targets():
    model = _relu_model()
    t = pass_targets([make_spec("fold-bn", {}), make_spec("test-targets", {})], model, max_rel_error=None)
    assert (t.min_cosine, t.min_top1, t.origin) == (0.99, 0.9, "test-targets's ")
    none = pass_targets([make_spec("fold-bn", {})], model, max_rel_error=0.5)
    assert (none.min_cosine, none.min_top1, none.max_rel_error) == (None, None, 0.5)
    assert np.isclose(pass_targets([make_spec("quantize", {})], model, None).min_cosine, 0.98)
