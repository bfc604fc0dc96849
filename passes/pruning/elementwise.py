"""Channel handlers of the ops that keep channels in place: activations, pooling, element-wise arithmetic,
normalisations, softmax and reductions over other axes.

Output channel c is a function of input channel c only, so the output's ids are the input's. Binary ops
(Add/Sub/Mul/Div/Max/Min/Sum/Mean/Pow) *couple* two operands that carry channels: the atoms at equal positions are
united (a residual connection, a squeeze-excitation gate), and a variable operand of fixed origin (a graph input)
couples the group to channels that cannot be pruned. A constant operand with a full channel axis (aligned to the
output's trailing axes by broadcasting) is sliced with the channels; BatchNormalization / InstanceNormalization
parameters likewise, and BN's γ joins the importance ("bn" term). Softmax, LayerNormalization and reductions over
the channel axis mix channels: blocked.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe

from .channels import Blocked, ChannelGraph, Term, handles, pass_through

UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Floor", "Ceil",
         "Round", "Sign", "Cast", "Identity", "Dropout", "Clip", "ThresholdedRelu", "Sin", "Cos", "Shrink",
         "IsNaN", "IsInf", "Not", "Swish")
POOLING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean")
REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
SOFTMAX = ("Softmax", "LogSoftmax", "Hardmax")


@handles(*UNARY, *POOLING)
def unary(cg: ChannelGraph, node: gs.Node) -> set[int]:
    for o in node.outputs[1:]:
        if o.outputs or o.name in {t.name for t in cg.graph.outputs}:
            raise Blocked(f"{describe(node)}: second output is used")
    return pass_through(cg, node)


def _broadcast_const(cg: ChannelGraph, node: gs.Node, index: int, out_rank: int, ref: str) -> None:
    """A constant operand of an element-wise op: slice its channel axis (if it has one of the full size)."""
    v = np.asarray(node.inputs[index].values)
    c = len(cg.ids[ref])
    if v.ndim > out_rank:
        raise Blocked(f"{describe(node)}: constant operand raises the rank")
    axis = v.ndim - (out_rank - 1)
    if axis < 0 or v.shape[axis] == 1:
        return
    if v.shape[axis] != c:
        raise Blocked(f"{describe(node)}: constant of shape {list(v.shape)} on {c} channels")
    cg.slice_const(node, index, axis, ref)


@handles(*BINARY)
def binary(cg: ChannelGraph, node: gs.Node) -> set[int]:
    out = node.outputs[0]
    out_rank = cg.rank(out)
    if out_rank is None:
        raise Blocked(f"{describe(node)}: output of unknown rank")
    carried = [i for i, t in enumerate(node.inputs) if t.name in cg.ids]
    full = [i for i in carried if len(cg.ids[node.inputs[i].name]) > 1 or cg.channels_of(out) == 1]
    for i in carried:
        if cg.rank(node.inputs[i]) != out_rank:
            raise Blocked(f"{describe(node)}: operands of different rank")
    ref = full[0] if full else carried[0]
    ref_ids = cg.ids[node.inputs[ref].name]
    for i, t in enumerate(node.inputs):
        if i == ref or t.is_empty():
            continue
        if isinstance(t, gs.Constant):
            _broadcast_const(cg, node, i, out_rank, node.inputs[ref].name)
        elif t.name in cg.ids:
            _couple(cg, node, ref_ids, cg.ids[t.name], allow_one=True)
        else:
            _couple_fixed(cg, node, t, ref_ids, out_rank)
    cg.ids[out.name] = ref_ids
    return set(carried)


def _couple(cg: ChannelGraph, node: gs.Node, ref_ids: np.ndarray, other: np.ndarray, allow_one: bool) -> None:
    c = len(ref_ids)
    if len(other) == c:
        cg.couple(ref_ids, other)
    elif not (allow_one and len(other) == 1):
        raise Blocked(f"{describe(node)}: operands with {c} and {len(other)} channels")


def _couple_fixed(cg: ChannelGraph, node: gs.Node, t: gs.Tensor, ref_ids: np.ndarray, out_rank: int) -> None:
    """A variable operand whose channels no prunable layer produces: coupled (never pruned) unless it
    broadcasts over the channel axis."""
    r = cg.rank(t)
    if r is None:
        raise Blocked(f"{describe(node)}: operand '{t.name}' of unknown shape")
    if r < out_rank - 1:
        return
    if r != out_rank:
        raise Blocked(f"{describe(node)}: operand '{t.name}' of rank {r} broadcasts on the channel axis")
    if cg.channels_of(t) == 1:
        return
    what = "a graph input" if not t.inputs else describe(t.inputs[0])
    other = cg.fixed_ids(t, f"coupled to '{t.name}' (from {what}), whose channels cannot be pruned")
    _couple(cg, node, ref_ids, other, allow_one=False)


@handles("PRelu")
def prelu(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if node.inputs[0].name not in cg.ids:
        raise Blocked(f"{describe(node)}: channels reach the slope")
    if not isinstance(node.inputs[1], gs.Constant):
        return binary(cg, node)
    r = cg.rank(node.outputs[0]) or cg.rank(node.inputs[0])
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    _broadcast_const(cg, node, 1, r, node.inputs[0].name)
    return pass_through(cg, node)


def _per_channel_params(cg: ChannelGraph, node: gs.Node, indices: range | tuple[int, ...]) -> None:
    x = node.inputs[0].name
    c = len(cg.ids[x])
    for i in indices:
        v = const_value(node.inputs[i])
        if v is None or v.shape != (c,):
            raise Blocked(f"{describe(node)}: parameter '{node.inputs[i].name}' is not a constant of shape [{c}]")
        cg.slice_const(node, i, 0, x)


@handles("BatchNormalization")
def batchnorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if sum(1 for o in node.outputs if not o.is_empty()) > 1 or node.attrs.get("training_mode", 0):
        raise Blocked(f"{describe(node)}: training-mode BatchNormalization")
    if node.attrs.get("spatial", 1) == 0:
        raise Blocked(f"{describe(node)}: spatial=0")
    _per_channel_params(cg, node, range(1, len(node.inputs)))
    cg.terms.append(Term("bn", cg.ids[node.inputs[0].name], np.asarray(node.inputs[1].values), 0))
    return pass_through(cg, node)


@handles("InstanceNormalization")
def instancenorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    _per_channel_params(cg, node, (1, 2))
    return pass_through(cg, node)


@handles("LayerNormalization")
def layernorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    axis = axis + r if axis < 0 else axis
    if axis <= 1 or len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        raise Blocked(f"{describe(node)}: normalises over the channel axis")
    return pass_through(cg, node)


@handles(*SOFTMAX)
def softmax(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    axis = int(node.attrs.get("axis", -1 if cg.opset >= 13 else 1))
    axis = axis + r if axis < 0 else axis
    if axis == 1 or (cg.opset < 13 and axis <= 1):
        raise Blocked(f"{describe(node)}: normalises over the channel axis")
    return pass_through(cg, node)


@handles(*REDUCE)
def reduce(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    axes_input = 1 if (node.op == "ReduceSum" and cg.opset >= 13) or cg.opset >= 18 else None
    axes = cg.axes_of(node, r, axes_input)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return pass_through(cg, node)
        raise Blocked(f"{describe(node)}: reduces over every axis, the channel axis too")
    if 1 in axes:
        raise Blocked(f"{describe(node)}: reduces over the channel axis")
    if not node.attrs.get("keepdims", 1) and 0 in axes:
        raise Blocked(f"{describe(node)}: removes the batch axis")
    return pass_through(cg, node)
