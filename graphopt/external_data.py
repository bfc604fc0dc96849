"""The files behind a big model's file-held tensors (``graphopt.tensor_data``): ``graphopt.io``'s helper for models
over the protobuf limit, which are held in memory with their weights left in the input's external-data files.

* ``hold_in_files``: after io checked the locations, each external tensor's location becomes its file's absolute
  path and its span is checked against the file's size (a model cannot make graphopt read past a file's end).
* ``read_tensor``: one tensor's array, read from its span into fresh memory (nothing else of the file is read or
  mapped); the array is read-only, so that a pass that edits weights in place fails loudly instead of editing a
  copy that is dropped.
* ``copy_tensor``: a tensor's bytes appended to an open output file, file to file in the kernel
  (``os.copy_file_range``; in chunks where that is unavailable): writing an output costs no memory.
* ``Spill``: a data file of the run's own, in a temporary folder removed when the process exits, for the weights the
  passes make on a big model: each is written there and then held like an input weight (``file_tensor``), so the
  rewritten model holds no weight in memory either (``graph.hold_in_file``).
* ``Linker``: a folder's view of the source files, for onnxruntime and ``onnx.checker``, which refuse absolute,
  ``..`` and symlinked locations: each source file is hard-linked into the folder (copied when the link fails,
  e.g. across file systems), and the written model refers to it there at the same offsets.
Memory: reading a tensor takes its size; copying and linking take none (the page cache is not the process's);
spilling a tensor takes the one tensor's bytes while it is written.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import onnx

from .errors import InputError
from .tensor_data import DataFile, data_bytes, external_span, file_location

CHUNK = 1 << 24     # bytes per read/write when os.copy_file_range is unavailable


def hold_in_files(tensors: Iterable[onnx.TensorProto], base: Path, where: str) -> None:
    """Point each external tensor at its file by absolute path (locations already checked safe by io), after
    checking that its span lies inside the file."""
    sizes: dict[Path, int] = {}
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = next(e for e in t.external_data if e.key == "location")
        path = (base / entry.value).resolve()
        size = sizes.setdefault(path, path.stat().st_size)
        offset, length = external_span(t)
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(f"{where}: tensor '{t.name}' claims bytes {offset}..{offset + length} of "
                             f"'{entry.value}', which has {size}")
        entry.value = str(path)


def read_tensor(t: onnx.TensorProto) -> np.ndarray:
    """A file-held tensor's values (read-only), read from its span of its file."""
    path = file_location(t)
    if path is None:
        raise ValueError(f"tensor '{t.name}' is not held in a file")
    offset, length = external_span(t)
    buf = np.empty(length, np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(buf)) != length:
            raise InputError(f"tensor '{t.name}': '{path}' ended before its {length} bytes")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if dtype.itemsize * int(np.prod(t.dims, dtype=np.int64)) == length and t.data_type != onnx.TensorProto.STRING:
        arr = buf.view(dtype).reshape(tuple(t.dims))
    else:   # packed (4-bit) types: onnx unpacks them
        inline = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, raw_data=buf.tobytes())
        arr = onnx.numpy_helper.to_array(inline)
    arr.flags.writeable = False
    return arr


def copy_tensor(t: onnx.TensorProto, out: BinaryIO) -> None:
    """Append a file-held tensor's bytes to ``out`` (at its position), file to file."""
    path = file_location(t)
    if path is None:
        raise ValueError(f"tensor '{t.name}' is not held in a file")
    offset, length = external_span(t)
    out.flush()
    with open(path, "rb") as src:
        dst_fd, src_fd = out.fileno(), src.fileno()
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:     # not supported between these files: copy the rest through memory
                pass
        out.seek(0, os.SEEK_END)    # the kernel moved the file's position under the buffered writer
        if done < length:
            src.seek(offset + done)
            while done < length:
                chunk = src.read(min(CHUNK, length - done))
                if not chunk:
                    raise InputError(f"tensor '{t.name}': '{path}' ended before its {length} bytes")
                out.write(chunk)
                done += len(chunk)


class Spill:
    """Tensors written one after the other to ``made.data`` in a temporary folder (made at the first tensor; the
    file closed and the folder removed when the process exits, since models refer to it until they are saved).
    ``file_tensor`` returns the tensor as a file-held one: dims and type, its span, no data."""

    def __init__(self) -> None:
        self.data: DataFile | None = None

    def file_tensor(self, t: onnx.TensorProto) -> onnx.TensorProto:
        if self.data is None:
            folder = Path(tempfile.mkdtemp(prefix="graphopt-made-"))
            f = open(folder / "made.data", "wb")
            atexit.register(_remove, f, folder)
            self.data = DataFile(f, str(folder / "made.data"))
        assert self.data.f is not None
        offset, length = self.data.place(t, data_bytes(t))
        self.data.f.flush()          # read back by path (read_tensor, sessions) from now on
        held = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string,
                                data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.data.location), ("offset", str(offset)), ("length", str(length))):
            entry = held.external_data.add()
            entry.key, entry.value = key, value
        return held


def _remove(f: BinaryIO, folder: Path) -> None:
    f.close()
    shutil.rmtree(folder, ignore_errors=True)


class Linker:
    """``keep`` for ``tensor_data.DataFile``: each source file linked (or copied) into ``folder`` once, as
    ``source-N.data``; the written model refers to it there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: dict[str, str] = {}

    def __call__(self, t: onnx.TensorProto) -> str:
        path = file_location(t)
        assert path is not None
        if path not in self.names:
            name = f"source-{len(self.names)}.data"
            try:
                os.link(path, self.folder / name)
            except OSError:     # another file system, or links not allowed: a copy (file to file)
                shutil.copyfile(path, self.folder / name)
            self.names[path] = name
        return self.names[path]


def sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no disk (for ``onnx.checker``, which checks the data file exists and
    holds each tensor's span, not its values)."""
    with open(path, "wb") as f:
        f.truncate(size)
