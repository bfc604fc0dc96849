"""The graph toolkit's small helpers (graphopt/graph.py), and its round trip keeping what onnx-graphsurgeon drops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

import graphopt
from graphopt.graph import const_value, describe, export, import_graph, is_float32, is_std, tensor_shapes, infer_model
from graphopt.report import count_parameters
from graphs import parse_model


def test_is_float32_on_types_numpy_lacks():
    assert is_float32(gs.Variable("f", dtype=np.float32))
    assert not is_float32(gs.Variable("d", dtype=np.float64))
    assert not is_float32(gs.Variable("unknown"))
    assert not is_float32(gs.Variable("bf16", dtype=onnx.TensorProto.BFLOAT16))   # kept as onnx type number 16


def test_node_helpers():
    graph = import_graph(parse_model("graph (float[2] x) => (float[2] y) { y = Mul(x, two) }",
                                     two=np.array([2.0, 2.0], np.float32)))
    mul = graph.nodes[0]
    assert is_std(mul) and is_std(mul, "Mul", "Add") and not is_std(mul, "Conv")
    assert describe(mul) == "Mul 'y'"           # an unnamed node is named by its first output
    assert const_value(mul.inputs[1]).tolist() == [2.0, 2.0] and const_value(mul.inputs[0]) is None


def test_round_trip_keeps_input_defaults_and_shapes():
    model = parse_model("""<ir_version: 7, opset_import: ["" : 13]>
        graph (float[2, 3] x, float[3] b) => (float[2, 3] y) { y = Add(x, b) }""", b=np.ones(3, np.float32))
    out = export(import_graph(model), model)
    assert [i.name for i in out.graph.input] == ["x", "b"]      # an input with a default stays an input
    assert [t.name for t in out.graph.initializer] == ["b"] and out.ir_version == 7
    assert tensor_shapes(infer_model(out))["y"] == [2, 3]


def test_export_names_graphopt_the_producer_and_keeps_the_rest():
    model = parse_model("graph (float[2] x) => (float[2] y) { y = Neg(x) }")
    model.producer_name, model.producer_version, model.doc_string = "pytorch", "2.13.0", "my model"
    model.metadata_props.add(key="author", value="me")
    out = export(import_graph(model), model)
    assert (out.producer_name, out.producer_version) == ("graphopt", graphopt.__version__)
    assert out.doc_string == "my model" and [(p.key, p.value) for p in out.metadata_props] == [("author", "me")]


def test_parameters_are_counted_in_subgraphs_and_in_stored_bytes():
    model = parse_model("""
        graph (bool c, float[2] x) => (float[2] y) {
            y = If (c) <then_branch = g1 () => (float[2] t) { t = Constant <value = float[2] {1.0, 2.0}> () },
                        else_branch = g2 () => (float[2] e) { e = Constant <value = float[2] {3.0, 4.0}> () }>
        }""", w=np.zeros((3,), np.int8))
    assert count_parameters(model) == (2 + 2 + 3, 4 * 2 + 4 * 2 + 3)
