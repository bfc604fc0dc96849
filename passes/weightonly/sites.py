"""Which MatMul/Gemm nodes the integer-weight passes (quantize-dynamic, quantize-weights) rewrite, and how a
rewritten node takes the original's place.

A site is ``lowrank.sites.site_of``'s K×N view of the weight (``y = x·W``; Gemm's ``transB`` undone), with Gemm's
``alpha`` folded into W and ``beta·C`` into a bias: ``alpha·x·W + beta·C = x·(alpha·W) + (beta·C)``. The sites are
read one weight at a time (``WeightSite.weight`` gives the float K×N array when asked), so a pass holds one float
weight and its quantized form at a time, never a copy of the model.
Declined, with the reason: a weight that is not a float32 constant or not 2-D, a Gemm with ``transA`` (the
activation would have to be transposed first), a Gemm whose C is not a constant and beta ≠ 1, a weight that is a
graph output or read by a node that is not a site of the pass (sites that share one weight each get the quantized
copy, made once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std
from graphopt.passes.base import PassResult, constant
from graphopt.passes.lowrank.sites import SiteDeclined, site_of, unique_name

SITE_OPS = ("MatMul", "Gemm")


@dataclass
class WeightSite:
    """A MatMul/Gemm whose weight is a float32 K×N constant: ``y = x·(alpha·W) + bias``."""

    node: gs.Node
    x: gs.Tensor
    source: gs.Constant      # the weight as stored
    alpha: float
    bias: gs.Tensor | None   # beta·C as a constant, or C itself (beta 1), or None

    @property
    def desc(self) -> str:
        return describe(self.node)

    def weight(self) -> np.ndarray:
        """alpha·W as a float32 K×N array (made when asked: one weight in memory at a time)."""
        w = np.asarray(self.source.values, dtype=np.float32)
        w = w.T if self.node.op == "Gemm" and self.node.attrs.get("transB", 0) else w
        return w * np.float32(self.alpha) if self.alpha != 1.0 else w

    @property
    def k(self) -> int:
        """K, the input features (from the weight's shape, without reading it)."""
        shape = self.source.shape
        return int(shape[-1] if self.node.op == "Gemm" and self.node.attrs.get("transB", 0) else shape[0])

    @property
    def key(self) -> tuple[str, bool, float]:
        """What makes two sites' quantized weights the same: the stored weight, its layout, alpha."""
        return self.source.name, bool(self.node.op == "Gemm" and self.node.attrs.get("transB", 0)), self.alpha


def _site(node: gs.Node) -> WeightSite:
    s = site_of(node)
    if s.dtype != np.float32:       # from the tensor's type: the weight is read when quantized
        raise SiteDeclined("weight is not float32")
    if node.op == "MatMul":
        return WeightSite(node, s.x, s.weight, 1.0, None)
    if node.attrs.get("transA", 0):
        raise SiteDeclined("Gemm with transA=1 (the activation would need a Transpose)")
    beta = float(node.attrs.get("beta", 1.0))
    bias = node.inputs[2] if s.has_bias else None
    if isinstance(bias, gs.Constant) and beta != 1.0:
        bias = constant(f"{bias.name}_beta", np.asarray(bias.values, np.float32) * np.float32(beta))
    elif bias is not None and beta != 1.0:
        raise SiteDeclined(f"Gemm bias is not a constant and beta={beta:g}")
    return WeightSite(node, s.x, s.weight, float(node.attrs.get("alpha", 1.0)), bias)


def find_sites(graph: gs.Graph, res: PassResult, exclude: tuple[str, ...] = ()) -> list[WeightSite]:
    """The MatMul/Gemm sites of ``graph`` (the others declined in ``res`` with the reason)."""
    outputs = {t.name for t in graph.outputs}
    found: dict[int, WeightSite] = {}
    for node in graph.nodes:
        if not is_std(node, *SITE_OPS):
            continue
        if node.name in exclude or node.op in exclude:
            res.decline(describe(node), "excluded by option")
            continue
        if len(node.inputs) > 1 and isinstance(node.inputs[0], gs.Constant) and \
                not isinstance(node.inputs[1], gs.Constant):
            res.decline(describe(node), "the constant is the first input (x·W with a constant x)")
            continue
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if isinstance(w, gs.Variable) and w.inputs and w.inputs[0].op != "Constant":
            res.decline(describe(node), "both inputs are activations (no weight)")
            continue
        try:
            found[id(node)] = _site(node)
        except SiteDeclined as e:
            res.decline(describe(node), str(e))
    sites = []
    for s in found.values():
        others = [u for u in s.source.outputs if id(u) not in found]
        if s.source.name in outputs:
            res.decline(s.desc, f"weight '{s.source.name}' is a graph output")
        elif others:
            res.decline(s.desc, f"weight '{s.source.name}' is shared with {describe(others[0])}, which is not "
                                "rewritten")
        else:
            sites.append(s)
    return sites


def replace(graph: gs.Graph, site: WeightSite, build: Callable[[gs.Variable], list[gs.Node]]) -> None:
    """Put the nodes ``build(y)`` (computing x·(alpha·W) into ``y``) in place of the site, adding the bias."""
    out = site.node.outputs[0]
    site.node.outputs.clear()
    site.node.inputs.clear()
    if site.bias is None:
        graph.nodes.extend(build(out))
        return
    y = gs.Variable(unique_name(graph, f"{out.name}_nobias"), dtype=out.dtype)
    nodes = build(y)
    nodes.append(gs.Node("Add", name=unique_name(graph, f"{site.node.name or out.name}_bias"),
                         inputs=[y, site.bias], outputs=[out]))
    graph.nodes.extend(nodes)
