"""Channel dependency analysis (the DepGraph idea of Torch-Pruning, on a plain ONNX graph): one walk over the
topologically sorted graph, dispatching each node to the handler registered for its op type, then the groups.

Dispatch: a node outside the default domain blocks the channels it reads ("unknown op"); a node reading channels a
Transpose moved off axis 1 goes to the ``handles_moved`` table (Transpose, Flatten, Reshape to [N, K]) or blocks;
otherwise the ``handles`` table, for nodes that read channels and for layers that create them (``origin``), with
"op not understood" for op types that have no handler. A handler's ``Blocked`` blocks every channel the node reads;
an input carrying channels that the handler did not follow is blocked too, and so is any channel read inside a
subgraph (If/Loop/Scan bodies) or reaching a graph output.

Groups: two sources (layers, or fixed channel spaces) whose atoms share a union-find class are in one group
(a second union-find, over sources); a group's channels are its classes. A group is pruned with one index set, and
only if no source in it is blocked or fixed. ``keep_masks`` turns the chosen classes into the keep mask of every
tensor that loses a channel position: position i of tensor t stays iff ``root(ids_t[i])`` is not chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std

from . import elementwise, layers, layout, ranges  # noqa: F401  (register the handlers)
from .channels import MOVED, HANDLERS, Blocked, ChannelGraph, Consumer, Group, Term, UnionFind
from .edits import Edit


@dataclass(frozen=True)
class Analysis:
    """The analysis of a graph: tensor ids, union-find roots of the atoms, groups, edit records (in emission order),
    importance terms and consumer layers."""

    ids: dict[str, np.ndarray]
    root: np.ndarray
    groups: list[Group]
    edits: list[Edit]
    terms: list[Term]
    consumers: list[Consumer]
    unpruned: list[tuple[str, str]]     # weighted layers whose output channels are no source, and why


def analyze(graph: gs.Graph, shapes: dict[str, list[Any] | None]) -> Analysis:
    """Walk ``graph`` (topologically sorted) once; return the channel analysis with its groups."""
    cg = ChannelGraph(graph, shapes)
    for node in graph.nodes:
        _visit(cg, node)
    for t in graph.outputs:
        if t.name in cg.ids:
            cg.block(cg.ids[t.name], f"'{t.name}' is a graph output")
        if t.name in cg.fmaps:
            cg.block(cg.fmaps[t.name], f"'{t.name}' is a graph output")
    root = cg.atoms.roots()
    return Analysis(cg.ids, root, _groups(cg, root), cg.edits, cg.terms, cg.consumers, cg.unpruned)


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


def _unknown(cg: ChannelGraph, node: gs.Node) -> set[int]:
    raise Blocked(f"{describe(node)}: op not understood by the channel analysis")


def _visit(cg: ChannelGraph, node: gs.Node) -> None:
    carried = [i for i, t in enumerate(node.inputs) if t.name in cg.ids]
    inner = _subgraph_names(node)
    for name in inner & cg.ids.keys():
        cg.block(cg.ids[name], f"{describe(node)} reads '{name}' inside a subgraph")
    for name in inner & cg.fmaps.keys():
        cg.block(cg.fmaps[name], f"{describe(node)} reads '{name}' inside a subgraph")
    moved = [i for i, t in enumerate(node.inputs) if t.name in cg.fmaps]
    if moved:
        _visit_moved(cg, node, moved, carried)
        return
    if not is_std(node):
        for i in carried:
            cg.block(cg.ids[node.inputs[i].name], f"{describe(node)}: unknown op (domain '{node.domain}')")
        return
    entry = HANDLERS.get(node.op)
    if not carried and not (entry is not None and entry.origin):
        return
    try:
        handled = (entry.fn if entry is not None else _unknown)(cg, node)
    except Blocked as e:
        for i in carried:
            cg.block(cg.ids[node.inputs[i].name], str(e))
        for o in node.outputs:
            cg.ids.pop(o.name, None)
        return
    for i in carried:
        if i not in handled:
            cg.block(cg.ids[node.inputs[i].name], f"{describe(node)}: input {i} carries channels it cannot follow")


def _visit_moved(cg: ChannelGraph, node: gs.Node, moved: list[int], carried: list[int]) -> None:
    """A node reading a tensor whose channels a Transpose moved: only the ``handles_moved`` ops, on input 0."""
    try:
        fn = MOVED.get(node.op)
        if not (is_std(node) and moved == [0] and not carried and fn is not None):
            raise Blocked(f"{describe(node)} reads channels that a Transpose moved off axis 1")
        fn(cg, node)
    except Blocked as e:
        for i in moved:
            cg.block(cg.fmaps[node.inputs[i].name], str(e))
        for i in carried:
            cg.block(cg.ids[node.inputs[i].name], str(e))


def _groups(cg: ChannelGraph, root: np.ndarray) -> list[Group]:
    """Sources linked by any united atom form one group (those with a prunable layer are reported)."""
    sources = UnionFind(len(cg.sources))
    src = np.asarray(cg.atom_source, dtype=np.int64)
    for a in range(len(root)):
        r = int(root[a])
        if r != a:
            sources.union(int(src[a]), int(src[r]))
    members: dict[int, list[int]] = {}
    for s in range(len(cg.sources)):
        members.setdefault(sources.find(s), []).append(s)
    groups: list[Group] = []
    for idxs in members.values():
        group = [cg.sources[i] for i in idxs]
        if all(s.fixed for s in group):
            continue   # no prunable layer in it: nothing to report
        atoms = np.concatenate([np.arange(s.start, s.start + s.size) for s in group])
        g = Group(len(groups), [s for s in group if not s.fixed] + [s for s in group if s.fixed],
                  np.unique(root[atoms]))
        for s in idxs:
            for reason in cg.blocks.get(s, []):
                if reason not in g.blocked:
                    g.blocked.append(reason)
        groups.append(g)
    return groups


def keep_masks(an: Analysis, pruned: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean keep mask of every tensor that loses at least one channel position."""
    masks: dict[str, np.ndarray] = {}
    if pruned.size == 0:
        return masks
    for name, ids in an.ids.items():
        keep = ~np.isin(an.root[ids], pruned)
        if not keep.all():
            masks[name] = keep
    return masks
