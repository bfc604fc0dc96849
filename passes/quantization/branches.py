"""Static int8 inside the branches of an ``If`` that stays (its condition computed at run time): each branch is
calibrated, built, judged and timed as a model of its own, then put back (``standalone``: why that is sound, and
how); the bodies of Loop and Scan nodes are then quantized the same way on their per-iteration values (``loops``).

An If branch has no inputs of its own: what it computes is a function of its nodes and of the outer values it reads.
So, per calibration feed, the enclosing model is run once with the If's condition and the branches' outer values as
outputs (``capture``): the feeds whose condition is true are the then-branch's calibration data, the others the
else-branch's. Ifs nested in a branch are reached by the same call on the branch's standalone model (the caller's
``quantize`` recurses). The branches are captured after the enclosing graph is quantized, so each is calibrated on
the inputs it will see; the whole model is then validated by the pipeline.

What stays float, with one line each (``why``): a branch no calibration feed takes; a branch when there is no
calibration data; a branch one of whose outputs is an outer value (the standalone model would pass an input
through); a branch already quantized. Captured feeds are held in memory (the branches' outer values per feed): the
first feeds only, up to CAPTURE_BYTES of them, said in a note.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.calibration.feeds import Batch
from graphopt.graph import const_value, describe, export
from graphopt.passes.base import PassContext

from .loops import quantize_bodies
from . import standalone
from .standalone import Branches, Quantizer, capture, free_values, holds, quantize_one
from ..subgraphs import subgraphs, unique_names, walk

NO_DATA = "float: an If branch is calibrated on the outer values it reads, which needs --calib-data"


def taken(cond: gs.Tensor, captured: list[tuple[Batch, dict[str, Any]]]) -> list[bool]:
    """Per captured feed, the If's condition (a constant one is the same for every feed)."""
    c = const_value(cond)
    return [bool(np.asarray(c if c is not None else v[cond.name]).reshape(-1)[0]) for _, v in captured]


def quantize_branches(graph: gs.Graph, ctx: PassContext, ops: Sequence[str], quantize: Quantizer) -> Branches:
    """Static int8 in the branches of ``graph``'s If nodes (module docstring) and in the bodies of its Loop and
    Scan nodes (``loops``) that hold a node of ``ops``; ``quantize`` is the pass on one graph (itself reaching the
    subgraphs nested in them). Subgraphs it does not reach get a float status in ``why``."""
    out = Branches()
    ifs = [n for n in graph.nodes if n.op == "If" and any(holds(s, ops) for s in subgraphs(n))]
    if ifs and ctx.calib is None:
        out.why.update({id(g): NO_DATA for n in ifs for s in subgraphs(n) for g in walk(s)})
    elif ifs:
        _ifs(graph, ifs, ctx, ops, quantize, out)
    quantize_bodies(graph, ctx, ops, quantize, out)     # after the branches: calibrated on what they will see
    if out.changed:
        unique_names(graph)
    return out


def _ifs(graph: gs.Graph, ifs: list[gs.Node], ctx: PassContext, ops: Sequence[str], quantize: Quantizer,
         out: Branches) -> None:
    """The branches of ``ifs`` (If nodes of ``graph``) calibrated on their outer values captured per feed."""
    frees = {id(s): free_values(s) for n in ifs for s in subgraphs(n)}
    names = [n.inputs[0].name for n in ifs if const_value(n.inputs[0]) is None] + \
        [t.name for f in frees.values() for t in f]
    captured, whole = capture(export(graph, ctx.original), names, ctx.require_calib("quantize"))
    if not whole:
        out.notes.append(f"If branches calibrated on the first {sum(b.rows for b, _ in captured)} samples only: the "
                         f"outer values they read are held in memory, at most {standalone.CAPTURE_BYTES >> 20} MiB "
                         "of them")
    for node in ifs:
        takes = taken(node.inputs[0], captured)
        for key, side in (("then_branch", True), ("else_branch", False)):
            branch = node.attrs[key]
            free = frees[id(branch)]
            feeds = [Batch({t.name: v[t.name] for t in free}, None, b.rows)
                     for (b, v), t in zip(captured, takes) if t == side]
            where = f"{describe(node)}.{key}"
            if not holds(branch, ops):
                continue
            if not feeds:
                why: str | None = (f"float: no calibration sample takes this branch (condition "
                                   f"'{node.inputs[0].name}' was {str(not side).lower()} for every feed)")
            else:
                source = f"its outer values ({', '.join(t.name for t in free)}) captured on {len(feeds)} feed(s)"
                why = quantize_one(graph, branch, free, feeds, ctx, quantize, where, source, out)
            out.why.update({id(g): why for g in walk(branch)} if why is not None else {id(branch): None})
