"""Walking a model's subgraphs (If branches, Loop and Scan bodies) for the passes that rewrite weights, and keeping
tensor names unique across scopes after they have.

ONNX scoping: a subgraph (a graph-valued attribute of an If, Loop or Scan node) has no inputs of its own beyond the
body's declared ones, sees every name of its enclosing scopes, and defines names (node outputs, body inputs,
initializers) that must not collide with a name it can see. onnx-graphsurgeon imports a subgraph as a ``gs.Graph``
in ``node.attrs`` whose nodes hold the enclosing scopes' tensor *objects*: a pass that runs on a subgraph reads an
outer-scope weight as the same ``gs.Constant`` it would see at the top level, and the nodes it appends go into that
subgraph. What it must not do is name a new tensor after one the subgraph does not hold but can see (or that sees
it): ``unique_names`` renames every tensor a subgraph defines whose name its own graph or an enclosing scope
gives another tensor (the model's top-level names are never renamed), so a pass may name new tensors as it does at the top level and call it
once at the end. A tensor is *defined* by a subgraph when no enclosing scope holds it: a body-local initializer, a
node output, a body input; an outer constant read only inside subgraphs counts as theirs (onnx-graphsurgeon exports
it as their initializer), which is harmless since it keeps one name.
``subgraph_rows`` gives the per-subgraph report rows of a pass that leaves subgraphs as they are (one line each:
which subgraph, its weighted nodes, why they stay float), leaving out those the pass reported itself.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import onnx_graphsurgeon as gs

from graphopt.graph import describe


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The node's subgraph attributes (If branches, Loop/Scan bodies)."""
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)]


def walk(graph: gs.Graph, skip: gs.Graph | None = None) -> Iterator[gs.Graph]:
    """``graph`` and its nested subgraphs, depth first, leaving out ``skip`` and what it holds."""
    if graph is skip:
        return
    yield graph
    for node in graph.nodes:
        for sub in subgraphs(node):
            yield from walk(sub, skip)


def graphs(root: gs.Graph) -> list[gs.Graph]:
    """``root`` and every subgraph in it, as a list taken now (a pass rewriting one does not change the walk)."""
    return list(walk(root))


def owners(root: gs.Graph) -> Iterator[tuple[str, gs.Graph]]:
    """Each subgraph with the place it sits, e.g. ``If 'y' (node 'if0').then_branch``, nested ones joined by ' / '."""
    def visit(graph: gs.Graph, prefix: str) -> Iterator[tuple[str, gs.Graph]]:
        for node in graph.nodes:
            for key, sub in node.attrs.items():
                if isinstance(sub, gs.Graph):
                    where = f"{prefix}{describe(node)}.{key}"
                    yield where, sub
                    yield from visit(sub, where + " / ")
    return visit(root, "")


def _held(graph: gs.Graph) -> list[gs.Tensor]:
    """The distinct tensor objects the graph's inputs, outputs and nodes hold (by identity, names may repeat)."""
    seen: dict[int, gs.Tensor] = {}
    for t in [*graph.inputs, *graph.outputs, *(t for n in graph.nodes for t in (*n.inputs, *n.outputs))]:
        seen.setdefault(id(t), t)
    return list(seen.values())


def unique_names(root: gs.Graph) -> int:
    """Rename each tensor a subgraph defines whose name a tensor of the same graph or of an enclosing scope has
    (``NAME_2``, ``NAME_3``, ...: the outer one keeps its name, the top level always does); returns how many.
    Sibling subgraphs may reuse a name (neither sees the other's), as onnx.checker and onnxruntime accept."""
    renamed = 0

    def visit(graph: gs.Graph, outer: dict[str, int], top: bool) -> None:
        nonlocal renamed
        scope, seen = dict(outer), set(outer.values())
        own = [t for t in _held(graph) if id(t) not in seen and t.name]
        for t in own:
            holder = scope.setdefault(t.name, id(t))
            if holder != id(t) and not top:
                k = 2
                while f"{t.name}_{k}" in scope:
                    k += 1
                t.name = f"{t.name}_{k}"
                scope[t.name] = id(t)
                renamed += 1
        for node in graph.nodes:
            for sub in subgraphs(node):
                visit(sub, scope, False)

    visit(root, {}, True)
    return renamed


def subgraph_rows(root: gs.Graph, ops: Iterable[str], status: str,
                  why: Mapping[int, str | None] | None = None) -> list[dict[str, str]]:
    """One report row per subgraph holding nodes of ``ops`` (directly, not in its own nested subgraphs): where it
    sits, how many of which, and ``status`` (why they stay as they are), or ``why[id(subgraph)]`` where given (None:
    no row, the pass reported that subgraph itself, and what it holds)."""
    wanted = set(ops)
    why = why or {}
    covered = {id(g) for where, sub in owners(root) if id(sub) in why and why[id(sub)] is None for g in walk(sub)}
    rows = []
    for where, sub in owners(root):
        if id(sub) in covered:
            continue
        found: dict[str, int] = {}
        for n in sub.nodes:
            if n.op in wanted:
                found[n.op] = found.get(n.op, 0) + 1
        if found:
            rows.append({"layer": where, "op": ", ".join(f"{k} x{v}" for k, v in sorted(found.items())),
                         "weights": "in a subgraph", "status": why.get(id(sub)) or status})
    return rows
