"""Where the ``svd`` pass can factorize, and the graph rewrite that puts the two factors in.

A site is a weighted ai.onnx node whose weight is a float initializer, seen as a K×N matrix in the ``y = x·W``
convention (``Site.w``, read from the weight when asked and not kept: a big model's weights are read one at a time;
``Site.dims`` from its shape), with the activation's feature axis (``Site.axis``: a row of X is the vector along it):
  * Gemm: ``Y = alpha·A'·B' + beta·C``; the weight is B (B' = Bᵀ with ``transB``), the activation A (transposed by
    ``transA``: features on axis 0). Becomes ``Gemm(A, W1; transA) -> Gemm(H, W2, C; alpha, beta)``: the bias
    (vector, matrix or scalar) and alpha/beta stay on the second factor; both factors keep the original ``transB``
    layout. Below opset 11 (where C is required) the first Gemm gets a zero scalar C.
  * MatMul whose second input is a constant 2-D weight, any number of leading dims on the activation:
    ``MatMul(MatMul(x, A), B)``.
  * Conv with a 1×1 (1×…×1) kernel and group 1 (a matmul over channels at every pixel, W = kernel[:, :, 0..]ᵀ):
    two 1×1 Convs; the first keeps strides, pads, auto_pad and dilations (for a 1×1 kernel they only pick and pad
    pixels), the second is plain and carries the bias.
A factor pair (a site with no bias whose only consumer is a site of the same op, through an inner dimension r
smaller than both outer ones, K -> r -> N) is found by ``factor_pairs`` so the pass can leave it alone.
``rows_per_run``: the output vectors a node computes per run at batch 1 (its output's elements over the feature
axis, symbolic dims taken as 1), from shape inference, so that MACs = params × rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.graph import describe, export, infer_model, node_name, tensor_shapes
from graphopt.passes.base import constant

FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
CONV_SPATIAL = ("strides", "pads", "auto_pad", "dilations")


@dataclass
class WeightSite:
    """A weighted node, its constant weight and its activation input ``x``. The weight's values are read when asked
    (``w``, float64) and not kept: a big model's weights are read one at a time (graphopt.graph.FileConstant), so
    take ``w`` once per use; shape and dtype come from the tensor without reading it."""

    node: gs.Node
    weight: gs.Constant
    x: gs.Tensor

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def desc(self) -> str:
        return describe(self.node)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.weight.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> np.dtype | None:
        return weight_dtype(self.weight)

    @property
    def w(self) -> np.ndarray:
        """The weight as stored, in float64 (read now)."""
        return np.asarray(self.weight.values, np.float64)


@dataclass
class Site(WeightSite):
    """A weighted node whose weight is a K×N matrix ``w`` in the ``x·W`` convention."""

    axis: int              # the activation's feature axis (rows of X are vectors along it)
    has_bias: bool

    @property
    def w(self) -> np.ndarray:
        """The K×N matrix (float64), read now."""
        values = np.asarray(self.weight.values)
        if self.node.op == "Gemm":
            w = values.T if self.node.attrs.get("transB", 0) else values
        elif self.node.op == "MatMul":
            w = values
        else:  # Conv [N, K, 1, ...]
            w = values.reshape(values.shape[0], values.shape[1]).T
        return np.asarray(w, np.float64)

    @property
    def dims(self) -> tuple[int, int]:
        """(K, N): in and out features (from the weight's shape, without reading it)."""
        shape = self.shape
        if self.node.op == "Conv" or (self.node.op == "Gemm" and self.node.attrs.get("transB", 0)):
            return shape[1], shape[0]
        return shape[0], shape[1]


class SiteDeclined(Exception):
    """A node that is not a factorization site; the message is the reason."""


def site_of(node: gs.Node) -> Site:
    """The node (a Gemm, MatMul or Conv) as a factorization site, or raise SiteDeclined with the reason (from the
    weight's dtype and shape: its values are not read)."""
    if len(node.inputs) < 2:
        raise SiteDeclined("missing weight input")
    x, wt = node.inputs[0], node.inputs[1]
    if not isinstance(wt, gs.Constant):
        raise SiteDeclined("weight is not a constant (an activation, a graph input, or a Constant node: run "
                           "fold-constants first)")
    dtype, shape = weight_dtype(wt), tuple(wt.shape)
    if dtype not in FLOATS:
        raise SiteDeclined(f"weight dtype {dtype} is not float")
    c = node.inputs[2] if len(node.inputs) > 2 else None
    # A zero constant C is no bias (the first factor of a Gemm below opset 11 carries one).
    bias = c is not None and not c.is_empty() and not (isinstance(c, gs.Constant) and not np.any(c.values))
    if node.op == "Gemm":
        if len(shape) != 2:
            raise SiteDeclined(f"weight of rank {len(shape)}")
        axis = 0 if node.attrs.get("transA", 0) else -1
    elif node.op == "MatMul":
        if len(shape) != 2:
            raise SiteDeclined(f"constant weight of rank {len(shape)} (need a 2-D matrix)")
        axis = -1
    else:  # Conv
        if len(shape) < 3 or any(d != 1 for d in shape[2:]):
            raise SiteDeclined(f"kernel {'x'.join(map(str, shape[2:])) or 'of rank < 3'} is not 1x1")
        if node.attrs.get("group", 1) != 1:
            raise SiteDeclined(f"group={node.attrs.get('group')} (need 1)")
        axis = 1
    return Site(node, wt, x, axis, bias)


def weight_dtype(t: gs.Constant) -> np.dtype | None:
    """A constant's numpy dtype, without reading its values; None for a type numpy lacks (bfloat16 as an onnx
    type number)."""
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def factor_pairs(sites: list[Site], outputs: set[str]) -> dict[int, str]:
    """Sites that form a factor pair X·A·B (A with no bias, only consumer B, inner dim below both outer dims), by
    ``id(site)``, with the reason to leave them alone."""
    by_node = {id(s.node): s for s in sites}
    out: dict[int, str] = {}
    for first in sites:
        h = first.node.outputs[0]
        if first.has_bias or h.name in outputs or len(h.outputs) != 1:
            continue
        second = by_node.get(id(h.outputs[0]))
        if second is None or second.x is not h or second.node.op != first.node.op:
            continue
        k, r = first.dims
        r2, n = second.dims
        if r == r2 and r < min(k, n):
            why = f"already a low-rank pair ({k}->{r}->{n}: '{first.name}', '{second.name}')"
            out[id(first)] = out[id(second)] = why
    return out


def rows_per_run(graph: gs.Graph, template: onnx.ModelProto, nodes: list[gs.Node]) -> dict[int, int]:
    """Output vectors each node computes in one run at batch 1 (symbolic dims taken as 1), from shape inference,
    by ``id(node)``; empty when inference fails."""
    if not nodes:
        return {}
    model = infer_model(export(graph, template))
    if model is None:
        return {}
    shapes = tensor_shapes(model)
    rows = {}
    for node in nodes:
        shape = shapes.get(node.outputs[0].name)
        if not shape:
            continue
        feature = 1 if node.op == "Conv" else len(shape) - 1
        dims = [d if isinstance(d, int) else 1 for d in shape]
        rows[id(node)] = int(np.prod([d for i, d in enumerate(dims) if i != feature], dtype=np.int64))
    return rows


def unique_name(graph: gs.Graph, base: str) -> str:
    names = graph.tensors().keys() | {n.name for n in graph.nodes}
    name, i = base, 1
    while name in names:
        i += 1
        name = f"{base}_{i}"
    return name


def splice(graph: gs.Graph, site: Site, a: np.ndarray, b: np.ndarray) -> None:
    """Replace the site's weight by factors: a new first node x -> h, the original node turned into h -> y."""
    node, dtype = site.node, site.dtype
    wname = site.weight.name
    out = node.outputs[0]
    h = gs.Variable(unique_name(graph, f"{out.name}_svd"), dtype=out.dtype)
    attrs: dict[str, Any] = {}
    if node.op == "Gemm":
        trans_b = node.attrs.get("transB", 0)
        w1, w2 = (a.T, b.T) if trans_b else (a, b)
        attrs = {"transA": node.attrs.get("transA", 0), "transB": trans_b}
        node.attrs["transA"] = 0
    elif node.op == "MatMul":
        w1, w2 = a, b
    else:  # Conv: weights [out, in, 1, ...]
        ones = [1] * (len(site.shape) - 2)
        w1 = a.T.reshape(a.shape[1], a.shape[0], *ones)
        w2 = b.T.reshape(b.shape[1], b.shape[0], *ones)
        attrs = {key: v for key, v in node.attrs.items() if key in CONV_SPATIAL}
        attrs["kernel_shape"] = ones
        for key in CONV_SPATIAL:
            node.attrs.pop(key, None)
        if "kernel_shape" in node.attrs:
            node.attrs["kernel_shape"] = ones
    c1 = constant(unique_name(graph, f"{wname}_svd_a"), w1, dtype)
    c2 = constant(unique_name(graph, f"{wname}_svd_b"), w2, dtype)
    inputs = [site.x, c1]
    if node.op == "Gemm" and graph.opset < 11:
        inputs.append(constant(unique_name(graph, f"{wname}_svd_zero"), np.zeros((1,), dtype)))
    first = gs.Node(node.op, name=unique_name(graph, f"{site.name}_svd_a"), attrs=attrs, inputs=inputs, outputs=[h],
                    domain=node.domain)
    node.inputs[0] = h
    node.inputs[1] = c2
    graph.nodes.append(first)
