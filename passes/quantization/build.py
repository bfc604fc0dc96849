"""Building the QDQ model for a plan, fixed activation ranges and a set of tensors left float.

Placement: every float input of a unit and its output (a Gemm's or MatMul's only where a planned op reads it) gets a
QuantizeLinear → DequantizeLinear pair, never a fused Conv's output before its activation; an other op (Add, Concat,
pooling, pass-through) is quantized, inputs and output, when one of its data inputs is. Tensors that must share one
scale (a pass-through's input and output, a Concat's inputs and output) are grouped by union-find and take the
union of their ranges. Activation parameters are uint8 (or int8) asymmetric over (lo, hi): s = (hi − lo) / 255,
z = round(−lo / s). Where the tensors left float leave a pair that no integer kernel reads or writes, the pair is
dropped (``drop_idle``): it would add rounding error and two ops for nothing. A unit runs int8 (weights included,
``weights``) when its data inputs are quantized; else its weights stay float too, as onnxruntime would run it.

Switchable builds (for the fallback's search, ``switch``): every quantized tensor and every int8 unit's op sit
in ``If(switch)`` with a boolean graph input per tensor, so that one session evaluates any subset of tensors
quantized (fake quantization in float), a unit with a float input running with float weights as a real build does;
a unit whose input no other op reads quantizes it in its own If, its fused activation included (switch.py).

Every real build with bias sites gets the full mean correction (``refit_biases``) on the feeds ``refit`` gives; the
float side of it and the GPTQ-rounded weights are kept across builds.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt.calibration.bias_correction import BiasSite, PatchMeanObserver, refit_biases
from graphopt.calibration.gptq import HessianObserver
from graphopt.calibration.qparams import qparams

from graphopt.graph import cleanup, export, is_float32
from graphopt.passes.base import constant

from .switch import Source, dequantized, switched, switched_op
from .plan import FLOAT_OUTPUT, SHARED_SCALE, Plan, Unit, int8_data, plan_reads
from .weights import (
    bias_scale,
    fit_bias,
    gptq_weights,
    nearest_weights,
    quantize_bias,
    rounding_correction,
    weight_qparams,
    with_bias_steps,
)

Refit = tuple[onnx.ModelProto, Callable[[], list[dict[str, np.ndarray]]]]


@dataclass(frozen=True)
class Built:
    """One build: the model, the units that run int8, the activation tensors quantized, the tensors dropped as
    idle, the units whose int32 bias the corrections changed, the units whose weights GPTQ rounded, why the full mean
    correction could not run (None: it ran or had nothing to do), and (switchable builds) each quantized tensor's
    boolean input."""

    model: onnx.ModelProto
    int8_units: tuple[str, ...]
    tensors: tuple[str, ...]
    idle: tuple[str, ...]
    corrected: tuple[str, ...]
    gptq_rounded: tuple[str, ...]
    refit_skipped: str | None = None
    switches: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # each op that runs int8 (a unit's name, another op's node name) with the quantized tensors it reads or writes
    links: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # each op of ``links``: the tensors its nodes write in ``model`` (a unit's op and its fused activation)
    produces: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


class _Placement(NamedTuple):
    units: list[tuple[Unit, gs.Node, gs.Node | None]]   # each unit with its op and activation in the copy
    qdq: dict[str, None]                                 # tensors to quantize, in order
    inner: set[str]                                      # conv outputs inside a fused unit: never quantized
    shared: list[tuple[str, str]]                        # tensors that share one scale
    others_io: list[tuple[list[str], str, bool]]         # (data inputs, output, True) of the other ops quantized
    others: list[str]                                    # their node names


class _Edit:
    """One build's working state: the graph copy being edited, the names it uses, its switches and bias sites."""

    def __init__(self, graph: gs.Graph, switchable: bool) -> None:
        self.graph = graph
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        self.switchable = switchable
        self.switches: dict[str, str] = {}
        self.bias_sites: dict[str, BiasSite] = {}     # unit -> its int32 bias, for the full mean correction
        self.sources: dict[str, Source] = {}          # switched tensor -> its float original and Q/DQ steps
        self.corrected: list[str] = []

    def name(self, base: str) -> str:
        """A tensor or node name derived from ``base`` that the graph being built does not use yet."""
        name = base
        for i in itertools.count(1):
            if name not in self.taken:
                break
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def dequantized(self, q: gs.Constant, scale: gs.Constant, zp: gs.Constant, base: str, shape: list[int],
                    attrs: dict[str, int]) -> gs.Variable:
        """A DequantizeLinear of the constant ``q`` appended to the graph; its output."""
        out = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32, shape=shape)
        self.graph.nodes.append(gs.Node("DequantizeLinear", name=self.name(f"{base}_DequantizeLinear"),
                                        inputs=[q, scale, zp], outputs=[out], attrs=attrs))
        return out

    def insert_qdq(self, t: gs.Variable, scale: np.ndarray, zp: np.ndarray) -> None:
        g = self.graph
        s = constant(self.name(f"{t.name}_scale"), np.reshape(scale, ()), np.float32)
        z = constant(self.name(f"{t.name}_zero_point"), np.reshape(zp, ()))
        consumers = list(t.outputs)
        q = gs.Variable(self.name(f"{t.name}_quantized"), dtype=z.values.dtype, shape=t.shape)
        dq = gs.Variable(self.name(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
        g.nodes.append(gs.Node("QuantizeLinear", name=self.name(f"{t.name}_QuantizeLinear"),
                               inputs=[t, s, z], outputs=[q]))
        g.nodes.append(gs.Node("DequantizeLinear", name=self.name(f"{t.name}_DequantizeLinear"),
                               inputs=[q, s, z], outputs=[dq]))
        out = dq
        if self.switchable:
            sw = gs.Variable(self.name(f"graphopt_switch_{len(self.switches)}"), dtype=np.bool_, shape=[])
            g.inputs.append(sw)
            self.switches[t.name] = sw.name
            steps = g.nodes[-2:]
            out = switched(g, self.name, sw, dq, t, steps)
        for c in consumers:
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = out
        if t in g.outputs:
            name = t.name
            t.name = self.name(f"{name}_float")
            out.name = name
            g.outputs = [out if o is t else o for o in g.outputs]
        if self.switchable:
            self.sources[out.name] = (t, steps)


def drop_idle(qdq: dict[str, None], ops_io: list[tuple[list[str], str | None, bool]]) -> list[str]:
    """Drop (in place) the quantized tensors that no integer kernel reads or writes; return them.

    ``ops_io``: (data inputs, output, whether the output must be quantized too). A unit runs int8 when its data
    inputs are quantized (its quantized output is its QLinearConv's output; a Gemm's or MatMul's output, None here,
    is kept only where an integer kernel reads it); another op (QLinearAdd, a pass-through) when its data inputs and
    its output are. Where the fallback leaves a tensor's neighbours float, its QuantizeLinear / DequantizeLinear
    pair would feed float ops: rounding error and two extra ops for nothing (PP-OCRv4 det with every unit float kept
    one such tensor, before a hard-swish, at cosine 0.974 on its evaluation set). One pass suffices: the ops that run
    int8 keep all their tensors, so dropping the others idles none of them."""
    live = [ops_io[i][:2] for i in live_ops(qdq, ops_io)]
    used = {t for ins, _ in live for t in ins} | {out for _, out in live if out is not None}
    idle = [t for t in qdq if t not in used]
    for t in idle:
        qdq.pop(t)
    return idle


def live_ops(qdq: Mapping[str, None], ops_io: list[tuple[list[str], str | None, bool]]) -> list[int]:
    """The indices of the ops in ``ops_io`` (``drop_idle``) that run int8 with the tensors in ``qdq`` quantized."""
    return [i for i, (ins, out, needs_out) in enumerate(ops_io)
            if all(t in qdq for t in ins) and (out in qdq or not needs_out)]


class Builder:
    """Builds QDQ models (``build``) from the float graph, its plan and fixed ranges; keeps across builds the
    GPTQ-rounded weights and the float side of the full mean correction."""

    def __init__(self, graph: gs.Graph, plan: Plan, ranges: dict[str, tuple[float, float]],
                 template: onnx.ModelProto, *, per_channel: bool, reduce_range: bool, activations: str,
                 hessians: dict[str, HessianObserver] | None = None,
                 means: dict[str, PatchMeanObserver] | None = None, refit: Refit | None = None) -> None:
        self.graph = graph.copy()
        self.plan = plan
        self.ranges = ranges
        self.template = template
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.activations = activations
        # unit name -> its input's second moments where they determine GPTQ (rounding=gptq)
        self.hessians = {k: h for k, h in (hessians or {}).items() if h.enough_rows()}
        # unit name -> its mean input patch (bias-correction): those units' biases absorb ΔW·E[x]
        self.means = {k: m for k, m in (means or {}).items() if m.mean() is not None}
        # (float model, its feeds): every build that is not switchable gets the full mean correction on them
        self.refit = refit
        self._reference_means: dict[str, list[np.ndarray]] = {}   # the float side of it, kept across builds
        self._rounded: dict[tuple[str, bytes], np.ndarray] = {}   # GPTQ weights by (unit, scales)

    def build(self, keep_float: set[str] | frozenset[str] = frozenset(), switchable: bool = False,
              refit: bool = True, per_tensor: frozenset[str] = frozenset()) -> Built:
        """The QDQ model with the tensors in ``keep_float`` left float; ``switchable``: see the module docstring;
        ``refit=False``: without the full mean correction (a build only timed: its biases do not change its
        latency); ``per_tensor``: units whose weights get one scale per tensor where the build is per channel."""
        edit = _Edit(self.graph.copy(), switchable)
        tensors = edit.graph.tensors()
        p = self._placement(edit.graph)
        for name in p.inner | set(keep_float):
            p.qdq.pop(name, None)
        params = self._activation_params([t for t in p.qdq if t in self.ranges], p.shared)
        for name in list(p.qdq):
            if name not in params:
                p.qdq.pop(name)
        inputs = [u.data_inputs(node) for u, node, _ in p.units]     # before the QDQ pairs rewire them
        ops_io = [(x, None if node.op in FLOAT_OUTPUT else (act or node).outputs[0].name, False)
                  for x, (u, node, act) in zip(inputs, p.units)] + p.others_io
        idle = drop_idle(p.qdq, ops_io)
        labels = [u.name for u, _, _ in p.units] + p.others
        live = live_ops(p.qdq, ops_io)
        links = tuple((labels[i], tuple(t for t in [*ops_io[i][0], ops_io[i][1]] if t in p.qdq)) for i in live)
        writes = [[node.outputs[0]] + ([act.outputs[0]] if act is not None else []) for _, node, act in p.units] + \
            [[tensors[out]] for _, out, _ in p.others_io]
        for name in p.qdq:
            edit.insert_qdq(tensors[name], *params[name])
        produces = {labels[i]: tuple(t.name for t in writes[i]) for i in live}      # the names as exported
        int8_units = []
        for x_names, (u, node, act) in zip(inputs, p.units):
            if not all(t in p.qdq for t in x_names):
                continue  # an input stays float: the unit cannot run integer, so its weights stay float too
            if u.weight_axis is not None:
                self._weights(edit, node, act, u, params[x_names[0]][0], edit.switches.get(x_names[0]),
                              self.per_channel and u.name not in per_tensor)
            int8_units.append(u.name)
        cleanup(edit.graph).toposort()
        model = export(edit.graph, self.template)
        skipped = None
        if refit and self.refit is not None and not switchable and edit.bias_sites:
            model, skipped = self._refit(model, edit)
        return Built(model, tuple(int8_units), tuple(p.qdq), tuple(idle), tuple(edit.corrected),
                     tuple(u for u in int8_units if u in self.hessians), skipped, MappingProxyType(edit.switches),
                     links, MappingProxyType(produces))

    def _placement(self, g: gs.Graph) -> _Placement:
        """Which tensors of the copy ``g`` a build with nothing left float quantizes (module docstring)."""
        by_out = {n.outputs[0].name: n for n in g.nodes if n.outputs}
        units = [(u, by_out[u.node.outputs[0].name], by_out[u.act.outputs[0].name] if u.act else None)
                 for u in self.plan.units]
        p = _Placement(units, {}, set(), [], [], [])
        read = plan_reads(self.plan)
        for u, node, act in units:
            for t in node.inputs[:2]:
                if not isinstance(t, gs.Constant) and is_float32(t):
                    p.qdq[t.name] = None
            if node.op not in FLOAT_OUTPUT or (act or node).outputs[0].name in read:
                p.qdq[(act or node).outputs[0].name] = None
            if act is not None:
                p.inner.add(node.outputs[0].name)
        # Other ops follow: quantized when a data input is already quantized (in topological order).
        for n in self.plan.others:
            node = by_out.get(n.outputs[0].name)
            data = int8_data(node) if node is not None else []
            # a Mul only where both inputs already are (SiLU's x and Sigmoid(x)): a QuantizeLinear added on a float
            # op's output (x·HardSigmoid(x)) cost PP-OCRv4 rec cosine 0.003 and no speed
            if not data or not (all if node.op == "Mul" else any)(t.name in p.qdq for t in data):
                continue
            for t in data:
                p.qdq[t.name] = None
            out = node.outputs[0]
            p.qdq[out.name] = None
            p.others_io.append(([t.name for t in data], out.name, True))
            p.others.append(node.name or out.name)
            if node.op in SHARED_SCALE or node.op == "Concat":
                p.shared.extend((t.name, out.name) for t in data)
        return p

    def _activation_params(self, names: list[str], shared: list[tuple[str, str]]
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Scale and zero point of each tensor, over the union of the ranges of the tensors it shares a scale with
        (union-find over ``shared``)."""
        parent = {n: n for n in names}

        def find(a: str) -> str:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, b in shared:
            if a in parent and b in parent:
                parent[find(a)] = find(b)
        group_range: dict[str, list[float]] = {}
        for n in names:
            lo, hi = self.ranges[n]
            r = group_range.setdefault(find(n), [math.inf, -math.inf])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return {n: qparams(*group_range[find(n)], self.activations, symmetric=False) for n in names}

    def _weights(self, edit: _Edit, node: gs.Node, act: gs.Node | None, u: Unit, x_scale: np.ndarray,
                 switch: str | None, per_channel: bool) -> None:
        """int8 weights and int32 bias of the unit's op ``node`` in the copy (``weights``), with the bias's
        rounding correction where the unit has a mean input patch, put behind DequantizeLinear (and, in a
        switchable build, ``If(switch)``); records the unit's bias site for the full mean correction."""
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            return
        axis = u.weight_axis
        assert axis is not None
        values = np.asarray(w.values, dtype=np.float32)
        n_out = values.shape[axis]
        w_scale, w_zp, dq_axis = weight_qparams(values, axis, per_channel, self.reduce_range)
        bias = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
        b = np.asarray(bias.values, dtype=np.float64) if bias is not None else None
        if b is not None and b.ndim == 1 and b.shape[0] == n_out:
            w_scale = fit_bias(w_scale, b, x_scale, dq_axis)
        else:
            b = None
        qw = self._rounded_weights(values, axis, u.name, w_scale, n_out, w_zp, dq_axis)
        b_scale = bias_scale(x_scale, w_scale, n_out)
        mean = self.means.get(u.name)
        if mean is not None and (b is not None or len(node.inputs) < 3 or node.inputs[2].is_empty()):
            offset = rounding_correction(values, qw, w_scale, axis, dq_axis, mean.mean(),
                                         int(node.attrs.get("group", 1)))
            if np.any(np.rint(offset / b_scale)):           # else the int32 bias would not change
                edit.corrected.append(u.name)
                if b is None:
                    bias = constant(edit.name(f"{node.name or w.name}_bias"), np.zeros(n_out, np.float32))
                    b = np.zeros(n_out)
                    if len(node.inputs) < 3:
                        node.inputs.append(bias)
                    else:
                        node.inputs[2] = bias
                b = b - offset
        per_axis = dq_axis is not None
        if switch is not None:      # switchable: the op itself in If(switch), on constant weights either way
            fake = {1: constant(edit.name(f"{w.name}_fake_quantized"), dequantized(qw, w_scale, w_zp, dq_axis))}
            if b is not None and bias is not None:
                bq = quantize_bias(b, b_scale)
                fake[2] = constant(edit.name(f"{bias.name}_fake_quantized"),
                                   dequantized(bq, b_scale if per_axis else b_scale[:1], np.zeros(1, np.int32),
                                               0 if per_axis else None))
            x = node.inputs[0]      # its own quantization in the op's If where no other op reads it (switch.py)
            switched_op(edit.graph, edit.name, switch, node, fake, act,
                        edit.sources.get(x.name) if len(x.outputs) == 1 else None)
            return
        wq = constant(edit.name(f"{w.name}_quantized"), qw)
        s = constant(edit.name(f"{w.name}_scale"), w_scale if per_axis else np.reshape(w_scale, ()))
        z = constant(edit.name(f"{w.name}_zero_point"), w_zp if per_axis else np.reshape(w_zp, ()))
        wdq = edit.dequantized(wq, s, z, w.name, list(values.shape), {"axis": dq_axis} if per_axis else {})
        node.inputs[1] = wdq
        if b is None or bias is None:
            return
        bq = constant(edit.name(f"{bias.name}_quantized"), quantize_bias(b, b_scale))
        bs = constant(edit.name(f"{bias.name}_scale"), b_scale if per_axis else np.reshape(b_scale[:1], ()))
        bz = constant(edit.name(f"{bias.name}_zero_point"), np.zeros(n_out if per_axis else (), np.int32))
        bdq = edit.dequantized(bq, bs, bz, bias.name, [n_out], {"axis": 0} if per_axis else {})
        node.inputs[2] = bdq
        edit.bias_sites[u.name] = BiasSite(node.outputs[0].name, u.node.outputs[0].name, bq.name, b_scale)

    def _rounded_weights(self, values: np.ndarray, axis: int, unit: str, w_scale: np.ndarray, n_out: int,
                         w_zp: np.ndarray, dq_axis: int | None) -> np.ndarray:
        """The unit's int8 weights: GPTQ-rounded where it has second moments (kept by (unit, scales) across
        builds), else rounded to nearest."""
        hessian = self.hessians.get(unit)
        if hessian is None:
            return nearest_weights(values, w_scale, w_zp, dq_axis)
        row_scale = np.broadcast_to(w_scale, (n_out,))
        key = (unit, row_scale.tobytes())
        if key not in self._rounded:
            self._rounded[key] = gptq_weights(values, axis, row_scale, hessian, self.reduce_range)
        return self._rounded[key]

    def _refit(self, model: onnx.ModelProto, edit: _Edit) -> tuple[onnx.ModelProto, str | None]:
        """The model with the full mean correction's steps in its int32 biases (units whose bias they change
        added to ``edit.corrected``), and why it could not run (None: it ran)."""
        assert self.refit is not None
        skipped = None
        try:
            steps = refit_biases(model, self.refit[0], list(edit.bias_sites.values()), self.refit[1](),
                                 self._reference_means)
        except Exception as e:      # a model onnxruntime cannot run cut in pieces keeps the weights' offsets
            skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            steps = {}
        model = with_bias_steps(model, steps)
        edit.corrected += [u for u, site in edit.bias_sites.items()
                           if steps.get(site.bias, np.zeros(1)).any() and u not in edit.corrected]
        return model, skipped
