"""Large embedding tables looked up by Gather, stored in fewer bits: int8 per row (``quantize-dynamic``) or blockwise
4/8-bit (``quantize-weights``).

A site is ``Gather(T, ids)`` on axis 0 of a float32 constant table T [V, D] (D at least ``MIN_WIDTH``, ids not a
constant) of at least ``MIN_ELEMENTS`` values for int8 (three extra nodes: a BERT's two token types stay float), at
least ``MIN_BLOCKWISE`` for blockwise (one node for one; the byte decoder's 256×128 table, 0.13 MB of its 0.82 MB
at 4 bits, is taken). Declined, with the reason: a table shared with another node or a graph
output, a Gather on another axis, an excluded node.
  * int8 per row (``quantize_embeddings``): ``Mul(Cast(Gather(Q, ids)), Gather(S, ids))`` with Q int8 symmetric per
    row (the quantize pass's ``weight_qparams``: s_v = max|T[v]| / 127) and S [V, 1]: 4x smaller, the lookup reads
    int8. Per row rather than per tensor (onnxruntime's quantize_dynamic takes one uint8 scale for the table), so a
    row of small values (rare tokens) keeps its resolution.
  * blockwise (``quantize_embeddings_blockwise``): each row cut along D into blocks of B values, each with a scale
    (and, asymmetric, a zero point) — ``blockwise.quantize_rtn`` of Tᵀ, i.e. the table is a weight with K = D and
    N = V: T[v, d] ≈ s[v, d // B]·(q[v, d] − z[v, d // B]). Written as com.microsoft.GatherBlockQuantized (uint8 data
    with ``bits`` 4 or 8, two 4-bit values per byte low nibble first, gather_axis 0, quantize_axis 1, zero points
    packed the same way, absent for symmetric blocks: the kernel's default 2^(bits−1), the same layout as
    MatMulNBits), which gathers the rows and dequantizes only them; or, ``qdq``, as the standard opset-21 blockwise
    ``DequantizeLinear(q, s[, z]; axis 1, block_size B) → Gather`` (D must be a multiple of B: no padding there).
    4-bit blocks of 32 store ~5.1 bits per value: MiniLM's 30522×384 word table 46.9 MB → 7.5 MB.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import MS_DOMAIN, describe, is_std, node_name
from graphopt.passes.base import PassResult, constant
from graphopt.passes.lowrank.sites import unique_name
from graphopt.passes.quantization.weights import nearest_weights, weight_qparams

from .blockwise import BlockQuant, quantize_rtn

MIN_ELEMENTS = 1 << 16
MIN_BLOCKWISE = 1 << 12
MIN_WIDTH = 8           # rows narrower than this are not embeddings (and a rewritten table's [V, 1] scales stay float)


def embedding_sites(graph: gs.Graph, res: PassResult, exclude: tuple[str, ...] = (),
                    min_elements: int = MIN_ELEMENTS) -> list[tuple[gs.Node, np.ndarray]]:
    """(Gather, its float32 table) for every embedding lookup of ``min_elements`` or more; others declined in ``res``."""
    outputs = {t.name for t in graph.outputs}
    sites = []
    for node in [n for n in graph.nodes if is_std(n, "Gather")]:
        table = node.inputs[0]
        if not isinstance(table, gs.Constant) or isinstance(node.inputs[1], gs.Constant):
            continue
        values = np.asarray(table.values)
        if values.dtype != np.float32 or values.ndim != 2 or values.size < min_elements or values.shape[1] < MIN_WIDTH:
            continue
        if node.name in exclude or "Gather" in exclude:
            res.decline(describe(node), "excluded by option")
        elif node.attrs.get("axis", 0) not in (0, -2):
            res.decline(describe(node), f"Gather on axis {node.attrs.get('axis')} (rows are axis 0)")
        elif len(table.outputs) > 1 or table.name in outputs:
            res.decline(describe(node), f"table '{table.name}' is shared or a graph output")
        else:
            sites.append((node, values))
    return sites


def quantize_embeddings(graph: gs.Graph, res: PassResult, exclude: tuple[str, ...] = ()) -> int:
    """Every large embedding Gather as int8 rows with a scale per row; the number rewritten."""
    sites = embedding_sites(graph, res, exclude)
    for node, values in sites:
        _rewrite_int8(graph, node, values)
    return len(sites)


def _rewrite_int8(graph: gs.Graph, node: gs.Node, values: np.ndarray) -> None:
    scale, zp, axis = weight_qparams(values, 0, True, False)
    q = nearest_weights(values, scale, zp, axis)
    name, base, out = node.inputs[0].name, node_name(node), node.outputs[0]
    ids = node.inputs[1]
    rows_q, rows_f, rows_s = (gs.Variable(unique_name(graph, f"{out.name}_rows_{s}"), dtype=t)
                              for s, t in (("int8", np.int8), ("float", np.float32), ("scale", np.float32)))
    qt = constant(unique_name(graph, f"{name}_int8"), q)
    st = constant(unique_name(graph, f"{name}_row_scale"), scale.reshape(-1, 1).astype(np.float32))
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes += [gs.Node("Gather", name=unique_name(graph, f"{base}_int8"), inputs=[qt, ids], outputs=[rows_q]),
                    gs.Node("Cast", name=unique_name(graph, f"{base}_cast"), attrs={"to": 1}, inputs=[rows_q],
                            outputs=[rows_f]),
                    gs.Node("Gather", name=unique_name(graph, f"{base}_scales"), inputs=[st, ids], outputs=[rows_s]),
                    gs.Node("Mul", name=unique_name(graph, f"{base}_dequantize"), inputs=[rows_f, rows_s],
                            outputs=[out])]


def quantize_embeddings_blockwise(graph: gs.Graph, res: PassResult, bits: int, block: int, symmetric: bool,
                                  fmt: str, exclude: tuple[str, ...] = ()) -> int:
    """Every large embedding Gather blockwise-quantized along its rows (module docstring); the number rewritten."""
    done = 0
    for node, values in embedding_sites(graph, res, exclude, MIN_BLOCKWISE):
        v, d = values.shape
        if fmt == "qdq" and d % block:
            res.decline(describe(node), f"row width {d} is not a multiple of block-size {block} (format=qdq has no "
                                        "padding; format=nbits pads)")
            continue
        if fmt == "nbits" and bits == 4 and d % 2:
            res.decline(describe(node), f"odd row width {d} (GatherBlockQuantized packs two 4-bit values per byte)")
            continue
        bq = quantize_rtn(values.T, bits, block, symmetric)         # K = D along the rows, N = V rows
        table = node.inputs[0].name
        stored = _rewrite_nbits(graph, node, bq, d) if fmt == "nbits" else _rewrite_qdq(graph, node, bq)
        err = float(np.linalg.norm(bq.dequantize().T - values) / max(float(np.linalg.norm(values)), 1e-30))
        res.notes.append(f"embedding '{table}' [{v}x{d}]: "
                         f"{values.nbytes / 1e6:.2f} MB -> {stored / 1e6:.2f} MB, relative error {err:.4f}")
        res.layers.append({"layer": node_name(node), "op": "Gather", "shape": f"{v}x{d}", "weight_error": round(err, 6),
                           "output_error": None, "status": "quantized"})
        done += 1
    return done


def _rewrite_nbits(graph: gs.Graph, node: gs.Node, bq: BlockQuant, d: int) -> int:
    """GatherBlockQuantized in the node's place; the bytes stored."""
    v = bq.q.shape[0]
    data = bq.nbits_blob().reshape(v, -1)[:, :d * bq.bits // 8]
    name, ids, out = node.inputs[0].name, node.inputs[1], node.outputs[0]
    inputs = [constant(unique_name(graph, f"{name}_q{bq.bits}"), np.ascontiguousarray(data)), ids,
              constant(unique_name(graph, f"{name}_scales"), bq.scale.astype(np.float32))]
    if bq.dtype.startswith("uint"):
        inputs.append(constant(unique_name(graph, f"{name}_zero_points"), bq.nbits_zero_points()))
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.append(gs.Node("GatherBlockQuantized", name=unique_name(graph, f"{node_name(node)}_q{bq.bits}"),
                               domain=MS_DOMAIN, inputs=inputs, outputs=[out],
                               attrs={"bits": bq.bits, "block_size": bq.block, "gather_axis": 0, "quantize_axis": 1}))
    return sum(np.asarray(t.values).nbytes for t in inputs if isinstance(t, gs.Constant))


def _rewrite_qdq(graph: gs.Graph, node: gs.Node, bq: BlockQuant) -> int:
    """DequantizeLinear (axis 1, blocked) of the integer table feeding the node; the bytes stored."""
    q, scale, zp = bq.qdq_weight()                                   # [D, V], [blocks, V]: the table's transpose
    name = node.inputs[0].name
    inputs = [constant(unique_name(graph, f"{name}_q{bq.bits}"), np.ascontiguousarray(q.T)),
              constant(unique_name(graph, f"{name}_scales"), np.ascontiguousarray(scale.T))]
    if bq.dtype.startswith("uint"):
        inputs.append(constant(unique_name(graph, f"{name}_zero_points"), np.ascontiguousarray(zp.T)))
    table = gs.Variable(unique_name(graph, f"{name}_dequantized"), dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", name=unique_name(graph, f"{name}_dq"), inputs=inputs,
                               outputs=[table], attrs={"axis": 1, "block_size": bq.block}))
    node.inputs[0] = table
    return (q.size * bq.bits + zp.size * bq.bits * bq.dtype.startswith("uint")) // 8 + scale.size * 4
