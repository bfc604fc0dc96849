"""A subgraph (an If branch, a Loop or Scan body) quantized as a model of its own, then put back: what
``branches`` (If) and ``loops`` (Loop, Scan) share.

Why it is sound: every value a subgraph computes is a function of its own nodes, of its declared inputs (a body's
iteration number, condition, carried state and scan slices; an If branch has none) and of the outer-scope values it
reads (``free_values``: the tensors its nodes, and the nodes of the subgraphs it holds, read without defining them).
Given those values as captured from the enclosing model on each calibration feed (``capture``: onnxruntime returns
them as extra outputs), a model with the subgraph's inputs and outer variables as graph inputs and the constants it
reads as initializers (``standalone``) computes exactly what the subgraph computes, so the quantize pass's whole
machinery (plan, calibrate, build, the fallback judged on the subgraph's outputs against the same targets,
objective=latency's timing against the float subgraph) runs on it unchanged, on the captured feeds (``Captured``;
``quantize_one``). The result's nodes replace the subgraph's (``put_back``); its inputs are mapped back to the
subgraph's own inputs and the outer tensors, each constant it left as it was to the original tensor (an outer weight
stays the outer one, not a copy), and ``unique_names`` keeps the names valid. Subgraphs nested in it are at the top
level of its standalone model, so the caller's ``quantize`` reaches them the same way. The standalone model's inputs
keep the enclosing graph's dims (symbolic where it has none), so onnxruntime optimizes it as it will the subgraph
inside the model (``_input``). Captured values are held in memory: the first feeds only, up to CAPTURE_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.feeds import Batch, DataSource, first_row_feed
from graphopt.graph import const_value, export, graph_protos, import_graph, quantized_ops
from graphopt.passes.base import PassContext, PassResult
from graphopt.runtime import make_session

from .report import (BIASES_CORRECTED, CALIBRATION_SAMPLES, COSINE, COSINE_LOW, GPTQ_ROUNDED, TENSORS_FLOAT,
                     TENSORS_QUANTIZED, TOP1, UNITS_FLOAT, UNITS_INT8)
from ..subgraphs import walk

PASSES_THROUGH = ("float: an output of the subgraph is one of its inputs or an outer-scope value (nothing of its own "
                  "to calibrate)")
ALREADY = "float: the subgraph is already quantized ({})"

# counts summed over the quantized subgraphs (If branches partition the feeds), and those whose worst is given
ADDITIVE = (CALIBRATION_SAMPLES, UNITS_INT8, UNITS_FLOAT, TENSORS_QUANTIZED, TENSORS_FLOAT, BIASES_CORRECTED,
            GPTQ_ROUNDED)
WORST = (COSINE, COSINE_LOW, TOP1)
Quantizer = Callable[[gs.Graph, PassContext], PassResult]
# The subgraphs' captured values are held for every captured feed: at most this many bytes of them (the first
# feeds; the pass's own calibration streams its data, this does not). 256 feeds of a 2 MiB activation: 512 MiB.
CAPTURE_BYTES = 1 << 30


class Captured(DataSource):
    """Calibration feeds captured in memory (a subgraph's inputs and outer values: one Batch per feed of the
    enclosing model for an If branch, per iteration for a Loop/Scan body)."""

    def __init__(self, batches: list[Batch], description: str) -> None:
        self.batches = batches
        self.description = description
        self.warnings: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


@dataclass
class Branches:
    """What ``quantize_branches`` did: report rows and notes of the quantized subgraphs, and for every subgraph of
    the graph (by id) the status its float row says, or None where the rows above cover it."""

    changed: bool = False
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    why: dict[int, str | None] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, list[float]] = field(default_factory=dict)

    def merge_into(self, res: PassResult, nothing_here: str) -> None:
        """Add what the subgraphs did to the enclosing graph's result: rows, notes, the counts (summed, or the
        worst of a fidelity figure) and the calibration ranges; where the subgraphs had units to quantize, the
        enclosing graph's own ``nothing_here`` decline goes."""
        res.layers += self.layers
        res.notes += self.notes
        _add_counts(res.counts, self.counts)
        if self.ranges:
            cal = res.artifacts.setdefault("calibration", {"method": None, "ranges": {}})
            cal["ranges"].update(self.ranges)
        if self.layers:     # the subgraphs had something to quantize, whatever the enclosing graph has
            res.declined = [d for d in res.declined if d["reason"] != nothing_here]
        res.changed = res.changed or self.changed


