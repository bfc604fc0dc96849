"""``fold-bn``: an inference BatchNormalization (and a per-channel constant Mul/Add) is folded into the weights of the
Conv, ConvTranspose, Gemm or MatMul before it.

BatchNormalization computes ``y = s·x + t`` per channel (axis 1) with ``s = γ/√(σ²+ε)`` and ``t = β − μ·s``; a
constant Mul is ``s = k, t = 0`` and a constant Add ``s = 1, t = k``. Folding into the producer ``x = W∗a + b``:
``W' = W·s`` per output channel, ``b' = b·s + t``. Everything is computed in float64 and cast to the weight's dtype.

Cases:
  * Conv: W is ``[C_out, C_in/group, k...]``, scale along axis 0; a missing bias is created.
  * ConvTranspose: W is ``[C_in, C_out/group, k...]``; output channel ``o = g·(C_out/group) + j`` for W's row block
    ``g`` (of ``C_in/group`` rows) and column ``j``, so W is viewed as ``[group, C_in/group, C_out/group, k...]``.
  * Gemm (opset >= 7): the output is ``[M, N]``, BN's axis 1 is N; W scaled along axis 1 (``transB=0``, W is
    ``[K, N]``) or axis 0 (``transB=1``). The bias becomes ``C' = β_gemm·C·s + t`` (any broadcastable shape) and
    ``beta`` is set to 1.
  * MatMul with a constant ``[K, N]`` weight, when its output is rank 2 (then BN's axis 1 is N): becomes a Gemm
    with the folded weight and ``C = t``. Other ranks are declined: BN's axis 1 is then not the weight's axis.
  * Mul or Add with a constant that is a scalar or per-channel (``[C,1,1]``, ``[1,C,1,1]``, ...; never broadcasting
    the output to a bigger shape) directly after a Conv or ConvTranspose, or after a Gemm or MatMul whose output is
    rank 2 (``[N]``, ``[1,N]``: a bias, as Keras/TF exports write MatMul + Add) (option ``mul-add``). With the bias
    inside a Gemm, quantize makes one QGemm of it instead of an integer MatMul and a float Add.
Declined, with the reason, graph untouched: the producer's output has other consumers or is a graph output; the
weight is not an initializer (e.g. a Constant node output: run fold-constants first) or is shared with another node
(when it would change); a BN parameter, the bias or the Mul/Add operand is not a constant; a training-mode BN (more
than one output, ``training_mode=1``) or ``spatial=0``; ``σ²+ε <= 0``; results that overflow the weight's dtype.
Sites inside If/Loop/Scan bodies are folded there. Exact (up to float rounding). New tensors are named after the old ones (``conv1.weight`` -> ``conv1.weight_fold``).
Sites are folded to a fixed point (a Mul folded into a Conv makes the BN after it a site); the result counts each
fold under ``folded_key(op, into)`` ("BatchNormalization folded into Conv").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.graph import const_value, describe, infer_shapes, is_std

from .base import Pass, PassContext, PassResult, constant, register
from .options import option
from .subgraphs import graphs, unique_names

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONV_LIKE = ("Conv", "ConvTranspose")

# Result count key: one per (folded op, producer op), e.g. "BatchNormalization folded into Conv".
FOLDED = "{op} folded into {into}"


def folded_key(op: str, into: str) -> str:
    """The result count key of ``op`` nodes folded into ``into`` nodes."""
    return FOLDED.format(op=op, into=into)


class _Decline(Exception):
    """A site that does not qualify; the message is the reason."""


@dataclass
class _Scope:
    """The graph being rewritten, its graph output names, and the tensor names taken (new ones are added)."""

    graph: gs.Graph
    outputs: set[str]
    names: set[str]

    def fresh(self, name: str) -> str:
        """A new tensor name derived from ``name``: ``w`` -> ``w_fold`` (``w_fold_2``, ... if taken)."""
        base = re.sub(r"_fold(_\d+)?$", "", name) + "_fold"
        new, i = base, 1
        while new in self.names:
            i += 1
            new = f"{base}_{i}"
        self.names.add(new)
        return new

    def remove(self, n: gs.Node) -> None:
        nodes = self.graph.nodes
        del nodes[next(i for i, m in enumerate(nodes) if m is n)]


def _unknown_rank2_site(n: gs.Node) -> bool:
    """Does ``n`` read the output of a Gemm/MatMul whose shape is not known (so whether it is rank 2 is not)?"""
    return any(isinstance(t, gs.Variable) and t.shape is None and len(t.inputs) == 1 and
               is_std(t.inputs[0], "Gemm", "MatMul") for t in n.inputs)


@register
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = ("BatchNormalization (and per-channel constant Mul/Add) folded into the preceding Conv, ConvTranspose, "
               "Gemm or MatMul weights (exact).")
    # Weights and BN parameters in Constant nodes (Paddle exports) or computed from constants fold only once
    # fold-constants has made them initializers.
    prerequisites = ("fold-constants",)

    @dataclass(frozen=True)
    class Options:
        mul_add: bool = option(True, "also fold a scalar or per-channel constant Mul/Add that follows a Conv, or "
                                     "a rank-2 Gemm/MatMul")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        if any(is_std(n, "BatchNormalization", "Mul", "Add") and _unknown_rank2_site(n)
               for g in graphs(graph) for n in g.nodes):
            infer_shapes(graph, ctx.original)    # whether a Gemm/MatMul output is rank 2 decides if it can take the fold
        scopes = graphs(graph)    # the model and its If/Loop/Scan bodies (``subgraphs``): folded where they are
        pending: dict[str, str] = {}   # site -> latest decline reason; a later success (fixed point) clears it
        for g in scopes:
            self._fold_in(g, res, pending)
        unique_names(graph)
        for site, reason in pending.items():
            res.decline(site, reason)
        return res

    def _fold_in(self, graph: gs.Graph, res: PassResult, pending: dict[str, str]) -> None:
        scope = _Scope(graph, {t.name for t in graph.outputs}, set(graph.tensors()))
        progress = True
        while progress:
            progress = False
            for n in list(graph.nodes):
                if not n.outputs:       # removed earlier in this sweep
                    continue
                if is_std(n, "BatchNormalization"):
                    site, fold = describe(n), _fold_bn
                elif is_std(n, "Mul", "Add") and self.options.mul_add:
                    site, fold = describe(n), _fold_mul_add
                else:
                    continue
                try:
                    done = fold(scope, n)
                except _Decline as e:
                    pending[site] = str(e)
                    continue
                if done is not None:
                    into, was = done
                    pending.pop(site, None)
                    res.changed = progress = True
                    res.count(folded_key(n.op, was))
                    res.layers.append({"node": site, "into": describe(into), "was": was})


# ----------------------------------------------------------------------------------------------------- matching


def _fold_bn(scope: _Scope, bn: gs.Node) -> tuple[gs.Node, str]:
    """Fold an inference BatchNormalization: scale γ/√(σ²+ε), shift β − μ·scale."""
    if sum(1 for o in bn.outputs if not o.is_empty()) > 1 or bn.attrs.get("training_mode", 0):
        raise _Decline("training-mode BatchNormalization (running statistics are outputs)")
    if bn.attrs.get("spatial", 1) == 0:
        raise _Decline("spatial=0: statistics are per element, not per channel")
    if len(bn.inputs) != 5:
        raise _Decline(f"expected 5 inputs, found {len(bn.inputs)}")
    x = bn.inputs[0]
    producer = x.inputs[0] if len(x.inputs) == 1 else None
    if producer is None or not is_std(producer, *PRODUCERS):
        what = "a graph input" if producer is None else describe(producer)
        raise _Decline(f"its input comes from {what}, not from Conv, ConvTranspose, Gemm or MatMul")
    params = []
    for role, t in zip(("scale", "bias", "mean", "var"), bn.inputs[1:]):
        v = const_value(t)
        if v is None:
            raise _Decline(f"{role} '{t.name}' is not a constant")
        if v.ndim != 1:
            raise _Decline(f"{role} '{t.name}' has shape {list(v.shape)}, expected [C]")
        params.append(v.astype(np.float64))
    gamma, beta, mean, var = params
    eps = float(np.float32(bn.attrs.get("epsilon", 1e-5)))
    if np.any(~(var + eps > 0)):
        raise _Decline("variance + epsilon is not positive (or NaN) for some channel")
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    return _fold_into(scope, producer, x, bn, scale, shift)


def _fold_mul_add(scope: _Scope, n: gs.Node) -> tuple[gs.Node, str] | None:
    """Fold a Mul (scale k) or Add (shift k) by a scalar or per-channel constant k; None when ``n`` is no site."""
    if len(n.inputs) != 2:
        return None
    a, b = n.inputs
    if isinstance(b, gs.Constant) and not isinstance(a, gs.Constant):
        y, k = a, b
    elif isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        y, k = b, a
    else:
        return None
    producer = y.inputs[0] if len(y.inputs) == 1 else None
    if producer is None or not is_std(producer, *PRODUCERS):
        return None                     # not a site: Mul/Add elsewhere in the graph
    if producer.op in ("Gemm", "MatMul") and (y.shape is None or len(y.shape) != 2):
        return None                     # a MatMul in a transformer ([B, S, N]): no Gemm can take the bias
    w_t = producer.inputs[1] if len(producer.inputs) > 1 else None
    if not isinstance(w_t, gs.Constant):
        raise _Decline(f"{describe(producer)}: weight is not an initializer (run fold-constants first)")
    if producer.op in CONV_LIKE and (w_t.shape is None or len(w_t.shape) < 3):
        raise _Decline(f"{describe(producer)}: weight '{w_t.name}' is not a convolution weight")
    if producer.op not in CONV_LIKE and (w_t.shape is None or len(w_t.shape) != 2):
        raise _Decline(f"{describe(producer)}: weight '{w_t.name}' is not a matrix")
    # shape only: no load
    channels, rank = _channels(producer, tuple(w_t.shape)), max(len(w_t.shape), 2)
    kv = const_value(k)
    assert kv is not None
    if kv.dtype.kind != "f":
        raise _Decline(f"constant '{k.name}' is {kv.dtype}, not a float")
    if kv.ndim > rank:
        raise _Decline(f"constant '{k.name}' of shape {list(kv.shape)} would broadcast the rank-{rank} output")
    shape = (1,) * (rank - kv.ndim) + kv.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        raise _Decline(f"constant '{k.name}' of shape {list(kv.shape)} is not a scalar or per-channel for "
                       f"{channels} channels")
    vec = np.broadcast_to(kv.astype(np.float64).reshape(-1), (channels,))
    if not np.all(np.isfinite(vec)):
        raise _Decline(f"constant '{k.name}' has non-finite values")
    if n.op == "Mul":
        return _fold_into(scope, producer, y, n, vec, np.zeros(channels))
    return _fold_into(scope, producer, y, n, np.ones(channels), vec)


def _channels(producer: gs.Node, w_shape: tuple[int, ...]) -> int:
    """Output channels (axis 1 of the output) of a Conv/ConvTranspose/Gemm/MatMul from its weight's shape."""
    if producer.op == "Conv":
        return int(w_shape[0])
    if producer.op == "ConvTranspose":
        return int(w_shape[1]) * int(producer.attrs.get("group", 1))
    return int(w_shape[0] if producer.op == "Gemm" and producer.attrs.get("transB", 0) else w_shape[1])


