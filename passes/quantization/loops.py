"""Static int8 inside Loop and Scan bodies: each body is calibrated on its own values at every iteration, then
quantized, judged and timed as a model of its own and put back (``standalone``: why that is sound, and how).

Why the per-iteration values can be had: a body is a function of its declared inputs (Loop: the iteration number,
the condition, the carried values; Scan: the state values, then one slice of each scan input) and of the outer
values it reads. ONNX lets a Loop or Scan return any body value at every iteration: a body output after Loop's
condition and carried values (after Scan's state values) is a *scan output*, the values of all iterations stacked
along a new axis (Loop: axis 0; Scan: its ``scan_output_axes`` entry, default 0). So in a copy of the enclosing model
each body input gets an Identity made a new last body output and the node a matching output, axis 0, the node's
``scan_output_axes`` / ``scan_output_directions`` extended where it has them (``iterations_model``); one run per
calibration feed (``capture``) gives arrays [iterations, ...] whose row t is that input at iteration t. The outer
values a body reads do not change across its iterations: they are captured once per feed, in the same run, and each
of the feed's rows refers to the same array (no copy). Row t of every input and the outer values are one feed of the
body's standalone model, on which the quantize pass runs unchanged: the same targets, the fallback judged on the
body's outputs per iteration, objective=latency's timing of the int8 body against the float one. A Loop or If in a
body is at the top level of its standalone model, so the same code reaches it, calibrated on the rows of its own
enclosing body (a Loop in a Loop: one row per inner iteration of every outer one).

Error over iterations: values carried from one iteration to the next carry each iteration's int8 error into the
next. The body is judged per iteration on float inputs with the pass's targets and their one-sided margins, with no
further margin for the iterations (how much compounds depends on the body: a running sum adds errors, a contracting
state damps them); the pipeline then validates the whole model on --val-data against the same targets, so a body
whose errors compound past them fails validation (exit 1, nothing written) rather than being written.

What stays float, one line each (``why``): every body when there is no calibration data; a body no feed iterates
(0 iterations on every feed); a body whose values change shape across iterations (scan outputs cannot stack them:
onnxruntime's error is quoted); a body one of whose outputs is one of its inputs or an outer value; a body already
quantized. The captured rows are held in memory, at most CAPTURE_BYTES (``standalone``): past that the first feeds
only, with a note saying how many feeds and iterations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.feeds import Batch
from graphopt.graph import describe, export
from graphopt.passes.base import PassContext
from graphopt.runtime import ort_message

from . import standalone as sa
from ..subgraphs import walk

BODIES = ("Loop", "Scan")
NO_DATA = "float: a Loop/Scan body is calibrated on its values at each iteration, which needs --calib-data"
NO_ITERATION = "float: no calibration feed iterates this body (0 iterations on every feed)"
UNSTACKED = ("float: its values at each iteration cannot be stacked as scan outputs (do their shapes change across "
             "iterations?): {}")
TAG = "__iteration"         # the names of the added body outputs and node outputs


def bodies(graph: gs.Graph, ops: Sequence[str]) -> list[gs.Node]:
    """The Loop and Scan nodes of ``graph`` whose body holds a node of ``ops`` (directly or nested)."""
    return [n for n in graph.nodes if n.op in BODIES and isinstance(n.attrs.get("body"), gs.Graph)
            and sa.holds(n.attrs["body"], ops)]


def iterations_model(model: onnx.ModelProto, index: int) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose Loop/Scan node number ``index`` also returns each body input at every iteration
    (module docstring), and those node outputs' names, in the order of the body's inputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = m.graph.node[index]
    body = next(a.g for a in node.attribute if a.name == "body")
    names = []
    for k, inp in enumerate(list(body.input)):
        out = body.output.add()
        out.CopyFrom(inp)
        out.name = f"{inp.name}{TAG}"
        body.node.append(onnx.helper.make_node("Identity", [inp.name], [out.name]))
        names.append(f"{node.output[0] or node.name}{TAG}{k}")
    node.output.extend(names)
    for a in node.attribute:
        if a.name in ("scan_output_axes", "scan_output_directions"):
            a.ints.extend([0] * len(names))
    return m, names


def per_iteration(graph: gs.Graph, node: gs.Node, free: list[gs.Variable], ctx: PassContext
                  ) -> tuple[list[Batch], int, bool] | str:
    """The body's feeds, one per iteration of every captured calibration feed (its inputs at that iteration, then
    the outer values it reads), how many calibration feeds they come from and whether those are all of them; or
    why the body stays float."""
    body = node.attrs["body"]
    model, names = iterations_model(export(graph, ctx.original), graph.nodes.index(node))
    try:
        captured, whole = sa.capture(model, names + [t.name for t in free], ctx.require_calib("quantize"))
    except Exception as e:          # onnxruntime's run: per-iteration shapes that do not stack
        return UNSTACKED.format(ort_message(e))
    rows = [Batch({**{t.name: np.asarray(v[n][i]) for t, n in zip(body.inputs, names)},
                   **{t.name: v[t.name] for t in free}}, None)
            for _, v in captured for i in range(v[names[0]].shape[0])]
    return (rows, len(captured), whole) if rows else NO_ITERATION


def quantize_bodies(graph: gs.Graph, ctx: PassContext, ops: Sequence[str], quantize: sa.Quantizer,
                    out: sa.Branches) -> None:
    """Static int8 in the bodies of ``graph``'s Loop and Scan nodes that hold a node of ``ops`` (module docstring),
    into ``out``; ``quantize`` is the pass on one graph (itself reaching the subgraphs nested in the body)."""
    for node in bodies(graph, ops):
        body = node.attrs["body"]
        where = f"{describe(node)}.body"
        why = NO_DATA if ctx.calib is None else _one(graph, node, ctx, quantize, where, out)
        out.why.update({id(g): why for g in walk(body)} if why is not None else {id(body): None})


def _one(graph: gs.Graph, node: gs.Node, ctx: PassContext, quantize: sa.Quantizer, where: str,
         out: sa.Branches) -> str | None:
    """Quantize one body on its per-iteration feeds; None when its rows are in ``out``, else why it stays float."""
    body = node.attrs["body"]
    free = sa.free_values(body)
    got = per_iteration(graph, node, free, ctx)
    if isinstance(got, str):
        return got
    rows, feeds, whole = got
    if not whole:
        out.notes.append(f"{where}: calibrated on the first {feeds} feed(s) only ({len(rows)} iterations): the "
                         f"values captured are held in memory, at most {sa.CAPTURE_BYTES >> 20} MiB of them")
    outer = f", and the outer values it reads ({', '.join(t.name for t in free)})" if free else ""
    source = f"its inputs at {len(rows)} iterations of {feeds} feed(s){outer}"
    return sa.quantize_one(graph, body, list(body.inputs) + free, rows, ctx, quantize, where, source, out)
