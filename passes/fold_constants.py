"""``fold-constants``: Constant nodes become initializers; nodes computable from constants alone are computed once.

Cases:
  * an ai.onnx ``Constant`` node (``value``, ``value_float(s)``, ``value_int(s)``) becomes an initializer. Exported
    models (PaddleOCR's among them) keep every weight in Constant nodes, which hides the weights from other passes.
    Declined: sparse or string constants, and a Constant whose output is a graph output (kept as a node, so the
    output stays a computed value).
  * a node whose every input is a constant (an initializer that is not a graph input) is evaluated once with
    onnxruntime, the same kernels that would run it at inference, so the result is bit-identical; its outputs
    become initializers. Declined: random ops, QuantizeLinear/DequantizeLinear (a quantized model stays quantized),
    ops with subgraphs (other than a constant If, inlined), non-ai.onnx domains, nodes producing a graph
    output, string results, results over 1 MiB that are more than twice the size of their inputs (folding an
    Expand or ConstantOfShape would grow the file rather than shrink the work), and results decoded from narrow
    integer constants (8- or 16-bit, 4-bit) that are larger than the constants they are computed from: such a chain
    is a compressed encoding of a weight, e.g. cluster-weights' codebook lookup Gather(codebook, Cast(uint8
    indices)), which onnxruntime expands at session start; folding it would write the dense weight back. Only the constant subgraph is
    evaluated, not the model; when it is itself over the protobuf limit (a Transpose of big weights) onnxruntime
    loads it from a temporary file (``graphopt.runtime.session_for``).
  * an ``If`` whose condition is a constant (``--fix-input`` makes an input such as a sample rate one) is replaced
    by its chosen branch's nodes (``inline_if``), then those are lowered and folded in turn, until no If is left to
    inline. Declined: an If whose condition is computed at run time.
Exact: the rewritten model computes the same values. Dead nodes and unused initializers are removed by the
pipeline's cleanup after the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from graphopt.graph import cleanup, describe, is_std
from graphopt.runtime import session_for, session_options

from .base import Pass, PassContext, PassResult, as_values, register
from .inline_if import IF_INLINED, inline_constant_ifs
from .subgraphs import graphs, unique_names

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}
# Folding DequantizeLinear(int8 weight) would turn a quantized model's weights back into float: 4x the size, and
# onnxruntime could no longer form its integer kernels.
QUANTIZATION = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
GROWTH_LIMIT_BYTES = 1 << 20

# Result count keys.
CONSTANTS_LOWERED = "Constant nodes lowered"
NODES_FOLDED = "nodes folded"


def constant_value(node: gs.Node) -> np.ndarray | str:
    """The value of a Constant node, or the reason it cannot be lowered."""
    if len(node.attrs) != 1:
        return "Constant node without exactly one value attribute"
    (key, val), = node.attrs.items()
    if key == "value" and isinstance(val, gs.Constant):
        if val.values.dtype.kind in "OSU":
            return "string constant"
        return np.asarray(val.values)
    if key == "value_float":
        return np.array(val, dtype=np.float32)
    if key == "value_floats":
        return np.array(val, dtype=np.float32).reshape(-1)
    if key == "value_int":
        return np.array(val, dtype=np.int64)
    if key == "value_ints":
        return np.array(val, dtype=np.int64).reshape(-1)
    return f"unsupported Constant attribute '{key}'"


def lower_constant_nodes(graph: gs.Graph, res: PassResult) -> None:
    """Turn ai.onnx Constant nodes into initializers (see the module docstring for what is declined)."""
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if not is_std(node, "Constant") or not node.outputs:
            continue
        out = node.outputs[0]
        if out.name in outputs:
            res.decline(describe(node), "its output is a graph output")
            continue
        value = constant_value(node)
        if isinstance(value, str):
            res.decline(describe(node), value)
            continue
        out.inputs.clear()
        out.to_constant(as_values(value))
        res.count(CONSTANTS_LOWERED)
        res.changed = True


@register
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "Constant nodes become initializers; nodes computable from constants are evaluated once (exact)."

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        while True:   # an inlined branch brings Constant nodes and foldable nodes (and Ifs) of its own
            for g in graphs(graph):     # the model, then the If/Loop/Scan bodies that stay (``subgraphs``)
                lower_constant_nodes(g, res)
                self._fold(graph, g, res)
            inlined, declined = inline_constant_ifs(graph)
            if not inlined:
                break
            res.count(IF_INLINED, inlined)
            res.changed = True
        for site, reason in declined:
            res.decline(site, reason)
        if unique_names(graph):    # no new names here: only a clash the input had (an outer name reused inside)
            res.changed = True
        unique = {(d["site"], d["reason"]): d for d in res.declined}   # a later round declines the same sites again
        res.declined = list(unique.values())
        return res

    def _fold(self, root: gs.Graph, graph: gs.Graph, res: PassResult) -> None:
        """Fold in ``graph``, the model (``root``) or one of its subgraphs: there the constants include the outer
        scopes' ones it reads, and a node is folded where it is (a loop-invariant one in a Loop body)."""
        graph.toposort()
        inputs = {t.name for t in (*graph.inputs, *root.inputs)}
        outputs = {t.name for t in graph.outputs}
        known: set[str] = {name for name, t in graph.tensors().items()
                           if isinstance(t, gs.Constant) and name not in inputs}
        candidates: list[gs.Node] = []
        for node in graph.nodes:
            if not is_std(node) or node.op in NONDETERMINISTIC | QUANTIZATION or node.op == "Constant":
                continue
            if not node.outputs:
                continue   # folded in an earlier round (inlining an If starts another); cleanup drops it
            real_inputs = [t for t in node.inputs if not t.is_empty()]
            if not real_inputs or not all(t.name in known for t in real_inputs):
                continue
            if any(isinstance(v, (gs.Graph, gs.Node.AttributeRef)) for v in node.attrs.values()):
                continue
            if any(o.name in outputs for o in node.outputs):
                res.decline(f"{node.op} '{node.name}'", "produces a graph output")
                continue
            candidates.append(node)
            known.update(o.name for o in node.outputs)
        if not candidates:
            return
        values = self._evaluate(root, graph, candidates, res)
        if values is None:
            return
        folded = set(map(id, candidates))
        # Keep producers whose boundary results would grow the model; re-check until nothing changes.
        changed = True
        while changed:
            changed = False
            for node in candidates:
                if id(node) not in folded:
                    continue
                for t in node.outputs:
                    if not self._is_boundary(t, folded):
                        continue
                    reason = self._refuse(node, t, values) or _decodes(node, t, values, folded)
                    if reason:
                        res.decline(f"{node.op} '{node.name}'", reason)
                        folded.discard(id(node))
                        changed = True
                        break
        for node in candidates:
            if id(node) not in folded:
                continue
            res.count(NODES_FOLDED)
            res.changed = True
            for t in list(node.outputs):
                if self._is_boundary(t, folded):
                    t.inputs.clear()
                    t.to_constant(as_values(values[t.name]))

    @staticmethod
    def _is_boundary(t: gs.Tensor, folded: set[int]) -> bool:
        return any(id(c) not in folded for c in t.outputs)

    @staticmethod
    def _refuse(node: gs.Node, t: gs.Tensor, values: dict[str, Any]) -> str | None:
        v = values.get(t.name)
        if not isinstance(v, np.ndarray):
            return "result is not a tensor"
        if v.dtype.kind in "OSU":
            return "string result"
        in_bytes = sum(np.asarray(values[i.name]).nbytes if i.name in values else
                       (i.values.nbytes if isinstance(i, gs.Constant) else 0) for i in node.inputs if not i.is_empty())
        if v.nbytes > GROWTH_LIMIT_BYTES and v.nbytes > 2 * in_bytes:
            return f"result of {v.nbytes} bytes would grow the model (inputs {in_bytes} bytes)"
        return None

    @staticmethod
    def _evaluate(root: gs.Graph, graph: gs.Graph, candidates: list[gs.Node], res: PassResult
                  ) -> dict[str, Any] | None:
        names = list(dict.fromkeys(o.name for n in candidates for o in n.outputs if not o.is_empty()))
        clone = graph.copy()     # a subgraph's copy holds copies of the outer constants it reads: a model of its own
        clone.opset, clone.import_domains = root.opset, root.import_domains
        tensors = clone.tensors()
        clone.inputs = []
        clone.outputs = [tensors[n] for n in names]
        cleanup(clone, remove_unused_graph_inputs=True, recurse_functions=False)
        try:
            model = gs.export_onnx(clone, do_type_check=False)
            sess = session_for(model, session_options(level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
            out_names = [o.name for o in sess.get_outputs()]
            return dict(zip(out_names, sess.run(out_names, {})))
        except Exception as e:
            res.decline(f"{len(candidates)} constant nodes", f"onnxruntime could not evaluate them: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return None


NARROW_INTEGERS = {np.dtype(t) for t in ("int8", "uint8", "int16", "uint16")}


def _decodes(node: gs.Node, t: gs.Tensor, values: dict[str, Any], folded: set[int]) -> str | None:
    """Why ``t`` (computed by ``node`` and the folded nodes before it) stays computed: it is larger than the
    constants it is computed from, one of which is a narrow integer tensor (module docstring), or None."""
    leaves: dict[str, np.ndarray] = {}
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        for i in n.inputs:
            if isinstance(i, gs.Constant):
                leaves[i.name] = np.asarray(i.values)
            elif i.inputs and id(i.inputs[0]) in folded:
                stack.append(i.inputs[0])
    narrow = [v for v in leaves.values() if v.dtype in NARROW_INTEGERS or str(v.dtype) in ("int4", "uint4")]
    total = sum(v.nbytes for v in leaves.values())
    v = values.get(t.name)
    if narrow and isinstance(v, np.ndarray) and v.nbytes > total:
        return (f"decodes {sum(x.size for x in narrow)} narrow integers into a {v.nbytes}-byte result (a compressed "
                f"weight, e.g. cluster-weights' codebook lookup; folding would write it back dense)")
    return None
