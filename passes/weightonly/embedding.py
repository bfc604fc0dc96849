"""Large embedding tables looked up by Gather, stored int8 with one scale per row (``quantize-dynamic``).

``Gather(T, ids)`` on axis 0 of a float32 constant table T [V, D] becomes
``Mul(Cast(Gather(Q, ids)), Gather(S, ids))`` with Q int8 symmetric per row (``calibration.qparams`` through the
quantize pass's ``weight_qparams``: s_v = max|T[v]| / 127) and S [V, 1] the scales: 4x smaller, and the lookup reads
int8. Per row rather than per tensor (onnxruntime's quantize_dynamic takes one uint8 scale for the whole table),
so a row of small values (rare tokens) keeps its resolution. Tables under ``MIN_ELEMENTS`` (a BERT's two token
types) stay float: they are not worth three nodes. Declined, with the reason: a table shared with another node or
a graph output, a Gather on another axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import describe, is_std, node_name
from graphopt.passes.base import PassResult, constant
from graphopt.passes.lowrank.sites import unique_name
from graphopt.passes.quantization.weights import nearest_weights, weight_qparams

MIN_ELEMENTS = 1 << 16
MIN_WIDTH = 8           # rows narrower than this are not embeddings (and a rewritten table's [V, 1] scales stay float)


def quantize_embeddings(graph: gs.Graph, res: PassResult, exclude: tuple[str, ...] = ()) -> int:
    """Rewrite every large embedding Gather (module docstring); the number rewritten."""
    outputs = {t.name for t in graph.outputs}
    done = 0
    for node in [n for n in graph.nodes if is_std(n, "Gather")]:
        table = node.inputs[0]
        if not isinstance(table, gs.Constant) or isinstance(node.inputs[1], gs.Constant):
            continue
        values = np.asarray(table.values)
        if values.dtype != np.float32 or values.ndim != 2 or values.size < MIN_ELEMENTS or values.shape[1] < MIN_WIDTH:
            continue
        if node.name in exclude or "Gather" in exclude:
            res.decline(describe(node), "excluded by option")
        elif node.attrs.get("axis", 0) not in (0, -2):
            res.decline(describe(node), f"Gather on axis {node.attrs.get('axis')} (rows are axis 0)")
        elif len(table.outputs) > 1 or table.name in outputs:
            res.decline(describe(node), f"table '{table.name}' is shared or a graph output")
        else:
            _rewrite(graph, node, values)
            done += 1
    return done


def _rewrite(graph: gs.Graph, node: gs.Node, values: np.ndarray) -> None:
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
