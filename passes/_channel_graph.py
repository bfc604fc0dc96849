"""Channel dependency analysis for ``prune-channels`` (the DepGraph idea of Torch-Pruning, on a plain ONNX graph).

Every *prunable layer* (Conv / ConvTranspose with group 1, Gemm, MatMul with a constant 2-D weight) creates fresh
channel *atoms*, one per output channel. Walking the graph in topological order, each tensor that carries channels
on axis 1 gets an array ``ids`` naming the atom behind each of its channel positions:

  * element-wise ops, BatchNormalization, pooling, Resize/Pad without channel change, Dropout, Identity,
    Squeeze/Unsqueeze/Transpose that keep axis 1, depthwise Conv: ``ids`` pass through (depthwise with channel
    multiplier m repeats each id m times);
  * Concat on axis 1 concatenates the inputs' ids; Split and Slice on axis 1 cut ranges of them;
  * Flatten (and Reshape to ``[N, C·H·W]``) repeats each id H·W times, so a Gemm after it sees channel c as its
    H·W rows; a Transpose that moves the channel axis (NCHW -> NHWC before a Keras/Caffe-style Flatten) is followed
    element by element (static shapes) until such a Flatten/Reshape, and blocks anything else;
  * Add/Sub/Mul/Div/Max/Min/... of two variable tensors (a residual connection, a gate) *couple* their operands:
    the atoms at equal positions are united (union-find) and must be removed together.

A *group* is a connected set of layers whose atoms were united; a *class* (a union-find root) is one prunable
channel of the group: removing it removes every tensor position that carries one of its atoms. Channels whose origin
is not a prunable layer (a graph input, a grouped Conv, an unknown op) get *fixed* atoms: a group that is coupled to
them is excluded. Anything the analysis does not understand (unknown ops, graph outputs, channel-axis reductions,
Reshapes with computed shapes, Shape reads of the channel dimension, ...) *blocks* the groups of the atoms it sees,
with the reason.

The analysis also records, for every node, the edit pruning needs (``edits``: closures called with the per-tensor
keep masks) and the weights that measure channel importance (``terms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

STANDARD = ("", "ai.onnx", None)

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish", "Floor", "Ceil",
         "Round", "Sign", "Cast", "Identity", "Dropout", "Clip", "ThresholdedRelu", "Sin", "Cos", "Shrink",
         "IsNaN", "IsInf", "Not", "Swish"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}

Keep = Callable[[str], "np.ndarray | None"]   # tensor name -> boolean keep mask over its channel positions


@dataclass
class Source:
    """A channel space: a prunable layer's output channels, or channels of fixed origin (``fixed`` says why)."""

    index: int
    node: gs.Node | None
    tensor: str
    start: int
    size: int
    fixed: str | None = None

    @property
    def name(self) -> str:
        if self.node is not None:
            return self.node.name or self.tensor
        return self.tensor


@dataclass
class Term:
    """Weights that measure importance: per channel position of ``ids``, the slice of ``values`` on ``axis``."""

    kind: str            # "out": sets the channel's magnitude; "in": a consumer's weights; "bn": a BN's gamma
    ids: np.ndarray
    values: np.ndarray
    axis: int
    scale: np.ndarray | None = None   # per-position factor (a BN after the producer)


@dataclass
class Consumer:
    """A weighted layer reading channel positions (its input channels shrink; reconstruction refits it)."""

    node: gs.Node
    tensor: str


@dataclass
class Group:
    index: int
    sources: list[Source]
    classes: np.ndarray                  # union-find roots, one per prunable channel
    blocked: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sources[0].name

    @property
    def layers(self) -> list[str]:
        return [s.name for s in self.sources]


class _Blocked(Exception):
    pass


def _std(n: gs.Node) -> bool:
    return n.domain in STANDARD


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _desc(n: gs.Node) -> str:
    return f"{n.op} '{n.name or (n.outputs[0].name if n.outputs else '')}'"


