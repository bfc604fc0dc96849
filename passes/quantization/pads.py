"""Folding a zero Pad into the Conv that reads it, before quantizing: exact, and it keeps int8 runs unbroken.

TensorFlow-style "SAME" padding is exported as Pad(constant 0) → Conv(pads=0) (EfficientNet-Lite: 17 of them, one
before the stem and every depthwise conv). onnxruntime's float graph fuses them (its PadFusion); in a QDQ graph
the QuantizeLinear / DequantizeLinear pair between Pad and Conv prevents that fusion, so each Pad runs in float
between a DequantizeLinear and a QuantizeLinear, a boundary in the middle of an int8 run. A Conv with
pads = (b_1..b_k, e_1..e_k) computes on x zero-extended by b_i before and e_i after spatial axis i, which is
what Pad(x, constant 0) → Conv(pads=p) computes with p + the Pad's spatial pads, so

    Conv(Pad(x, [0, 0, b.., 0, 0, e..], 0), pads=p)  =  Conv(x, pads=p + (b.., e..))

exactly, for non-negative pads on the spatial axes only (none on batch and channels) and auto_pad NOTSET.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import cleanup, const_value, is_std


def conv_pads(pad: gs.Node) -> list[int] | None:
    """The spatial pads (begins then ends, as Conv's ``pads``) of a constant-zero Pad on spatial axes only; None if
    the Pad is not one."""
    if pad.attrs.get("mode", "constant") not in ("constant", b"constant") or len(pad.inputs) < 2:
        return None
    if len(pad.inputs) > 3 and not pad.inputs[3].is_empty():
        return None                                     # an axes input: not worth reading
    pads = const_value(pad.inputs[1])
    value = const_value(pad.inputs[2]) if len(pad.inputs) > 2 and not pad.inputs[2].is_empty() else np.zeros(1)
    if pads is None or value is None or np.any(value != 0) or pads.ndim != 1 or len(pads) % 2 or len(pads) < 6:
        return None
    rank = len(pads) // 2
    begins, ends = [int(v) for v in pads[:rank]], [int(v) for v in pads[rank:]]
    if any(begins[:2]) or any(ends[:2]) or min(begins + ends) < 0:
        return None
    return begins[2:] + ends[2:]


def fold_pads(graph: gs.Graph) -> int:
    """Fold every constant-zero Pad whose only readers are Conv nodes (auto_pad NOTSET) into them, in place; the
    number folded. The Pad is left to ``cleanup`` (it has no reader then)."""
    outputs = {t.name for t in graph.outputs}
    folded = 0
    for pad in [n for n in graph.nodes if is_std(n, "Pad")]:
        out = pad.outputs[0]
        spatial = conv_pads(pad)
        readers = list(out.outputs)
        if spatial is None or not readers or out.name in outputs or not all(
                is_std(c, "Conv") and c.inputs[0] is out and c.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
                and len(c.attrs.get("pads", [0] * len(spatial))) == len(spatial) for c in readers):
            continue
        for conv in readers:
            old = list(conv.attrs.get("pads", [0] * len(spatial)))
            conv.attrs["pads"] = [a + b for a, b in zip(old, spatial)]
            conv.inputs[0] = pad.inputs[0]
        folded += 1
    if folded:
        cleanup(graph)
    return folded
