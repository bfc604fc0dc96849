"""Residual blocks of a graph for ``prune-layers``: finding them, removing one, and the layers to refit after it.

A residual block is an ai.onnx ``Add(x, f)`` of two activations where x (the identity) is an ancestor of f: the
branch is every node that descends from x and is an ancestor of f, and removing the block makes the Add's output x
itself (``y = x + f(x)`` becomes ``y = x``; the branch, then unused, is cleaned up). Other inputs of branch nodes
that do not descend from x (an attention mask, constants) are allowed. Declined, with the reason: an Add where
neither input lies on the other's path (a projection shortcut ``proj(x) + f(x)``, or a merge of two branches),
a branch with side outputs (a branch tensor read outside the branch or a graph output: removing it would change
them), and an Add whose inputs' shapes differ (a broadcast, not an identity; symbolic dims are taken to agree).
The layers refitted after a removal (``next_layers``) are the first Conv/Gemm/MatMul with a constant weight reached
from the Add's output through nodes with a single activation input (Relu, LayerNormalization, ...); a merge (Add,
Concat, ...) stops the walk, since its other input does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std, node_name

WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass
class Block:
    """A residual block: ``add`` computes ``identity + branch output``; ``branch`` its nodes (graph order)."""

    add: gs.Node
    identity: gs.Tensor
    branch: list[gs.Node]

    @property
    def name(self) -> str:
        return node_name(self.add)

    @property
    def desc(self) -> str:
        return describe(self.add)


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _ancestors(t: gs.Tensor) -> set[int]:
    """ids of the nodes ``t`` depends on."""
    seen: set[int] = set()
    stack = [t]
    while stack:
        node = _producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.inputs)
    return seen


def _descendants(t: gs.Tensor) -> set[int]:
    """ids of the nodes that depend on ``t``."""
    seen: set[int] = set()
    stack = [t]
    while stack:
        for node in stack.pop().outputs:
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.outputs)
    return seen


def find_blocks(graph: gs.Graph, shapes: dict[str, object]) -> tuple[list[Block], list[tuple[str, str]]]:
    """The residual blocks, and the (site, reason) of each Add of two activations that is not one."""
    outputs = {t.name for t in graph.outputs}
    blocks: list[Block] = []
    declined: list[tuple[str, str]] = []
    for add in graph.nodes:
        if not is_std(add, "Add") or len(add.inputs) != 2 or any(isinstance(t, gs.Constant) for t in add.inputs):
            continue
        a, b = add.inputs
        up_a, up_b = _ancestors(a), _ancestors(b)
        if a is not b and any(id(n) in up_b for n in a.outputs):      # a feeds b's path: a is the identity
            x, f, up_f = a, b, up_b
        elif a is not b and any(id(n) in up_a for n in b.outputs):
            x, f, up_f = b, a, up_a
        else:
            declined.append((describe(add), "no identity input: neither input lies on the other's path (a "
                                            "projection shortcut, or a merge of two branches)"))
            continue
        branch_ids = _descendants(x) & up_f
        branch = [n for n in graph.nodes if id(n) in branch_ids]
        reason = _why_not(add, x, f, branch, branch_ids, outputs, shapes)
        if reason:
            declined.append((describe(add), reason))
        else:
            blocks.append(Block(add, x, branch))
    return blocks, declined


def _why_not(add: gs.Node, x: gs.Tensor, f: gs.Tensor, branch: list[gs.Node], ids: set[int], outputs: set[str],
             shapes: dict[str, object]) -> str | None:
    sx, sf = shapes.get(x.name), shapes.get(f.name)
    if sx is not None and sf is not None and (len(sx) != len(sf) or any(
            isinstance(i, int) and isinstance(j, int) and i != j for i, j in zip(sx, sf))):
        return f"shapes differ: identity '{x.name}' {list(sx)} vs branch '{f.name}' {list(sf)}"
    for node in branch:
        for t in node.outputs:
            if t.name in outputs:
                return f"the branch has side outputs: '{t.name}' is a graph output"
            readers = [r for r in t.outputs if id(r) not in ids and r is not add]
            if readers:
                return f"the branch has side outputs: '{t.name}' is also read by {describe(readers[0])}"
    return None


def remove(graph: gs.Graph, block: Block) -> bool:
    """Make the block's Add output its identity input; False when the Add is gone already (inside a branch removed
    before). The caller cleans the graph up."""
    add = block.add
    if not add.outputs or not add.inputs:
        return False
    y = add.outputs[0]
    if y.name in {t.name for t in graph.outputs}:
        add.op, add.attrs = "Identity", {}
        add.inputs[:] = [block.identity]
        return True
    for consumer in list(y.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is y:
                consumer.inputs[i] = block.identity
    add.inputs.clear()
    add.outputs.clear()
    return True


def next_layers(start: gs.Tensor) -> list[gs.Node]:
    """The first weighted layers reached from ``start`` through single-activation nodes (see the module doc)."""
    found: list[gs.Node] = []
    seen: set[int] = set()
    stack = [start]
    while stack:
        for node in stack.pop().outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            active = [t for t in node.inputs if not isinstance(t, gs.Constant) and not t.is_empty()]
            if is_std(node, *WEIGHTED) and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                found.append(node)
            elif len(active) == 1:
                stack.extend(node.outputs)
    return found


def branch_weights(block: Block) -> int:
    """Weight parameters in the block's branch (its constants' elements, each counted once)."""
    seen: dict[str, int] = {}
    for node in block.branch:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                seen[t.name] = int(np.asarray(t.values).size)
    return sum(seen.values())
