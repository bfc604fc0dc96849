"""``fuse-conv-relu``: a Conv followed by an activation becomes onnxruntime's ``com.microsoft.FusedConv``.

FusedConv (onnxruntime contrib op, CPU kernel float32 only) is a Conv with the same inputs and attributes plus
``activation`` (string) and, for the activations that take them, ``activation_params`` (floats), applied by MLAS in
the convolution's output loop (onnxruntime/contrib_ops/cpu/fused_activation.cc):

  =============  ============================  ===============================================
  activation     activation_params             from
  =============  ============================  ===============================================
  Relu           -                             Relu
  Sigmoid        -                             Sigmoid
  Tanh           -                             Tanh
  LeakyRelu      [alpha]                       LeakyRelu (alpha default 0.01)
  HardSigmoid    [alpha, beta]                 HardSigmoid (defaults 0.2, 0.5)
  Clip           [min, max]                    Clip: opset >= 11 constant ``min``/``max`` inputs, opset < 11
                                               ``min``/``max`` attributes; a missing bound is float32
                                               lowest / max, as in onnxruntime's Clip (ReLU6 is Clip(0, 6))
  =============  ============================  ===============================================

The activation's output tensor keeps its name; the Conv's output tensor disappears. Opt-in (not in the default
pipeline): the result needs onnxruntime. Declined, with the reason: the Conv's output has other consumers or is a
graph output; a Clip bound that is not a constant (or min > max); a Conv that is not float32 (no FusedConv kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import MS_DOMAIN, const_value, describe, is_std

from .base import Pass, PassContext, PassResult, register

ACTIVATIONS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip")

# Result count key: one per activation, e.g. "Conv+Relu fused".
FUSED = "Conv+{act} fused"


def fused_key(act: str) -> str:
    """The result count key of Convs fused with an ``act`` activation."""
    return FUSED.format(act=act)


class _Decline(Exception):
    """A site that does not qualify; the message is the reason."""


def activation_params(act: gs.Node) -> list[float]:
    """FusedConv's ``activation_params`` for an activation node, in onnxruntime's order."""
    a = act.attrs
    if act.op == "LeakyRelu":
        return [float(a.get("alpha", 0.01))]
    if act.op == "HardSigmoid":
        return [float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))]
    if act.op == "Clip":
        lo, hi = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)  # as onnxruntime's Clip
        bounds = [float(a.get("min", lo)), float(a.get("max", hi))]        # opset < 11: attributes
        for i, t in enumerate(act.inputs[1:3]):                             # opset >= 11: optional inputs
            if t.is_empty():
                continue
            if not isinstance(t, gs.Constant):
                raise _Decline(f"Clip {('min', 'max')[i]} '{t.name}' is not a constant")
            v = np.asarray(t.values)
            if v.size != 1:
                raise _Decline(f"Clip {('min', 'max')[i]} '{t.name}' is not a scalar")
            bounds[i] = float(v.reshape(()))
        if not bounds[0] <= bounds[1]:
            raise _Decline(f"Clip min {bounds[0]} > max {bounds[1]}")
        return bounds
    return []


def _dtype(t: gs.Tensor) -> str | None:
    """The tensor's dtype name, None when unknown. Not graph.is_float32: the decline names the dtype, and a dtype
    numpy does not know (gs keeps bfloat16 as its onnx type number) must give a name, not a TypeError."""
    value = const_value(t)
    if value is not None:
        return str(value.dtype)
    if t.dtype is None:
        return None
    try:
        return str(np.dtype(t.dtype))
    except TypeError:
        return str(t.dtype)


@register
class FuseConvActivation(Pass):
    name = "fuse-conv-relu"
    summary = ("Conv + Relu/Clip/LeakyRelu/HardSigmoid/Sigmoid/Tanh -> onnxruntime com.microsoft.FusedConv "
               "(exact; the output needs onnxruntime).")
    must_not_follow = {"quantize": "onnxruntime's int8 fusions need DequantizeLinear -> Conv -> QuantizeLinear; a "
                                   "FusedConv between them keeps the convolution in float"}

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        outputs = {t.name for t in graph.outputs}
        for act in list(graph.nodes):
            if not is_std(act, *ACTIVATIONS) or not act.inputs or not act.outputs:
                continue
            y = act.inputs[0]
            conv = y.inputs[0] if len(y.inputs) == 1 else None
            if conv is None or not is_std(conv, "Conv"):
                continue
            site = f"{describe(conv)} + {describe(act)}"
            try:
                if y.name in outputs:
                    raise _Decline(f"the Conv output '{y.name}' is a graph output")
                if len(y.outputs) != 1:
                    raise _Decline(f"the Conv output '{y.name}' has {len(y.outputs)} consumers")
                dtypes = {d for d in (_dtype(y), _dtype(conv.inputs[1]) if len(conv.inputs) > 1 else None) if d}
                if dtypes != {"float32"}:
                    found = ", ".join(sorted(map(str, dtypes))) or "unknown"
                    raise _Decline(f"onnxruntime's FusedConv is float32 only; this Conv is {found}")
                params = activation_params(act)
            except _Decline as e:
                res.decline(site, str(e))
                continue
            attrs = dict(conv.attrs)
            attrs["activation"] = act.op
            if params:
                attrs["activation_params"] = params
            inputs = list(conv.inputs)
            while inputs and inputs[-1].is_empty():
                inputs.pop()
            out = act.outputs[0]
            for n in (conv, act):
                n.inputs.clear()
                n.outputs.clear()
            graph.nodes[:] = [n for n in graph.nodes if n is not conv and n is not act]
            graph.nodes.append(gs.Node("FusedConv", name=conv.name, domain=MS_DOMAIN, attrs=attrs,
                                       inputs=inputs, outputs=[out]))
            res.changed = True
            res.count(fused_key(act.op))
            res.layers.append({"conv": describe(conv), "activation": act.op, "params": params})
        return res
