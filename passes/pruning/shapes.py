"""Tensor shapes for the channel analysis, and shape re-inference after pruning.

Before: onnx shape inference with data propagation (Shape-computed values propagate into Reshape targets); shapes
it leaves unknown (exporters' Shape-computed reshapes lose them) are observed by running the model once in
onnxruntime on the first calibration batch (one row when the model accepts it), else on seeded random inputs.
After: every intermediate shape is forgotten (channel counts changed) and inferred again.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import RandomSource, model_inputs
from graphopt.passes.base import PassContext, PassResult

from graphopt.errors import one_line
from graphopt.graph import cleanup, infer_model, infer_shapes, tensor_shapes
from graphopt.runtime import run_with_outputs

log = logging.getLogger("graphopt")

Shapes = dict[str, "list[Any] | None"]


def analysis_shapes(model: onnx.ModelProto, ctx: PassContext, res: PassResult) -> Shapes:
    """Every tensor's shape that inference finds or one run observes (int dims where static, str for symbols,
    None unknown)."""
    inferred = infer_model(model, data_prop=True)
    if inferred is None:
        log.info("  shape inference failed")
    shapes = tensor_shapes(inferred if inferred is not None else model)
    _observe_missing(model, shapes, ctx, res)
    return shapes


def _observe_missing(model: onnx.ModelProto, shapes: Shapes, ctx: PassContext, res: PassResult) -> None:
    produced = [o for n in model.graph.node for o in n.output if o]
    missing = [t for t in produced if shapes.get(t) is None]
    if not missing:
        return
    what = "model for reconstruction"
    try:
        if ctx.calib is not None:
            feed = next(iter(ctx.calib)).feed
        else:
            feed = next(iter(RandomSource(model_inputs(model), ctx.input_shapes, ctx.seed, n_feeds=1))).feed
        try:   # one row is enough and keeps memory small; a fixed batch size needs the whole feed
            one = first_row_feed(feed)
            values = run_with_outputs(model, missing, one, what)
        except Exception:
            values = run_with_outputs(model, missing, feed, what)
    except Exception as e:
        res.notes.append(f"{len(missing)} tensor shapes unknown (shape inference) and not observable: "
                         f"{one_line(e)[:160]}")
        return
    n = 0
    for name, v in values.items():
        if isinstance(v, np.ndarray):
            shapes[name] = list(v.shape)
            n += 1
    res.notes.append(f"{n} tensor shapes that shape inference left unknown were observed in onnxruntime")


def reinfer(graph: gs.Graph, ctx: PassContext) -> None:
    """Forget every intermediate shape (they may be stale) and infer them again."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in keep:
            t.shape = None
    cleanup(graph)
    if not infer_shapes(graph, ctx.original):
        log.info("  shape inference after pruning failed")
