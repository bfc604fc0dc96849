"""Static int8 inside the branches of an ``If`` that stays (its condition computed at run time): each branch is
calibrated, built, judged and timed as a model of its own, then put back.

Why it is sound: an If branch has no inputs of its own; every value it computes is a function of its own nodes
and of the outer-scope values it reads (``free_values``: the tensors its nodes, and the nodes of the subgraphs it
holds, read without defining them). Those outer values live in the enclosing graph, where onnxruntime can return
them as extra outputs. So, per calibration feed, the enclosing model is run once with the If's condition and the
branch's outer values as outputs (``capture``): the feeds whose condition is true are the then-branch's
calibration data, the others the else-branch's. A branch with its outer variables as graph inputs and its outer
constants as initializers (``standalone``) computes exactly what the branch computes on those feeds, so the
quantize pass's whole machinery (plan, calibrate, build, the fallback judged on the branch's outputs against the
same targets, objective=latency's timing against the float branch) runs on it unchanged, on the captured feeds
(``Captured``). The result's nodes replace the branch's (``put_back``); its inputs are mapped back to the outer
tensors and each constant it left as it was to the original tensor (an outer weight stays the outer one, not a
copy), and ``unique_names`` keeps the names valid. Ifs nested in a branch are reached by the same call on the
standalone model (the caller's ``quantize`` recurses). The branches are captured after the enclosing graph is
quantized, so each is calibrated on the inputs it will see; the whole model is then validated by the pipeline.
The standalone model's inputs keep the enclosing graph's dims (symbolic where it has none), so onnxruntime
optimizes it as it will the branch inside the model (``_input``).

What stays float, with one line each (``why``): a branch no calibration feed takes; a branch when there is no
calibration data; a branch one of whose outputs is an outer value (the standalone model would pass an input
through); Loop and Scan bodies (their values depend on the iteration-carried state, which no single outer value
gives: not calibrated this way). Captured feeds are held in memory (the branches' outer values per feed): the
first feeds only, up to CAPTURE_BYTES of them, said in a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.feeds import Batch, DataSource
from graphopt.graph import const_value, describe, export, graph_protos, import_graph, quantized_ops
from graphopt.passes.base import PassContext, PassResult
from graphopt.runtime import make_session

from .report import (BIASES_CORRECTED, CALIBRATION_SAMPLES, COSINE, COSINE_LOW, GPTQ_ROUNDED, TENSORS_FLOAT,
                     TENSORS_QUANTIZED, TOP1, UNITS_FLOAT, UNITS_INT8)
from ..subgraphs import subgraphs, unique_names, walk

NO_DATA = "float: an If branch is calibrated on the outer values it reads, which needs --calib-data"
LOOP_BODY = ("float: inside a Loop/Scan body, whose values depend on the iteration-carried state (not calibrated); "
             "quantize-dynamic and quantize-weights, run before quantize, make these weights int8")
IN_LOOP = "float: an If inside a Loop/Scan body (its outer values are iteration-carried state; not calibrated)"
PASSES_THROUGH = "float: an output of the branch is an outer-scope value (nothing of the branch's own to calibrate)"
ALREADY = "float: the branch is already quantized ({})"

# counts summed over the quantized branches (they partition the feeds), and those whose worst branch is given
ADDITIVE = (CALIBRATION_SAMPLES, UNITS_INT8, UNITS_FLOAT, TENSORS_QUANTIZED, TENSORS_FLOAT, BIASES_CORRECTED,
            GPTQ_ROUNDED)
WORST = (COSINE, COSINE_LOW, TOP1)
Quantizer = Callable[[gs.Graph, PassContext], PassResult]
# The branches' outer values are held for every captured feed: at most this many bytes of them (the first feeds;
# the pass's own calibration streams its data, this does not). 256 feeds of a 2 MiB activation: 512 MiB.
CAPTURE_BYTES = 1 << 30


class Captured(DataSource):
    """Calibration feeds captured in memory (a branch's outer values, one Batch per feed of the enclosing model)."""

    def __init__(self, batches: list[Batch], description: str) -> None:
        self.batches = batches
        self.description = description
        self.warnings: list[str] = []

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


@dataclass
class Branches:
    """What ``quantize_branches`` did: report rows and notes of the quantized branches, and for every subgraph of
    the graph (by id) the status its float row says, or None where the rows above cover it."""

    changed: bool = False
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    why: dict[int, str | None] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, list[float]] = field(default_factory=dict)

    def merge_into(self, res: PassResult, nothing_here: str) -> None:
        """Add what the branches did to the enclosing graph's result: rows, notes, the counts (summed, or the worst
        of a fidelity figure) and the calibration ranges; where the branches had units to quantize, the enclosing graph's own ``nothing_here``
        decline goes."""
        res.layers += self.layers
        res.notes += self.notes
        _add_counts(res.counts, self.counts)
        if self.ranges:
            cal = res.artifacts.setdefault("calibration", {"method": None, "ranges": {}})
            cal["ranges"].update(self.ranges)
        if self.layers:     # the branches had something to quantize, whatever the enclosing graph has
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
    """The outer-scope variables the branch reads (its nodes and its nested subgraphs' nodes), in order of first
    use: those no node of the branch (or of its subgraphs) produces and that are no body input there. Constants
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
    held stay within ``budget`` bytes (CAPTURE_BYTES; at least one feed); and whether every feed was taken."""
    budget = CAPTURE_BYTES if budget is None else budget
    feed_names = {i.name for i in model.graph.input}
    fetch = [n for n in dict.fromkeys(names) if n not in feed_names]
    sess = make_session(model, "model with an If branch's outer values as outputs", extra_outputs=fetch)
    out = []
    held = 0
    for b in calib:
        values = dict(zip(fetch, sess.run(fetch, b.feed))) if fetch else {}
        values.update({n: b.feed[n] for n in names if n in feed_names})
        held += sum(np.asarray(v).nbytes for v in values.values())
        if out and held > budget:
            return out, False
        out.append((b, values))
    return out, True


