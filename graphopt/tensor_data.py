"""Tensor data inside ONNX protobufs, without serializing a model: each tensor's size from its dims and type, and
a copy of a model whose larger tensors refer to one external-data file (their bytes appended to it, or only
counted) while the model and its data stay as they are. ``graphopt.io`` opens the files and decides when a model
is over the protobuf limit; this module never opens a file itself.

File-held tensors: a big model is held in memory with its weights left in their files (``graphopt.io`` loads it
so): such a tensor is external with an *absolute* ``location`` (``file_location``), which no ONNX file may carry
(onnx and onnxruntime refuse absolute paths), so it never reaches a file as it is: ``detached`` appends its bytes
to the new data file through ``DataFile.copy`` (io copies them file to file), or refers to the same file linked
beside the written model (``DataFile.keep``), or only counts them.
"""

from __future__ import annotations

import math
import os
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import onnx
from onnx import external_data_helper

EXTERNAL_MIN_BYTES = 1024               # tensors this big or bigger go to the external-data file
ALIGN_MIN_BYTES, ALIGN = 2**20, 2**16   # and those of 1 MiB or more start at a 64 KiB boundary (mappable)
_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, in subgraphs and functions too."""
    yield from external_data_helper._get_all_tensors(model)


def data_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (nothing is copied or serialized)."""
    n = math.prod(t.dims)       # not np.prod: 12 µs a call on a protobuf's dims, ~45 ms of a small model's quantize
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    if t.data_type in _FOUR_BIT:
        return (n + 1) // 2
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):   # an unknown type: whatever the tensor holds
        return t.ByteSize()


def file_location(t: onnx.TensorProto) -> str | None:
    """The absolute path of the file holding a file-held tensor's data (see the module docstring), else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    location = next((e.value for e in t.external_data if e.key == "location"), "")
    return location if os.path.isabs(location) else None


def external_span(t: onnx.TensorProto) -> tuple[int, int]:
    """(offset, length) of an external tensor's data in its file (length from its dims when not given)."""
    info = {e.key: e.value for e in t.external_data}
    return int(info.get("offset", 0)), int(info["length"]) if "length" in info else data_bytes(t)


class DataFile:
    """Where detached tensor data goes: appended to ``f`` (or only counted, when ``f`` is None). File-held tensors
    are appended by ``copy(tensor, f)`` (bytes copied file to file), unless ``keep(tensor)`` names the location under
    which the written model refers to the tensor's own file, linked beside it."""

    def __init__(self, f: BinaryIO | None, location: str = "model.onnx.data",
                 copy: Callable[[onnx.TensorProto, BinaryIO], None] | None = None,
                 keep: Callable[[onnx.TensorProto], str] | None = None) -> None:
        self.f, self.location, self.size = f, location, 0
        self.copy, self.keep = copy, keep

    def place(self, t: onnx.TensorProto, n: int) -> tuple[int, int]:
        """Append the tensor's data (``n`` bytes by its dims); its offset and length in the file."""
        pad = -self.size % ALIGN if n >= ALIGN_MIN_BYTES else 0
        if self.f is not None:
            self.f.write(b"\0" * pad)
            if file_location(t) is not None:
                if self.copy is None:
                    raise ValueError(f"tensor '{t.name}' is held in a file and no copier was given")
                n = external_span(t)[1]
                self.copy(t, self.f)
            else:
                data = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                self.f.write(data)
                n = len(data)
        offset = self.size + pad
        self.size = offset + n
        return offset, n


# Messages walked field by field (they may hold big tensors); any other message is copied whole.
_WALKED = (onnx.ModelProto, onnx.GraphProto, onnx.NodeProto, onnx.AttributeProto, onnx.FunctionProto)
_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                          "string_data", "external_data", "data_location"})


def _copy_fields(src: Any, dst: Any, data: DataFile, skip: frozenset[str] = frozenset()) -> None:
    for f, value in src.ListFields():
        if f.name in skip:
            continue
        if f.message_type is None:
            if f.is_repeated:
                getattr(dst, f.name).extend(value)
            else:
                setattr(dst, f.name, value)
        elif f.is_repeated:
            target = getattr(dst, f.name)
            for item in value:
                _copy_message(item, target.add(), data)
        else:
            _copy_message(value, getattr(dst, f.name), data)


def _copy_message(src: Any, dst: Any, data: DataFile) -> None:
    if isinstance(src, onnx.TensorProto):
        held = file_location(src) is not None
        if held and data.keep is not None:
            dst.CopyFrom(src)
            next(e for e in dst.external_data if e.key == "location").value = data.keep(src)
            return
        n = data_bytes(src)
        if not held and (n < EXTERNAL_MIN_BYTES or src.data_type == onnx.TensorProto.STRING
                         or external_data_helper.uses_external_data(src)):
            dst.CopyFrom(src)
            return
        _copy_fields(src, dst, data, _DATA_FIELDS)
        offset, length = data.place(src, n)
        dst.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data.location), ("offset", str(offset)), ("length", str(length))):
            entry = dst.external_data.add()
            entry.key, entry.value = key, value
    elif isinstance(src, _WALKED):
        _copy_fields(src, dst, data)
    else:
        dst.CopyFrom(src)


def detached(model: onnx.ModelProto, data: DataFile) -> onnx.ModelProto:
    """A copy of ``model`` whose tensors of ``EXTERNAL_MIN_BYTES`` or more refer to ``data`` (their bytes go there);
    the model itself is left as it is and its data is never copied whole."""
    skeleton = onnx.ModelProto()
    _copy_message(model, skeleton, data)
    return skeleton
