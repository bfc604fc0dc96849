"""The graph toolkit: the onnx-graphsurgeon round trip and its repairs, shape inference, and the small node and
tensor helpers every pass uses. The only module that calls ``gs.import_onnx``/``gs.export_onnx`` for a whole model
or ``onnx.shape_inference``.

Round trip: ``import_graph(model)`` gives a gs graph that keeps what onnx-graphsurgeon would lose (inputs with
default initializers, attributes it skips, non-tensor types); ``export(graph, template)`` gives a ModelProto with
the template's IR version (raised if a pass upgraded the opset), model metadata and declared non-tensor types.
Sparse storage: ``to_sparse_initializers`` stores an initializer as a ``sparse_initializer`` (COO: its nonzero
values and their int64 linear indices, the only index type onnx.checker accepts) where that is smaller than dense,
i.e. below 1/3 nonzero for float32 (4 + 8 bytes per nonzero against 4 per entry); onnxruntime makes it dense again
when it loads the model. ``import_graph`` makes them dense too (onnx-graphsurgeon does not read them).
Shapes: ``infer_model`` is onnx shape inference on a copy, ``None`` where it fails; ``infer_shapes`` applies it to
a gs graph in place; ``tensor_shapes`` reads the inferred dims (int, symbol string, or None when unknown).
A big model's weights stay in their files (``graphopt.io``): their constants read them when a pass asks for
``.values`` and keep them only while the pass holds the array (``FileConstant``), so a pass that takes one weight
at a time holds one; the exported model refers to the files again for the weights no pass replaced.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from . import __version__, io
from .errors import InputError, one_line
from .external_data import Spill, read_tensor
from .tensor_data import EXTERNAL_MIN_BYTES, data_bytes, file_location
from .scopes import share_initializers

STANDARD = ("", "ai.onnx", None)   # the default domain, as onnx and onnx-graphsurgeon spell it
MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
                 "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm",
                 "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
                 "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeMatMul", "QAttention"}

Shapes = dict[str, "list[Any] | None"]


# ------------------------------------------------------------------------------------------- node helpers


def is_std(node: gs.Node, *ops: str) -> bool:
    """The node is in the default ONNX domain (and, when ``ops`` are given, one of them)."""
    return node.domain in STANDARD and (not ops or node.op in ops)


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """A constant tensor's values as an array; None for a variable."""
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def is_float32(t: gs.Tensor) -> bool:
    """The tensor's dtype is known and float32 (onnx-graphsurgeon keeps types numpy lacks, such as bfloat16, as
    onnx type numbers: those are not)."""
    if t.dtype is None:
        return False
    try:
        return np.dtype(t.dtype) == np.dtype(np.float32)
    except TypeError:
        return False


def quantized_ops(graph: gs.Graph) -> list[str]:
    """The quantization op types a graph already holds (QDQ, QLinear*, *Integer): a pass that needs float weights declines such a model."""
    return sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})


def node_name(node: gs.Node) -> str:
    """The node's name, or its first output's when it has none (exporters leave many nodes unnamed)."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def describe(node: gs.Node) -> str:
    """``Op 'name'`` for reports (``node_name``)."""
    return f"{node.op} '{node_name(node)}'"


# ---------------------------------------------------------------------------------------------- round trip


def replace_graph(graph: gs.Graph, new: gs.Graph) -> None:
    """Make ``graph`` (the object the pipeline holds) take the contents of ``new``."""
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    graph.functions = new.functions


def cleanup(graph: gs.Graph, remove_unused_graph_inputs: bool = False, recurse_functions: bool = True) -> gs.Graph:
    """``graph.cleanup`` (removes the nodes no graph output depends on, in subgraphs and local functions too) without
    its cost: onnx-graphsurgeon formats every node it removes, arrays included, for a log line it then drops (2.3 s
    of CPU on PP-OCR cls). The dead nodes go first, each graph's own way (``_get_used_node_ids``), so its cleanup
    finds none left to format."""
    graphs = [graph, *(graph.functions if recurse_functions else [])]
    while graphs:
        g = graphs.pop()
        with g.node_ids():
            for inp in g.inputs:
                inp.inputs.clear()
            used, _ = g._get_used_node_ids()
            for node in g.nodes:
                if g._get_node_id(node) not in used:
                    node.inputs.clear()
                    node.outputs.clear()
            g.nodes = [n for n in g.nodes if g._get_node_id(n) in used]
        graphs += g.subgraphs()
    return graph.cleanup(remove_unused_graph_inputs=remove_unused_graph_inputs, recurse_functions=recurse_functions)


def _input_defaults(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are also graph inputs (IR < 4 style): defaults the caller may override, not constants."""
    inputs = {i.name for i in model.graph.input}
    return {t.name: t for t in model.graph.initializer if t.name in inputs}


