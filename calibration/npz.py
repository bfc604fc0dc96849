"""Feeds cut from one ``.npz`` of arrays stacked along axis 0, read lazily so memory holds one batch, not the file.

For each model input the npz holds an array named after it:
  * of the input's rank: cut into batches along axis 0 (the declared batch size if fixed, else ``batch_size``
    rows; a fixed batch size must divide the rows) — "batched";
  * with one more axis than the input: one feed per index of its axis 0 (models with no batch axis) — "stacked";
  * for an input of unknown rank, or a scalar: the whole array is the feed, once — "whole".
All inputs must give the same number of feeds; ``__labels__`` holds one label per sample. Rows are read straight
from the ``.npy`` member (its header gives shape and dtype, then ``rows × row bytes`` per batch), so an
object or Fortran-ordered array cannot be streamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
from numpy.lib import format as npformat

from graphopt import io
from graphopt.errors import InputError

from .feeds import DEFAULT_BATCH, LABELS_KEY, Batch, DataSource, Dim, InputSpec, cast_to_input, show_shape


def _fits(shape: Sequence[int], declared: Sequence[Dim]) -> bool:
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


class NpzSource(DataSource):
    """Feeds cut from one ``.npz`` of arrays stacked along axis 0."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], batch_size: int = DEFAULT_BATCH,
                 max_samples: int | None = None) -> None:
        self.path = path
        self.inputs = list(inputs)
        self.batch_size = batch_size
        with io.open_npz(path) as z:
            keys = list(z.files)
            shapes = {k: _npy_shape(z, k) for k in keys}
        self.labels_present = LABELS_KEY in keys
        self.plan: dict[str, tuple[str, int, int]] = {}  # name -> (mode, rows per feed, rows used)
        n_samples: int | None = None
        feeds: int | None = None
        where = str(path)
        for spec in self.inputs:
            if spec.name not in keys:
                if spec.has_default:
                    continue
                raise InputError(f"{where}: no array for model input '{spec.name}' "
                                 f"(arrays: {', '.join(k for k in keys if k != LABELS_KEY) or 'none'})")
            shape = shapes[spec.name]
            declared = spec.shape
            if declared is None:
                mode, rows, count, samples = "whole", shape[0] if shape else 1, 1, 1
            elif len(shape) == len(declared) + 1 and _fits(shape[1:], declared):
                mode, rows, count, samples = "stacked", 1, shape[0], shape[0]
            elif len(declared) >= 1 and len(shape) == len(declared) and _fits(shape[1:], declared[1:]):
                rows = declared[0] if declared[0] is not None else batch_size
                if declared[0] is not None and shape[0] % declared[0] != 0:
                    raise InputError(f"{where}: array '{spec.name}' has {shape[0]} rows, not a multiple of the "
                                     f"model's fixed batch size {declared[0]}")
                mode, count, samples = "batched", -(-shape[0] // rows), shape[0]
            elif len(declared) == 0 and len(shape) == 0:
                mode, rows, count, samples = "whole", 1, 1, 1
            else:
                raise InputError(f"{where}: array '{spec.name}' has shape {list(shape)}, which does not match the "
                                 f"model input '{spec.name}' of shape {show_shape(declared)} (stack samples on axis 0)")
            if max_samples is not None and mode in ("stacked", "batched"):
                samples = min(samples, max_samples)
                count = -(-samples // rows)
            self.plan[spec.name] = (mode, rows, samples)
            if feeds is not None and count != feeds:
                raise InputError(f"{where}: arrays give different numbers of samples ({n_samples} vs {samples})")
            feeds, n_samples = count, samples
        self.n_feeds = feeds or 0
        self.n_samples = n_samples or 0
        if self.labels_present and shapes[LABELS_KEY][:1] != (self.n_samples,) and max_samples is None:
            raise InputError(f"{where}: '{LABELS_KEY}' has {shapes[LABELS_KEY][:1]} entries for "
                             f"{self.n_samples} samples")
        self.description = f"{path.name} ({self.n_samples} samples)"

    def __iter__(self) -> Iterator[Batch]:
        spec_by_name = {s.name: s for s in self.inputs}
        with io.open_npz(self.path) as z:
            streams = {name: _RowReader(z, name) for name in self.plan}
            labels = _RowReader(z, LABELS_KEY) if self.labels_present else None
            try:
                for i in range(self.n_feeds):
                    feed = {}
                    lab = None
                    for name, (mode, rows, total) in self.plan.items():
                        if mode == "whole":
                            part = streams[name].read_all()
                        else:
                            take = min(rows, total - i * rows)
                            part = streams[name].read_rows(take)
                            if mode == "stacked":
                                part = part[0]
                            if labels is not None and lab is None:
                                lab = labels.read_rows(take)
                        feed[name] = cast_to_input(name, part, spec_by_name[name], str(self.path))
                    yield Batch(feed, lab)
            finally:
                for r in streams.values():
                    r.close()
                if labels is not None:
                    labels.close()


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran order, dtype) from the header of an ``.npy`` stream, leaving it at the first data byte."""
    version = npformat.read_magic(f)
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    return tuple(shape), fortran, dtype


class _RowReader:
    """Reads an array from an npz member a few rows at a time, so memory holds one batch, not the file."""

    def __init__(self, z: Any, key: str) -> None:
        self.key = key
        self.f = z.zip.open(key + ".npy")
        self.shape, fortran, self.dtype = _npy_header(self.f)
        self.streamable = not fortran and not self.dtype.hasobject and len(self.shape) > 0
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize if self.shape else 0
        self.z = z

    def read_rows(self, n: int) -> np.ndarray:
        if not self.streamable:
            raise InputError(f"array '{self.key}' cannot be streamed (object or Fortran-ordered); re-save it "
                             "with numpy in C order")
        data = self.f.read(n * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise InputError(f"array '{self.key}' is truncated")
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:])).copy()

    def read_all(self) -> np.ndarray:
        return np.asarray(self.z[self.key])

    def close(self) -> None:
        self.f.close()


def _npy_shape(z: Any, key: str) -> tuple[int, ...]:
    """Shape of an array in an npz without reading its data."""
    with z.zip.open(key + ".npy") as f:
        return _npy_header(f)[0]
