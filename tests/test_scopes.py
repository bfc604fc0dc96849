"""graphopt.scopes: equal initializers of different subgraphs are stored once, in their innermost enclosing graph;
the model computes the same values to the bit."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings, strategies as st

from graphopt.graph import export, import_graph
from graphopt.scopes import share_initializers
from graphs import rand, run


def _branch(tag: str, c: gs.Constant, x: gs.Variable, inner: gs.Graph | None = None) -> gs.Graph:
    """out = x + c, or (with ``inner``) an If on x's first value > 0 between ``inner`` and a copy reading c."""
    out = gs.Variable(f"o_{tag}", np.float32, (4,))
    if inner is None:
        return gs.Graph(nodes=[gs.Node("Add", inputs=[x, c], outputs=[out])], outputs=[out])
    cond = gs.Variable(f"cond_{tag}", np.bool_, ())
    nodes = [gs.Node("ReduceMax", inputs=[x], outputs=[gs.Variable(f"m_{tag}", np.float32, ())],
                     attrs={"keepdims": 0})]
    nodes.append(gs.Node("Greater", inputs=[nodes[0].outputs[0], gs.Constant(f"z_{tag}", np.zeros((), np.float32))],
                         outputs=[cond]))
    nodes.append(gs.Node("If", inputs=[cond], outputs=[out],
                         attrs={"then_branch": inner, "else_branch": _branch(tag + "e", c, x)}))
    return gs.Graph(nodes=nodes, outputs=[out])


def _model(values: np.ndarray, *, nested: bool, copies: bool) -> onnx.ModelProto:
    """x[4], flag -> If(flag) with both branches adding ``values`` (nested: the then-branch holds another If). With
    ``copies`` each branch reads its own equal constant (as folding in each branch writes), else one shared one."""
    x = gs.Variable("x", np.float32, (4,))
    flag = gs.Variable("flag", np.bool_, ())
    const = (lambda tag: gs.Constant(f"c_{tag}", values.copy())) if copies else \
        (lambda tag, c=gs.Constant("c", values): c)
    then = _branch("t", const("t"), x, inner=_branch("n", const("n"), x) if nested else None)
    y = gs.Variable("y", np.float32, (4,))
    graph = gs.Graph(nodes=[gs.Node("If", inputs=[flag], outputs=[y],
                                    attrs={"then_branch": then, "else_branch": _branch("e", const("e"), x)})],
                     inputs=[x, flag], outputs=[y], opset=17)
    return gs.export_onnx(graph)


def _stored(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(graph, initializer) pairs of every graph, main first."""
    out = []

    def walk(g: onnx.GraphProto, where: str) -> None:
        out.extend((where, t.name) for t in g.initializer if t.name.startswith("c"))
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f"{where}/{n.name or n.op_type}.{a.name}")
    walk(model.graph, "")
    return out


@settings(max_examples=12, deadline=None)
@given(nested=st.booleans(), copies=st.booleans(), n=st.integers(1, 3))
def test_equal_subgraph_initializers_stored_once_same_outputs(nested, copies, n):
    model = _model(rand(4, seed=n), nested=nested, copies=copies)
    before = len(_stored(model))
    assert before == 2 + nested                               # gs writes one per reading subgraph
    x = rand(4, seed=7) - 0.5
    expected = {f: run(model, {"x": x, "flag": np.array(f)}) for f in (True, False)}
    assert share_initializers(model) == before - 1
    onnx.checker.check_model(model, full_check=True)
    assert [where for where, _ in _stored(model)] == [""]     # once, in the main graph, which encloses them all
    for f, want in expected.items():
        got = run(model, {"x": x, "flag": np.array(f)})
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_different_values_and_branch_outputs_stay_export_shares():
    """Unequal constants stay apart; an initializer a branch returns stays in its branch; graph.export shares, and
    exporting the re-imported graph again gives the same graph."""
    model = _model(rand(4, seed=1), nested=False, copies=True)
    branch = model.graph.node[0].attribute[0].g
    branch.initializer[0].CopyFrom(onnx.numpy_helper.from_array(rand(4, seed=2), branch.initializer[0].name))
    assert share_initializers(model) == 0
    returns = _model(rand(4, seed=1), nested=False, copies=True)
    for a in returns.graph.node[0].attribute:
        name = a.g.initializer[0].name
        a.g.CopyFrom(onnx.helper.make_graph([], a.name, [], [onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, [4])], [onnx.numpy_helper.from_array(rand(4, seed=3), name)]))
    assert share_initializers(returns) == 0
    model = _model(rand(4, seed=1), nested=True, copies=False)
    once = export(import_graph(model), model)
    assert [where for where, _ in _stored(once)] == [""]
    again = export(import_graph(once), once)
    assert again.graph.SerializeToString() == once.graph.SerializeToString()


def test_a_kept_name_another_value_has_is_left_in_place():
    """Sibling subgraphs may give one name to different values: moving an initializer of that name up would shadow
    the other one, so its group stays as it is (and the model stays valid)."""
    model = _model(rand(4, seed=1), nested=False, copies=True)
    then, other = (a.g for a in model.graph.node[0].attribute)
    kept = then.initializer[0].name
    other.node.extend([onnx.helper.make_node("Identity", ["x"], [kept])])     # the else-branch's own value
    assert share_initializers(model) == 0
    onnx.checker.check_model(model, full_check=True)
    assert [t.name for t in then.initializer] == [kept] and len(other.initializer) == 1