def infer_model(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto | None:
    """onnx shape inference on a copy of ``model`` (``data_prop`` also propagates Shape-computed values); None
    when inference fails. A model over the protobuf limit is inferred without its weights' data (dims and the
    small constants are kept): the copy returned holds types and shapes, not weights."""
    try:
        source = io.data_free_copy(model) if io.is_big(model) else model
        return onnx.shape_inference.infer_shapes(source, data_prop=data_prop)
    except Exception:
        return None


def infer_shapes(graph: gs.Graph, template: onnx.ModelProto) -> bool:
    """Give the graph's tensors the dtypes and shapes onnx shape inference finds; False (graph untouched) when
    inference fails."""
    model = export(graph, template)
    inferred = infer_model(model)
    if inferred is None:
        return False
    if io.is_big(model):    # the inferred copy has no weights: its types go into the exported model
        for field in ("value_info", "output"):
            del getattr(model.graph, field)[:]
            getattr(model.graph, field).extend(getattr(inferred.graph, field))
        inferred = model
    replace_graph(graph, import_graph(inferred))
    return True


def tensor_shapes(model: onnx.ModelProto) -> Shapes:
    """Each typed tensor's dims as shape inference left them (int, symbol string, or None) and each initializer's."""
    shapes: Shapes = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = vi.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in t.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


SPARSE_STORAGE = "sparse storage"   # PassResult.artifacts key: store the final model's sparse weights as such
MIN_SPARSE_SAVING = 0.1             # ... where that saves at least this fraction of the tensor's bytes
MIN_SPARSE_BYTES = 1024             # ... of a tensor at least this big (smaller ones gain nothing)


def sparse_initializer_value(sp: onnx.SparseTensorProto) -> onnx.TensorProto:
    """A sparse initializer as the dense TensorProto it stands for (indices linear [NNZ] or [NNZ, rank])."""
    values = onnx.numpy_helper.to_array(sp.values)
    indices = onnx.numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sp.dims, dtype=np.int64)), values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sp.dims))
    dense[flat] = values
    return onnx.numpy_helper.from_array(dense.reshape(tuple(sp.dims)), sp.values.name)


