"""Planning: which ops the quantize pass may run int8, as onnxruntime's QDQ fusions need them for QLinear*/
MatMulInteger kernels.

  * units: Conv, Gemm (alpha = beta = 1, no transA) and MatMul with a constant 2-D float32 weight, and MatMul of two
    float activations (attention). The weight's output-channel axis is 0 for Conv and Gemm transB=1, 1 for Gemm
    transB=0 and MatMul (``Unit.weight_axis``; None for activation x activation). A Conv/Gemm whose only consumer
    is Relu or Clip (constant bounds) forms one unit with it: no QDQ between them, the output range is observed
    after the activation (it starts at 0) and onnxruntime folds the activation into the requantization;
  * others: residual Add of two activations and Concat (inputs and output share one scale, so Concat needs no
    rescale); pooling and pass-through ops (MaxPool, AveragePool, GlobalAveragePool, Reshape, Transpose, Flatten,
    Squeeze, Unsqueeze, Resize), int8 when their input already is; pass-through outputs share their input's scale,
    so onnxruntime drops the Q/DQ pair and moves int8 data; the activations onnxruntime's QDQ transformer runs in
    integer (its selectors: Sigmoid and LeakyRelu become QLinearSigmoid / QLinearLeakyRelu, a 256-entry lookup
    table of the fixed scales; Mul of two activations becomes QLinearMul), so SiLU = x·Sigmoid(x) after an int8
    layer stays int8 instead of a DequantizeLinear, two float ops and a QuantizeLinear; each with its own output
    scale; a Mul only where both its inputs already are quantized (x·HardSigmoid(x) keeps it float: the build).
    objective=latency keeps them int8 only where the region measures faster;
  * a Gemm's or MatMul's output is quantized only where another planned op reads it (``plan_reads``): onnxruntime
    runs DequantizeLinear → Gemm/MatMul with a float output as QGemm / MatMulIntegerToFloat, integer all the same,
    so logits or a dense layer's output before a float bias Add or Softmax carry no rounding; a Conv needs its
    output quantized to run QLinearConv;
  * every other op (LayerNormalization, Softmax, HardSigmoid, a Mul by a constant, ...) stays float: it reads the
    DequantizeLinear output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_float32, is_std, node_name

WEIGHTED = {"Conv", "Gemm", "MatMul"}
# Weighted ops whose integer kernels can write float (QGemm, MatMulIntegerToFloat): their output needs no QDQ
FLOAT_OUTPUT = {"Gemm", "MatMul"}
FUSABLE_ACTIVATIONS = {"Relu", "Clip"}
SHARED_SCALE = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize"}
OWN_SCALE = {"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
BINARY = {"Add", "Mul"}         # of two activations: QLinearAdd, QLinearMul
OTHERS = BINARY | {"Concat"} | SHARED_SCALE | OWN_SCALE


@dataclass
class Unit:
    """A weighted op (with its fused activation) that is quantized or left float as a whole."""

    node: gs.Node
    act: gs.Node | None
    weight_axis: int | None      # None: activation x activation MatMul

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def output(self) -> gs.Tensor:
        return (self.act or self.node).outputs[0]

    @property
    def op(self) -> str:
        """The op as the report shows it: ``Conv+Relu``."""
        return self.node.op + (f"+{self.act.op}" if self.act else "")

    def data_inputs(self, node: gs.Node | None = None) -> list[str]:
        """The inputs that must be quantized for the unit to run int8 (of ``node``, the unit's op in a copy of the
        graph): the first, and for an activation x activation MatMul the second too."""
        return [t.name for t in (node or self.node).inputs[:1 if self.weight_axis is not None else 2]]


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    others: list[gs.Node] = field(default_factory=list)   # Add, Concat, pooling, pass-through candidates
    declined: list[tuple[str, str]] = field(default_factory=list)   # (site, reason)


def excluded(node: gs.Node, exclude: tuple[str, ...]) -> bool:
    return node.name in exclude or node.op in exclude


def make_plan(graph: gs.Graph, exclude: tuple[str, ...]) -> Plan:
    """The units and the other candidate ops of ``graph`` in topological order, and the sites declined."""
    plan = Plan()
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if not is_std(node, *WEIGHTED, *OTHERS):
            continue
        if excluded(node, exclude):
            plan.declined.append((describe(node), "excluded by option"))
        elif node.op in WEIGHTED:
            unit = _unit(node, outputs, exclude, plan.declined)
            if unit is not None:
                plan.units.append(unit)
        else:
            plan.others.append(node)
    return plan


def _weight_axis(node: gs.Node) -> int | None | str:
    """The weight's output-channel axis (None: activation x activation MatMul), or why the op does not qualify."""
    w = node.inputs[1]
    const = isinstance(w, gs.Constant)
    if node.op == "Conv":
        return 0 if const else "weight is not a constant"
    if node.op == "Gemm":
        if not const or w.values.ndim != 2:
            return "weight is not a constant matrix"
        if node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0 or node.attrs.get("transA", 0):
            return "alpha/beta != 1 or transA"
        return 0 if node.attrs.get("transB", 0) else 1
    if const:   # MatMul
        return 1 if w.values.ndim == 2 else f"constant weight of rank {w.values.ndim} (need 2)"
    return None if is_float32(w) else "second input is not float32"


