"""Reconstruction after pruning (``reconstruct=true``): every layer whose input channels shrank is refitted, in
topological order, so that its output on the pruned model's inputs matches the teacher's output at that point
(channel-pruning feature-map distillation in closed form, as in He et al. 2017 / ThiNet; the least squares are in
``fit``). Later layers see the refitted earlier ones: each layer's input is computed on the current pruned graph.

The teacher of a target tensor is the original model where the tensor exists there with the same values (checked
on one calibration row, relative tolerance 1e-3), else the model before this pass (earlier passes may have renamed
or changed it). At most ``rows-per-sample`` output positions per sample and ``samples`` samples are used, so memory
holds one batch and one (K+1)x(K+1) matrix per layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import DataSource
from graphopt.passes.base import PassContext, PassResult

from graphopt.errors import one_line
from graphopt.graph import cleanup, describe, export, import_graph
from graphopt.runtime import make_session, run_with_outputs

from .config import LAYERS_RECONSTRUCTED, Options
from .edits import Names, Plan
from .fit import Fit

MAX_REFIT_NOTES = 12
WHAT = "model for reconstruction"


def reconstruct(graph: gs.Graph, ctx: PassContext, plan: Plan, before: onnx.ModelProto, names: Names,
                o: Options, res: PassResult) -> None:
    """Refit the plan's consumer layers of the (pruned, re-inferred) ``graph`` in place."""
    calib = ctx.require_calib("prune-channels")
    # the graph was re-imported after shape inference: find the consumers by their output tensor
    pending = set(plan.refit)
    order = [n for n in graph.nodes if n.outputs and n.outputs[0].name in pending]
    if not order:
        return
    fits: list[tuple[gs.Node, Fit | str]] = [(n, Fit.make(n)) for n in order]   # each refit writes only its node
    targets = [f.target for _, f in fits if not isinstance(f, str)]
    teacher_graphs = _teachers(ctx, before, targets, calib, res) if targets else {}
    rng = np.random.default_rng(ctx.seed)
    refits: list[tuple[str, float, float, int, int]] = []
    for node, fit in tqdm(fits, unit="layer", desc="refitting", leave=False, disable=None):  # shown on a terminal
        site = describe(node)
        if isinstance(fit, str):
            res.notes.append(f"reconstruction skipped {site}: {fit}")
            continue
        teacher = _prefix_session(teacher_graphs[fit.target], fit.target, ctx.original)
        seen = _accumulate(graph, ctx, node, fit, teacher, plan.keep.get(fit.target), calib, rng, o)
        before_err, after_err = fit.solve(o.damping)
        fit.write(names)
        res.layers.append({"layer": node.name or fit.target, "op": node.op, "refit rows": fit.rows,
                           "rel error before": round(before_err, 6), "rel error after": round(after_err, 6)})
        refits.append((site, before_err, after_err, fit.rows, seen))
        res.count(LAYERS_RECONSTRUCTED)
    _notes(refits, res)


def _accumulate(graph: gs.Graph, ctx: PassContext, node: gs.Node, fit: Fit, teacher: ort.InferenceSession,
                cols: np.ndarray | None, calib: DataSource, rng: np.random.Generator, o: Options) -> int:
    """Stream calibration batches into ``fit``: the layer's input on the current graph, the teacher's output
    (its kept channels ``cols``); returns the samples seen."""
    student = _prefix_session(import_graph(export(graph, ctx.original)), node.inputs[0].name, ctx.original)
    seen = 0
    for batch in calib:
        x = student.run(None, batch.feed)[0]
        y = teacher.run(None, batch.feed)[0]
        if cols is not None:
            y = np.compress(cols, y, axis=1)
        n = x.shape[0] if x.ndim else 1
        fit.update(x, y, rng, max(n * o.rows_per_sample, 1))
        first = next(iter(batch.feed.values()))
        seen += first.shape[0] if first.ndim else 1
        if seen >= o.samples:
            break
    return seen


def _notes(refits: list[tuple[str, float, float, int, int]], res: PassResult) -> None:
    if len(refits) <= MAX_REFIT_NOTES:
        for site, e0, e1, rows, seen in refits:
            res.notes.append(f"reconstructed {site}: relative RMS error on calibration data {e0:.4f} -> "
                             f"{e1:.4f} ({rows} rows, {seen} samples)")
    elif refits:
        e0s, e1s = np.array([r[1] for r in refits]), np.array([r[2] for r in refits])
        worst = refits[int(np.argmax(e1s))]
        res.notes.append(f"reconstructed {len(refits)} layers: relative RMS error on calibration data, median "
                         f"{np.median(e0s):.4f} -> {np.median(e1s):.4f}, worst after {worst[0]} {worst[1]:.4f} "
                         f"-> {worst[2]:.4f} (every layer in the report's layers)")


def _prefix_session(graph: gs.Graph, name: str, template: onnx.ModelProto) -> ort.InferenceSession:
    """A session computing only tensor ``name`` (the part of the graph it depends on)."""
    g = graph.copy()
    g.outputs = [g.tensors()[name]]
    cleanup(g)
    return make_session(export(g, template), WHAT)


def _teachers(ctx: PassContext, before: onnx.ModelProto, names: list[str], calib: Any, res: PassResult
              ) -> dict[str, gs.Graph]:
    """Per target tensor: the original model where it has the same values there, else the pre-pass model."""
    g_before = import_graph(before)
    out = {n: g_before for n in names}
    if ctx.original is before:
        return out
    try:
        g_orig = import_graph(ctx.original)
        have = g_orig.tensors()
        common = [n for n in names if n in have and not isinstance(have[n], gs.Constant)]
        if not common:
            res.notes.append("reconstruction teacher: the model before this pass (names differ from the original)")
            return out
        feed = next(iter(calib)).feed
        one = first_row_feed(feed)   # one row: little memory
        try:
            a = run_with_outputs(ctx.original, common, one, WHAT)
            b = run_with_outputs(before, common, one, WHAT)
        except Exception:
            a = run_with_outputs(ctx.original, common, feed, WHAT)
            b = run_with_outputs(before, common, feed, WHAT)
    except Exception as e:  # the original is the better teacher, not a required one
        res.notes.append(f"reconstruction teacher: the model before this pass ({one_line(e)})")
        return out
    used = 0
    for n in common:
        x, y = a.get(n), b.get(n)
        if x is not None and y is not None and x.shape == y.shape and np.allclose(
                x, y, rtol=1e-3, atol=1e-4 * float(np.abs(y).max() + 1e-12)):
            out[n] = g_orig
            used += 1
    rest = "" if used == len(names) else ", the model before this pass for the rest"
    res.notes.append(f"reconstruction teacher: the original model for {used} of {len(names)} layers{rest}")
    return out