# ---------------------------------------------------------------------------------------------------- rewriting


def _fold_into(scope: _Scope, producer: gs.Node, y: gs.Tensor, consumer: gs.Node, scale: np.ndarray,
               shift: np.ndarray) -> tuple[gs.Node, str]:
    """Fold ``consumer(y) = scale·y + shift`` (per channel) into ``producer``, ``y`` being its output; return
    the node that now computes the consumer's output and the producer's op type before the rewrite."""
    where = describe(producer)
    w_t, w, bias_t, bias = _operands(scope, producer, y, where)
    new_w = _scaled_weight(scope, producer, y, w, w_t.name, scale, where)
    changes_w = not np.all(scale == 1.0)
    if changes_w and (len(w_t.outputs) > 1 or w_t.name in scope.outputs):
        raise _Decline(f"{where}: weight '{w_t.name}' is shared with other nodes")
    new_b = _shifted_bias(producer, bias_t, bias, scale, shift, where)
    w_out, b_out = new_w.astype(w.dtype), new_b.astype(bias.dtype if bias is not None else w.dtype)
    if not (np.all(np.isfinite(w_out)) and np.all(np.isfinite(b_out))):
        raise _Decline(f"{where}: folded values overflow {w.dtype}")
    w_new = constant(scope.fresh(w_t.name), w_out) if changes_w else w_t
    b_base = bias_t.name if bias_t is not None else (w_t.name[:-6] + "bias" if w_t.name.endswith("weight")
                                                     else f"{w_t.name}_bias")
    return _rewire(scope, producer, consumer, w_new, constant(scope.fresh(b_base), b_out))