def _unit(node: gs.Node, outputs: set[str], exclude: tuple[str, ...], declined: list[tuple[str, str]]
          ) -> Unit | None:
    site = describe(node)
    if not is_float32(node.inputs[0]):
        declined.append((site, "input is not float32"))
        return None
    axis = _weight_axis(node)
    if isinstance(axis, str):
        declined.append((site, axis))
        return None
    w = node.inputs[1]
    if isinstance(w, gs.Constant) and w.values.dtype != np.float32:
        declined.append((site, f"weight dtype {w.values.dtype}"))
        return None
    act = None
    out = node.outputs[0]
    if node.op != "MatMul" and len(out.outputs) == 1 and out.name not in outputs:
        nxt = out.outputs[0]
        if is_std(nxt, *FUSABLE_ACTIVATIONS) and not excluded(nxt, exclude):
            if nxt.op == "Relu" or all(isinstance(t, gs.Constant) for t in nxt.inputs[1:] if not t.is_empty()):
                act = nxt
    return Unit(node, act, axis)


def int8_data(node: gs.Node) -> list[gs.Tensor]:
    """An Add's, Mul's, Concat's or other op's data inputs if it can run int8 (every one a float activation; an Add
    or Mul of two), else []."""
    data = [t for t in (node.inputs if node.op in BINARY | {"Concat"} else node.inputs[:1]) if not t.is_empty()]
    if not data or not all(is_float32(t) and not isinstance(t, gs.Constant) for t in data) or (
            node.op in BINARY and len(data) != 2):
        return []
    return data


def plan_reads(plan: Plan) -> set[str]:
    """The tensors a planned op can read as int8: a unit's first two inputs, the data inputs of the other ops that
    can run int8 (``int8_data``)."""
    read = {t.name for u in plan.units for t in u.node.inputs[:2]}
    for n in plan.others:
        read |= {t.name for t in int8_data(n)}
    return read


def candidate_tensors(plan: Plan) -> list[str]:
    """Every float activation tensor a build could quantize (inputs and outputs of planned ops), in plan order."""
    names: list[str] = []
    read = plan_reads(plan)
    for u in plan.units:
        names += [t.name for t in u.node.inputs[:2] if not isinstance(t, gs.Constant) and is_float32(t)]
        if u.node.op not in FLOAT_OUTPUT or u.output.name in read:
            names.append(u.output.name)
    for n in plan.others:
        data = int8_data(n)
        if data:
            names += [t.name for t in data] + [t.name for t in n.outputs[:1] if is_float32(t)]
    return list(dict.fromkeys(names))
