"""The layers whose constant weights prune-weights and cluster-weights rewrite, their weights as rows, and the
second moments of their inputs.

A qualifying layer is a Conv, Gemm or MatMul whose weight (input 1) is a float32 initializer read by that node alone
and is not a graph output; a MatMul's weight must be 2-D. Its weight seen as rows ``[G, O/G, D]``: one row per output
channel, G groups (Conv ``group``; 1 otherwise), D inputs per row in the order the layer reads them (Conv: the
``C/G × kh × kw`` patch, channel-major; Gemm/MatMul: K). ``rows``/``unrows`` convert both ways.

Second moments: H = Σ x xᵀ [G, D, D] of each layer's input vectors over the calibration data
(``calibration.gptq.HessianObserver``; Conv patches cut as the Conv reads them, ``conv_geometry``), one streamed run
over the current model for all layers; layers reading one tensor the same way share one observer. As for GPTQ, a
fit to these inputs holds on other data only with at least MIN_ROWS_PER_DIM (8) input vectors per dimension
(``enough``): with fewer (a classifier's Gemm seen on 128 images) it fits the calibration inputs, not the task. A Conv whose
patches cannot be cut (rank other than 1-D/2-D, SAME padding on an unknown size) has no H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.collector import collect
from graphopt.calibration.gptq import MAX_SAMPLES, MIN_ROWS_PER_DIM, Fanout, HessianObserver
from graphopt.calibration.readers import DataSource
from graphopt.graph import describe, export, is_std, node_name

from ..base import PassResult
from ..quantization.calibrate import conv_geometry, with_inputs_observed

__all__ = ["MIN_ROWS_PER_DIM", "Layer", "Moments", "find_layers", "second_moments"]

WEIGHTED = ("Conv", "Gemm", "MatMul")


class Moments(NamedTuple):
    """Second moments of the layers' inputs (``second_moments``)."""

    h: dict[str, np.ndarray]      # mean second moment by layer name
    enough: set[str]              # layers seen on at least MIN_ROWS_PER_DIM input vectors per dimension
    samples: int


@dataclass
class Layer:
    """One qualifying layer: its node, its weight constant, and how the weight maps to rows."""

    node: gs.Node
    weight: gs.Constant

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def desc(self) -> str:
        return describe(self.node)

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self.weight.values)

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.node.op == "Conv" else 1

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is [K, O] (MatMul, Gemm without transB): rows are its columns."""
        return self.node.op == "MatMul" or (self.node.op == "Gemm" and not self.node.attrs.get("transB", 0))

    def rows(self, w: np.ndarray | None = None) -> np.ndarray:
        """The weight (or ``w`` of its shape) as rows [G, O/G, D] (a copy, float64)."""
        w = self.values if w is None else w
        flat = w.T if self.transposed else w.reshape(w.shape[0], -1)
        return np.array(flat, np.float64).reshape(self.groups, flat.shape[0] // self.groups, -1)

    def unrows(self, r: np.ndarray) -> np.ndarray:
        """Rows [G, O/G, D] back in the weight's layout and dtype."""
        shape = self.values.shape
        flat = r.reshape(-1, r.shape[-1])
        return np.ascontiguousarray(flat.T if self.transposed else flat.reshape(shape), dtype=self.values.dtype)

    def input_channel_axis(self) -> tuple[int, int]:
        """(channels, taps per channel) of a row: a row is ``channels`` runs of ``taps`` (Conv: kh·kw) entries."""
        d = self.rows().shape[-1]
        taps = int(np.prod(self.values.shape[2:])) if self.node.op == "Conv" else 1
        return d // taps, taps


def find_layers(graph: gs.Graph, exclude: tuple[str, ...], min_size: int, res: PassResult) -> list[Layer]:
    """The qualifying layers of ``graph``; every other Conv/Gemm/MatMul declined in ``res`` with its reason."""
    outputs = {t.name for t in graph.outputs}
    found: list[Layer] = []
    for node in graph.nodes:
        if not is_std(node, *WEIGHTED) or len(node.inputs) < 2:
            continue
        site = describe(node)
        w = node.inputs[1]
        reason = None
        if node.name in exclude or node.op in exclude:
            reason = "excluded by option"
        elif not isinstance(w, gs.Constant):
            reason = "weight is not a constant (computed in the graph or a graph input)"
        elif np.asarray(w.values).dtype != np.float32:
            reason = f"weight is {np.asarray(w.values).dtype}, not float32 (quantized or another precision)"
        elif len(w.outputs) > 1:
            reason = f"weight '{w.name}' is shared with {len(w.outputs) - 1} other node(s)"
        elif w.name in outputs:
            reason = f"weight '{w.name}' is a graph output"
        elif node.op == "MatMul" and np.asarray(w.values).ndim != 2:
            reason = f"MatMul weight of rank {np.asarray(w.values).ndim} (only 2-D weights)"
        elif node.op == "Gemm" and node.attrs.get("transA", 0):
            reason = "Gemm with transA=1"
        elif np.asarray(w.values).size < min_size:
            reason = f"{np.asarray(w.values).size} weight parameters < min-size {min_size}: too small to pay"
        if reason:
            res.decline(site, reason)
        else:
            found.append(Layer(node, w))
    return found


def second_moments(graph: gs.Graph, template: onnx.ModelProto, layers: list[Layer], calib: DataSource,
                   max_samples: int | None) -> Moments:
    """The mean second moment H/n [G, D, D] (n: input vectors seen) by layer name (module docstring; a layer without
    one is absent), the names of those seen on enough vectors to refit them (``enough_rows``), and the samples
    seen."""
    shared: dict[tuple[str, Any], HessianObserver] = {}
    by_layer: dict[str, HessianObserver] = {}
    for layer in layers:
        geometry = conv_geometry(layer.node) if layer.node.op == "Conv" else None
        if layer.node.op == "Conv" and geometry is None:
            continue
        key = (layer.node.inputs[0].name, geometry)
        if key not in shared:
            shared[key] = HessianObserver(geometry, max_samples=max_samples or MAX_SAMPLES)
        by_layer[layer.name] = shared[key]
    if not by_layer:
        return Moments({}, set(), 0)
    grouped: dict[str, list[HessianObserver]] = {}
    for (x, _), obs in shared.items():
        grouped.setdefault(x, []).append(obs)
    readers = {x: obs[0] if len(obs) == 1 else Fanout(obs) for x, obs in grouped.items()}
    feeds = {t.name for t in graph.inputs}
    fetch = [x for x in readers if x not in feeds]
    seen = collect(export(graph, template), fetch, with_inputs_observed(calib, readers, feeds), readers,
                   max_samples=max_samples)
    seen_layers = {name: obs for name, obs in by_layer.items() if obs.h is not None and obs.rows}
    return Moments({name: obs.h / obs.rows for name, obs in seen_layers.items()},
                   {name for name, obs in seen_layers.items() if obs.enough_rows()}, seen)