def _add_counts(into: dict[str, float], counts: dict[str, float]) -> None:
    """Fold ``counts`` into ``into``: a fidelity figure (WORST) the lower of the two, any other count summed."""
    for k, v in counts.items():
        into[k] = min(into.get(k, v), v) if k in WORST else into.get(k, 0) + v


def holds(graph: gs.Graph, ops: Sequence[str]) -> bool:
    """Whether ``graph`` or a subgraph in it has a node of ``ops``."""
    return any(n.op in ops for g in walk(graph) for n in g.nodes)


def free_values(branch: gs.Graph) -> list[gs.Variable]:
    """The outer-scope variables the subgraph reads (its nodes and its nested subgraphs' nodes), in order of first
    use: those no node of it (or of its subgraphs) produces and that are no body input there. Constants
    are not among them: the standalone model holds those it reads as initializers, outer ones included."""
    defined: set[int] = set()
    for g in walk(branch):
        defined.update(id(t) for t in g.inputs)
        defined.update(id(t) for n in g.nodes for t in n.outputs)
    seen: dict[int, gs.Variable] = {}
    for g in walk(branch):
        for n in g.nodes:
            for t in n.inputs:
                if t.name and isinstance(t, gs.Variable) and id(t) not in defined:
                    seen.setdefault(id(t), t)
    return list(seen.values())


def constants(graph: gs.Graph) -> dict[str, list[gs.Constant]]:
    """The constants read in ``graph`` and its subgraphs, by name (sibling subgraphs may reuse one)."""
    out: dict[str, list[gs.Constant]] = {}
    for g in walk(graph):
        for n in g.nodes:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and all(c is not t for c in out.get(t.name, [])):
                    out.setdefault(t.name, []).append(t)
    return out


def capture(model: onnx.ModelProto, names: Sequence[str], calib: DataSource, budget: int | None = None
            ) -> tuple[list[tuple[Batch, dict[str, Any]]], bool]:
    """Per feed of ``calib``: the feed and the values of ``names`` (tensors of the model's top level, graph inputs
    included) on it, from one session with those names as extra outputs; the first feeds only, while the values
    held stay within ``budget`` bytes (CAPTURE_BYTES; at least one feed); and whether every feed was taken. A feed
    is run in parts of at most as many rows as hold a quarter of the budget, measured on its first row alone
    (``_parts``): a Loop body's values at every iteration of a 16-row feed could otherwise exceed the budget in
    one run."""
    budget = CAPTURE_BYTES if budget is None else budget
    feed_names = {i.name for i in model.graph.input}
    fetch = [n for n in dict.fromkeys(names) if n not in feed_names]
    sess = make_session(model, "model with a subgraph's captured values as outputs", extra_outputs=fetch)

    def values_on(feed: dict[str, Any]) -> dict[str, Any]:
        values = dict(zip(fetch, sess.run(fetch, feed))) if fetch else {}
        values.update({n: feed[n] for n in names if n in feed_names})
        return values

    out = []
    held, step = 0, None
    for b in calib:
        if step is None and b.rows > 1:
            one = first_row_feed(b.feed)
            step = max(1, budget // (4 * max(1, sum(np.asarray(v).nbytes for v in values_on(one).values()))))
        for part in _parts(b, step or b.rows):
            values = values_on(part.feed)
            held += sum(np.asarray(v).nbytes for v in values.values())
            if out and held > budget:
                return out, False
            out.append((part, values))
    return out, True


def _parts(b: Batch, step: int) -> list[Batch]:
    """``b`` in feeds of at most ``step`` rows (its arrays cut along axis 0, 0-d values kept); whole where it has
    no more rows or where its arrays do not all have its rows along axis 0 (no batch axis to cut)."""
    arrays = [v for v in b.feed.values() if isinstance(v, np.ndarray) and v.ndim]
    if b.rows <= step or not arrays or any(v.shape[0] != b.rows for v in arrays):
        return [b]
    return [Batch({k: v[i:i + step] if isinstance(v, np.ndarray) and v.ndim else v for k, v in b.feed.items()},
                  None if b.labels is None else b.labels[i:i + step]) for i in range(0, b.rows, step)]


def _input(t: gs.Variable, first: np.ndarray) -> onnx.ValueInfoProto:
    """A graph input for an outer value: the captured dtype, the dims the enclosing graph gives it (symbolic
    where it has none), as onnxruntime sees them in the enclosing model. Fixed dims taken from the captured feeds
    instead would let onnxruntime fold what the enclosing model computes at run time (its shape tests, then the
    Ifs on them), which it does not do there (and with QDQ nodes read inside those Ifs onnxruntime 1.32 aborts)."""
    known = t.shape if t.shape is not None and len(t.shape) == first.ndim else [None] * first.ndim
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else f"{t.name}_d{i}" for i, d in enumerate(known)]
    return onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(first.dtype), dims)


