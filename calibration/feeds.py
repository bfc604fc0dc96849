"""What a feed is: the model's input specs, a Batch (one feed and its labels) and the DataSource protocol. The
checks every reader applies on the way in (dtype casts, NaN/Inf, labels, unknown keys) are in ``checks``.

A feed is ``{input_name: ndarray}`` ready for onnxruntime, every value an ndarray of the input's dtype (a 0-d input's
too: onnxruntime refuses numpy scalars), paired with the labels of its samples (or None). The reserved key
``__labels__`` (class indices, one per sample, or exact one-hot rows) carries labels; it is never an input name.
A source's ``warnings`` list what it did to the data or doubts about it (a cast, guessed shapes, synthetic data),
each said once, for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from graphopt.graph import graph_protos

LABELS_KEY = "__labels__"
DEFAULT_BATCH = 16   # rows per .npz batch: calibration, fallback and validation runs hold at most this many

Dim = int | None  # None: dynamic (symbolic or unknown)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[Dim, ...] | None   # None: rank unknown
    dim_names: tuple[str, ...]      # symbolic names ('' where fixed or unnamed)
    dtype: np.dtype[Any] | None     # None: not a tensor (sequence, map, optional)
    has_default: bool               # an initializer backs it (IR < 4 style), so it may be omitted
    # An integer input used as Gather indices into a constant table (directly or through Cast, Reshape-like ops):
    # the rows of the smallest such table (valid ids are [0, rows)) and its name; None where there is none.
    index_rows: int | None = None
    index_table: str = ""


@dataclass
class Batch:
    feed: dict[str, np.ndarray]
    labels: np.ndarray | None
    samples: int | None = None      # set by a source that knows (an .npz): samples in this feed

    @property
    def rows(self) -> int:
        """Samples in this feed: ``samples`` if the source said, else axis 0 of its first array of rank >= 1 (a 0-d
        input, such as an If's condition, has no batch axis), else 1."""
        if self.samples is not None:
            return self.samples
        first = next((v for v in self.feed.values() if isinstance(v, np.ndarray) and v.ndim), None)
        return first.shape[0] if first is not None else 1


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's graph inputs with declared shapes and numpy dtypes."""
    inits = {t.name for t in model.graph.initializer}
    tables = index_tables(model)
    specs = []
    for vi in model.graph.input:
        t = vi.type
        shape: tuple[Dim, ...] | None = None
        names: tuple[str, ...] = ()
        dtype = None
        if t.HasField("tensor_type"):
            tt = t.tensor_type
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            except Exception:
                dtype = None
            if tt.HasField("shape"):
                dims = tt.shape.dim
                shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)
                names = tuple(d.dim_param if d.HasField("dim_param") else "" for d in dims)
        rows, table = tables.get(vi.name, (None, ""))
        specs.append(InputSpec(vi.name, shape, names, dtype, vi.name in inits, rows, table))
    return specs


# Ops that pass an index tensor's values on unchanged (input 0; every input of a Concat), and the ops that index a
# constant table: {op: {index input: table input}}, with the axis attribute's default.
_CARRY = {"Cast", "CastLike", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Transpose", "Tile",
          "Slice", "Concat"}
_INDEXING = {("", "Gather"): {1: 0}, ("com.microsoft", "EmbedLayerNormalization"): {0: 2, 1: 4}}


def index_tables(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """{graph input: (rows, table)} for the integer inputs that index a constant table (a Gather's constant data on
    its axis, an embedding), directly or through ops that carry their values on: the smallest such table. Random
    inputs draw these in [0, rows), so that an embedding lookup does not fail (a BERT's token_type_ids has 2 rows)."""
    graphs = list(graph_protos(model.graph))   # subgraphs too
    nodes = [n for g in graphs for n in g.node]
    shapes = {t.name: tuple(t.dims) for g in graphs for t in g.initializer}
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in nodes:
        for i, t in enumerate(n.input):
            if t:
                consumers.setdefault(t, []).append((n, i))
    found: dict[str, tuple[int, str]] = {}
    for vi in model.graph.input:
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0
        if elem not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                        onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                        onnx.TensorProto.UINT64):
            continue
        best: tuple[int, str] | None = None
        seen, todo = {vi.name}, [vi.name]
        while todo:
            for n, i in consumers.get(todo.pop(), []):
                domain = "" if n.domain == "ai.onnx" else n.domain
                table_at = _INDEXING.get((domain, n.op_type), {}).get(i)
                if table_at is not None and table_at < len(n.input) and n.input[table_at] in shapes:
                    dims = shapes[n.input[table_at]]
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0) if n.op_type == "Gather" else 0
                    if dims and -len(dims) <= axis < len(dims) and (best is None or dims[axis] < best[0]):
                        best = (int(dims[axis]), n.input[table_at])
                elif domain == "" and n.op_type in _CARRY and (i == 0 or n.op_type == "Concat"):
                    for out in n.output[:1]:
                        if out and out not in seen:
                            seen.add(out)
                            todo.append(out)
        if best is not None and best[0] > 0:
            found[vi.name] = best
    return found


class DataSource:
    """A re-iterable stream of Batches with a short description for the report, and ``warnings`` (each said once)
    about the data, for the report's warnings: those a source can tell on opening are there at once, those found
    while reading (an iterable's casts) once the data has been read."""

    description: str = ""
    warnings: list[str]

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


def show_shape(shape: Sequence[Dim] | None) -> str:
    """``[1,3,?,?]`` for messages."""
    if shape is None:
        return "[unknown]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def first_row_feed(feed: dict[str, Any]) -> dict[str, Any]:
    """Each array cut to its first row (0-d values as they are): a one-sample feed, for a probe run. Where the
    arrays disagree on their first dimension it is not a batch axis for all of them (a recurrent state [2, 1, 128]
    beside audio [1, 576]): the feed is returned whole, a valid input where a cut one would not be."""
    leading = {v.shape[0] for v in feed.values() if getattr(v, "ndim", 0)}
    if len(leading) > 1:
        return dict(feed)
    return {k: v[:1] if getattr(v, "ndim", 0) else v for k, v in feed.items()}

