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
from graphopt.pipeline import make_spec, run_pipeline, with_prerequisites
from graphopt.targets import pipeline_targets, validation_targets
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


def test_validation_thresholds_are_the_pipelines_made_as_strict_as_the_passes_own():
    model = _relu_model()
    base = pipeline_targets(gate=True, min_cosine=None, min_top1=None, max_accuracy_drop=None, max_rel_error=None)
    assert (base.min_cosine, base.min_top1, base.max_accuracy_drop) == (0.98, 0.95, 1.0)   # the defaults
    t = validation_targets(base, [make_spec("fold-bn", {}), make_spec("test-targets", {})], model, given=frozenset())
    assert (t.min_cosine, t.min_top1, t.origin) == (0.99, 0.9, "test-targets's ")   # a pass's own replaces defaults
    same = validation_targets(base, [make_spec("quantize", {})], model, given=frozenset())
    assert (same.min_cosine, same.source_pass) == (0.98, None)      # quantize searches the pipeline's targets
    strict = validation_targets(base, [make_spec("quantize", {"min-cosine": 0.995})], model, given=frozenset())
    assert (strict.min_cosine, strict.source_pass) == (0.995, "quantize")
    weaker = validation_targets(base, [make_spec("quantize", {"min-cosine": 0.9})], model, given=frozenset())
    assert (weaker.min_cosine, weaker.source_pass) == (0.9, "quantize")   # the pass's own beats a default
    user = validation_targets(base, [make_spec("quantize", {"min-cosine": 0.9})], model,
                              given=frozenset({"min_cosine"}))
    assert (user.min_cosine, user.source_pass) == (0.98, None)          # ... not a target the user set
    off = pipeline_targets(gate=False, min_cosine=None, min_top1=None, max_accuracy_drop=None, max_rel_error=0.5)
    assert (off.min_cosine, off.min_top1, off.max_accuracy_drop, off.max_rel_error) == (None, None, None, 0.5)
    zero = pipeline_targets(gate=True, min_cosine=0, min_top1=0, max_accuracy_drop=2.0, max_rel_error=None)
    assert (zero.min_cosine, zero.min_top1, zero.max_accuracy_drop) == (None, None, 2.0)