def standalone(branch: gs.Graph, root: gs.Graph, free: list[gs.Variable], first: dict[str, np.ndarray],
               template: onnx.ModelProto) -> onnx.ModelProto:
    """The subgraph as a model: ``free`` (its declared inputs, then the outer variables it reads) as graph inputs
    (typed from the captured values ``first``), the constants it reads as initializers, its outputs as graph outputs
    (typed as the enclosing graph has them: the value_info is dropped); the opsets of ``root``."""
    g = gs.Graph(nodes=list(branch.nodes), inputs=list(free), outputs=list(branch.outputs), name=branch.name,
                 opset=root.opset, import_domains=root.import_domains)
    model = export(g, template)
    del model.graph.input[:]
    model.graph.input.extend(_input(t, first[t.name]) for t in free)
    for g in graph_protos(model.graph):
        del g.value_info[:]
    return model


def _same(a: gs.Constant, b: gs.Constant) -> bool:
    x, y = const_value(a), const_value(b)
    return x is not None and y is not None and x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def put_back(branch: gs.Graph, quantized: gs.Graph, free: list[gs.Variable]) -> None:
    """Make ``branch`` hold the quantized standalone graph's nodes and outputs. Its inputs become the tensors of
    ``free`` they stand for, and each constant it kept as it was (same name and values) the subgraph's original
    tensor object (an outer weight stays the outer one, not a copy), in nested subgraphs too."""
    outer: dict[str, gs.Tensor] = {t.name: t for t in free}
    inputs = {id(t) for t in quantized.inputs}
    kept = constants(branch)
    for g in walk(quantized):
        for n in g.nodes:
            for i, t in enumerate(n.inputs):
                if id(t) in inputs:
                    n.inputs[i] = outer[t.name]
                elif isinstance(t, gs.Constant):
                    same = next((c for c in kept.get(t.name, []) if c is t or _same(c, t)), None)
                    if same is not None and same is not t:
                        n.inputs[i] = same
    branch.nodes = quantized.nodes
    branch.outputs = list(quantized.outputs)


def _rows(where: str, res: PassResult) -> list[dict[str, Any]]:
    """The subgraph's layer rows, each named with where it sits."""
    return [{**r, "layer": f"{where} / {r.get('layer', '')}"} for r in res.layers]



def quantize_one(root: gs.Graph, sub: gs.Graph, inputs: list[gs.Variable], feeds: list[Batch], ctx: PassContext,
                 quantize: Quantizer, where: str, source: str, out: Branches) -> str | None:
    """Quantize one subgraph of ``root`` as a model of its own whose graph inputs are ``inputs`` (its declared
    inputs, then the outer variables it reads) on ``feeds`` (values of those, described by ``source`` in the note);
    None when its rows are in ``out``, else why it stays float."""
    if any(id(t) == id(f) for t in sub.outputs for f in inputs):
        return PASSES_THROUGH
    already = sorted({op for g in walk(sub) for op in quantized_ops(g)})
    if already:
        return ALREADY.format(", ".join(already))
    model = standalone(sub, root, inputs, feeds[0].feed, ctx.original)
    graph = import_graph(model)
    sctx = PassContext(original=model, calib=Captured(feeds, f"{where}: {source}"),
                       calibration_ranges=ctx.calibration_ranges, seed=ctx.seed, targets=ctx.targets)
    res = quantize(graph, sctx)
    out.layers += _rows(where, res)
    if not res.changed:
        out.notes += [f"{where}: {n}" for n in res.notes]
        reasons = [d["reason"] for d in res.declined] or res.notes[:1] or ["nothing to quantize"]
        return None if res.layers else f"float: {reasons[0]}"
    put_back(sub, graph, inputs)
    out.changed = True
    _add_counts(out.counts, {k: v for k, v in res.counts.items() if k in ADDITIVE or k in WORST})
    out.ranges.update(res.artifacts.get("calibration", {}).get("ranges", {}))
    out.notes += [f"{where}: int8 QDQ, calibrated on {source}", *(f"{where}: {n}" for n in res.notes)]
    return None