def _operands(scope: _Scope, producer: gs.Node, y: gs.Tensor, where: str
              ) -> tuple[gs.Constant, np.ndarray, gs.Tensor | None, np.ndarray | None]:
    """The producer's weight and bias (tensor, value), when it can take a fold at all."""
    if len(producer.outputs) != 1:
        raise _Decline(f"{where} has {len(producer.outputs)} outputs")
    if y.name in scope.outputs:
        raise _Decline(f"the output '{y.name}' of {where} is a graph output")
    if len(y.outputs) != 1:
        raise _Decline(f"the output '{y.name}' of {where} has {len(y.outputs)} consumers")
    if len(producer.inputs) < 2:
        raise _Decline(f"{where} has no weight input")
    w_t = producer.inputs[1]
    w = const_value(w_t)
    if w is None:
        raise _Decline(f"{where}: weight '{w_t.name}' is not an initializer (run fold-constants first)")
    if w.dtype.kind != "f":
        raise _Decline(f"{where}: weight '{w_t.name}' is {w.dtype}, not a float")
    bias_t = producer.inputs[2] if len(producer.inputs) > 2 and not producer.inputs[2].is_empty() else None
    bias = None
    if bias_t is not None:
        bias = const_value(bias_t)
        if bias is None:
            raise _Decline(f"{where}: bias '{bias_t.name}' is not a constant")
    return w_t, w, bias_t, bias


