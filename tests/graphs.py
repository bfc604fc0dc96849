"""Small helpers for tests that build graphs and run them in onnxruntime: the one place tests make models.

Build a model in a test so the test shows its graph, in onnx.parser text where it is small::

    model = parse_model('''
        graph (float[1, 4] x) => (float[1, 4] y) {
            m = MatMul(x, w)
            y = Relu(m)
        }''', w=rand(4, 4))

or node by node where the weights are many or the attributes computed::

    model = make_model(
        [node("Conv", ["x", "w"], ["c"]), node("Relu", ["c"], ["y"])],
        inputs=[("x", [1, 3, 8, 8])], outputs=["y"],
        initializers={"w": rand(4, 3, 3, 3)})

then run passes and compare in onnxruntime with every graph optimization off (so onnxruntime's own fusions cannot
hide a bug in ours)::

    out, records = run_passes(model, ["fold-bn"])
    assert ops(out) == ["Conv", "Relu"]
    assert_same_outputs(model, out)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.passes.base import PassContext
from graphopt.pipeline import StepRecord, make_spec, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"          # the small trained models shipped with graphopt
OPSET = 17
MS_DOMAIN = "com.microsoft"

ShapeLike = Sequence[int | str | None] | None


# ------------------------------------------------------------------------------------------------ building


def rand(*shape: int, seed: int = 0, lo: float = -1.0, hi: float = 1.0, dtype: Any = np.float32) -> np.ndarray:
    """Seeded uniform random array (different seeds give different arrays of the same shape)."""
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(dtype)


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None, domain: str = "",
         **attrs: Any) -> onnx.NodeProto:
    """``onnx.helper.make_node`` with a default node name (the first output's name)."""
    return helper.make_node(op, list(inputs), list(outputs), name=name if name is not None else outputs[0],
                            domain=domain, **attrs)


def value_info(name: str, shape: ShapeLike = None, dtype: Any = np.float32) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def _vi(item: str | tuple | onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    if isinstance(item, onnx.ValueInfoProto):
        return item
    if isinstance(item, str):
        return onnx.ValueInfoProto(name=item)   # typed by shape inference in make_model
    return value_info(*item)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Iterable[str | tuple | onnx.ValueInfoProto],
               outputs: Iterable[str | tuple | onnx.ValueInfoProto],
               initializers: Mapping[str, np.ndarray] | None = None, *, opset: int = OPSET,
               domains: Mapping[str, int] | None = None, value_infos: Iterable[tuple] = (),
               check: bool = True) -> onnx.ModelProto:
    """A checked model. Inputs/outputs: a name, ``(name, shape[, dtype])`` or a ValueInfoProto; an output given by
    name only is typed by onnx shape inference (the onnx checker wants a type and shape on graph outputs)."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "test", [_vi(i) for i in inputs], [_vi(o) for o in outputs], inits,
                              value_info=[value_info(*v) for v in value_infos])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="graphopt-tests")
    if any(not o.HasField("type") for o in model.graph.output):
        # Outputs given by name: take their types from shape inference (only theirs: intermediate tensors stay
        # without value_info, as in most exported models).
        inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        for o in model.graph.output:
            if not o.HasField("type") and inferred[o.name].HasField("type"):
                o.CopyFrom(inferred[o.name])
    if check:
        onnx.checker.check_model(model)
    return model


def parse_model(text: str, *, opset: int = OPSET, check: bool = True, **initializers: np.ndarray
                ) -> onnx.ModelProto:
    """A model from ``onnx.parser`` text (one graph, default domain ``opset`` unless the text has a ``<...>``
    header), with ``initializers`` (name=array) added as the graph's weights."""
    header = "" if text.lstrip().startswith("<") else f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
    model = onnx.parser.parse_model(header + text)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items())
    if check:
        onnx.checker.check_model(model)
    return model