class ChannelGraph:
    """The result of :func:`analyze`: atoms, sources, groups, edits and importance terms."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, list[Any] | None]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.opset = graph.opset
        self.ids: dict[str, np.ndarray] = {}
        # tensors whose channels a Transpose moved off axis 1: atom id of every element of dims[1:]
        self.fmaps: dict[str, np.ndarray] = {}
        self.parent: list[int] = []
        self.atom_source: list[int] = []
        self.sources: list[Source] = []
        self.blocks: dict[int, list[str]] = {}
        self.edits: list[Callable[[Keep], None]] = []
        self.terms: list[Term] = []
        self.consumers: list[Consumer] = []
        self.producer_of: dict[str, gs.Node] = {}       # source tensor -> producing layer
        self.names = set(graph.tensors())
        self.root: np.ndarray = np.zeros(0, np.int64)
        self.groups: list[Group] = []

    # ------------------------------------------------------------------------------------------ union-find

    def _find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def _union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def new_source(self, node: gs.Node | None, tensor: str, size: int, fixed: str | None = None) -> np.ndarray:
        start = len(self.parent)
        idx = len(self.sources)
        self.sources.append(Source(idx, node, tensor, start, size, fixed))
        self.parent.extend(range(start, start + size))
        self.atom_source.extend([idx] * size)
        if fixed:
            self.blocks.setdefault(idx, []).append(fixed)
        return np.arange(start, start + size, dtype=np.int64)

    def block(self, ids: np.ndarray, reason: str) -> None:
        for s in sorted({self.atom_source[a] for a in np.unique(ids).tolist()}):
            reasons = self.blocks.setdefault(s, [])
            if reason not in reasons:
                reasons.append(reason)

    # -------------------------------------------------------------------------------------------- shapes

    def shape(self, t: gs.Tensor) -> list[Any] | None:
        if isinstance(t, gs.Constant):
            return list(t.values.shape)
        s = self.shapes.get(t.name)
        if s is None and t.shape is not None:
            s = list(t.shape)
        return s

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def channels_of(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        if s is None or len(s) < 2 or not isinstance(s[1], int) or s[1] <= 0:
            return None
        return s[1]

    def fixed_ids(self, t: gs.Tensor, why: str) -> np.ndarray:
        """Atoms for the channels of a tensor that no prunable layer produces (never pruned)."""
        if t.name in self.ids:
            return self.ids[t.name]
        c = self.channels_of(t)
        if c is None:
            raise _Blocked(f"operand '{t.name}' has an unknown channel count")
        ids = self.new_source(None, t.name, c, fixed=why)
        self.ids[t.name] = ids
        return ids

    # ------------------------------------------------------------------------------------------- helpers

    def new_name(self, base: str) -> str:
        name, i = f"{base}_pruned", 1
        while name in self.names:
            i += 1
            name = f"{base}_pruned{i}"
        self.names.add(name)
        return name

    def slice_const(self, node: gs.Node, index: int, axis: int, tensor: str) -> None:
        """Record: input ``index`` of ``node`` (a constant) loses the positions ``tensor`` loses, on ``axis``."""

        def edit(keep: Keep) -> None:
            mask = keep(tensor)
            if mask is None:
                return
            c = node.inputs[index]
            v = np.asarray(c.values)
            node.inputs[index] = gs.Constant(self.new_name(c.name), np.ascontiguousarray(np.compress(mask, v, axis)))

        self.edits.append(edit)

    def add_reader(self, node: gs.Node, x: gs.Tensor, ids: np.ndarray, weight: np.ndarray, axis: int) -> None:
        """Record: ``node`` reads the channels ``ids`` of ``x`` through its constant weight (input 1) on ``axis``:
        it is a consumer to reconstruct, the weight's slices count in the channels' importance, and they go with
        the channels."""
        self.consumers.append(Consumer(node, x.name))
        self.terms.append(Term("in", ids, weight, axis))
        self.slice_const(node, 1, axis, x.name)

    def set_const(self, node: gs.Node, index: int, make: Callable[[Keep], np.ndarray | None]) -> None:
        def edit(keep: Keep) -> None:
            v = make(keep)
            if v is not None:
                c = node.inputs[index]
                node.inputs[index] = gs.Constant(self.new_name(c.name if c.name else node.name), v)

        self.edits.append(edit)

    def axes_of(self, node: gs.Node, rank: int | None, input_index: int | None, attr: str = "axes"
                ) -> list[int] | None:
        """Normalised axes from the attribute or a constant input; None if absent; raises if not constant."""
        vals: Any = None
        if attr in node.attrs:
            vals = node.attrs[attr]
        elif input_index is not None and len(node.inputs) > input_index and not node.inputs[input_index].is_empty():
            v = _const(node.inputs[input_index])
            if v is None:
                raise _Blocked(f"{_desc(node)}: axes are computed, not constant")
            vals = v.reshape(-1).tolist()
        if vals is None:
            return None
        if isinstance(vals, int):
            vals = [vals]
        if rank is None and any(a < 0 for a in vals):
            raise _Blocked(f"{_desc(node)}: negative axes with unknown rank")
        return [int(a) + (rank if a < 0 else 0) for a in vals]  # type: ignore[operator]


def analyze(graph: gs.Graph, shapes: dict[str, list[Any] | None]) -> ChannelGraph:
    """Walk ``graph`` (topologically sorted) once; return the channel graph with its groups."""
    cg = ChannelGraph(graph, shapes)
    for node in graph.nodes:
        _visit(cg, node)
    for t in graph.outputs:
        if t.name in cg.ids:
            cg.block(cg.ids[t.name], f"'{t.name}' is a graph output")
        if t.name in cg.fmaps:
            cg.block(cg.fmaps[t.name], f"'{t.name}' is a graph output")
    _finish(cg)
    return cg


def _subgraph_names(node: gs.Node) -> set[str]:
    names: set[str] = set()
    for v in node.attrs.values():
        graphs = v if isinstance(v, (list, tuple)) else [v]
        for g in graphs:
            if isinstance(g, gs.Graph):
                for n in g.nodes:
                    names.update(t.name for t in n.inputs)
                    for sub in _subgraph_names(n):
                        names.add(sub)
    return names


def _visit(cg: ChannelGraph, node: gs.Node) -> None:
    carried = [i for i, t in enumerate(node.inputs) if t.name in cg.ids]
    inner = _subgraph_names(node)
    for name in inner & cg.ids.keys():
        cg.block(cg.ids[name], f"{_desc(node)} reads '{name}' inside a subgraph")
    for name in inner & cg.fmaps.keys():
        cg.block(cg.fmaps[name], f"{_desc(node)} reads '{name}' inside a subgraph")
    moved = [i for i, t in enumerate(node.inputs) if t.name in cg.fmaps]
    if moved:
        _visit_moved(cg, node, moved, carried)
        return
    if _std(node) and node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        handled = _layer(cg, node)
    elif not carried:
        return
    elif not _std(node):
        for i in carried:
            cg.block(cg.ids[node.inputs[i].name], f"{_desc(node)}: unknown op (domain '{node.domain}')")
        return
    else:
        try:
            handled = _HANDLERS.get(node.op, _unknown)(cg, node)
        except _Blocked as e:
            for i in carried:
                cg.block(cg.ids[node.inputs[i].name], str(e))
            for o in node.outputs:
                cg.ids.pop(o.name, None)
            return
    for i in carried:
        if i not in handled:
            cg.block(cg.ids[node.inputs[i].name], f"{_desc(node)}: input {i} carries channels it cannot follow")


def _visit_moved(cg: ChannelGraph, node: gs.Node, moved: list[int], carried: list[int]) -> None:
    """A node reading a tensor whose channels a Transpose moved: only Transpose, Flatten, Reshape to [N, K]."""
    x = node.inputs[0]
    try:
        if not (_std(node) and moved == [0] and not carried and node.op in ("Transpose", "Flatten", "Reshape")):
            raise _Blocked(f"{_desc(node)} reads channels that a Transpose moved off axis 1")
        fmap = cg.fmaps[x.name]
        out = node.outputs[0]
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is None or perm[0] != 0:
                raise _Blocked(f"{_desc(node)}: transpose {perm} moves the batch axis")
            cg.fmaps[out.name] = np.transpose(fmap, [p - 1 for p in perm[1:]])
        elif node.op == "Flatten":
            if int(node.attrs.get("axis", 1)) != 1:
                raise _Blocked(f"{_desc(node)}: flattens with axis != 1")
            cg.ids[out.name] = fmap.reshape(-1)
        else:
            sv = _const(node.inputs[1])
            if sv is None:
                raise _Blocked(f"{_desc(node)}: shape is computed (Shape-dependent), not constant")
            target = [int(d) for d in sv.reshape(-1)]
            k = fmap.size
            if not (len(target) == 2 and (target[0] == 0 or (target[0] == -1 and target[1] == k)
                                           or (target[0] > 0 and target[1] in (-1, k)))
                    and target[1] in (-1, k)):
                raise _Blocked(f"{_desc(node)}: reshape to {target} after a Transpose of pruned channels")
            cg.ids[out.name] = fmap.reshape(-1)
            if target[1] == k:
                cg.set_const(node, 1, lambda keep: _with(target, 1, keep(out.name), lambda m: int(m.sum())))
    except _Blocked as e:
        for i in moved:
            cg.block(cg.fmaps[node.inputs[i].name], str(e))
        for i in carried:
            cg.block(cg.ids[node.inputs[i].name], str(e))


def _unknown(cg: ChannelGraph, node: gs.Node) -> set[int]:
    raise _Blocked(f"{_desc(node)}: op not understood by the channel analysis")


# ------------------------------------------------------------------------------------------ weighted layers


def _layer(cg: ChannelGraph, node: gs.Node) -> set[int]:
    """Conv, ConvTranspose, Gemm, MatMul: consumers of their input channels, sources of their output channels."""
    x = node.inputs[0]
    xid = cg.ids.get(x.name)
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wv = _const(w) if w is not None else None
    b = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    out = node.outputs[0]
    here = _desc(node)

    def refuse(reason: str) -> set[int]:
        if xid is not None:
            cg.block(xid, f"{here}: {reason}")
        return {0}

    if wv is None or (b is not None and _const(b) is None):
        if w is not None and w.name in cg.ids:
            cg.block(cg.ids[w.name], f"{here}: channels reach a weight input")
        from_node = any(t is not None and t.inputs and t.inputs[0].op == "Constant" for t in (w, b))
        return refuse("weight or bias is not a constant" + (" (a Constant node: run fold-constants first)"
                                                             if from_node else ""))
    if wv.dtype.kind != "f":
        return refuse(f"weight dtype {wv.dtype}")
    if node.op in ("Conv", "ConvTranspose"):
        if wv.ndim < 3:
            return refuse("weight rank < 3")
        group = int(node.attrs.get("group", 1))
        transpose = node.op == "ConvTranspose"
        c_in = wv.shape[0] if transpose else wv.shape[1] * group
        c_out = wv.shape[1] * group if transpose else wv.shape[0]
        in_axis, out_axis = (0, 1) if transpose else (1, 0)
        if group == 1:
            if xid is not None:
                if len(xid) != c_in:
                    return refuse(f"input has {len(xid)} channels, weight expects {c_in}")
                cg.add_reader(node, x, xid, wv, in_axis)
            ids = cg.new_source(node, out.name, c_out)
            cg.ids[out.name] = ids
            cg.producer_of[out.name] = node
            cg.terms.append(Term("out", ids, wv, out_axis, _bn_scale(cg, out)))
            cg.slice_const(node, 1, out_axis, out.name)
            if b is not None:
                cg.slice_const(node, 2, 0, out.name)
            return {0}
        if xid is not None and group == c_in == len(xid) and (
                (not transpose and wv.shape[1] == 1) or (transpose and wv.shape[0] == c_in)):
            # depthwise: channel c_in -> outputs [c·m, (c+1)·m); channels pass through
            m = c_out // c_in
            ids = np.repeat(xid, m)
            cg.ids[out.name] = ids
            if transpose:
                cg.slice_const(node, 1, 0, x.name)
            else:
                cg.slice_const(node, 1, 0, out.name)
            if b is not None:
                cg.slice_const(node, 2, 0, out.name)

            def set_group(keep: Keep, node: gs.Node = node, name: str = x.name) -> None:
                mask = keep(name)
                if mask is not None:
                    node.attrs["group"] = int(mask.sum())

            cg.edits.append(set_group)
            return {0}
        return refuse(f"grouped convolution (group={group}) mixes channels within groups")
    # Gemm / MatMul
    if wv.ndim != 2:
        return refuse(f"weight of rank {wv.ndim}")
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return refuse("transA=1")
        tb = int(node.attrs.get("transB", 0))
        in_axis, out_axis = (1, 0) if tb else (0, 1)
    else:
        xr = cg.rank(x)
        if xr is None:
            return refuse("input of unknown rank")
        if xr >= 3:
            if xid is not None:   # contracts the last axis: channels (axis 1) pass through
                cg.ids[out.name] = xid
            return {0}
        if xr != 2:
            return refuse(f"input of rank {xr}")
        in_axis, out_axis = 0, 1
    k, n = wv.shape[in_axis], wv.shape[out_axis]
    if xid is not None:
        if len(xid) != k:
            return refuse(f"input has {len(xid)} features, weight expects {k}")
        cg.add_reader(node, x, xid, wv, in_axis)
    if cg.rank(out) not in (2, None):
        return {0}
    ids = cg.new_source(node, out.name, n)
    cg.ids[out.name] = ids
    cg.producer_of[out.name] = node
    cg.terms.append(Term("out", ids, wv, out_axis, _bn_scale(cg, out)))
    cg.slice_const(node, 1, out_axis, out.name)
    if b is not None:
        bv = _const(b)
        assert bv is not None
        if bv.ndim >= 1 and bv.shape[-1] == n and n > 1:
            cg.slice_const(node, 2, bv.ndim - 1, out.name)
        elif bv.ndim >= 1 and bv.shape[-1] not in (1, n):
            cg.block(ids, f"{here}: bias of shape {list(bv.shape)}")
    return {0}


def _bn_scale(cg: ChannelGraph, out: gs.Variable) -> np.ndarray | None:
    """|γ/√(σ²+ε)| of a BatchNormalization that is the only reader of ``out`` (effective weight magnitude)."""
    if len(out.outputs) != 1:
        return None
    bn = out.outputs[0]
    if not (_std(bn) and bn.op == "BatchNormalization" and len(bn.inputs) == 5):
        return None
    g, v = _const(bn.inputs[1]), _const(bn.inputs[4])
    if g is None or v is None:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    return np.abs(g.astype(np.float64)) / np.sqrt(np.maximum(v.astype(np.float64) + eps, 1e-30))


# ---------------------------------------------------------------------------------------------- handlers


def _pass(cg: ChannelGraph, node: gs.Node, i: int = 0) -> set[int]:
    cg.ids[node.outputs[0].name] = cg.ids[node.inputs[i].name]
    return {i}


def _unary(cg: ChannelGraph, node: gs.Node) -> set[int]:
    for o in node.outputs[1:]:
        if o.outputs or o.name in {t.name for t in cg.graph.outputs}:
            raise _Blocked(f"{_desc(node)}: second output is used")
    return _pass(cg, node)


def _pool(cg: ChannelGraph, node: gs.Node) -> set[int]:
    return _unary(cg, node)


def _broadcast_const(cg: ChannelGraph, node: gs.Node, index: int, out_rank: int, ref: str) -> None:
    """A constant operand of an element-wise op: slice its channel axis (if it has one of the full size)."""
    v = np.asarray(node.inputs[index].values)
    c = len(cg.ids[ref])
    if v.ndim > out_rank:
        raise _Blocked(f"{_desc(node)}: constant operand raises the rank")
    axis = v.ndim - (out_rank - 1)
    if axis < 0 or v.shape[axis] == 1:
        return
    if v.shape[axis] != c:
        raise _Blocked(f"{_desc(node)}: constant of shape {list(v.shape)} on {c} channels")
    cg.slice_const(node, index, axis, ref)


def _binary(cg: ChannelGraph, node: gs.Node) -> set[int]:
    out = node.outputs[0]
    out_rank = cg.rank(out)
    if out_rank is None:
        raise _Blocked(f"{_desc(node)}: output of unknown rank")
    carried = [i for i, t in enumerate(node.inputs) if t.name in cg.ids]
    full = [i for i in carried if len(cg.ids[node.inputs[i].name]) > 1 or cg.channels_of(out) == 1]
    for i in carried:
        if cg.rank(node.inputs[i]) != out_rank:
            raise _Blocked(f"{_desc(node)}: operands of different rank")
    if not full:
        ref = carried[0]
    else:
        ref = full[0]
    ref_ids = cg.ids[node.inputs[ref].name]
    c = len(ref_ids)
    for i, t in enumerate(node.inputs):
        if i == ref or t.is_empty():
            continue
        if isinstance(t, gs.Constant):
            _broadcast_const(cg, node, i, out_rank, node.inputs[ref].name)
            continue
        if t.name in cg.ids:
            other = cg.ids[t.name]
            if len(other) == c:
                cg._union(ref_ids, other)
            elif len(other) != 1:
                raise _Blocked(f"{_desc(node)}: operands with {c} and {len(other)} channels")
            continue
        # a variable operand whose channels no prunable layer produces
        r = cg.rank(t)
        if r is None:
            raise _Blocked(f"{_desc(node)}: operand '{t.name}' of unknown shape")
        if r < out_rank - 1:
            continue
        if r != out_rank:
            raise _Blocked(f"{_desc(node)}: operand '{t.name}' of rank {r} broadcasts on the channel axis")
        ch = cg.channels_of(t)
        if ch == 1:
            continue
        what = "a graph input" if not t.inputs else _desc(t.inputs[0])
        other = cg.fixed_ids(t, f"coupled to '{t.name}' (from {what}), whose channels cannot be pruned")
        if len(other) != c:
            raise _Blocked(f"{_desc(node)}: operands with {c} and {len(other)} channels")
        cg._union(ref_ids, other)
    cg.ids[out.name] = ref_ids
    return set(carried)


def _prelu(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if node.inputs[0].name not in cg.ids:
        raise _Blocked(f"{_desc(node)}: channels reach the slope")
    if not isinstance(node.inputs[1], gs.Constant):
        return _binary(cg, node)
    r = cg.rank(node.outputs[0]) or cg.rank(node.inputs[0])
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    _broadcast_const(cg, node, 1, r, node.inputs[0].name)
    return _pass(cg, node)


def _clip(cg: ChannelGraph, node: gs.Node) -> set[int]:
    return _unary(cg, node)


def _batchnorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    if sum(1 for o in node.outputs if not o.is_empty()) > 1 or node.attrs.get("training_mode", 0):
        raise _Blocked(f"{_desc(node)}: training-mode BatchNormalization")
    if node.attrs.get("spatial", 1) == 0:
        raise _Blocked(f"{_desc(node)}: spatial=0")
    x = node.inputs[0].name
    c = len(cg.ids[x])
    for i in range(1, len(node.inputs)):
        v = _const(node.inputs[i])
        if v is None or v.shape != (c,):
            raise _Blocked(f"{_desc(node)}: parameter '{node.inputs[i].name}' is not a constant of shape [{c}]")
        cg.slice_const(node, i, 0, x)
    cg.terms.append(Term("bn", cg.ids[x], np.asarray(node.inputs[1].values), 0))
    return _pass(cg, node)


def _instancenorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0].name
    c = len(cg.ids[x])
    for i in (1, 2):
        v = _const(node.inputs[i])
        if v is None or v.shape != (c,):
            raise _Blocked(f"{_desc(node)}: parameter '{node.inputs[i].name}' is not a constant of shape [{c}]")
        cg.slice_const(node, i, 0, x)
    return _pass(cg, node)


def _layernorm(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    axis = axis + r if axis < 0 else axis
    if axis <= 1 or len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        raise _Blocked(f"{_desc(node)}: normalises over the channel axis")
    return _pass(cg, node)


def _softmax(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    axis = int(node.attrs.get("axis", -1 if cg.opset >= 13 else 1))
    axis = axis + r if axis < 0 else axis
    if axis == 1 or (cg.opset < 13 and axis <= 1):
        raise _Blocked(f"{_desc(node)}: normalises over the channel axis")
    return _pass(cg, node)


def _reduce(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    axes_input = 1 if (node.op == "ReduceSum" and cg.opset >= 13) or cg.opset >= 18 else None
    axes = cg.axes_of(node, r, axes_input)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return _pass(cg, node)
        raise _Blocked(f"{_desc(node)}: reduces over every axis, the channel axis too")
    if 1 in axes:
        raise _Blocked(f"{_desc(node)}: reduces over the channel axis")
    if not node.attrs.get("keepdims", 1) and 0 in axes:
        raise _Blocked(f"{_desc(node)}: removes the batch axis")
    return _pass(cg, node)


def _flatten(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    s = cg.shape(x)
    if s is None:
        raise _Blocked(f"{_desc(node)}: input of unknown shape")
    axis = int(node.attrs.get("axis", 1))
    axis = axis + len(s) if axis < 0 else axis
    if axis != 1:
        raise _Blocked(f"{_desc(node)}: flattens with axis={axis}, mixing the channel axis with others")
    hw = _spatial(s)
    if hw is None:
        raise _Blocked(f"{_desc(node)}: spatial size unknown ({s}), cannot map channels to features")
    cg.ids[node.outputs[0].name] = np.repeat(cg.ids[x.name], hw)
    return {0}


def _spatial(s: Sequence[Any]) -> int | None:
    if not all(isinstance(d, int) and d >= 0 for d in s[2:]):
        return None
    return int(math.prod(s[2:]))


def _reshape(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x, out = node.inputs[0], node.outputs[0]
    sv = _const(node.inputs[1])
    if sv is None:
        raise _Blocked(f"{_desc(node)}: shape is computed (Shape-dependent), not constant")
    shape_in, shape_out = cg.shape(x), cg.shape(out)
    if shape_in is None or shape_out is None:
        raise _Blocked(f"{_desc(node)}: shapes unknown")
    xid = cg.ids[x.name]
    c = len(xid)
    target = [int(d) for d in sv.reshape(-1)]
    batch_kept = (len(target) >= 1 and (target[0] == 0 or (shape_in[0] == shape_out[0] and shape_in[0] is not None)
                                        or (isinstance(shape_in[0], int) and target[0] == shape_in[0])))
    allowzero = int(node.attrs.get("allowzero", 0))
    if len(shape_out) >= 2 and len(target) >= 2 and batch_kept and shape_out[1] == c and target[1] in (0, c, -1):
        if target[1] == 0 and allowzero:
            raise _Blocked(f"{_desc(node)}: allowzero")
        # channel axis kept (spatial axes merged or split)
        if target[1] == -1 and not all(d > 0 for i, d in enumerate(target) if i != 1):
            raise _Blocked(f"{_desc(node)}: channel dimension inferred (-1) from other unknown dims")
        if target[1] == c:
            cg.set_const(node, 1, lambda keep: _with(target, 1, keep(x.name), lambda k: int(k.sum())))
        cg.ids[out.name] = xid
        return {0}
    hw = _spatial(shape_in)
    if (len(shape_out) == 2 and len(target) == 2 and hw is not None and len(shape_in) >= 2
            and (batch_kept or (target[0] == -1 and target[1] == c * hw)) and target[1] in (c * hw, -1)
            and (target[1] != -1 or target[0] in (0,) or batch_kept)):
        cg.ids[out.name] = np.repeat(xid, hw)
        if target[1] > 0:
            cg.set_const(node, 1, lambda keep: _with(target, 1, keep(x.name), lambda k: int(k.sum()) * hw))
        return {0}
    raise _Blocked(f"{_desc(node)}: reshape {list(shape_in)} -> {target} moves the channel axis")


def _with(target: list[int], pos: int, mask: np.ndarray | None, value: Callable[[np.ndarray], int]
          ) -> np.ndarray | None:
    if mask is None:
        return None
    t = list(target)
    t[pos] = value(mask)
    return np.array(t, dtype=np.int64)


def _squeeze(cg: ChannelGraph, node: gs.Node) -> set[int]:
    unsq = node.op == "Unsqueeze"
    r = cg.rank(node.outputs[0] if unsq else node.inputs[0])
    axes = cg.axes_of(node, r, 1 if cg.opset >= 13 else None)
    if axes is None:
        raise _Blocked(f"{_desc(node)}: no axes given (would drop the batch axis when it is 1)")
    if 0 in axes or 1 in axes:
        raise _Blocked(f"{_desc(node)}: moves the channel axis")
    return _pass(cg, node)


def _transpose(cg: ChannelGraph, node: gs.Node) -> set[int]:
    perm = node.attrs.get("perm")
    if perm is not None and list(perm[:2]) == [0, 1]:
        return _pass(cg, node)
    x = node.inputs[0]
    s = cg.shape(x)
    if perm is None or perm[0] != 0 or s is None or _spatial(s) is None:
        raise _Blocked(f"{_desc(node)}: transpose {perm} moves the channel axis")
    # channels move off axis 1: follow every element (static shape) until a Flatten/Reshape to [N, K]
    ids = cg.ids[x.name]
    fmap = np.broadcast_to(ids.reshape((-1,) + (1,) * (len(s) - 2)), (len(ids), *s[2:]))
    cg.fmaps[node.outputs[0].name] = np.transpose(fmap, [p - 1 for p in perm[1:]])
    return {0}


def _concat(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.outputs[0])
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    axis = int(node.attrs["axis"])
    axis = axis + r if axis < 0 else axis
    if axis != 1:
        return _binary(cg, node)
    parts = []
    for t in node.inputs:
        if t.name in cg.ids:
            parts.append(cg.ids[t.name])
        else:
            what = "a constant" if isinstance(t, gs.Constant) else (
                "a graph input" if not t.inputs else _desc(t.inputs[0]))
            parts.append(cg.fixed_ids(t, f"channels from {what}"))
    cg.ids[node.outputs[0].name] = np.concatenate(parts)
    return set(range(len(node.inputs)))


def _split(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    r = cg.rank(x)
    axis = int(node.attrs.get("axis", 0))
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    axis = axis + r if axis < 0 else axis
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
        v = _const(node.inputs[1])
        if v is None:
            raise _Blocked(f"{_desc(node)}: split sizes are computed")
        sizes = [int(s) for s in v.reshape(-1)]
    if sizes is None:
        c = len(xid)
        each = -(-c // n)
        sizes = [min(each, c - i * each) for i in range(n)]
    if sum(sizes) != len(xid) or len(sizes) != n:
        raise _Blocked(f"{_desc(node)}: split sizes {sizes} do not cover {len(xid)} channels")
    bounds = np.cumsum([0] + sizes)
    for o, lo, hi in zip(node.outputs, bounds[:-1], bounds[1:]):
        cg.ids[o.name] = xid[lo:hi]

    def edit(keep: Keep, node: gs.Node = node, name: str = x.name) -> None:
        mask = keep(name)
        if mask is None:
            return
        new = [int(mask[lo:hi].sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
        node.attrs.pop("num_outputs", None)
        if cg.opset >= 13:
            node.attrs.pop("split", None)
            c = gs.Constant(cg.new_name((node.name or x.name) + "_split"), np.array(new, dtype=np.int64))
            if len(node.inputs) > 1:
                node.inputs[1] = c
            else:
                node.inputs.append(c)
        else:
            node.attrs["split"] = new

    cg.edits.append(edit)
    return {0}


def _slice(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    xid = cg.ids[x.name]
    r = cg.rank(x)
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    if cg.opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = []
        for i in range(1, 5):
            if len(node.inputs) > i and not node.inputs[i].is_empty():
                v = _const(node.inputs[i])
                if v is None:
                    raise _Blocked(f"{_desc(node)}: starts/ends/axes/steps are computed")
                vals.append([int(a) for a in v.reshape(-1)])
            else:
                vals.append(None)
        starts, ends = vals[0], vals[1]
        assert starts is not None and ends is not None
        axes = vals[2] if vals[2] is not None else list(range(len(starts)))
        steps = vals[3] if vals[3] is not None else [1] * len(starts)
    axes = [a + r if a < 0 else a for a in axes]
    if 1 not in axes:
        return _pass(cg, node)
    k = axes.index(1)
    if steps[k] != 1:
        raise _Blocked(f"{_desc(node)}: slices the channel axis with step {steps[k]}")
    c = len(xid)
    lo, hi, _ = slice(starts[k], ends[k], 1).indices(c)
    hi = max(hi, lo)
    cg.ids[node.outputs[0].name] = xid[lo:hi]
    if cg.opset < 10:
        def edit_attr(keep: Keep, node: gs.Node = node) -> None:
            mask = keep(x.name)
            if mask is None:
                return
            s = int(mask[:lo].sum())
            node.attrs["starts"] = [s if i == k else v for i, v in enumerate(starts)]
            node.attrs["ends"] = [s + int(mask[lo:hi].sum()) if i == k else v for i, v in enumerate(ends)]

        cg.edits.append(edit_attr)
    else:
        cg.set_const(node, 1, lambda keep: _with(starts, k, keep(x.name), lambda m: int(m[:lo].sum())))
        cg.set_const(node, 2, lambda keep: _with(ends, k, keep(x.name), lambda m: int(m[:hi].sum())))
    return {0}


def _pad(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    r = cg.rank(x)
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        axes = list(range(r))
    else:
        pv = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if pv is None:
            raise _Blocked(f"{_desc(node)}: pads are computed")
        pads = [int(p) for p in pv.reshape(-1)]
        axes = cg.axes_of(node, r, 3) or list(range(r))
        for t in node.inputs[2:3]:
            if not t.is_empty() and t.name in cg.ids:
                raise _Blocked(f"{_desc(node)}: channels reach the pad value")
    n = len(axes)
    if 1 in axes:
        k = axes.index(1)
        if pads[k] != 0 or pads[k + n] != 0:
            raise _Blocked(f"{_desc(node)}: pads the channel axis")
    return _pass(cg, node)


def _resize(cg: ChannelGraph, node: gs.Node) -> set[int]:
    x = node.inputs[0]
    c = len(cg.ids[x.name])
    if node.op == "Upsample":
        sv = _const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("scales", []))
        if sv is None or sv.size < 2 or float(sv.reshape(-1)[1]) != 1.0:
            raise _Blocked(f"{_desc(node)}: scales are computed or scale the channel axis")
        return _pass(cg, node)
    if "axes" in node.attrs:
        axes = cg.axes_of(node, cg.rank(x), None)
        if axes is not None and 1 not in axes:
            return _pass(cg, node)
        raise _Blocked(f"{_desc(node)}: resizes the channel axis")
    scales = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    sizes = node.inputs[3] if len(node.inputs) > 3 and not node.inputs[3].is_empty() else None
    if len(node.inputs) == 2 and cg.opset < 11:   # Resize-10: (X, scales)
        scales, sizes = node.inputs[1], None
    if scales is not None:
        sv = _const(scales)
        if sv is None:
            raise _Blocked(f"{_desc(node)}: scales are computed")
        if sv.size < 2 or float(sv.reshape(-1)[1]) != 1.0:
            raise _Blocked(f"{_desc(node)}: scales the channel axis")
        return _pass(cg, node)
    if sizes is not None:
        zv = _const(sizes)
        if zv is None:
            raise _Blocked(f"{_desc(node)}: sizes are computed (Shape-dependent)")
        target = [int(d) for d in zv.reshape(-1)]
        if len(target) < 2 or target[1] != c:
            raise _Blocked(f"{_desc(node)}: sizes {target} change the channel count")
        cg.set_const(node, 3, lambda keep: _with(target, 1, keep(x.name), lambda m: int(m.sum())))
        return _pass(cg, node)
    raise _Blocked(f"{_desc(node)}: neither scales nor sizes")


def _shape(cg: ChannelGraph, node: gs.Node) -> set[int]:
    r = cg.rank(node.inputs[0])
    if r is None:
        raise _Blocked(f"{_desc(node)}: unknown rank")
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    start = start + r if start < 0 else start
    end_i = r if end is None else (int(end) + r if int(end) < 0 else int(end))
    if not start <= 1 < end_i:
        return {0}
    idx_channel = 1 - start
    for user in node.outputs[0].outputs:
        if not (_std(user) and user.op == "Gather" and int(user.attrs.get("axis", 0)) == 0
                and user.inputs[0] is node.outputs[0]):
            raise _Blocked(f"{_desc(node)}: the shape of a pruned tensor feeds {_desc(user)}")
        iv = _const(user.inputs[1])
        n = end_i - start
        if iv is None or idx_channel in [int(i) + n if i < 0 else int(i) for i in iv.reshape(-1)]:
            raise _Blocked(f"{_desc(node)}: the channel count of a pruned tensor is read by {_desc(user)}")
    if node.outputs[0].name in {t.name for t in cg.graph.outputs}:
        raise _Blocked(f"{_desc(node)}: the shape of a pruned tensor is a graph output")
    return {0}


def _tile_expand(cg: ChannelGraph, node: gs.Node) -> set[int]:
    v = _const(node.inputs[1])
    if v is None:
        raise _Blocked(f"{_desc(node)}: repeats/shape are computed")
    vals = [int(a) for a in v.reshape(-1)]
    r = cg.rank(node.inputs[0])
    if node.op == "Tile":
        if len(vals) < 2 or vals[1] != 1:
            raise _Blocked(f"{_desc(node)}: repeats the channel axis")
        return _pass(cg, node)
    out_r = cg.rank(node.outputs[0])
    if r is None or out_r != r or len(vals) != r or vals[1] not in (1, len(cg.ids[node.inputs[0].name])):
        raise _Blocked(f"{_desc(node)}: expands the channel axis")
    if vals[1] != 1:
        x = node.inputs[0].name
        cg.set_const(node, 1, lambda keep: _with(vals, 1, keep(x), lambda m: int(m.sum())))
    return _pass(cg, node)


_HANDLERS: dict[str, Callable[[ChannelGraph, gs.Node], set[int]]] = {
    **{op: _unary for op in UNARY}, **{op: _pool for op in POOLING}, **{op: _binary for op in BINARY},
    **{op: _reduce for op in REDUCE}, **{op: _softmax for op in SOFTMAX},
    "PRelu": _prelu, "Clip": _clip, "BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm,
    "LayerNormalization": _layernorm, "Flatten": _flatten, "Reshape": _reshape, "Squeeze": _squeeze,
    "Unsqueeze": _squeeze, "Transpose": _transpose, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Pad": _pad, "Resize": _resize, "Upsample": _resize, "Shape": _shape, "Tile": _tile_expand,
    "Expand": _tile_expand,
}


# ------------------------------------------------------------------------------------------------- groups


def _finish(cg: ChannelGraph) -> None:
    n = len(cg.parent)
    cg.root = np.array([cg._find(a) for a in range(n)], dtype=np.int64)
    # sources linked by any united atom form one group
    parent = list(range(len(cg.sources)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    src = np.asarray(cg.atom_source, dtype=np.int64)
    for a in range(n):
        r = int(cg.root[a])
        if r != a:
            x, y = find(int(src[a])), find(int(src[r]))
            if x != y:
                parent[max(x, y)] = min(x, y)
    members: dict[int, list[int]] = {}
    for s in range(len(cg.sources)):
        members.setdefault(find(s), []).append(s)
    for root, idxs in members.items():
        sources = [cg.sources[i] for i in idxs]
        if all(s.fixed for s in sources):
            continue   # no prunable layer in it: nothing to report
        atoms = np.concatenate([np.arange(s.start, s.start + s.size) for s in sources])
        classes = np.unique(cg.root[atoms])
        g = Group(len(cg.groups), [s for s in sources if not s.fixed] + [s for s in sources if s.fixed], classes)
        for s in idxs:
            for reason in cg.blocks.get(s, []):
                if reason not in g.blocked:
                    g.blocked.append(reason)
        cg.groups.append(g)


def keep_masks(cg: ChannelGraph, pruned: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean keep mask of every tensor that loses at least one channel position."""
    masks: dict[str, np.ndarray] = {}
    if pruned.size == 0:
        return masks
    for name, ids in cg.ids.items():
        keep = ~np.isin(cg.root[ids], pruned)
        if not keep.all():
            masks[name] = keep
    return masks
