"""Inlining an ``If`` whose condition is a constant (part of ``fold-constants``): the chosen branch's nodes move into
the graph that holds the If.

ONNX semantics (If): exactly one branch runs, chosen by the one-element bool condition; a branch has no inputs, sees
every name of its enclosing scopes, and its i-th output is the If's i-th output. So when the condition is a
constant, the If computes what its chosen branch's nodes compute when placed in the parent graph:
  * outer-scope names need no resolution: onnx-graphsurgeon gives a branch's nodes the enclosing scopes' tensor
    objects, which stay what they are once the nodes move up;
  * a name the branch defines (a node output, a branch initializer) that the rest of the model uses for another
    tensor is renamed (``NAME__inlined``, ``NAME__inlined2``, ...); nested subgraphs hold the same object, so they
    see the new name. A branch initializer equal to the outer tensor of its name (exporters copy outer weights
    into subgraphs) is replaced by that tensor instead;
  * the branch node computing output i writes the If's output i instead (the parent's consumers, graph outputs and
    nested subgraphs keep reading the same tensor); an output the branch does not compute itself (an outer-scope
    tensor, a branch initializer, the same tensor given twice) goes through an Identity.
Nested: an If of the chosen branch is an If of the parent afterwards and is inlined in the same sweep when its
condition is constant; Ifs inside other subgraphs (Loop/Scan bodies, branches of Ifs that stay) are inlined where
their condition is constant there. Declined, untouched, with a reason: a condition computed at run time, a condition
that is not one element.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe, is_std

from .subgraphs import subgraphs, walk

IF_INLINED = "If nodes inlined"
SUFFIX = "__inlined"


def inline_constant_ifs(root: gs.Graph) -> tuple[int, list[tuple[str, str]]]:
    """Inline every If with a constant condition in ``root`` and its subgraphs; (how many, [(site, reason)] for the
    Ifs left as they are)."""
    declined: list[tuple[str, str]] = []
    return _sweep(root, root, declined), declined


def _sweep(root: gs.Graph, graph: gs.Graph, declined: list[tuple[str, str]]) -> int:
    """Inline in ``graph``, then in the subgraphs of the nodes it holds afterwards (a dropped branch is not visited)."""
    count = _inline_in(root, graph, declined)
    return count + sum(_sweep(root, sub, declined) for node in graph.nodes for sub in subgraphs(node))


def _inline_in(root: gs.Graph, graph: gs.Graph, declined: list[tuple[str, str]]) -> int:
    count = 0
    pending = [n for n in graph.nodes if is_std(n, "If")]
    while pending:
        node = pending.pop(0)
        cond = const_value(node.inputs[0]) if node.inputs else None
        if cond is None:
            declined.append((describe(node), f"its condition '{node.inputs[0].name if node.inputs else ''}' is "
                             "computed at run time (a constant one is inlined: see --fix-input)"))
            continue
        if cond.size != 1:
            declined.append((describe(node), f"its condition holds {cond.size} values, not one"))
            continue
        branch = node.attrs.get("then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
        if not isinstance(branch, gs.Graph):
            declined.append((describe(node), "the chosen branch is not a graph"))
            continue
        moved = inline(root, graph, node, branch)
        pending.extend(n for n in moved if is_std(n, "If"))
        count += 1
    return count


def inline(root: gs.Graph, graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> list[gs.Node]:
    """Replace the If ``node`` of ``graph`` by the nodes of its ``branch`` (``root``: the whole model, for names);
    returns the moved nodes."""
    outs = list(node.outputs)
    at = next(i for i, n in enumerate(graph.nodes) if n is node)
    node.inputs.clear()
    node.outputs.clear()
    del graph.nodes[at]
    _resolve_names(root, branch)     # the If is out of the model: its other branch's names are free
    moved = list(branch.nodes)
    own = set(map(id, moved))
    taken: set[int] = set()
    for b, o in zip(branch.outputs, outs):
        producer = b.inputs[0] if len(b.inputs) == 1 else None
        if producer is not None and id(producer) in own and id(b) not in taken:
            taken.add(id(b))
            _replace(branch, b, o)
            producer.outputs[next(i for i, t in enumerate(producer.outputs) if t is b)] = o
            o.dtype = o.dtype if o.dtype is not None else b.dtype
            o.shape = o.shape if o.shape is not None else b.shape
        else:
            moved.append(gs.Node("Identity", name=f"{o.name}{SUFFIX}_identity", inputs=[b], outputs=[o]))
    branch.nodes = []
    graph.nodes[at:at] = moved
    return moved


def _replace(branch: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` in the branch and its nested subgraphs reads ``new``."""
    for g in walk(branch):
        for n in g.nodes:
            for i, t in enumerate(n.inputs):
                if t is old:
                    n.inputs[i] = new
        g.outputs = [new if t is old else t for t in g.outputs]


def _resolve_names(root: gs.Graph, branch: gs.Graph) -> None:
    """Rename the branch's own tensors whose names the rest of the model gives other tensors (a branch initializer
    equal to the outer tensor of its name is replaced by it)."""
    elsewhere: dict[str, gs.Tensor] = {}
    for g in walk(root, skip=branch):
        for t in g.tensors().values():
            elsewhere.setdefault(t.name, t)
    names = set(elsewhere)
    for g in walk(branch):
        names.update(g.tensors())
    own: list[gs.Tensor] = [t for n in branch.nodes for t in n.outputs]
    own += [t for n in branch.nodes for t in n.inputs if isinstance(t, gs.Constant) and not t.is_empty()]
    seen: set[int] = set()
    for t in own:
        other = elsewhere.get(t.name)
        if id(t) in seen or other is None or other is t:
            continue
        seen.add(id(t))
        if isinstance(t, gs.Constant) and isinstance(other, gs.Constant) and _same(t, other):
            _replace(branch, t, other)
            continue
        k, new = 1, f"{t.name}{SUFFIX}"
        while new in names:
            k += 1
            new = f"{t.name}{SUFFIX}{k}"
        names.add(new)
        t.name = new


def _same(a: gs.Constant, b: gs.Constant) -> bool:
    x, y = np.asarray(a.values), np.asarray(b.values)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
