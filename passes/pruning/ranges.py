"""Channel handlers of the ops that join, cut or pad tensors: Concat, Split, Slice, Pad, Resize/Upsample.

On the channel axis, Concat concatenates its inputs' ids (an input no prunable layer produces gets fixed atoms);
Split output i takes ids ``[b_i, b_i+1)`` and its size becomes the number of kept channels in that range; Slice
(step 1) takes ids ``[lo, hi)`` and its bounds become the kept counts before ``lo`` and ``hi``. On other axes they
pass ids through (a Concat elsewhere couples its operands like an element-wise op). Pad and Resize pass ids through
when they leave the channel axis alone (zero pads there, scale 1, sizes naming the channel count, which then
becomes the kept count); anything computed (Shape-dependent) blocks.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe

from .channels import Blocked, ChannelGraph, handles, pass_through
from .edits import SetCount, SetSplit
from .elementwise import binary


def _axis(cg: ChannelGraph, node: gs.Node, t: gs.Tensor, default: int | None) -> int:
    r = cg.rank(t)
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    axis = int(node.attrs["axis"] if default is None else node.attrs.get("axis", default))
    return axis + r if axis < 0 else axis


@handles("Concat")
def concat(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if _axis(cg, node, node.outputs[0], None) != 1:
        return binary(cg, node)
    parts = []
    for t in node.inputs:
        if t.name in cg.ids:
            parts.append(cg.ids[t.name])
        else:
            what = "a constant" if isinstance(t, gs.Constant) else (
                "a graph input" if not t.inputs else describe(t.inputs[0]))
            parts.append(cg.fixed_ids(t, f"channels from {what}"))
    cg.ids[node.outputs[0].name] = np.concatenate(parts)
    return set(range(len(node.inputs)))


@handles("Split")
def split(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    axis = _axis(cg, node, x, 0)
    xid = cg.ids[x.name]
    n = len(node.outputs)
    if axis != 1:
        for o in node.outputs:
            cg.ids[o.name] = xid
        return {0}
    sizes: list[int] | None = None
    if "split" in node.attrs:
        sizes = [int(s) for s in node.attrs["split"]]
    elif len(node.inputs) > 1 and not node.inputs[1].is_empty():
        v = const_value(node.inputs[1])
        if v is None:
            raise Blocked(f"{describe(node)}: split sizes are computed")
        sizes = [int(s) for s in v.reshape(-1)]
    if sizes is None:
        c = len(xid)
        each = -(-c // n)
        sizes = [min(each, c - i * each) for i in range(n)]
    if sum(sizes) != len(xid) or len(sizes) != n:
        raise Blocked(f"{describe(node)}: split sizes {sizes} do not cover {len(xid)} channels")
    bounds = np.cumsum([0] + sizes)
    for o, lo, hi in zip(node.outputs, bounds[:-1], bounds[1:]):
        cg.ids[o.name] = xid[lo:hi]
    cg.edits.append(SetSplit(node, describe(node), x.name, tuple(int(b) for b in bounds), cg.opset >= 13))
    return {0}


def _slice_args(cg: ChannelGraph, node: gs.Node) -> tuple[list[int], list[int], list[int], list[int]]:
    """starts, ends, axes (not normalised), steps: attributes before opset 10, constant inputs since."""
    if cg.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        return starts, ends, list(node.attrs.get("axes", range(len(starts)))), [1] * len(starts)
    vals = []
    for i in range(1, 5):
        if len(node.inputs) > i and not node.inputs[i].is_empty():
            v = const_value(node.inputs[i])
            if v is None:
                raise Blocked(f"{describe(node)}: starts/ends/axes/steps are computed")
            vals.append([int(a) for a in v.reshape(-1)])
        else:
            vals.append(None)
    starts, ends = vals[0], vals[1]
    assert starts is not None and ends is not None
    axes = vals[2] if vals[2] is not None else list(range(len(starts)))
    steps = vals[3] if vals[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


@handles("Slice")
def slice_(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    xid = cg.ids[x.name]
    r = cg.rank(x)
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    starts, ends, axes, steps = _slice_args(cg, node)
    axes = [a + r if a < 0 else a for a in axes]
    if 1 not in axes:
        return pass_through(cg, node)
    k = axes.index(1)
    if steps[k] != 1:
        raise Blocked(f"{describe(node)}: slices the channel axis with step {steps[k]}")
    lo, hi, _ = slice(starts[k], ends[k], 1).indices(len(xid))
    hi = max(hi, lo)
    cg.ids[node.outputs[0].name] = xid[lo:hi]
    site = describe(node)
    first, last = ("starts", "ends") if cg.opset < 10 else (1, 2)
    cg.edits.append(SetCount(node, site, first, tuple(starts), k, x.name, stop=lo))
    cg.edits.append(SetCount(node, site, last, tuple(ends), k, x.name, stop=hi))
    return {0}


@handles("Pad")
def pad(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    if r is None:
        raise Blocked(f"{describe(node)}: unknown rank")
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        axes = list(range(r))
    else:
        pv = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if pv is None:
            raise Blocked(f"{describe(node)}: pads are computed")
        pads = [int(p) for p in pv.reshape(-1)]
        axes = cg.axes_of(node, r, 3) or list(range(r))
        for t in node.inputs[2:3]:
            if not t.is_empty() and t.name in cg.ids:
                raise Blocked(f"{describe(node)}: channels reach the pad value")
    n = len(axes)
    if 1 in axes:
        k = axes.index(1)
        if pads[k] != 0 or pads[k + n] != 0:
            raise Blocked(f"{describe(node)}: pads the channel axis")
    return pass_through(cg, node)


def _scale_one(node: gs.Node, sv: np.ndarray | None, computed: str, scales: str) -> None:
    if sv is None:
        raise Blocked(f"{describe(node)}: {computed}")
    if sv.size < 2 or float(sv.reshape(-1)[1]) != 1.0:
        raise Blocked(f"{describe(node)}: {scales}")


@handles("Resize", "Upsample")
def resize(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    if node.op == "Upsample":
        sv = const_value(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("scales", []))
        what = "scales are computed or scale the channel axis"
        _scale_one(node, sv, what, what)
        return pass_through(cg, node)
    if "axes" in node.attrs:
        axes = cg.axes_of(node, cg.rank(x), None)
        if axes is not None and 1 not in axes:
            return pass_through(cg, node)
        raise Blocked(f"{describe(node)}: resizes the channel axis")
    scales = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    sizes = node.inputs[3] if len(node.inputs) > 3 and not node.inputs[3].is_empty() else None
    if len(node.inputs) == 2 and cg.opset < 11:   # Resize-10: (X, scales)
        scales, sizes = node.inputs[1], None
    if scales is not None:
        _scale_one(node, const_value(scales), "scales are computed", "scales the channel axis")
        return pass_through(cg, node)
    if sizes is not None:
        zv = const_value(sizes)
        if zv is None:
            raise Blocked(f"{describe(node)}: sizes are computed (Shape-dependent)")
        target = [int(d) for d in zv.reshape(-1)]
        if len(target) < 2 or target[1] != len(cg.ids[x.name]):
            raise Blocked(f"{describe(node)}: sizes {target} change the channel count")
        cg.edits.append(SetCount(node, describe(node), 3, tuple(target), 1, x.name))
        return pass_through(cg, node)
    raise Blocked(f"{describe(node)}: neither scales nor sizes")
