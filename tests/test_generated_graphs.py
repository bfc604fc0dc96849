"""Generated small graphs through every pass, end to end through the CLI (hypothesis).

The graphs are drawn from the ops the passes rewrite or must see through: Conv (plain, grouped, depthwise), with a
bias or not, BatchNormalization, per-channel Mul/Add by constants, Relu/Clip/Sigmoid, residual Add, Concat,
MaxPool, then GlobalAveragePool -> Flatten -> Gemm or MatMul. Property: every pass either writes a model that
onnx.checker accepts and that validation passed (exit 0), or refuses with one line on stderr and writes nothing
(exit 1 or 2) — never exit 3, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from graphs import OPSET

PASSES = ["fold-constants", "fold-bn", "fuse-conv-relu", "prune-channels:ratio=0.5", "svd:ratio=0.5", "quantize"]


@st.composite
def conv_graphs(draw: st.DrawFn) -> onnx.ModelProto:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c, hw = draw(st.integers(1, 4)), draw(st.integers(4, 8))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    tensors = [("x", c)]                      # (name, channels) of the 4-D tensors so far

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    for i in range(draw(st.integers(1, 5))):
        src, ch = tensors[-1]
        out = f"t{i}"
        op = draw(st.sampled_from(["conv", "conv", "bn", "act", "muladd", "residual", "concat", "pool"]))
        if op == "conv":
            group = draw(st.sampled_from([1, ch]))
            oc = ch if group == ch and draw(st.booleans()) else draw(st.integers(1, 8)) * (group if group > 1 else 1)
            k = draw(st.sampled_from([1, 3]))
            ins = [src, const(f"w{i}", rng.standard_normal((oc, ch // group, k, k)) * 0.5)]
            if draw(st.booleans()):
                ins.append(const(f"b{i}", rng.standard_normal(oc) * 0.1))
            nodes.append(helper.make_node("Conv", ins, [out], pads=[k // 2] * 4, group=group, name=f"conv{i}"))
            ch = oc
        elif op == "bn":
            params = [const(f"bn{i}_{p}", v) for p, v in (("g", rng.uniform(0.5, 1.5, ch)), ("b", rng.normal(0, .1, ch)),
                                                        ("m", rng.normal(0, .1, ch)), ("v", rng.uniform(0.5, 1.5, ch)))]
            nodes.append(helper.make_node("BatchNormalization", [src, *params], [out], name=f"bn{i}"))
        elif op == "act":
            act = draw(st.sampled_from(["Relu", "Sigmoid", "Clip"]))
            ins = [src] + ([const(f"lo{i}", np.array(0.0)), const(f"hi{i}", np.array(6.0))] if act == "Clip" else [])
            nodes.append(helper.make_node(act, ins, [out], name=f"act{i}"))
        elif op == "muladd":
            kind = draw(st.sampled_from(["Mul", "Add"]))
            nodes.append(helper.make_node(kind, [src, const(f"k{i}", rng.uniform(0.5, 1.5, (1, ch, 1, 1)))], [out],
                                          name=f"{kind.lower()}{i}"))
        elif op == "residual":
            same = [name for name, n in tensors if n == ch]
            nodes.append(helper.make_node("Add", [src, draw(st.sampled_from(same))], [out], name=f"add{i}"))
        elif op == "concat":
            other, oc = draw(st.sampled_from(tensors))
            nodes.append(helper.make_node("Concat", [src, other], [out], axis=1, name=f"concat{i}"))
            ch += oc
        else:
            nodes.append(helper.make_node("MaxPool", [src], [out], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                          name=f"pool{i}"))
        tensors.append((out, ch))
    last, ch = tensors[-1]
    classes = draw(st.integers(2, 6))
    nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat")]
    if draw(st.booleans()):
        nodes.append(helper.make_node("Gemm", ["flat", const("fc", rng.standard_normal((classes, ch))),
                                               const("fcb", rng.standard_normal(classes))], ["y"], transB=1, name="fc"))
    else:
        nodes.append(helper.make_node("MatMul", ["flat", const("fc", rng.standard_normal((ch, classes)))], ["y"],
                                      name="fc"))
    graph = helper.make_graph(nodes, "generated", [helper.make_tensor_value_info("x", 1, ["N", c, hw, hw])],
                              [helper.make_tensor_value_info("y", 1, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("pass_arg", PASSES)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=conv_graphs(), seed=st.integers(0, 1000))
def test_every_pass_on_generated_graphs(cli, tmp_path: Path, pass_arg: str, model: onnx.ModelProto, seed: int):
    folder = tmp_path / f"case{seed}"
    folder.mkdir(exist_ok=True)
    src, out, data = folder / "in.onnx", folder / "out.onnx", folder / "calib.npz"
    onnx.save(model, src)
    x = model.graph.input[0].type.tensor_type.shape.dim
    np.savez(data, x=np.random.default_rng(seed).standard_normal((16, x[1].dim_value, x[2].dim_value, x[3].dim_value))
             .astype(np.float32))
    res = cli(src, out, "--pass", pass_arg, "--calib-data", data, "--latency-runs", "0")
    assert res.code in (0, 1, 2), res.err
    event(f"exit {res.code}" + (f": {res.err.strip()[:90]}" if res.code else ""))
    assert "Traceback" not in res.err
    if res.code == 0:
        onnx.checker.check_model(onnx.load(out), full_check=True)
        assert "PASSED" in res.out
    else:
        assert len([line for line in res.err.splitlines() if line.strip()]) == 1, res.err
        assert not out.exists()