def conv_model(opset: int = 17, batch: int | str = "N", constant_nodes: bool = True) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(w*2, pads 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N,5].

    With ``constant_nodes`` the conv weight and the factor 2 sit in Constant nodes, as exporters like Paddle do.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 4)).astype(np.float32)
    fcb = rng.standard_normal(5).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])
    nodes = []
    inits = [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(fcb, "fc_b")]
    if constant_nodes:
        nodes += [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
                  helper.make_node("Constant", [], ["two"], value_float=2.0)]
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes += [helper.make_node("Mul", ["w", "two"], ["w2"]),
              helper.make_node("Conv", ["x", "w2"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ops(model: onnx.ModelProto) -> list[str]:
    """The node op types in graph order; other domains as ``domain.Op``."""
    return [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def node_by_op(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    matches = [n for n in model.graph.node if n.op_type == op]
    assert len(matches) == 1, f"expected one {op}, found {len(matches)}"
    return matches[0]


def attrs(n: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


# ----------------------------------------------------------------------------------------------------- running


def session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0, dims: int = 2) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared shapes (symbolic dims become ``dims``); floats in [-1, 1)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype.kind == "f":
            feeds[vi.name] = rng.uniform(-1, 1, size=shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run in onnxruntime CPU, one thread, with graph optimizations off unless ``optimize``."""
    return session(model, optimize).run(None, dict(feeds))


def rel_error(ref: np.ndarray, out: np.ndarray) -> float:
    """max |out - ref| / max |ref| (0 when both are all zero)."""
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = float(np.max(np.abs(out64 - ref64))) if ref64.size else 0.0
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    return 0.0 if err == 0 else (err / scale if scale > 0 else float("inf"))


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Mapping | None = None, *,
                        rtol: float = 1e-5, seeds: Sequence[int] = (0, 1)) -> float:
    """Both models give the same outputs (shape, dtype, rel error <= rtol) with graph optimizations off; returns the
    largest relative error seen."""
    worst = 0.0
    for feed in [feeds] if feeds is not None else [random_feeds(original, s) for s in seeds]:
        ref, out = run(original, feed), run(rewritten, feed)
        assert len(ref) == len(out)
        for r, o in zip(ref, out):
            assert r.shape == o.shape and r.dtype == o.dtype, (r.shape, r.dtype, o.shape, o.dtype)
            e = rel_error(r, o)
            assert e <= rtol, f"relative error {e:.3g} > {rtol:g}"
            worst = max(worst, e)
    return worst


# ------------------------------------------------------------------------------------------------------ passes


def run_passes(model: onnx.ModelProto, passes: Sequence[str | tuple[str, Mapping[str, Any]]], *,
               verify: bool = True) -> tuple[onnx.ModelProto, list[StepRecord]]:
    """Run passes through the real pipeline (cleanup, toposort, onnx.checker after each); no validation."""
    specs = [make_spec(p, {}) if isinstance(p, str) else make_spec(p[0], p[1]) for p in passes]
    return run_pipeline(model, specs, PassContext(original=model), verify=verify)


def declined(records: Sequence[StepRecord]) -> list[str]:
    """All decline reasons of all steps, as ``site: reason`` strings."""
    return [f"{d['site']}: {d['reason']}" for r in records for d in r.result.declined]


def _canonical(model: onnx.ModelProto) -> tuple:
    g = model.graph
    ser = lambda items: sorted(x.SerializeToString(deterministic=True) for x in items)  # noqa: E731
    return (ser(g.node), ser(g.initializer), [x.SerializeToString(deterministic=True) for x in g.input],
            [x.SerializeToString(deterministic=True) for x in g.output])


def same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes and initializers (in any order: passes toposort), same inputs and outputs."""
    return _canonical(a) == _canonical(b)


def assert_one_line_error(res: Any, code: int, *needles: str) -> None:
    """A CLI result (conftest's ``cli`` fixture) that failed with ``code`` and one line of stderr holding
    ``needles``, no traceback."""
    assert res.code == code, (res.code, res.err)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ------------------------------------------------------------------------------- models of the quantize tests


def xy_model(nodes, inits, x_shape, y_shape, opset=17) -> onnx.ModelProto:
    """A checked IR-8 model of ``nodes`` from float input ``x`` to float output ``y``, with TensorProto ``inits``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_net(opset: int = 17) -> onnx.ModelProto:
    """Conv+Relu, Conv+Clip(ReLU6), residual Add, MaxPool, GlobalAveragePool, Flatten, Gemm."""
    rng = np.random.default_rng(0)
    f = np.float32
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(f), "w1"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(f), "b1"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(f), "w2"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(f), "b2"),
             numpy_helper.from_array(rng.standard_normal((10, 8)).astype(f), "fc"),
             numpy_helper.from_array(rng.standard_normal(10).astype(f), "fcb"),
             numpy_helper.from_array(np.array(0, f), "zero"), numpy_helper.from_array(np.array(6, f), "six")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6"),
             helper.make_node("Add", ["r1", "r2"], ["a"], name="add"),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc")]
    if opset < 11:
        nodes[3] = helper.make_node("Clip", ["c2"], ["r2"], min=0.0, max=6.0, name="relu6")
        inits = inits[:-2]
    return xy_model(nodes, inits, ["N", 3, 16, 16], ["N", 10], opset)


def calib(n: int = 64, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``n`` seeded samples for conv_net, in batches of 8."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.random((8, 3, 16, 16)).astype(np.float32)} for _ in range(n // 8)]


def ort_kernels(m: onnx.ModelProto, tmp_path) -> list[str]:
    """The ops onnxruntime runs the model with (its graph after the extended optimizations: fused kernels)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def residual_net(scales: Sequence[float] = (0.05, 1.0), shortcut: str = "identity") -> onnx.ModelProto:
    """x[N,8,6,6] -> Conv+Relu stem, then one residual block per scale (``h + Conv(Relu(Conv(h)))``, the branch's
    last weights times the scale; 0 makes the branch output exactly zero), each followed by Relu, then
    GlobalAveragePool, Flatten, Gemm -> y[N,5]. ``shortcut``: "identity"; "projection" (the first block's identity
    goes through a 1x1 Conv); "side-output" (the first branch's inner tensor is also a graph output); "broadcast"
    (the first branch ends in a ReduceMean over H, W: an Add that broadcasts)."""
    rng = np.random.default_rng(3)
    f = np.float32
    inits = {"ws": (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(f), "bs": (rng.standard_normal(8) * .1).astype(f),
             "fc": rng.standard_normal((5, 8)).astype(f), "fcb": rng.standard_normal(5).astype(f)}
    nodes = [node("Conv", ["x", "ws", "bs"], ["s"], name="stem", pads=[1, 1, 1, 1]), node("Relu", ["s"], ["h0"])]
    outputs: list[str] = []
    h = "h0"
    for i, scale in enumerate(scales):
        inits[f"w{i}a"] = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(f)
        inits[f"w{i}b"] = (rng.standard_normal((8, 8, 3, 3)) * 0.3 * scale).astype(f)
        inits[f"b{i}b"] = (rng.standard_normal(8) * 0.1 * scale).astype(f)
        nodes += [node("Conv", [h, f"w{i}a"], [f"c{i}a"], name=f"block{i}_conv_a", pads=[1, 1, 1, 1]),
                  node("Relu", [f"c{i}a"], [f"r{i}a"]),
                  node("Conv", [f"r{i}a", f"w{i}b", f"b{i}b"], [f"f{i}"], name=f"block{i}_conv_b", pads=[1, 1, 1, 1])]
        branch, ident = f"f{i}", h
        if i == 0 and shortcut == "projection":
            inits["wp"] = (rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(f)
            nodes.append(node("Conv", [h, "wp"], ["proj"], name="proj"))
            ident = "proj"
        if i == 0 and shortcut == "side-output":
            outputs.append("r0a")
        if i == 0 and shortcut == "broadcast":
            nodes.append(node("ReduceMean", [f"f{i}"], ["fm"], axes=[2, 3], keepdims=1))
            branch = "fm"
        nodes += [node("Add", [ident, branch], [f"a{i}"], name=f"block{i}_add"), node("Relu", [f"a{i}"], [f"h{i + 1}"])]
        h = f"h{i + 1}"
    nodes += [node("GlobalAveragePool", [h], ["g"]), node("Flatten", ["g"], ["fl"]),
              node("Gemm", ["fl", "fc", "fcb"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [("x", ["N", 8, 6, 6])], ["y", *outputs], inits, opset=13)


def residual_calib(n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``n`` seeded samples for residual_net, in batches of 8."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 8, 6, 6)).astype(np.float32)} for _ in range(n // 8)]


def conv_only_model(xs: tuple[int, ...], w: np.ndarray, **attrs) -> onnx.ModelProto:
    """One Conv of weight ``w`` on an input of shape ``xs``."""
    xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xs))
    yi = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "g", [xi], [yi],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


GEOMETRIES = [  # (input shape, weight shape, group, strides, pads, dilations)
    ((2, 3, 9, 8), (4, 3, 3, 3), 1, [1, 1], [1, 1, 1, 1], [1, 1]),
    ((2, 4, 11, 10), (6, 4, 3, 2), 1, [2, 2], [0, 1, 2, 0], [1, 1]),      # stride 2, asymmetric pads
    ((1, 6, 10, 10), (6, 1, 5, 5), 6, [1, 2], [2, 2, 2, 2], [1, 1]),      # depthwise
    ((2, 4, 12, 12), (6, 2, 3, 3), 2, [1, 1], [0, 0, 0, 0], [2, 2]),      # grouped, dilated
    ((3, 5, 17), (4, 5, 3), 1, [2], [1, 0], [1]),                         # 1-D
    ((2, 3, 8, 9), (4, 3, 2, 3), 1, [1, 1], "VALID", [1, 1]),            # auto_pad VALID
    ((2, 3, 9, 8), (4, 3, 3, 2), 1, [2, 3], "SAME_UPPER", [1, 1]),       # SAME: odd padding at the end
    ((2, 4, 10, 7), (4, 1, 4, 3), 4, [3, 2], "SAME_LOWER", [1, 1]),      # ... at the start; depthwise
]


def two_layer_mlp(k: int = 32, hidden: int = 32, *, shared: bool = False, bias: bool = True,
                  column_scale: np.ndarray | None = None) -> onnx.ModelProto:
    """x [N, k] -> Gemm(w1, transB) -> Relu -> MatMul(w2) -> y [N, 8], random weights (seed 0); ``shared``: a
    second MatMul reads w2 (output y2); ``column_scale``: w1's columns divided by it (weights large where the input
    is small, as training leaves them)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((hidden, k)) / np.sqrt(k)
    inits = {"w1": (w1 if column_scale is None else w1 / column_scale[:k]).astype(np.float32),
             "w2": (rng.standard_normal((hidden, 8)) / np.sqrt(hidden)).astype(np.float32)}
    if bias:
        inits["b1"] = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    nodes = [node("Gemm", ["x", "w1"] + (["b1"] if bias else []), ["h"], "fc1", transB=1),
             node("Relu", ["h"], ["r"], "relu"), node("MatMul", ["r", "w2"], ["y"], "fc2")]
    if shared:
        nodes.append(node("MatMul", ["r", "w2"], ["y2"], "fc2b"))
    return make_model(nodes, [("x", ["N", k])], ["y", "y2"] if shared else ["y"], inits)


# ------------------------------------------------------------------------------- models with subgraphs (If, Loop)


def _literal(a: np.ndarray) -> str:
    """An onnx.parser tensor literal of a float32 array: ``float[4, 8] {...}``."""
    return f"float[{', '.join(map(str, a.shape))}] {{{', '.join(repr(float(v)) for v in a.reshape(-1))}}}"


def if_matmul_model(shared: bool = False) -> onnx.ModelProto:
    """y = If(b), b a graph input (a condition computed at run time): then y = MatMul(x, wa)·s, wa an outer-scope
    weight, s a per-column constant; else y = MatMul(x, Transpose(c)), c a Constant node of the branch. Beside it a
    top-level tensor named 'wa_int8' (the name quantize-dynamic gives wa's int8 copy). ``shared``: the else branch
    reads wa instead (one weight in two branches)."""
    other = "e = MatMul(x, wa)" if shared else \
        f"c = Constant <value = {_literal(rand(4, 8, seed=3))}> ()  ct = Transpose(c)  e = MatMul(x, ct)"
    return parse_model(f"""
    agraph (float[N, 8] x, bool b) => (float[N, 4] y, float[N, 8] wa_int8) {{
        wa_int8 = Relu(x)
        y = If (b) <then_branch = g1 () => (float[N, 4] t) {{ m = MatMul(x, wa)  t = Mul(m, s) }},
                    else_branch = g2 () => (float[N, 4] e) {{ {other} }}>
    }}""", wa=rand(8, 4, seed=1), s=rand(4, seed=2, lo=0.5, hi=2.0))


def loop_lstm_model() -> onnx.ModelProto:
    """h = Loop(n, h0), a decoder step: h <- Squeeze(LSTM(MatMul(h, Transpose(w)), wl, rl).Y) with w, wl, rl
    outer-scope weights (the Transpose is loop-invariant)."""
    return parse_model("""
    agraph (float[1, 1, 8] h0, int64 n) => (float[1, 1, 8] h) {
        t = Constant <value = bool {1}> ()
        h = Loop (n, t, h0) <body = step (int64 i, bool cin, float[1, 1, 8] hin) => (bool cout, float[1, 1, 8] hout) {
            cout = Identity(cin)
            wt = Transpose(w)
            p = MatMul(hin, wt)
            y, yh, yc = LSTM <hidden_size = 8> (p, wl, rl)
            hout = Squeeze(y, one) }>
    }""", w=rand(8, 8, seed=4), wl=rand(1, 32, 8, seed=5), rl=rand(1, 32, 8, seed=6),
        one=np.array([1], np.int64))


def if_conv_model(nested: bool = False) -> onnx.ModelProto:
    """y = If(b), b a graph input (a condition computed at run time), each branch two 3x3 Convs (the first with a
    Relu) on the top-level x: then-branch weights w1, w2, else-branch w3, w4 (outer-scope initializers).
    ``nested``: the then-branch is itself an If on a second input c, with w1, w2 in its then-branch and w3, w4 in
    its else-branch."""
    def convs(w: str, v: str, out: str) -> str:
        return (f"{out}_c = Conv <pads = [1, 1, 1, 1]> (x, {w}, {w}_b)  {out}_r = Relu({out}_c)  "
                f"{out} = Conv <pads = [1, 1, 1, 1]> ({out}_r, {v}, {v}_b)")
    weights = {f"w{i}": rand(4, 3 if i % 2 else 4, 3, 3, seed=20 + i, lo=-0.5, hi=0.5) for i in range(1, 5)}
    biases = {f"w{i}_b": rand(4, seed=30 + i, lo=-0.1, hi=0.1) for i in range(1, 5)}
    then = (f"t = If (c) <then_branch = h1 () => (float[N, 4, 8, 8] u) {{ {convs('w1', 'w2', 'u')} }}, "
            f"else_branch = h2 () => (float[N, 4, 8, 8] v) {{ {convs('w3', 'w4', 'v')} }}>"
            if nested else convs("w1", "w2", "t"))
    return parse_model(f"""
    agraph (float[N, 3, 8, 8] x, bool b{", bool c" if nested else ""}) => (float[N, 4, 8, 8] y) {{
        y = If (b) <then_branch = g1 () => (float[N, 4, 8, 8] t) {{ {then} }},
                    else_branch = g2 () => (float[N, 4, 8, 8] e) {{ {convs("w3", "w4", "e")} }}>
    }}""", **weights, **biases)


def loop_matmul_model(grow: bool = False) -> onnx.ModelProto:
    """h = Loop(n, h0) with h <- Relu(MatMul(h, w)) (w an outer weight), each step's h also a scan output hs.
    ``grow``: the carried value grows instead, h <- Concat(h, MatMul(x, w)) on the outer x, so its shape changes
    at every iteration (scan outputs cannot stack it)."""
    step = ("p = MatMul(x, w)  hout = Concat <axis = 1> (hin, p)  hsc = Relu(p)" if grow else
            "p = MatMul(hin, w)  hout = Relu(p)  hsc = Identity(hout)")
    return parse_model(f"""
    agraph (float[1, 8] x, float[1, 8] h0, int64 n) => (float[1, H] h, float[T, 1, 8] hs) {{
        t = Constant <value = bool {{1}}> ()
        h, hs = Loop (n, t, h0) <body = step (int64 i, bool cin, float[1, H] hin)
                                         => (bool cout, float[1, H] hout, float[1, 8] hsc) {{
            cout = Identity(cin)
            {step} }}>
    }}""", w=rand(8, 8, seed=9, lo=-0.6, hi=0.6))


def nested_loop_model() -> onnx.ModelProto:
    """h = Loop(n, h0) whose body runs g = Loop(k, h) with g <- Relu(MatMul(g, w)), then h <- Relu(MatMul(g, v)):
    a MatMul with an outer weight in each of two nested bodies."""
    return parse_model("""
    agraph (float[1, 8] x, float[1, 8] h0, int64 n, int64 k) => (float[1, 8] h, float[T, 1, 8] hs) {
        t = Constant <value = bool {1}> ()
        h, hs = Loop (n, t, h0) <body = outer (int64 i, bool cin, float[1, 8] hin)
                                          => (bool cout, float[1, 8] hout, float[1, 8] hsc) {
            cout = Identity(cin)
            t2 = Constant <value = bool {1}> ()
            g = Loop (k, t2, hin) <body = inner (int64 j, bool c2, float[1, 8] gin) => (bool c2o, float[1, 8] gout) {
                c2o = Identity(c2)
                p = MatMul(gin, w)
                gout = Relu(p)
            }>
            q = MatMul(g, v)
            hout = Relu(q)
            hsc = Identity(hout)
        }>
    }""", w=rand(8, 8, seed=9, lo=-0.6, hi=0.6), v=rand(8, 8, seed=3, lo=-0.6, hi=0.6))


def _trained_body(net: str, image: str) -> tuple[list[onnx.NodeProto], str, list[onnx.TensorProto]]:
    """models/<net>.onnx's nodes reading ``image`` for its input, the name of its logits, its trained weights."""
    g = onnx.load(MODELS / f"{net}.onnx").graph
    nodes = list(g.node)
    for n in nodes:
        n.input[:] = [image if i == g.input[0].name else i for i in n.input]
    return nodes, g.output[0].name, list(g.initializer)


def mnist_scan_model(net: str = "mnist_mlp") -> onnx.ModelProto:
    """A Scan over sequences of MNIST images seq [N, T, 1, 28, 28] (scan_input_axes [1]) whose body is
    models/<net>.onnx's graph with its trained weights (outer-scope initializers): each step's logits are a scan
    output (scan_output_axes [1]: logits [N, T, 10]) and their running sum the carried state (acc [N, 10])."""
    nodes, y, weights = _trained_body(net, "image")
    body = helper.make_graph(
        nodes + [node("Add", ["acc_in", y], ["acc_out"]), node("Identity", [y], ["step_logits"])], "step",
        [value_info("acc_in", ["N", 10]), value_info("image", ["N", 1, 28, 28])],
        [value_info("acc_out", ["N", 10]), value_info("step_logits", ["N", 10])])
    return make_model([
        node("Shape", ["seq"], ["n"], start=0, end=1), node("Concat", ["n", "ten"], ["shape"], axis=0),
        node("ConstantOfShape", ["shape"], ["acc0"]),
        node("Scan", ["acc0", "seq"], ["acc", "logits"], num_scan_inputs=1, scan_input_axes=[1],
             scan_output_axes=[1], body=body)],
        [("seq", ["N", "T", 1, 28, 28])], [("acc", ["N", 10]), ("logits", ["N", "T", 10])],
        {"ten": np.array([10], np.int64), **{w.name: numpy_helper.to_array(w) for w in weights}})


def mnist_loop_model(net: str = "mnist_cnn") -> onnx.ModelProto:
    """A Loop over the steps of sequences of MNIST images seq [N, T, 1, 28, 28] (trip count T): the body gathers
    image i from the outer-scope seq and runs models/<net>.onnx's graph on it with its trained weights; each step's
    logits are a scan output (stacked on axis 0, transposed to logits [N, T, 10]) and the running sum of their
    softmax the carried state (prob [N, 10])."""
    nodes, y, weights = _trained_body(net, "image")
    body = helper.make_graph(
        [node("Gather", ["seq", "i"], ["image"], axis=1), *nodes, node("Softmax", [y], ["p"], axis=1),
         node("Add", ["acc_in", "p"], ["acc_out"]), node("Identity", ["cin"], ["cout"]),
         node("Identity", [y], ["step_logits"])], "step",
        [value_info("i", [], np.int64), value_info("cin", [], np.bool_), value_info("acc_in", ["N", 10])],
        [value_info("cout", [], np.bool_), value_info("acc_out", ["N", 10]), value_info("step_logits", ["N", 10])])
    return make_model([
        node("Shape", ["seq"], ["n"], start=0, end=1), node("Concat", ["n", "ten"], ["shape"], axis=0),
        node("ConstantOfShape", ["shape"], ["acc0"]),
        node("Shape", ["seq"], ["t1"], start=1, end=2), node("Squeeze", ["t1"], ["trips"]),
        node("Loop", ["trips", "", "acc0"], ["prob", "steps"], body=body),
        node("Transpose", ["steps"], ["logits"], perm=[1, 0, 2])],
        [("seq", ["N", "T", 1, 28, 28])], [("prob", ["N", 10]), ("logits", ["N", "T", 10])],
        {"ten": np.array([10], np.int64), **{w.name: numpy_helper.to_array(w) for w in weights}})


def mnist_sequences(split: str = "calib", steps: int = 4) -> dict[str, np.ndarray]:
    """models/mnist_<split>.npz's images as sequences seq [N/steps, steps, 1, 28, 28] (labels [N/steps, steps])."""
    d = np.load(MODELS / f"mnist_{split}.npz")
    n = len(d["input"]) // steps * steps
    return {"seq": d["input"][:n].reshape(-1, steps, 1, 28, 28), "__labels__": d["__labels__"][:n].reshape(-1, steps)}
