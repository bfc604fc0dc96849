"""``prune-weights``: unstructured (or 2:4) magnitude pruning of Conv/Gemm/MatMul weights, refitted on calibration
data, stored sparse where that makes the file smaller.

Which weights (``sparsity.masks``): the lowest-scoring ``sparsity`` fraction of each qualifying layer
(``scope=layer``) or of all of them together (``scope=global``), or 2 of every 4 input channels (``pattern=2:4``);
scores |w|, or with calibration data |w|·RMS(input) (Wanda). With calibration data the kept weights of every row
are refitted to the layer's outputs on it (exact masked least squares from the inputs' second moments, the
one-shot OBS/SparseGPT reconstruction; ``sparsity.masks.refit``). ``sparsity=auto`` takes the largest of
AUTO_SPARSITIES whose model keeps the pipeline's targets (``autosearch``). Layers (``sparsity.layers``): constant
float32 weights read by one node, at least ``min-size`` of them.

Storage: with ``storage=sparse`` the pipeline writes initializers that are mostly zeros as ``sparse_initializer``
(``graph.to_sparse_initializers``): that pays only above 2/3 sparsity for float32 (onnx.checker requires int64
indices: 12 bytes per kept weight), and onnxruntime densifies them at load. Below that the file stays dense and
shrinks only under a general-purpose compressor (the report's zipped size). onnxruntime's CPU kernels are dense: a
pruned model runs at the dense model's speed (benchmarks/results/sparsity.md). Zeros survive ``quantize``
(symmetric int8 weights round 0 to 0; GPTQ rounding keeps zero weights zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import SPARSE_STORAGE, is_std

from .autosearch import no_targets, search
from .base import Pass, PassContext, PassResult, constant, register
from .options import option, unmatched
from .sparsity.layers import MIN_ROWS_PER_DIM, WEIGHTED, Layer, Moments, find_layers, second_moments
from .sparsity.masks import global_masks, lowest, output_error, refit, scores, two_four_mask

AUTO_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)   # sparsity=auto's candidates, mildest first
MIN_SIZE = 1024

# Result count keys.
LAYERS_PRUNED = "layers pruned"
WEIGHTS_ZEROED = "weights zeroed"
SPARSITY_CHOSEN = "sparsity chosen"


@register
class PruneWeights(Pass):
    name = "prune-weights"
    summary = ("Unstructured or 2:4 magnitude pruning of Conv/Gemm/MatMul weights, refitted on calibration data; "
               "stored sparse where that is smaller.")
    exact = False
    prerequisites = ("fold-constants",)    # exporters (PaddleOCR's) keep weights in Constant nodes
    must_not_follow = {"quantize": "prune the float weights, then quantize (int8 keeps the zeros)",
                       "cluster-weights": "clustered weights are a codebook lookup, no longer constants to prune"}

    @dataclass(frozen=True)
    class Options:
        sparsity: float | Literal["auto"] = option(
            0.5, "fraction of the weights set to zero; auto: the largest of 0.1..0.9 that keeps the pipeline's "
            "targets (needs --calib-data)", lo=0, hi=1, hi_open=True)
        scope: Literal["layer", "global"] = option("layer", "the fraction per layer, or over all layers together")
        pattern: Literal["unstructured", "2:4"] = option(
            "unstructured", "2:4: two of every four input channels (sparsity 0.5)")
        storage: Literal["sparse", "dense"] = option(
            "sparse", "write mostly-zero weights as sparse_initializer where the file gets smaller")
        min_size: int = option(MIN_SIZE, "leave layers with fewer weight parameters alone", lo=0)
        exclude: tuple[str, ...] = option((), "node names or op types to leave alone (repeat the key)")
        samples: int | None = option(None, "use at most this many calibration samples for the refit", lo=1)

        def __post_init__(self) -> None:
            if self.pattern == "2:4" and self.sparsity != 0.5:
                raise ValueError(f"pattern=2:4 prunes exactly half of the weights; drop sparsity={self.sparsity}")
            if self.pattern == "2:4" and self.scope == "global":
                raise ValueError("pattern=2:4 holds in every layer; scope=global does not apply")

    def searches(self) -> bool:
        return self.options.sparsity == "auto"

    def needs_calibration(self) -> bool:
        return self.options.sparsity == "auto"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        weighted = [n for n in graph.nodes if is_std(n, *WEIGHTED)]
        res.notes += unmatched(self.name, "exclude", o.exclude, [n.name for n in weighted],
                               ops={n.op for n in weighted}, what="Conv/Gemm/MatMul node")
        layers = find_layers(graph, o.exclude, o.min_size, res)
        if not layers:
            return res
        sparsity = o.sparsity
        if sparsity == "auto":
            reason = no_targets(ctx, "sparsity")
            if reason:
                res.decline("model", f"{reason}; give a sparsity")
                return res
            cache: dict[int, Moments] = {}

            def build(g: gs.Graph, s: float, c: PassContext) -> None:
                fit_layers = find_layers(g, o.exclude, o.min_size, PassResult())
                if id(c.calib) not in cache:
                    cache[id(c.calib)] = second_moments(g, ctx.original, fit_layers, c.calib, o.samples)
                self.prune(fit_layers, s, cache[id(c.calib)], PassResult())

            found = search(AUTO_SPARSITIES, build, graph, ctx, self.name)
            sparsity = AUTO_SPARSITIES[found.index]
            res.counts[SPARSITY_CHOSEN] = sparsity
            res.notes.append(found.note("sparsity", f"{sparsity:.2f}", ctx.targets))
        moments = Moments({}, set(), 0)
        if ctx.calib is not None and sparsity > 0:
            moments = second_moments(graph, ctx.original, layers, ctx.calib, o.samples)
        self.prune(layers, float(sparsity), moments, res)
        if res.changed and o.storage == "sparse":
            res.artifacts[SPARSE_STORAGE] = True
        return res

    def prune(self, layers: list[Layer], sparsity: float, moments: Moments, res: PassResult) -> None:
        """Zero ``sparsity`` of the layers' weights (refitted where ``moments`` has the layer's H), reporting into
        ``res``."""
        hs = moments.h
        if sparsity <= 0:
            res.notes.append("sparsity 0: nothing to prune")
            return
        rows = [layer.rows() for layer in layers]
        score = [scores(r, hs.get(layer.name)) for layer, r in zip(layers, rows)]
        masks = self._masks(layers, rows, score, sparsity, res)
        for layer, r, mask in zip(layers, rows, masks):
            if mask is None:
                continue
            if not np.any(r[mask]):
                res.notes.append(f"{layer.desc}: already pruned to this pattern; unchanged")
                continue
            h = hs.get(layer.name)
            fitted = h is not None and layer.name in moments.enough
            if h is not None and not fitted:
                res.notes.append(f"{layer.desc}: not refitted, fewer than {MIN_ROWS_PER_DIM} calibration input "
                                 f"vectors per weight of a row (a fit would match those inputs, not others)")
            new = refit(r, mask, h) if fitted else np.where(mask, 0.0, r)
            plain = np.where(mask, 0.0, r)
            layer.node.inputs[1] = constant(layer.weight.name, layer.unrows(new))
            res.changed = True
            res.count(LAYERS_PRUNED)
            res.count(WEIGHTS_ZEROED, int(mask.sum()))
            row: dict[str, Any] = {"layer": layer.name, "op": layer.node.op, "shape": list(layer.values.shape),
                                   "params": int(r.size), "zeros": int(mask.sum()),
                                   "sparsity": round(float(mask.mean()), 4)}
            if h is not None:
                row["refitted"] = fitted
                row["output_error_magnitude"] = round(output_error(r, plain, h), 6)
                row["output_error_refit"] = round(output_error(r, new, h), 6)
            res.layers.append(row)
        how = "refitted on the calibration data" if hs else "no calibration data: magnitude only, not refitted"
        res.notes.insert(0, f"sparsity {sparsity:g} ({self.options.pattern}, scope {self.options.scope}); {how}")

    def _masks(self, layers: list[Layer], rows: list[np.ndarray], score: list[np.ndarray], sparsity: float,
               res: PassResult) -> list[np.ndarray | None]:
        """One mask per layer (True: pruned), None for a layer the pattern does not fit (declined)."""
        o = self.options
        if o.pattern == "2:4":
            out: list[np.ndarray | None] = []
            for layer, s in zip(layers, score):
                channels, taps = layer.input_channel_axis()
                if channels % 4:
                    res.decline(layer.desc, f"{channels} input channels per group, not a multiple of 4 (2:4)")
                    out.append(None)
                else:
                    out.append(two_four_mask(s, taps))
            return out
        if o.scope == "global":
            return list(global_masks(score, sparsity))
        return [lowest(s, round(sparsity * s.size)) for s in score]