def _scaled_weight(scope: _Scope, producer: gs.Node, y: gs.Tensor, w: np.ndarray, w_name: str, scale: np.ndarray,
                   where: str) -> np.ndarray:
    """``W' = W·scale`` along the producer's output-channel axis, in float64."""
    op = producer.op
    w64 = w.astype(np.float64)
    c = scale.shape[0]
    if op == "Conv":
        if w.ndim < 3 or w.shape[0] != c:
            raise _Decline(f"{where} has {w.shape[0]} output channels, the folded node {c}")
        return w64 * scale.reshape((c,) + (1,) * (w.ndim - 1))
    if op == "ConvTranspose":
        group = int(producer.attrs.get("group", 1))
        if w.ndim < 3 or w.shape[0] % group or group * w.shape[1] != c:
            raise _Decline(f"{where} has {group * w.shape[1]} output channels, the folded node {c}")
        per = w.shape[1]
        view = w64.reshape((group, w.shape[0] // group, per) + w.shape[2:])
        return (view * scale.reshape((group, 1, per) + (1,) * (w.ndim - 2))).reshape(w.shape)
    # Gemm, MatMul
    if scope.graph.opset < 7:
        raise _Decline(f"opset {scope.graph.opset} < 7 (Gemm without broadcasting)")
    if w.ndim != 2:
        raise _Decline(f"{where}: weight '{w_name}' has rank {w.ndim}, expected 2")
    trans_b = op == "Gemm" and bool(producer.attrs.get("transB", 0))
    n_out = w.shape[0] if trans_b else w.shape[1]
    if n_out != c:
        raise _Decline(f"{where} has {n_out} output channels, the folded node {c}")
    if op == "MatMul":
        ranks = {len(t.shape) for t in (producer.inputs[0], y) if t.shape is not None}
        if ranks != {2}:
            raise _Decline(f"{where}: output rank is {'unknown' if not ranks else max(ranks)}; the channel "
                           "axis 1 is the weight's output axis only for rank 2")
    return w64 * (scale[:, None] if trans_b else scale[None, :])


def _shifted_bias(producer: gs.Node, bias_t: gs.Tensor | None, bias: np.ndarray | None, scale: np.ndarray,
                  shift: np.ndarray, where: str) -> np.ndarray:
    """``b' = b·scale + shift`` (a Gemm's C times its beta), in float64; ``shift`` when there is no bias."""
    c = scale.shape[0]
    if producer.op in CONV_LIKE:
        if bias is not None and bias.shape != (c,):
            assert bias_t is not None
            raise _Decline(f"{where}: bias '{bias_t.name}' has shape {list(bias.shape)}, expected [{c}]")
        b64 = bias.astype(np.float64) if bias is not None else np.zeros(c)
        return b64 * scale + shift
    if producer.op == "Gemm" and bias is not None:
        beta = float(np.float32(producer.attrs.get("beta", 1.0)))
        return beta * bias.astype(np.float64) * scale + shift
    return shift


def _rewire(scope: _Scope, producer: gs.Node, consumer: gs.Node, w_new: gs.Tensor, b_new: gs.Constant
            ) -> tuple[gs.Node, str]:
    """The producer takes the folded constants and the consumer's output tensor; the consumer goes. A MatMul
    becomes a Gemm (it has no bias input)."""
    op = producer.op
    out = consumer.outputs[0]
    consumer.inputs.clear()
    consumer.outputs.clear()
    scope.remove(consumer)
    if op == "MatMul":
        a = producer.inputs[0]
        producer.inputs.clear()
        producer.outputs.clear()
        scope.remove(producer)
        producer = gs.Node("Gemm", name=producer.name, inputs=[a, w_new, b_new], outputs=[out])
        scope.graph.nodes.append(producer)
        return producer, op
    producer.inputs[1] = w_new
    if len(producer.inputs) > 2:
        producer.inputs[2] = b_new
    else:
        producer.inputs.append(b_new)
    if op == "Gemm":
        producer.attrs["beta"] = 1.0
    producer.outputs.clear()
    producer.outputs.append(out)
    return producer, op