def to_sparse_initializers(model: onnx.ModelProto) -> int:
    """Move (in place) every main-graph initializer of MIN_SPARSE_BYTES or more whose sparse encoding saves at least
    MIN_SPARSE_SAVING of its bytes into ``sparse_initializer`` (module docstring); return how many moved. Graph
    inputs are left alone."""
    g = model.graph
    inputs = {i.name for i in g.input}
    keep: list[onnx.TensorProto] = []
    moved = 0
    for t in g.initializer:
        if t.name in inputs or t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (
                onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or data_bytes(t) < MIN_SPARSE_BYTES:
            keep.append(t)
            continue
        a = onnx.numpy_helper.to_array(t)
        nz = np.flatnonzero(a)
        if a.dtype.kind not in "fiu" or nz.size * (a.itemsize + 8) > (1 - MIN_SPARSE_SAVING) * a.nbytes:
            keep.append(t)
            continue
        values = onnx.numpy_helper.from_array(a.ravel()[nz], t.name)
        g.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            values, onnx.numpy_helper.from_array(nz.astype(np.int64), ""), list(a.shape)))
        moved += 1
    if moved:
        del g.initializer[:]
        g.initializer.extend(keep)
    return moved


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx-graphsurgeon graph of the model; inputs with default initializers stay inputs (gs would freeze them);
    sparse initializers become dense ones."""
    if model.graph.sparse_initializer:
        dense = onnx.ModelProto()
        dense.CopyFrom(model)
        dense.graph.initializer.extend(sparse_initializer_value(sp) for sp in dense.graph.sparse_initializer)
        del dense.graph.sparse_initializer[:]
        model = dense
    try:
        graph = gs.import_onnx(model)
    except Exception as e:
        raise InputError(f"cannot read the model's graph: {one_line(e)}") from e
    defaults = _input_defaults(model)
    if defaults:
        tensors = graph.tensors()
        order = [i.name for i in model.graph.input]
        for name in defaults:
            t = tensors.get(name)
            if isinstance(t, gs.Constant):
                t.to_variable(dtype=t.dtype, shape=list(t.shape))
                t.type = "tensor_type"
        graph.inputs = [tensors[n] for n in order if n in tensors]
    _patch_gs_import(graph, model.graph)
    _read_on_demand(graph)
    return graph


class FileValues(LazyValues):
    """A file-held tensor's values: read when asked for (``read_tensor``, read-only) and kept only while someone
    holds the array (a weak reference). onnx-graphsurgeon exports it as the tensor it came from, still in its file."""

    def __init__(self, tensor: onnx.TensorProto) -> None:
        super().__init__(tensor)
        self._ref: weakref.ref[np.ndarray] | None = None

    def load(self) -> np.ndarray:
        arr = self._ref() if self._ref is not None else None
        if arr is None:
            arr = read_tensor(self.tensor)
            self._ref = weakref.ref(arr)
        return arr


class FileConstant(gs.Constant):
    """A constant whose values are ``FileValues``: unlike gs.Constant, it does not keep what it read."""

    @property
    def values(self) -> Any:
        v = self._values
        return v.load() if isinstance(v, FileValues) else v

    @values.setter
    def values(self, values: Any) -> None:
        self._values = values


def _read_on_demand(graph: gs.Graph) -> None:
    """Make the file-held constants of a graph (its tensors, Constant-node values, subgraphs) ``FileConstant``s."""
    def held(t: Any) -> None:
        if (isinstance(t, gs.Constant) and type(t._values) is LazyValues
                and isinstance(t._values.tensor, onnx.TensorProto) and file_location(t._values.tensor)):
            t._values = FileValues(t._values.tensor)
            t.__class__ = FileConstant

    for t in graph.tensors().values():
        held(t)
    for node in graph.nodes:
        for v in node.attrs.values():
            if isinstance(v, gs.Graph):
                _read_on_demand(v)
            else:
                held(v)


def hold_in_file(graph: gs.Graph, spill: Spill) -> int:
    """Write the graph's in-memory constants of ``EXTERNAL_MIN_BYTES`` or more (on a big model: the weights a pass
    made) to ``spill`` one at a time, as onnx-graphsurgeon would export them, and make them ``FileConstant``s read
    from there when asked; the number written. The graph, and every model exported from it, then holds no weight in
    memory."""
    done = 0
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or isinstance(t._values, FileValues):
            continue
        lazy = isinstance(t._values, LazyValues)
        if lazy and (not isinstance(t._values.tensor, onnx.TensorProto) or file_location(t._values.tensor)):
            continue
        size = data_bytes(t._values.tensor) if lazy else getattr(t._values, "nbytes", 0)
        if size < EXTERNAL_MIN_BYTES:
            continue
        t._values = FileValues(spill.file_tensor(OnnxExporter.export_tensor_proto(t)))
        t.__class__ = FileConstant
        done += 1
    for node in graph.nodes:
        for v in node.attrs.values():
            if isinstance(v, gs.Graph):
                done += hold_in_file(v, spill)
    return done


def _patch_gs_import(graph: gs.Graph, proto: onnx.GraphProto) -> None:
    """Undo what onnx-graphsurgeon loses on import, in a graph and its subgraphs.

    * attributes it skips (TYPE_PROTO such as Optional's ``type``, SPARSE_TENSOR, TENSORS, ...) go back on the node
      as their onnx values, which its exporter writes back as they were;
    * optional, map and opaque types and sequences of non-tensors, which its exporter crashes on or writes wrongly,
      are forgotten on the tensors; ``export`` restores the declared types from the original model.
    """
    for node, pnode in zip(graph.nodes, proto.node):
        for a in pnode.attribute:
            if a.name not in node.attrs:
                node.attrs[a.name] = onnx.helper.get_attribute_value(a)
            elif a.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs[a.name], gs.Graph):
                _patch_gs_import(node.attrs[a.name], a.g)
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.dtype is not None and (
                getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type", "sparse_tensor_type")
                or isinstance(t.dtype, onnx.TypeProto) or (isinstance(t.dtype, int) and t.dtype == 0)):
            t.dtype, t.shape = None, None


def graph_protos(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """A graph and all its subgraphs (If/Loop/Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from graph_protos(a.g)
            for sub in a.graphs:
                yield from graph_protos(sub)


def _restore_types(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Put back the non-tensor types (optional, map, nested sequence) that ``_patch_gs_import`` had to forget."""
    types: dict[str, onnx.TypeProto] = {}
    for g in graph_protos(template.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.HasField("type") and not vi.type.HasField("tensor_type"):
                types.setdefault(vi.name, vi.type)
    for g in graph_protos(model.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.name in types and not vi.type.HasField("tensor_type"):
                vi.type.CopyFrom(types[vi.name])
        keep = [vi for vi in g.value_info if vi.HasField("type")]
        if len(keep) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep)


def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export a graph to a ModelProto keeping the template model's IR version and model-level metadata (domain,
    model version, doc string, metadata_props); the producer is graphopt."""
    model = gs.export_onnx(graph, do_type_check=False)
    _restore_types(model, template)
    model.ir_version = max(template.ir_version, _min_ir_for(model))
    if model.ir_version >= 4:           # (before IR 4 an initializer of the main graph must also be an input)
        share_initializers(model)       # gs writes a constant into every subgraph that reads it
    defaults = _input_defaults(template)
    if defaults:
        have = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(defaults[i.name] for i in model.graph.input
                                       if i.name in defaults and i.name not in have)
    for attr in ("domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(template, attr))
    model.producer_name, model.producer_version = "graphopt", __version__   # who wrote this file
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def _min_ir_for(model: onnx.ModelProto) -> int:
    """Lowest IR version that can carry the model's ai.onnx opset (a pass may have upgraded the opset)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return int(ir)
    return onnx.IR_VERSION