def taken(cond: gs.Tensor, captured: list[tuple[Batch, dict[str, Any]]]) -> list[bool]:
    """Per captured feed, the If's condition (a constant one is the same for every feed)."""
    c = const_value(cond)
    return [bool(np.asarray(c if c is not None else v[cond.name]).reshape(-1)[0]) for _, v in captured]


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
    """The branch as a model: the outer variables it reads as graph inputs (typed from the captured values), the
    constants it reads as initializers, its outputs as graph outputs (typed as the enclosing graph has them: the
    value_info is dropped); the opsets of ``root``."""
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
    """Make ``branch`` hold the quantized standalone graph's nodes and outputs. Its inputs become the outer
    variables they stand for, and each constant it kept as it was (same name and values) the branch's original
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
    """The branch's layer rows, each named with where the branch sits."""
    return [{**r, "layer": f"{where} / {r.get('layer', '')}"} for r in res.layers]


def quantize_branches(graph: gs.Graph, ctx: PassContext, ops: Sequence[str], quantize: Quantizer) -> Branches:
    """Static int8 in the branches of ``graph``'s If nodes (module docstring) that hold a node of ``ops``;
    ``quantize`` is the pass on one graph (itself reaching the Ifs nested in it). Subgraphs it does not reach get a
    float status in ``why``."""
    out = Branches()
    ifs = [n for n in graph.nodes if n.op == "If" and any(holds(s, ops) for s in subgraphs(n))]
    for n in graph.nodes:       # Loop/Scan bodies, and everything in them
        if n.op != "If":
            for s in subgraphs(n):
                out.why.update({id(g): LOOP_BODY if g is s else IN_LOOP for g in walk(s)})
    if not ifs:
        return out
    if ctx.calib is None:
        out.why.update({id(g): NO_DATA for n in ifs for s in subgraphs(n) for g in walk(s)})
        return out
    frees = {id(s): free_values(s) for n in ifs for s in subgraphs(n)}
    names = [n.inputs[0].name for n in ifs if const_value(n.inputs[0]) is None] + \
        [t.name for f in frees.values() for t in f]
    captured, whole = capture(export(graph, ctx.original), names, ctx.calib)
    if not whole:
        out.notes.append(f"If branches calibrated on the first {sum(b.rows for b, _ in captured)} samples only: the "
                         f"outer values they read are held in memory, at most {CAPTURE_BYTES >> 20} MiB of them")
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
                why = _one(graph, branch, free, feeds, ctx, quantize, where, out)
            out.why.update({id(g): why for g in walk(branch)} if why is not None else {id(branch): None})
    if out.changed:
        unique_names(graph)
    return out


def _one(root: gs.Graph, branch: gs.Graph, free: list[gs.Variable], feeds: list[Batch], ctx: PassContext,
         quantize: Quantizer, where: str, out: Branches) -> str | None:
    """Quantize one branch on its feeds; None when its rows are in ``out``, else why it stays float."""
    if any(id(t) == id(f) for t in branch.outputs for f in free):
        return PASSES_THROUGH
    already = sorted({op for g in walk(branch) for op in quantized_ops(g)})
    if already:
        return ALREADY.format(", ".join(already))
    model = standalone(branch, root, free, feeds[0].feed, ctx.original)
    sub = import_graph(model)
    bctx = PassContext(original=model, calib=Captured(feeds, f"{where}: outer values on {len(feeds)} feed(s)"),
                       calibration_ranges=ctx.calibration_ranges, seed=ctx.seed, targets=ctx.targets)
    res = quantize(sub, bctx)
    out.layers += _rows(where, res)
    if not res.changed:
        out.notes += [f"{where}: {n}" for n in res.notes]
        reasons = [d["reason"] for d in res.declined] or res.notes[:1] or ["nothing to quantize"]
        return None if res.layers else f"float: {reasons[0]}"
    put_back(branch, sub, free)
    out.changed = True
    _add_counts(out.counts, {k: v for k, v in res.counts.items() if k in ADDITIVE or k in WORST})
    out.ranges.update(res.artifacts.get("calibration", {}).get("ranges", {}))
    out.notes += [f"{where}: int8 QDQ, calibrated on its outer values ({', '.join(t.name for t in free)}) captured "
                  f"on {len(feeds)} feed(s)", *(f"{where}: {n}" for n in res.notes)]
    return None
