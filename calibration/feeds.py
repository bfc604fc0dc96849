"""What a feed is: the model's input specs, a Batch (one feed and its labels), the DataSource protocol, and the
checks every reader applies on the way in (dtype casts, one feed from a mapping of arrays).

A feed is ``{input_name: ndarray}`` ready for onnxruntime, paired with the labels of its samples (or None). An array
is cast to the input's dtype only within its kind (``np.can_cast(..., "same_kind")``: float64 -> float32 yes, float
-> int no). The reserved key ``__labels__`` (int array, one label per sample) carries labels; it is never an input
name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from graphopt.errors import InputError

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


@dataclass
class Batch:
    feed: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def rows(self) -> int:
        """Samples in this feed: axis 0 of its first array (1 for a feed without a batch axis)."""
        first = next(iter(self.feed.values()), None)
        return first.shape[0] if isinstance(first, np.ndarray) and first.ndim else 1


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's graph inputs with declared shapes and numpy dtypes."""
    inits = {t.name for t in model.graph.initializer}
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
        specs.append(InputSpec(vi.name, shape, names, dtype, vi.name in inits))
    return specs


class DataSource:
    """A re-iterable stream of Batches with a short description for the report."""

    description: str = ""

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError


def cast_to_input(name: str, arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """``arr`` in the dtype of the model input ``spec`` (same kind only), else an InputError naming ``where``."""
    if spec.dtype is None or arr.dtype == spec.dtype:
        return arr
    if spec.dtype.kind in "OSU" and arr.dtype.kind in "OSU":
        return arr.astype(spec.dtype)
    if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
        return arr.astype(spec.dtype)
    raise InputError(f"{where}: array '{name}' has dtype {arr.dtype}, the model input needs {spec.dtype}")


def feed_from_mapping(data: dict[str, Any], inputs: Sequence[InputSpec], where: str) -> Batch:
    """One feed from a mapping of input names to arrays (plus ``__labels__``), used as it is."""
    feed = {}
    for spec in inputs:
        if spec.name not in data:
            if spec.has_default:
                continue
            raise InputError(f"{where}: no array for model input '{spec.name}'")
        value = data[spec.name]
        feed[spec.name] = cast_to_input(spec.name, np.asarray(value), spec, where) if spec.dtype is not None else value
    labels = data.get(LABELS_KEY)
    return Batch(feed, None if labels is None else np.atleast_1d(np.asarray(labels)))


def show_shape(shape: Sequence[Dim] | None) -> str:
    """``[1,3,?,?]`` for messages."""
    if shape is None:
        return "[unknown]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
