"""``quantize-dynamic``: int8 weights made offline, activations quantized at run time; no calibration data.

  * MatMul/Gemm with a float32 constant weight (``weightonly.sites``): W ≈ s·q, int8 symmetric per output column
    (``per-channel``; s = max|W[:, n]| / 127, the quantize pass's ``weight_qparams``, 7-bit where this CPU's u8·s8
    kernel saturates), and DynamicQuantizeLinear(x) → MatMulInteger → Cast → Mul(s_x·s) (``weightonly.emit``):
    onnxruntime fuses it into its DynamicQuantizeMatMul kernel; 3.4x faster than float at 64 rows and 2x at 1 row
    on a 384×1536 weight (Zen 4, docs/quantize-dynamic.md);
  * LSTM with constant W and R: com.microsoft.DynamicQuantizeLSTM, W and R int8 per gate row, transposed to the
    kernel's [directions, input, 4·hidden] layout (``quantization.recurrent.dynamic_lstm``, the rewrite ``quantize``
    makes too; 1.7-2.9x faster than float LSTM, measured);
  * Gather of a large float32 embedding table (``weightonly.embedding``): int8 rows with a scale per row;
  * Conv is left float: onnxruntime's ConvInteger measured 10x slower than float Conv here (a note says so); GRU
    has no integer kernel in onnxruntime.
Sites inside If/Loop/Scan bodies (a weight of the body or of an outer scope; ``subgraphs``) are rewritten there.
Lossy: validated by the pipeline's targets on --val-data (or on seeded random inputs, with a warning). Declined:
what ``weightonly.sites`` declines; LSTM with layout=1 or non-constant weights. A second run finds no float weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.options import option, unmatched

from .quantization.cpu import reduce_range_auto
from .quantization.recurrent import dynamic_lstm, lstm_declined
from .subgraphs import graphs, unique_names
from .weightonly.embedding import quantize_embeddings
from .weightonly.emit import dynamic_nodes, dynamic_weight
from .weightonly.sites import SITE_OPS, WeightSite, find_sites, replace

QUANTIZED = "MatMul/Gemm quantized"
LSTMS = "LSTM quantized"
EMBEDDINGS = "embedding tables quantized"
PER_COLUMN = "weights with per-column scales"
CONV_NOTE = ("Conv left float: onnxruntime's ConvInteger measured ~10x slower than float Conv on Zen 4 "
             "(docs/quantize-dynamic.md)")


@register
class QuantizeDynamic(Pass):
    name = "quantize-dynamic"
    summary = "int8 weights, activations quantized at run time (MatMul/Gemm, LSTM); needs no calibration data."
    exact = False
    prerequisites = ("fold-constants",)
    must_not_follow = {"quantize": "quantize already chose, per layer, int8 weights where they meet the targets and "
                                   "(objective=latency) measure faster, LSTMs included (as DynamicQuantizeLSTM); "
                                   "quantize-dynamic after it would make int8 the layers it chose to keep float"}

    @dataclass(frozen=True)
    class Options:
        per_channel: Literal["auto", "true", "false"] = option(
            "auto", "one weight scale per output column; auto: per tensor unless that errs by over 3% of the weight "
                    "(per-column scales cost 0.5-2 us per call, weightonly.emit)")
        reduce_range: Literal["auto", "true", "false"] = option(
            "auto", "7-bit weights; auto: where this CPU's u8s8 kernel saturates (x86 without VNNI; probed)")
        lstm: bool = option(True, "LSTM weights int8 too (com.microsoft.DynamicQuantizeLSTM)")
        embeddings: bool = option(True, "large embedding tables (Gather) int8 with a scale per row")
        exclude: tuple[str, ...] = option((), "node names or op types to keep float (repeat the key)")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        res = PassResult()
        scopes = graphs(graph)    # the model and its If/Loop/Scan bodies: weights used there are quantized there
        nodes = [n for g in scopes for n in g.nodes]
        names = [n.name for n in nodes if n.op in (*SITE_OPS, "LSTM", "Gather")]
        res.notes += unmatched(self.name, "exclude", o.exclude, names, ops={n.op for n in nodes},
                               what="MatMul/Gemm/LSTM/Gather node")
        reduce = reduce_range_auto() if o.reduce_range == "auto" else o.reduce_range == "true"
        for g in scopes:
            self._quantize(g, res, reduce)
        unique_names(graph)
        if any(is_std(n, "Conv") and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant) for n in nodes):
            res.notes.append(CONV_NOTE)
        res.notes.insert(0, f"int8 weights (per-channel={o.per_channel}: {res.counts.get(PER_COLUMN, 0):.0f} with a "
                            "scale per column"
                            f"{', 7-bit' if reduce else ''}), uint8 activations quantized at run time: "
                            f"{res.counts.get(QUANTIZED, 0):.0f} MatMul/Gemm, {res.counts.get(LSTMS, 0):.0f} LSTM, "
                            f"{res.counts.get(EMBEDDINGS, 0):.0f} embedding tables")
        return res

    def _quantize(self, graph: gs.Graph, res: PassResult, reduce: bool) -> None:
        """The sites of one graph (the model or a subgraph): new nodes go into it, activations quantized there."""
        o = self.options
        shared: dict[tuple, list[gs.Tensor]] = {}
        quantized_x: dict[str, list[gs.Variable]] = {}
        for s in find_sites(graph, res, o.exclude):
            res.count(PER_COLUMN, _matmul(graph, s, o.per_channel, reduce, shared, quantized_x))
            res.changed = True
            res.count(QUANTIZED)
        if o.lstm:
            for node in [n for n in graph.nodes if is_std(n, "LSTM")]:
                if node.name in o.exclude or "LSTM" in o.exclude:
                    res.decline(describe(node), "excluded by option")
                    continue
                reason = lstm_declined(node)
                if reason:
                    res.decline(describe(node), reason)
                else:
                    dynamic_lstm(graph, node, o.per_channel != "false", reduce)
                    res.changed = True
                    res.count(LSTMS)
        if o.embeddings:
            res.count(EMBEDDINGS, quantize_embeddings(graph, res, o.exclude))
            res.changed = res.changed or res.counts[EMBEDDINGS] > 0


def _matmul(graph: gs.Graph, s: WeightSite, per_channel: str, reduce: bool, shared: dict[tuple, list[gs.Tensor]],
            quantized_x: dict[str, list[gs.Variable]]) -> bool:
    """One MatMul/Gemm site with int8 weights, whether with a scale per column: the float weight is read here and
    dropped on return, before the next (a big model's weights one at a time)."""
    w = s.weight()
    q, scale = dynamic_weight(w, per_channel, reduce)
    del w
    replace(graph, s, lambda y: dynamic_nodes(graph, s, q, scale, y, shared, quantized_x))
    return scale.ndim > 0

