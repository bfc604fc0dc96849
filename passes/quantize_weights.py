"""``quantize-weights``: weight-only blockwise quantization of MatMul/Gemm weights to 4 or 8 bits; activations stay
float. The weights shrink ~7x at 4 bits (block 32, asymmetric: 4 bits + a float scale and a 4-bit zero point per
32 values), and decode-like runs (few rows) get faster because the kernel reads fewer bytes.

Per site (``weightonly.sites``: a MatMul/Gemm with a float32 constant K×N weight; Gemm's alpha, transB and beta·C
handled), one weight at a time (``weightonly.blockwise`` has the math):
  * method=rtn: round to nearest, per block of ``block-size`` values along K; no data;
  * method=gptq: the same scales, the rounding by GPTQ given H = Σ x xᵀ of the layer's inputs on --calib-data
    (``calibration.gptq``, the int8 quantize pass's rounding, extended to per-block scales and zero points);
  * method=awq: input channels scaled by a^α before rounding (a: the channels' RMS on --calib-data, α searched on
    a grid per input tensor, ``weightonly.awq``), the activations divided by the same scale (one Mul per input);
  * format=nbits: com.microsoft.MatMulNBits with ``accuracy-level`` (default 4: int8 activations inside the
    kernel, measured 2.5x faster than levels 0-2 on Zen 4 — levels 0-2 run slower than float — see
    docs/quantize-weights.md); format=qdq: int4/uint4 (int8/uint8) blockwise DequantizeLinear → MatMul (opset 21;
    a model below opset 21 is declined, and a weight whose K is not a multiple of the block, with the reason);
  * embeddings=true: large embedding Gathers blockwise too, rounded to nearest (``weightonly.embedding``).
Sites inside If/Loop/Scan bodies are rewritten there (gptq/awq need the input observed: one the body computes
is not, and its weights are rounded to nearest, with a note). Declined: sites as ``weightonly.sites`` says; weights
already quantized are no longer float constants, so a second run changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import export
from graphopt.passes.base import Pass, PassContext, PassResult, constant, register
from graphopt.passes.lowrank.sites import unique_name
from graphopt.passes.options import option, unmatched

from .subgraphs import graphs, unique_names
from .weightonly import awq
from .weightonly.blockwise import BlockQuant, output_error, quantize_gptq, quantize_rtn
from .weightonly.embedding import quantize_embeddings_blockwise
from .weightonly.emit import nbits_nodes, qdq_nodes
from .weightonly.observe import input_moments
from .weightonly.sites import SITE_OPS, WeightSite, find_sites, replace

QDQ_OPSET = 21
# Result count keys.
QUANTIZED = "weights quantized"
BYTES_BEFORE = "weight bytes before"
BYTES_AFTER = "weight bytes after"
CALIBRATION_SAMPLES = "calibration samples"
EMBEDDINGS = "embedding tables quantized"


@register
class QuantizeWeights(Pass):
    name = "quantize-weights"
    summary = "Weight-only blockwise 4/8-bit quantization of MatMul/Gemm weights (MatMulNBits or blockwise DQ)."
    exact = False
    prerequisites = ("fold-constants",)
    must_not_follow = {"quantize": "quantize leaves no float MatMul weights; quantize weights first, or one of them",
                       "quantize-dynamic": "quantize-dynamic leaves no float MatMul weights"}

    @dataclass(frozen=True)
    class Options:
        bits: Literal[4, 8] = option(4, "weight bits")
        block_size: Literal[16, 32, 64, 128, 256] = option(32, "weights per scale, along the input dimension K")
        symmetric: bool = option(False, "symmetric blocks (no zero points; int4 [-7, 7]) instead of uint4 with a "
                                        "zero point per block")
        method: Literal["rtn", "gptq", "awq"] = option(
            "rtn", "rounding: rtn (to nearest, no data), gptq (error-compensating, --calib-data), awq (activation-"
            "aware channel scaling, --calib-data)")
        format: Literal["nbits", "qdq"] = option(
            "nbits", "nbits: com.microsoft.MatMulNBits (onnxruntime); qdq: blockwise DequantizeLinear -> MatMul "
                     "(standard ONNX, opset 21)")
        accuracy_level: Literal[0, 1, 2, 3, 4] = option(
            4, "MatMulNBits' compute type: 0/1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest here, measured)")
        exclude: tuple[str, ...] = option((), "node names or op types to keep float (repeat the key)")
        samples: int | None = option(None, "gptq/awq: use at most this many calibration samples", lo=1)
        embeddings: bool = option(True, "large embedding tables (Gather) blockwise too, rounded to nearest "
                                        "(GatherBlockQuantized, or DequantizeLinear -> Gather for format=qdq)")

        def __post_init__(self) -> None:
            if self.format == "qdq" and self.accuracy_level != 4:
                raise ValueError("option 'accuracy-level' is read by format=nbits only")
            if self.samples is not None and self.method == "rtn":
                raise ValueError("option 'samples' is read by method=gptq or awq only (rtn needs no data)")

    def needs_calibration(self) -> bool:
        return self.options.method != "rtn"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        if self.options.format == "qdq" and graph.opset < QDQ_OPSET:
            return (f"format=qdq needs opset {QDQ_OPSET} (int4 and blocked DequantizeLinear); the model is opset "
                    f"{graph.opset}: use format=nbits, or convert the model first")
        return None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        res = PassResult()
        scopes = graphs(graph)     # the model and its If/Loop/Scan bodies (``subgraphs``)
        weighted = [n for g in scopes for n in g.nodes if n.op in (*SITE_OPS, "Gather")]
        res.notes += unmatched(self.name, "exclude", o.exclude, [n.name for n in weighted],
                               ops={n.op for n in weighted}, what="MatMul/Gemm/Gather node")
        sites = [(g, s) for g in scopes for s in find_sites(g, res, o.exclude) if self._block_fits(s, res)]
        top = {id(t) for t in graph.tensors().values()}   # calibration observes the model's own tensors only
        moments: dict[str, Any] = {}
        if sites and o.method != "rtn":
            moments, seen = input_moments(export(graph, ctx.original), [s for _, s in sites if id(s.x) in top],
                                          ctx.require_calib(self.name), o.samples)
            res.counts[CALIBRATION_SAMPLES] = seen
            hidden = sum(1 for _, s in sites if id(s.x) not in top)
            if hidden:
                res.notes.append(f"{hidden} weights inside If/Loop/Scan bodies read an input computed there, which "
                                 "calibration cannot observe (onnxruntime exposes no subgraph value as an output): "
                                 "rounded to nearest")
        groups: dict[tuple[int, str], list[WeightSite]] = {}
        for g, s in sites:
            groups.setdefault((id(g), s.x.name), []).append(s)
        where = {id(g): g for g in scopes}
        shared_in: dict[int, dict[tuple, list[gs.Tensor]]] = {}
        for (gid, name), group in groups.items():
            g, shared = where[gid], shared_in.setdefault(gid, {})
            obs = moments.get(name) if id(group[0].x) in top else None
            # H from fewer input rows than 8 per dimension fits those rows, not other data (calibration.gptq)
            h = obs.h[0] if obs is not None and obs.enough_rows() else None
            if o.method != "rtn" and h is None and obs is not None:
                res.notes.append(f"'{name}': too few calibration rows for its {group[0].k} "
                                 "input channels; rounded to nearest")
            if o.method == "awq" and h is not None:
                self._awq(g, group, h, obs.rows, shared, res)
                continue
            for s in group:
                self._quantize(g, s, h, shared, res)
        if o.embeddings:
            res.count(EMBEDDINGS, quantize_embeddings_blockwise(graph, res, o.bits, o.block_size, o.symmetric,
                                                                o.format, o.exclude))
            res.changed = res.changed or res.counts[EMBEDDINGS] > 0
        unique_names(graph)
        res.notes.insert(0, f"bits={o.bits}, block-size={o.block_size}, {'symmetric' if o.symmetric else 'asymmetric'}"
                            f", method={o.method}, format={o.format}"
                            + (f" (accuracy_level {o.accuracy_level})" if o.format == "nbits" else "")
                            + f": {res.counts.get(QUANTIZED, 0):.0f} weights, "
                            f"{res.counts.get(BYTES_BEFORE, 0) / 1e6:.2f} MB -> {res.counts.get(BYTES_AFTER, 0) / 1e6:.2f} MB")
        return res

    def _block_fits(self, s: WeightSite, res: PassResult) -> bool:
        k = s.k
        if self.options.format == "qdq" and k % self.options.block_size:
            res.decline(s.desc, f"K={k} is not a multiple of block-size {self.options.block_size} (format=qdq has "
                                "no padding; format=nbits pads)")
            return False
        return True

    def _quantize(self, graph: gs.Graph, s: WeightSite, h: np.ndarray | None, shared: dict[tuple, list[gs.Tensor]],
                  res: PassResult) -> None:
        """One weight read, rounded (gptq given ``h``, else to nearest) and emitted; its float array and integers are
        dropped on return, before the next weight is read (a big model's weights one at a time)."""
        o = self.options
        w = s.weight()
        bq = quantize_gptq(w, h, o.bits, o.block_size, o.symmetric) if h is not None and o.method == "gptq" \
            else quantize_rtn(w, o.bits, o.block_size, o.symmetric)
        self._emit(graph, s, w, bq, h, shared, res)

    def _awq(self, graph: gs.Graph, group: list[WeightSite], h: np.ndarray, rows: int,
             shared: dict[tuple, list[gs.Tensor]], res: PassResult) -> None:
        """One AWQ scale for the weights reading one input: the input divided by it (a Mul), the weights scaled."""
        o = self.options
        weights = [s.weight() for s in group]
        alpha, scale, quants, err, rtn_err = awq.search(
            weights, h, rows, lambda w: quantize_rtn(w, o.bits, o.block_size, o.symmetric))
        x = group[0].x
        if alpha > 0:
            scaled = gs.Variable(unique_name(graph, f"{x.name}_awq"), dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", name=unique_name(graph, f"{x.name}_awq_scale"),
                                       inputs=[x, constant(unique_name(graph, f"{x.name}_awq_inverse"),
                                                           (1.0 / scale).astype(np.float32))], outputs=[scaled]))
            for s in group:
                s.x = scaled
        res.notes.append(f"awq '{x.name}' ({len(group)} weights): alpha={alpha:g}, calibration output error "
                         f"{err / rtn_err if rtn_err > 0 else 1.0:.3f}x round-to-nearest's")
        for s, w, bq in zip(group, weights, quants):
            self._emit(graph, s, w, bq, h, shared, res, scale=scale)

    def _emit(self, graph: gs.Graph, s: WeightSite, w: np.ndarray, bq: BlockQuant, h: np.ndarray | None,
              shared: dict[tuple, list[gs.Tensor]], res: PassResult, scale: np.ndarray | None = None) -> None:
        """Replace the site by the quantized weight's nodes; count and report it."""
        o = self.options
        new = s.key not in shared
        replace(graph, s, lambda y: nbits_nodes(graph, s, bq, o.accuracy_level, y, shared) if o.format == "nbits"
                else qdq_nodes(graph, s, bq, y, shared))
        w_hat = bq.dequantize() if scale is None else bq.dequantize() / scale[:, None].astype(np.float32)
        err = float(np.linalg.norm(w_hat - w) / max(float(np.linalg.norm(w)), 1e-30))
        out_err = None if h is None else output_error(w, w_hat, h) / max(output_error(w, np.zeros_like(w), h), 1e-30)
        res.changed = True
        res.count(QUANTIZED)
        if new:
            res.count(BYTES_BEFORE, w.size * 4)
            res.count(BYTES_AFTER, sum(t.values.nbytes for t in shared[s.key] if isinstance(t, gs.Constant))
                      if o.format == "nbits" else bq.q.size * bq.bits / 8 + bq.scale.size * 4 * (2 if bq.dtype.startswith("uint") else 1))
        res.layers.append({"layer": s.node.name or s.desc, "op": s.node.op, "shape": f"{w.shape[0]}x{w.shape[1]}",
                           "weight_error": round(err, 6),
                           "output_error": None if out_err is None else round(float(np.sqrt(out_err)), 6),
                           "status": "quantized"})
