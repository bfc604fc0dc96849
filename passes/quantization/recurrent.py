"""Recurrent layers with int8 weights: LSTM as com.microsoft.DynamicQuantizeLSTM, the rewrite quantize-dynamic
makes (``dynamic_lstm``), and ``quantize``'s choice of which LSTMs to rewrite (``quantize_recurrent``).

The rewrite: W [D, 4H, I] and R [D, 4H, H] become int8 q with a float scale s per gate row (per tensor with
``per_channel`` off), W ≈ s·q, s = max|row| / 127 (``weights.weight_qparams``; 7-bit where this CPU's u8·s8 kernel
saturates), transposed to the kernel's [D, I, 4H] layout; onnxruntime quantizes X and h_{t-1} to uint8 at each
step at run time (s_x = (max − min) / 255) and sums q_x·q in int32, so no activation range is calibrated: an LSTM
in an If/Loop/Scan body (where int8 QDQ has no ranges) qualifies as one at the top level. GRU and RNN stay float:
onnxruntime has no integer kernel for them.

The choice, after quantize's QDQ stage, on its result (``base``), each LSTM site in walk order (the model, then its
subgraphs depth first):
  * fidelity: LSTMs made int8 one at a time on top of those already taken, each kept where the model (QDQ layers
    and all int8 LSTMs so far) still meets the pass's targets against float on the calibration samples, with the
    fallback's one-sided margins (``judge.Judge.meets``). An LSTM whose int8 weights leave every output bit-identical
    is not run by the calibration samples (an If branch they do not take): neither its error nor its speed is
    measured, which the report says;
  * objective=latency: ``base`` and ``base`` with each kept LSTM int8 alone timed interleaved (``latency
    .time_models``: medians, notches, the sequential stop; float is the anchor), an LSTM kept int8 where its model
    pays over ``base`` (``latency.Timing.pays``: faster by MIN_GAIN, 3%; gains taken as adding up: a
    DynamicQuantizeLSTM takes and gives float tensors, so no quantize/dequantize boundary couples two of them). An
    LSTM the samples do not run follows one made int8 whose W or R it reads (``_follow``: float, it would keep those
    weights stored beside their int8 copy). The set written is a subset of the set judged, plus those followers;
    int8 error only adds, and validation checks the model again on held-out data. objective=size: every LSTM that
    meets the targets.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graph import MS_DOMAIN, cleanup, describe, export, import_graph, is_float32, is_std
from graphopt.passes.base import PassContext, PassResult, constant
from graphopt.passes.lowrank.sites import unique_name
from graphopt.validate import Thresholds

from ..judge import Judge, Quality, judge_samples
from ..subgraphs import graphs, owners, unique_names
from .cpu import reduce_range_auto
from .latency import MIN_GAIN, Timing, rewarm_runs, time_models, timing_feed
from .weights import nearest_weights, weight_qparams

RECURRENT = ("LSTM", "GRU", "RNN")
NO_KERNEL = "onnxruntime has no integer {op} kernel (its only int8 recurrent kernel is DynamicQuantizeLSTM)"
LSTM_INT8 = "LSTM int8 (DynamicQuantizeLSTM)"
RECURRENT_FLOAT = "recurrent layers float"
UNRUN = "not run by the calibration samples (an If/Loop branch they do not take)"
TIMING_BUDGET_S = 2.0       # seconds of runs for the with/without comparison
TIMING_RUNS = 1000          # rounds at most (the budget binds first on all but tiny models): one LSTM step is a small
                            # part of a model, its gain a few % (Silero VAD: ~3 µs of ~110), so the notches must be narrow


class Site(NamedTuple):
    """A recurrent node, the graph (model or subgraph) holding it and where that sits ("" at the top level)."""

    where: str
    graph: gs.Graph
    node: gs.Node

    def label(self) -> str:
        return describe(self.node) + (f" (in {self.where})" if self.where else "")


def recurrent_sites(root: gs.Graph) -> list[Site]:
    """Every LSTM/GRU/RNN of the model and its subgraphs, in walk order (the same for any import of one model)."""
    places = {id(g): w for w, g in owners(root)}
    return [Site(places.get(id(g), ""), g, n) for g in graphs(root) for n in g.nodes if is_std(n, *RECURRENT)]


def lstm_declined(node: gs.Node) -> str | None:
    """Why an LSTM cannot become DynamicQuantizeLSTM, or None."""
    if node.attrs.get("layout", 0):
        return "layout=1 (batch first): DynamicQuantizeLSTM takes sequence-first inputs"
    w, r = node.inputs[1], node.inputs[2]
    if not all(isinstance(t, gs.Constant) and is_float32(t) for t in (w, r)):
        return "W or R is not a float32 constant"
    return None     # W/R read by other nodes too: this LSTM gets int8 copies (equal copies are stored once, scopes)


def dynamic_lstm(graph: gs.Graph, node: gs.Node, per_channel: bool, reduce: bool) -> None:
    """Rewrite one LSTM (``lstm_declined`` gave None) as DynamicQuantizeLSTM in ``graph``; the LSTM is left with no
    inputs or outputs, for cleanup."""
    ins = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
    new = []
    for t in (ins[1], ins[2]):
        v = np.asarray(t.values, np.float32)                      # [D, 4H, I]
        d, g, i = v.shape
        flat = v.reshape(d * g, i)
        scale, zp, axis = weight_qparams(flat, 0, per_channel, reduce)
        q = nearest_weights(flat, scale, zp, axis).reshape(d, g, i).transpose(0, 2, 1)
        shape = (d, g) if per_channel else (d,)
        s = np.broadcast_to(scale.reshape(-1) if per_channel else scale, (d * g,) if per_channel else (d,))
        new += [constant(unique_name(graph, f"{t.name}_int8"), q),
                (constant(unique_name(graph, f"{t.name}_scale"), np.asarray(s, np.float32).reshape(shape))),
                constant(unique_name(graph, f"{t.name}_zero_point"), np.zeros(shape, np.int8))]
        del v, flat, q          # W's float values gone before R's are read
    outs = list(node.outputs)
    inputs = [ins[0], new[0], new[3], *ins[3:8], new[1], new[2], new[4], new[5]]
    graph.nodes.append(gs.Node("DynamicQuantizeLSTM", name=unique_name(graph, f"{node.name or 'lstm'}_dynamic"),
                               domain=MS_DOMAIN, attrs=dict(node.attrs), inputs=inputs, outputs=outs))
    node.outputs.clear()
    node.inputs.clear()


class Decision(NamedTuple):
    """One recurrent site: int8 or not, and why (for the report)."""

    site: str
    op: str
    int8: bool
    why: str


def quantize_recurrent(graph: gs.Graph, float_model: onnx.ModelProto, ctx: PassContext, o: Any,
                       targets: Thresholds, res: PassResult) -> None:
    """Rewrite the LSTMs of ``graph`` (quantize's result) that meet ``targets`` against ``float_model`` (the pass's
    input) and, with objective=latency, measure faster (module docstring); their rows, notes and counts go to
    ``res`` (quantize's result)."""
    sites = recurrent_sites(graph)
    per_channel = o.per_channel != "false"
    reduce = reduce_range_auto() if o.reduce_range == "auto" else o.reduce_range == "true"
    decisions: dict[int, Decision] = {}
    open_ = []
    for i, s in enumerate(sites):
        excluded = s.node.name in o.exclude or s.node.op in o.exclude
        why = NO_KERNEL.format(op=s.node.op) if s.node.op != "LSTM" else \
            "excluded by option" if excluded else lstm_declined(s.node)
        if why:
            decisions[i] = Decision(s.label(), s.node.op, False, why)
        else:
            open_.append(i)
    if open_:
        base = export(graph, ctx.original)
        build = lambda chosen: _with_int8(base, ctx.original, chosen, per_channel, reduce)   # noqa: E731
        decisions |= _follow(_decide(open_, sites, base, build, float_model, ctx, o, targets), sites)
    for i in sorted(decisions):
        if decisions[i].int8:
            dynamic_lstm(sites[i].graph, sites[i].node, per_channel, reduce)
    unique_names(graph)
    _report(res, [decisions[i] for i in sorted(decisions)], per_channel)


def _follow(decided: dict[int, Decision], sites: list[Site]) -> dict[int, Decision]:
    """An LSTM the samples never run (left float: no gain to measure) that reads the W or R of one made int8 goes
    int8 with it: float, it would keep those weights stored beside the int8 copy (Silero VAD without --fix-input:
    2.29 MB against 2.22 for the input), and no sample can tell the two apart."""
    int8 = {i: d for i, d in decided.items() if d.int8}
    out = dict(decided)
    for i, d in decided.items():
        if d.int8 or not d.why.startswith(UNRUN):
            continue
        mine = {id(t) for t in sites[i].node.inputs[1:3]}
        lead = next((j for j in int8 if mine & {id(t) for t in sites[j].node.inputs[1:3]}), None)
        if lead is not None:
            out[i] = Decision(d.site, d.op, True, f"{UNRUN}; int8 as {sites[lead].label()}, whose weights it reads "
                                                  "(float, it would keep them stored beside their int8 copy)")
    return out


def _with_int8(model: onnx.ModelProto, original: onnx.ModelProto, chosen: set[int], per_channel: bool,
               reduce: bool) -> onnx.ModelProto:
    """``model`` with the recurrent sites numbered ``chosen`` (``recurrent_sites`` order) as DynamicQuantizeLSTM."""
    graph = import_graph(model)
    sites = recurrent_sites(graph)
    for i in sorted(chosen):
        dynamic_lstm(sites[i].graph, sites[i].node, per_channel, reduce)
    unique_names(graph)
    return export(cleanup(graph).toposort(), original)


def _decide(open_: list[int], sites: list[Site], base: onnx.ModelProto,
            build: Callable[[set[int]], onnx.ModelProto], float_model: onnx.ModelProto, ctx: PassContext, o: Any,
            targets: Thresholds) -> dict[int, Decision]:
    """The LSTMs that qualify: fidelity, then (objective=latency) speed, each with its reason."""
    out: dict[int, Decision] = {}
    if ctx.calib is None:
        note = "; not timed: no calibration sample (as objective=size)" if o.objective == "latency" else ""
        return {i: Decision(sites[i].label(), "LSTM", True, f"targets not checked: no calibration sample{note}")
                for i in open_}
    judge = Judge(float_model, ctx.original, judge_samples(ctx.calib), targets)
    kept, unrun, said = _fidelity(judge, open_, base, build)
    for i in open_:
        if i not in kept:
            out[i] = Decision(sites[i].label(), "LSTM", False, said[i])
    if o.objective == "size":
        out |= {i: Decision(sites[i].label(), "LSTM", True, said[i] + (f"; {UNRUN}" if i in unrun else ""))
                for i in kept}
        return out
    out |= {i: Decision(sites[i].label(), "LSTM", False, f"{UNRUN}: no gain to measure") for i in unrun}
    timed = [i for i in kept if i not in unrun]
    if timed:
        feed = timing_feed(ctx.calib)
        t = time_models([base, *(build({i}) for i in timed)], feed, TIMING_BUDGET_S, TIMING_RUNS,
                        rewarm_runs(float_model, feed), [(0, k) for k in range(1, len(timed) + 1)], 0)
        for i, ti in zip(timed, t[1:]):
            fast = ti.pays(t[0])
            out[i] = Decision(sites[i].label(), "LSTM", fast, f"{said[i]}; {_speed(ti, t[0], fast)}")
    return out


def _fidelity(judge: Judge, open_: list[int], base: onnx.ModelProto, build: Callable[[set[int]], onnx.ModelProto]
              ) -> tuple[list[int], set[int], dict[int, str]]:
    """Each LSTM made int8 on top of those kept so far, kept where the targets hold: those kept, those whose int8
    weights change no output bit on the samples (not run by them), and what the judge said of each."""
    previous = judge.quality(base)
    kept: list[int] = []
    unrun: set[int] = set()
    said: dict[int, str] = {}
    for i in open_:
        q = judge.quality(build({*kept, i}))
        if q == previous:
            unrun.add(i)
        if not judge.meets(q):
            said[i] = f"fidelity: int8 misses the targets ({_quality(q, judge)})"
            continue
        said[i] = f"targets hold ({_quality(q, judge)})"
        kept.append(i)
        previous = q
    return kept, unrun, said


def _quality(q: Quality, judge: Judge) -> str:
    """The judged figures against the targets checked."""
    out = f"cosine {q.cosine:.5f}, 95% lower bound {q.cosine_low:.5f} vs min-cosine {judge.min_cosine}"
    if q.top1 < 1.0 or judge.min_top1 > 0 and judge.checked:
        out += f"; top-1 {q.top1:.3f} vs min-top1 {judge.min_top1} with the margin"
    return out


def _speed(with_: Timing, without: Timing, fast: bool) -> str:
    """The timing line: with this LSTM int8 against without, and the verdict."""
    line = (f"{with_.median * 1e3:.1f} µs int8 vs {without.median * 1e3:.1f} µs float "
            f"(±{(with_.notch + without.notch) * 1e3:.1f} µs; median per run, 1 thread)")
    return (f"measured faster: {line}" if fast else
            f"speed: not measured {100 * MIN_GAIN:.0f}% faster (latency.MIN_GAIN), {line}")


def _report(res: PassResult, decisions: list[Decision], per_channel: bool) -> None:
    """Rows (one per recurrent layer), a note each and the counts."""
    res.changed = res.changed or any(d.int8 for d in decisions)
    for d in decisions:
        status = "int8" if d.int8 else "float"
        res.layers.append({"layer": d.site, "op": d.op, "weights": ("per-channel" if per_channel else "per-tensor")
                           if d.int8 else "float", "status": status if d.int8 else f"float: {d.why}"})
        res.notes.append(f"{d.site}: {status}" + (" (DynamicQuantizeLSTM)" if d.int8 else "") + f": {d.why}")
        res.count(LSTM_INT8 if d.int8 else RECURRENT_FLOAT)
