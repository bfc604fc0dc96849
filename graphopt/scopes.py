"""Initializers that several subgraphs hold, stored once, in the innermost graph enclosing all of them.

onnx-graphsurgeon exports a constant into every subgraph that reads it, so a weight read by both branches of an If
(or by an If nested in a Loop body) is written once per branch; folding an op on it in each branch (Silero VAD's
``Unsqueeze(weight_ih)`` in the two branches of its decoder's If) writes one equal copy per branch too. ONNX scoping
lets a subgraph read any value of an enclosing graph, so equal initializers (same type, shape and bytes) of
different subgraphs are one tensor: the first keeps its name and moves to the innermost graph that encloses every
copy (their lowest common ancestor in the graph tree), the others are dropped and their readers renamed to it.
Exact: the values read are the same bytes. Left as they are: initializers with external data (not in memory),
those a subgraph returns as an output (a branch output naming an outer value trips onnxruntime), and the main
graph's own (nothing encloses it).
Speed: onnxruntime does not prepack an LSTM's weight read from an enclosing graph. Silero VAD with
``--fix-input sr=16000`` after fold-constants: 1.27 MB and 2.4% slower per chunk than with one copy per branch
(2.33 MB); without --fix-input no slower than either the copies or the input model (Zen 4, onnxruntime 1.32.0,
interleaved medians of 3000 runs). MatMul reading an outer weight measured the same as a local one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterator

import onnx


def share_initializers(model: onnx.ModelProto) -> int:
    """Store equal subgraph initializers once (module docstring), in place; the number of copies dropped."""
    root = model.graph      # one wrapper object per graph, held for the whole call: ids stay valid
    parents: dict[int, onnx.GraphProto | None] = {id(root): None}
    groups: dict[tuple, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = defaultdict(list)
    graphs = [root, *_subgraphs(root, parents)]
    if len(graphs) < 3:     # fewer than two subgraphs: nothing to share
        return 0
    defined = Counter(n for g in graphs for n in _defines(g))
    for g in graphs[1:]:
        outputs = {o.name for o in g.output}
        for t in g.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and t.name not in outputs:
                groups[(t.data_type, tuple(t.dims), _payload(t))].append((g, t))
    dropped = 0
    for copies in groups.values():
        # (equal tensors of one graph are not this module's matter; a kept name that some other value of the model
        # also has, legal in sibling subgraphs, would be shadowed there once it moves up: left as it is)
        if len({id(g) for g, _ in copies}) > 1 and defined[copies[0][1].name] == sum(
                t.name == copies[0][1].name for _, t in copies):
            dropped += _share(copies, parents)
    return dropped


def _defines(g: onnx.GraphProto) -> Iterator[str]:
    """The names ``g`` itself gives values: its inputs, initializers and node outputs."""
    yield from (i.name for i in g.input)
    yield from (t.name for t in g.initializer)
    yield from (o for n in g.node for o in n.output if o)


def _subgraphs(g: onnx.GraphProto, parents: dict[int, onnx.GraphProto | None]) -> Iterator[onnx.GraphProto]:
    """Every graph nested in ``g`` (not ``g``), parents first, recording each one's enclosing graph."""
    for node in g.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                parents[id(sub)] = g
                yield sub
                yield from _subgraphs(sub, parents)


def _payload(t: onnx.TensorProto) -> bytes:
    """The tensor's values as stored, without its name: equal payloads are equal tensors of one type and shape."""
    bare = onnx.TensorProto()
    bare.CopyFrom(t)
    bare.name = ""
    bare.ClearField("doc_string")
    return bare.SerializeToString(deterministic=True)


def _share(copies: list[tuple[onnx.GraphProto, onnx.TensorProto]], parents: dict[int, onnx.GraphProto | None]
           ) -> int:
    """One stored copy in the innermost graph enclosing all ``copies``; readers of the others renamed to it."""
    home = _common_ancestor([g for g, _ in copies], parents)
    at_home = next((t for g, t in copies if g is home), None)     # stays where it is (a re-export is the same)
    keep = at_home if at_home is not None else copies[0][1]
    name = keep.name
    if at_home is None:
        kept = onnx.TensorProto()
        kept.CopyFrom(keep)
        home.initializer.append(kept)
    for g, t in copies:
        if t is at_home:
            continue
        old = t.name
        g.initializer.remove(t)
        if old != name:
            _rename(g, old, name)
    return len(copies) - 1


def _common_ancestor(graphs: list[onnx.GraphProto], parents: dict[int, onnx.GraphProto | None]) -> onnx.GraphProto:
    """The innermost graph that is, or encloses, every graph of ``graphs``."""
    def chain(g: onnx.GraphProto) -> list[onnx.GraphProto]:
        out = []
        cur: onnx.GraphProto | None = g
        while cur is not None:
            out.append(cur)
            cur = parents[id(cur)]
        return out[::-1]            # outermost first

    chains = [chain(g) for g in graphs]
    home = chains[0][0]
    for level in zip(*chains):
        if any(x is not level[0] for x in level):
            break
        home = level[0]
    return home


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``g`` and the graphs nested in it (no name is defined twice in a valid model)."""
    for node in g.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename(sub, old, new)
    stale = [vi for vi in g.value_info if vi.name == old]      # the kept initializer carries its type
    for vi in stale:
        g.value_info.remove(vi)
