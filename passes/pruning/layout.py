"""Channel handlers of the ops that move or reshape the channel axis: Flatten, Reshape, Squeeze/Unsqueeze,
Transpose (and the ops after a Transpose that moved channels off axis 1), Tile/Expand, Shape.

Flatten (and Reshape to ``[N, C·H·W]``) repeats each channel id H·W times (static spatial dims): a Gemm after it
reads channel c as its H·W features, and a constant shape's feature count becomes ``H·W x kept``. A Reshape that
keeps axis 1 (merging or splitting spatial axes) passes ids through. A Transpose that keeps axes 0 and 1 passes
them through; one that moves the channel axis (NCHW -> NHWC before a Caffe-style Flatten) is followed element by
element: ``fmap`` holds the atom of every element of dims[1:] (static shape), permuted with the data, until a
Flatten or a Reshape to ``[N, K]`` turns it back into ids over K features. Shape is allowed when nothing reads the
channel count from it; Tile/Expand when they do not repeat the channel axis.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe, is_std

from .channels import Blocked, ChannelGraph, handles, handles_moved, pass_through
from .edits import SetCount


def spatial(s: Sequence[Any]) -> int | None:
    """The product of the spatial dims (after N, C), None unless all are static."""
    if not all(isinstance(d, int) and d >= 0 for d in s[2:]):
        return None
    return int(math.prod(s[2:]))


@handles("Flatten")
def flatten(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    s = cg.shape(x)
    if s is None:
        raise Blocked(f"{describe(node)}: input of unknown shape")
    axis = int(node.attrs.get("axis", 1))
    axis = axis + len(s) if axis < 0 else axis
    if axis != 1:
        raise Blocked(f"{describe(node)}: flattens with axis={axis}, mixing the channel axis with others")
    hw = spatial(s)
    if hw is None:
        raise Blocked(f"{describe(node)}: spatial size unknown ({s}), cannot map channels to features")
    cg.ids[node.outputs[0].name] = np.repeat(cg.ids[x.name], hw)
    return {0}


@handles("Reshape")
def reshape(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x, out = node.inputs[0], node.outputs[0]
    sv = const_value(node.inputs[1])
    if sv is None:
        raise Blocked(f"{describe(node)}: shape is computed (Shape-dependent), not constant")
    shape_in, shape_out = cg.shape(x), cg.shape(out)
    if shape_in is None or shape_out is None:
        raise Blocked(f"{describe(node)}: shapes unknown")
    xid = cg.ids[x.name]
    c = len(xid)
    target = [int(d) for d in sv.reshape(-1)]
    batch_kept = (len(target) >= 1 and (target[0] == 0 or (shape_in[0] == shape_out[0] and shape_in[0] is not None)
                                        or (isinstance(shape_in[0], int) and target[0] == shape_in[0])))
    if len(shape_out) >= 2 and len(target) >= 2 and batch_kept and shape_out[1] == c and target[1] in (0, c, -1):
        if target[1] == 0 and int(node.attrs.get("allowzero", 0)):
            raise Blocked(f"{describe(node)}: allowzero")
        # channel axis kept (spatial axes merged or split)
        if target[1] == -1 and not all(d > 0 for i, d in enumerate(target) if i != 1):
            raise Blocked(f"{describe(node)}: channel dimension inferred (-1) from other unknown dims")
        if target[1] == c:
            cg.edits.append(SetCount(node, describe(node), 1, tuple(target), 1, x.name))
        cg.ids[out.name] = xid
        return {0}
    hw = spatial(shape_in)
    if (len(shape_out) == 2 and len(target) == 2 and hw is not None and len(shape_in) >= 2
            and (batch_kept or (target[0] == -1 and target[1] == c * hw)) and target[1] in (c * hw, -1)
            and (target[1] != -1 or target[0] in (0,) or batch_kept)):
        cg.ids[out.name] = np.repeat(xid, hw)
        if target[1] > 0:
            cg.edits.append(SetCount(node, describe(node), 1, tuple(target), 1, x.name, times=hw))
        return {0}
    raise Blocked(f"{describe(node)}: reshape {list(shape_in)} -> {target} moves the channel axis")


@handles("Squeeze", "Unsqueeze")
def squeeze(cg: ChannelGraph, node: gs.Node) -> set[int]:
    unsq = node.op == "Unsqueeze"
    r = cg.rank(node.outputs[0] if unsq else node.inputs[0])
    axes = cg.axes_of(node, r, 1 if cg.opset >= 13 else None)
    if axes is None:
        raise Blocked(f"{describe(node)}: no axes given (would drop the batch axis when it is 1)")
    if 0 in axes or 1 in axes:
        raise Blocked(f"{describe(node)}: moves the channel axis")
    return pass_through(cg, node)


@handles("Transpose")
def transpose(cg: ChannelGraph, node: gs.Node) -> set[int]:
    perm = node.attrs.get("perm")
    if perm is not None and list(perm[:2]) == [0, 1]:
        return pass_through(cg, node)
    x = node.inputs[0]
    s = cg.shape(x)
    if perm is None or perm[0] != 0 or s is None or spatial(s) is None:
        raise Blocked(f"{describe(node)}: transpose {perm} moves the channel axis")
    # channels move off axis 1: follow every element (static shape) until a Flatten/Reshape to [N, K]
    ids = cg.ids[x.name]
    fmap = np.broadcast_to(ids.reshape((-1,) + (1,) * (len(s) - 2)), (len(ids), *s[2:]))
    cg.fmaps[node.outputs[0].name] = np.transpose(fmap, [p - 1 for p in perm[1:]])
    return {0}


@handles_moved("Transpose")
def moved_transpose(cg: ChannelGraph, node: gs.Node) -> set[int]:
    perm = node.attrs.get("perm")
    if perm is None or perm[0] != 0:
        raise Blocked(f"{describe(node)}: transpose {perm} moves the batch axis")
    cg.fmaps[node.outputs[0].name] = np.transpose(cg.fmaps[node.inputs[0].name], [p - 1 for p in perm[1:]])
    return {0}


@handles_moved("Flatten")
def moved_flatten(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if int(node.attrs.get("axis", 1)) != 1:
        raise Blocked(f"{describe(node)}: flattens with axis != 1")
    cg.ids[node.outputs[0].name] = cg.fmaps[node.inputs[0].name].reshape(-1)
    return {0}


@handles_moved("Reshape")
def moved_reshape(cg: ChannelGraph, node: gs.Node) -> set[int]:
    fmap, out = cg.fmaps[node.inputs[0].name], node.outputs[0]
    sv = const_value(node.inputs[1])
    if sv is None:
        raise Blocked(f"{describe(node)}: shape is computed (Shape-dependent), not constant")
    target = [int(d) for d in sv.reshape(-1)]
    k = fmap.size
    if not (len(target) == 2 and (target[0] == 0 or (target[0] == -1 and target[1] == k)
                                   or (target[0] > 0 and target[1] in (-1, k)))
            and target[1] in (-1, k)):
        raise Blocked(f"{describe(node)}: reshape to {target} after a Transpose of pruned channels")
    cg.ids[out.name] = fmap.reshape(-1)
    if target[1] == k:
        cg.edits.append(SetCount(node, describe(node), 1, tuple(target), 1, out.name))
    return {0}


@handles("Tile", "Expand")
def tile_expand(cg: ChannelGraph, node: gs.Node) -> set[int]:
    v = const_value(node.inputs[1])
    if v is None:
        raise Blocked(f"{describe(node)}: repeats/shape are computed")
    vals = [int(a) for a in v.reshape(-1)]
    r = cg.rank(node.inputs[0])
    if node.op == "Tile":
        if len(vals) < 2 or vals[1] != 1:
            raise Blocked(f"{describe(node)}: repeats the channel axis")
        return pass_through(cg, node)
    out_r = cg.rank(node.outputs[0])
    if r is None or out_r != r or len(vals) != r or vals[1] not in (1, len(cg.ids[node.inputs[0].name])):
        raise Blocked(f"{describe(node)}: expands the channel axis")
    if vals[1] != 1:
        cg.edits.append(SetCount(node, describe(node), 1, tuple(vals), 1, node.inputs[0].name))
    return pass_through(cg, node)


@handles("Shape")
def shape(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = start + r if start < 0 else start
    end_i = r if end is None else (int(end) + r if int(end) < 0 else int(end))
    if not start <= 1 < end_i:
        return {0}
    idx_channel = 1 - start
    for user in node.outputs[0].outputs:
        if not (is_std(user, "Gather") and int(user.attrs.get("axis", 0)) == 0
                and user.inputs[0] is node.outputs[0]):
            raise Blocked(f"{describe(node)}: the shape of a pruned tensor feeds {describe(user)}")
        iv = const_value(user.inputs[1])
        n = end_i - start
        if iv is None or idx_channel in [int(i) + n if i < 0 else int(i) for i in iv.reshape(-1)]:
            raise Blocked(f"{describe(node)}: the channel count of a pruned tensor is read by {describe(user)}")
    if node.outputs[0].name in {t.name for t in cg.graph.outputs}:
        raise Blocked(f"{describe(node)}: the shape of a pruned tensor is a graph output")
    return {0}
