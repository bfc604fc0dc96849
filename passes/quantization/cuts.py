"""The latency table's regions timed on their own: each int8 region of a build cut out of the model twice, as the
int8 nodes that compute it and as the same ops in float, each fed the float model's values at the region's inputs
on the timing sample (``region_cuts``); a region's gain alone is m(float cut) − m(int8 cut).

Why: timed as whole models (the model with that region alone int8, against float), every region costs a whole run
per round and its gain carries the whole model's noise: PP-OCRv4 det (AMD EPYC Zen 4), 11 regions, 5 rounds, 8.7 s
of runs, notches of ±3.6% of its 60 ms, wider than most regions' gains. A cut pair runs only the region: one round
of every region's pair is about two runs of the model, and each gain has its own region's noise.

The int8 cut of region R, in the build where the regions run int8: the nodes that write the outputs of R's
ops (``Built.produces``: a unit's op and its fused activation, another op), the QuantizeLinear of each tensor of R
and the DequantizeLinear after it, and the DequantizeLinear of the ops' constant weights and biases. Its inputs are
what these nodes read that other nodes make (the region's entries), its outputs what they make that other nodes or
the graph read: the int8 run with the QuantizeLinear / DequantizeLinear pair at each boundary, as the whole model
runs it. The float cut: the nodes writing the same outputs in the float build (the same tensor names), inputs and
outputs found the same way. Where a cut cannot be made (an op's outputs not found, a cut onnxruntime does not
load or run), ``region_cuts`` returns None and the caller times whole models.

Caches: the cuts are timed in one rotation with no untimed run before each (rewarm 0), so a region's weights were
last read a whole rotation (about two runs of the model) before, as in the whole model run repeatedly, where the
rest of the model runs between two uses: a cut kept hot where the model streams its weights would understate
int8's gain on weight-bound layers (MiniLM's MatMuls, 88 MB of float weights, beyond the caches).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
import onnx
from onnx import helper

from graphopt.runtime import LatencySessions, run_with_outputs


class Span(NamedTuple):
    """A cut's nodes (indices into the model's nodes, in its order), its inputs and its outputs."""

    nodes: list[int]
    entries: list[str]
    exits: list[str]


def span(model: onnx.ModelProto, writes: set[str], tensors: set[str]) -> Span | None:
    """The cut of the ops writing ``writes`` with the QuantizeLinear / DequantizeLinear pairs of ``tensors`` (empty
    for the float build), as the module docstring says; None where an output in ``writes`` has no node or the cut
    has no output."""
    nodes = model.graph.node
    inits = {i.name for i in model.graph.initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    if not writes or any(t not in producer for t in writes):
        return None
    keep = {producer[t] for t in writes}
    keep |= {i for i, n in enumerate(nodes) if n.op_type == "QuantizeLinear" and n.input[0] in tensors}
    quantized = {nodes[i].output[0] for i in keep if nodes[i].op_type == "QuantizeLinear"}
    read = {t for i in keep for t in nodes[i].input}
    keep |= {i for i, n in enumerate(nodes) if n.op_type == "DequantizeLinear"
             and (n.input[0] in quantized or (n.input[0] in inits and n.output[0] in read))}
    order = sorted(keep)
    made = {o for i in order for o in nodes[i].output if o}
    entries = list(dict.fromkeys(t for i in order for t in nodes[i].input if t and t not in made and t not in inits))
    outside = {t for i, n in enumerate(nodes) if i not in keep for t in n.input} | {o.name for o in model.graph.output}
    exits = [o for i in order for o in nodes[i].output if o and o in outside]
    return Span(order, entries, exits) if exits else None


def cut_model(model: onnx.ModelProto, s: Span, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The model of span ``s`` of ``model``: its nodes, the initializers they read, inputs typed and shaped as
    ``values`` (the entries' values), outputs as shape inference gives them from these."""
    nodes = [model.graph.node[i] for i in s.nodes]
    read = {t for n in nodes for t in n.input}
    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(values[t].dtype), values[t].shape)
              for t in s.entries]
    graph = helper.make_graph(nodes, f"{model.graph.name}_cut", inputs, [onnx.ValueInfoProto(name=t) for t in s.exits],
                              [i for i in model.graph.initializer if i.name in read])
    cut = helper.make_model(graph, opset_imports=model.opset_import)
    cut.ir_version = model.ir_version
    return onnx.shape_inference.infer_shapes(cut)


def region_cuts(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, regions: list[tuple[set[str], set[str]]],
                feed: Mapping[str, Any]) -> tuple[list[onnx.ModelProto], list[dict[str, Any]], LatencySessions] | None:
    """For each region ((the tensors its ops write, its quantized tensors)) of ``int8_model``: the float cut (from
    ``float_model``, the build with every region float) and the int8 cut (in that order, two models per region),
    each one's feed (the float model's values at its entries on ``feed``), and their latency sessions, each loaded
    and run once; None where one cannot be made (module docstring). A region's int8 cut is the same in the build
    with every region int8 as in the build with it alone int8: no quantized tensor is two regions' (``regions``
    joins the ops that share one), so its boundary pairs are its own."""
    spans = []
    for writes, tensors in regions:
        f, q = span(float_model, writes, set()), span(int8_model, writes, tensors)
        if f is None or q is None:
            return None
        spans.append((f, q))
    wanted = list(dict.fromkeys(t for f, q in spans for t in f.entries + q.entries))
    given = {i.name for i in float_model.graph.input}
    try:
        inner = [t for t in wanted if t not in given]
        values = {**(run_with_outputs(float_model, inner, feed, "float model (region inputs)") if inner else {}),
                  **{t: np.asarray(feed[t]) for t in wanted if t in given}}
        models, feeds = [], []
        for f, q in spans:
            for source, s in ((float_model, f), (int8_model, q)):
                models.append(cut_model(source, s, values))
                feeds.append({t: values[t] for t in s.entries})
        sessions = LatencySessions(models)
        for m, fd in zip(models, feeds):
            sessions.get(m, 1).run(None, fd)
    except Exception:       # a cut onnxruntime does not load or run: the caller times whole models
        return None
    return models, feeds, sessions
