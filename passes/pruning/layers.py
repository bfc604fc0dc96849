"""Channel handlers of the weighted layers: Conv and ConvTranspose (group 1, or depthwise), Gemm, MatMul with a
constant 2-D weight.

A weighted layer with a constant float weight *reads* the channels of its input through the weight's in-channel
axis (a consumer: those weight slices go with the channels and count in their importance) and is the *source* of
fresh channels, one per output channel: its weight's out-channel slices and bias entries go with them, and their
magnitude (times |γ/√(σ²+ε)| of a BatchNormalization that alone reads the output) is the channel's "out" weight.
A depthwise Conv (group = C_in, one input channel per group) passes channels through: input channel c feeds
outputs [c·m, (c+1)·m) (channel multiplier m), and its ``group`` becomes the kept count. A MatMul whose input has
rank >= 3 contracts the last axis: axis 1 passes through. Anything else (a computed weight, a grouped Conv, a
non-float weight, mismatched channel counts) blocks the input's channels with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe, is_std

from .channels import ChannelGraph, Term, handles
from .edits import SetCount


def _refuse(cg: ChannelGraph, node: gs.Node, reason: str) -> set[int]:
    xid = cg.ids.get(node.inputs[0].name)
    if xid is not None:
        cg.block(xid, f"{describe(node)}: {reason}")
    cg.unpruned.append((describe(node), reason))
    return {0}


@handles("Conv", "ConvTranspose", "Gemm", "MatMul", origin=True)
def weighted_layer(cg: ChannelGraph, node: gs.Node) -> set[int]:
    """Consumer of its input channels, source of its output channels."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wv = const_value(w) if w is not None else None
    b = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if wv is None or (b is not None and const_value(b) is None):
        if w is not None and w.name in cg.ids:
            cg.block(cg.ids[w.name], f"{describe(node)}: channels reach a weight input")
        from_node = any(t is not None and t.inputs and t.inputs[0].op == "Constant" for t in (w, b))
        return _refuse(cg, node, "weight or bias is not a constant" + (
            " (a Constant node: run fold-constants first)" if from_node else ""))
    if wv.dtype.kind != "f":
        return _refuse(cg, node, f"weight dtype {wv.dtype}")
    if node.op in ("Conv", "ConvTranspose"):
        return _conv(cg, node, wv, b is not None)
    return _dense(cg, node, wv, b)


def _source(cg: ChannelGraph, node: gs.Node, wv: np.ndarray, out_axis: int, n: int) -> np.ndarray:
    """The layer's output channels: fresh atoms, their importance term, their weight slices."""
    out = node.outputs[0]
    ids = cg.new_source(node, out.name, n)
    cg.ids[out.name] = ids
    cg.terms.append(Term("out", ids, wv, out_axis, _bn_scale(out)))
    cg.slice_const(node, 1, out_axis, out.name)
    return ids


def _conv(cg: ChannelGraph, node: gs.Node, wv: np.ndarray, has_bias: bool) -> set[int]:
    if wv.ndim < 3:
        return _refuse(cg, node, "weight rank < 3")
    x, out = node.inputs[0], node.outputs[0]
    xid = cg.ids.get(x.name)
    group = int(node.attrs.get("group", 1))
    transpose = node.op == "ConvTranspose"
    c_in = wv.shape[0] if transpose else wv.shape[1] * group
    c_out = wv.shape[1] * group if transpose else wv.shape[0]
    in_axis, out_axis = (0, 1) if transpose else (1, 0)
    if group == 1:
        if xid is not None:
            if len(xid) != c_in:
                return _refuse(cg, node, f"input has {len(xid)} channels, weight expects {c_in}")
            cg.add_reader(node, x, xid, wv, in_axis)
        _source(cg, node, wv, out_axis, c_out)
        if has_bias:
            cg.slice_const(node, 2, 0, out.name)
        return {0}
    if xid is not None and group == c_in == len(xid) and (
            (not transpose and wv.shape[1] == 1) or (transpose and wv.shape[0] == c_in)):
        # depthwise: channel c_in -> outputs [c·m, (c+1)·m); channels pass through
        cg.ids[out.name] = np.repeat(xid, c_out // c_in)
        cg.slice_const(node, 1, 0, x.name if transpose else out.name)
        if has_bias:
            cg.slice_const(node, 2, 0, out.name)
        cg.edits.append(SetCount(node, describe(node), "group", None, 0, x.name))
        return {0}
    return _refuse(cg, node, f"grouped convolution (group={group}) mixes channels within groups")


def _dense(cg: ChannelGraph, node: gs.Node, wv: np.ndarray, b: gs.Tensor | None) -> set[int]:
    """Gemm, MatMul: a rank-2 weight; MatMul on a rank >= 3 input passes axis 1 through."""
    if wv.ndim != 2:
        return _refuse(cg, node, f"weight of rank {wv.ndim}")
    x, out = node.inputs[0], node.outputs[0]
    xid = cg.ids.get(x.name)
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return _refuse(cg, node, "transA=1")
        in_axis, out_axis = (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    else:
        xr = cg.rank(x)
        if xr is None:
            return _refuse(cg, node, "input of unknown rank")
        if xr >= 3:
            if xid is not None:   # contracts the last axis: channels (axis 1) pass through
                cg.ids[out.name] = xid
            cg.unpruned.append((describe(node), f"its output features are the last axis of a rank-{xr} tensor "
                                "(a transformer's tokens x features): the analysis follows channels on axis 1 only"))
            return {0}
        if xr != 2:
            return _refuse(cg, node, f"input of rank {xr}")
        in_axis, out_axis = 0, 1
    k, n = wv.shape[in_axis], wv.shape[out_axis]
    if xid is not None:
        if len(xid) != k:
            return _refuse(cg, node, f"input has {len(xid)} features, weight expects {k}")
        cg.add_reader(node, x, xid, wv, in_axis)
    if cg.rank(out) not in (2, None):
        cg.unpruned.append((describe(node), f"output of rank {cg.rank(out)}"))
        return {0}
    ids = _source(cg, node, wv, out_axis, n)
    if b is not None:
        bv = const_value(b)
        assert bv is not None
        if bv.ndim >= 1 and bv.shape[-1] == n and n > 1:
            cg.slice_const(node, 2, bv.ndim - 1, out.name)
        elif bv.ndim >= 1 and bv.shape[-1] not in (1, n):
            cg.block(ids, f"{describe(node)}: bias of shape {list(bv.shape)}")
    return {0}


def _bn_scale(out: gs.Variable) -> np.ndarray | None:
    """|γ/√(σ²+ε)| of a BatchNormalization that is the only reader of ``out`` (effective weight magnitude)."""
    if len(out.outputs) != 1:
        return None
    bn = out.outputs[0]
    if not (is_std(bn, "BatchNormalization") and len(bn.inputs) == 5):
        return None
    g, v = const_value(bn.inputs[1]), const_value(bn.inputs[4])
    if g is None or v is None:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    return np.abs(g.astype(np.float64)) / np.sqrt(np.maximum(v.astype(np.float64) + eps, 1e-30))
