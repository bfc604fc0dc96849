"""``cluster-weights``: weight sharing. Each qualifying layer's weights become k = 2^bits shared values (per-layer
k-means, ``sparsity.kmeans``), stored as a uint8 index tensor of the weight's shape and a float32 codebook [k]:
``weight = Gather(codebook, Cast(indices, int32))`` (Gather takes int32/int64 indices only, so the uint8 indices are
cast first). onnxruntime folds the Cast and the Gather at session start, so the model runs at float speed with the
dense weight in memory, while the file holds 1 byte per weight instead of 4. uint4 indices (two per byte) need
opset 21 for the Cast; the models this pass is meant for are older, so indices are uint8 at every ``bits`` and
bits < 8 shrinks only the zipped file (fewer distinct symbols). fold-constants leaves the lookup alone (it does not
fold a result decoded from narrow integers into something larger).

Data-aware (``data-aware=true``, needs calibration data): the k-means is weighted per input by the mean squared
input it multiplies (the diagonal of the layers' input second moments, ``sparsity.layers.second_moments``), so
L = Σ E[x_j²](w_oj − c)² is the diagonal part of the output error E‖ΔW x‖² — the statistic GPTQ weighs rounding
with. Layers (``sparsity.layers``): constant float32 weights read by one node; declined below ``min-size`` weights
or where the indices and codebook would not halve the weight's bytes (n + 4k > 2n: n < 4k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std

from .base import Pass, PassContext, PassResult, constant, register
from .options import option, unmatched
from .sparsity.kmeans import kmeans
from .sparsity.layers import WEIGHTED, Layer, Moments, find_layers, second_moments

MIN_SIZE = 1024

# Result count keys.
LAYERS_CLUSTERED = "layers clustered"
WEIGHT_BYTES_SAVED = "weight bytes saved"


def clustered(node: gs.Node) -> bool:
    """Whether ``node``'s weight is already a codebook lookup (Gather of a constant codebook by cast indices)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    producer = w.inputs[0] if w is not None and w.inputs else None
    return producer is not None and is_std(producer, "Gather") and isinstance(producer.inputs[0], gs.Constant)


@register
class ClusterWeights(Pass):
    name = "cluster-weights"
    summary = ("Weight sharing: per-layer k-means of Conv/Gemm/MatMul weights to 2^bits values, stored as uint8 "
               "indices + codebook (4x smaller file, float speed); optionally data-aware.")
    exact = False
    prerequisites = ("fold-constants",)    # exporters (PaddleOCR's) keep weights in Constant nodes
    must_not_follow = {"quantize": "quantized weights are int8 already; cluster the float model (or quantize)"}

    @dataclass(frozen=True)
    class Options:
        bits: int = option(8, "codebook of 2^bits values per layer", lo=2, hi=8)
        data_aware: bool = option(False, "weight the k-means by each input's mean square on --calib-data")
        min_size: int = option(MIN_SIZE, "leave layers with fewer weight parameters alone", lo=0)
        exclude: tuple[str, ...] = option((), "node names or op types to leave alone (repeat the key)")
        samples: int | None = option(None, "data-aware: use at most this many calibration samples", lo=1)

        def __post_init__(self) -> None:
            if self.samples is not None and not self.data_aware:
                raise ValueError("option 'samples' is read by data-aware=true only")

    def needs_calibration(self) -> bool:
        return self.options.data_aware

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        k = 2 ** o.bits
        weighted = [n for n in graph.nodes if is_std(n, *WEIGHTED)]
        res.notes += unmatched(self.name, "exclude", o.exclude, [n.name for n in weighted],
                               ops={n.op for n in weighted}, what="Conv/Gemm/MatMul node")
        for n in weighted:
            if clustered(n):
                res.decline(describe(n), "already clustered (a codebook Gather)")
        layers = [layer for layer in find_layers(graph, o.exclude, max(o.min_size, 1), _Quiet(res, weighted))
                  if self._pays(layer, k, res)]
        moments = Moments({}, set(), 0)
        if o.data_aware and layers:
            moments = second_moments(graph, ctx.original, layers, ctx.require_calib(self.name), o.samples)
        rng = np.random.default_rng(ctx.seed)
        for layer in layers:
            self._cluster(graph, layer, k, moments.h.get(layer.name), rng, res)
        res.notes.insert(0, f"bits={o.bits} (k={k}), uint8 indices; "
                         + ("data-aware (k-means weighted by E[x^2] of each input)" if o.data_aware else "plain"))
        return res

    def _pays(self, layer: Layer, k: int, res: PassResult) -> bool:
        n = layer.values.size
        if n < 4 * k:
            res.decline(layer.desc, f"{n} weights: indices + a {k}-value codebook would not halve its bytes "
                                    f"(needs at least {4 * k})")
            return False
        return True

    def _cluster(self, graph: gs.Graph, layer: Layer, k: int, h: np.ndarray | None, rng: np.random.Generator,
                 res: PassResult) -> None:
        """Replace the layer's weight by Gather(codebook, Cast(indices))."""
        rows = layer.rows()
        importance = None if h is None else np.diagonal(h, axis1=1, axis2=2)[:, None, :]    # [G, 1, D]
        if self.options.data_aware and h is None:
            res.notes.append(f"{layer.desc}: no input statistics (patches not cut); plain k-means")
        codebook, idx_rows, history = kmeans(rows, importance, k, rng)
        indices = layer.unrows(idx_rows.astype(np.float64)).astype(np.uint8)
        name = layer.weight.name
        cast_out = gs.Variable(f"{name}_cluster_idx32", dtype=np.int32, shape=list(indices.shape))
        weight = gs.Variable(f"{name}_clustered", dtype=np.float32, shape=list(indices.shape))
        graph.nodes.append(gs.Node("Cast", f"{name}_cluster_cast", {"to": onnx.TensorProto.INT32},
                                   [constant(f"{name}_cluster_idx", indices)], [cast_out]))
        graph.nodes.append(gs.Node("Gather", f"{name}_cluster_lookup", {"axis": 0},
                                   [constant(f"{name}_codebook", codebook, np.float32), cast_out], [weight]))
        layer.node.inputs[1] = weight
        approx = codebook[idx_rows]
        err = float(np.linalg.norm(approx - rows) / max(np.linalg.norm(rows), 1e-30))
        saved = layer.values.nbytes - indices.nbytes - 4 * codebook.size
        res.changed = True
        res.count(LAYERS_CLUSTERED)
        res.count(WEIGHT_BYTES_SAVED, saved)
        res.layers.append({"layer": layer.name, "op": layer.node.op, "shape": list(indices.shape),
                           "values": int(codebook.size), "weight_error": round(err, 6),
                           "kmeans_iterations": len(history) - 1, "bytes_saved": int(saved)})


class _Quiet(PassResult):
    """A result for ``find_layers`` that forwards its declines to ``res``, except for the clustered layers' (their
    reason is given once, as 'already clustered')."""

    def __init__(self, res: PassResult, weighted: list[gs.Node]) -> None:
        super().__init__()
        self.res = res
        self.skip = {describe(n) for n in weighted if clustered(n)}

    def decline(self, site: str, reason: str) -> None:
        if site not in self.skip:
            self.res.decline(site, reason)
