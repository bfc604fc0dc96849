"""Data readers: turn calibration/validation data into a re-iterable stream of feeds for a given model.

A feed is ``{input_name: ndarray}`` ready for onnxruntime, paired with the labels of its samples (or None).
Sources (DESIGN.md §2):
  * an ``.npz`` whose keys are input names and whose arrays are stacked along axis 0. An array of the input's
    rank is cut into batches along axis 0 (the declared batch size if fixed, else ``batch_size`` rows); an array
    with one more axis than the input holds one feed per index of its axis 0 (for models with no batch axis);
  * a folder of ``.npz`` files, one feed per file (sorted by name), used as they are;
  * any iterable of feed dicts, including onnxruntime's ``CalibrationDataReader`` (``get_next()`` until None).
The reserved key ``__labels__`` (int array, one label per sample) carries labels; it is never an input name.
Arrays are read lazily from the file, batch by batch, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from graphopt import io
from graphopt.errors import InputError, UsageError

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


def _fits(shape: Sequence[int], declared: Sequence[Dim]) -> bool:
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


def _cast(name: str, arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    if spec.dtype is None or arr.dtype == spec.dtype:
        return arr
    if spec.dtype.kind in "OSU" and arr.dtype.kind in "OSU":
        return arr.astype(spec.dtype)
    if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
        return arr.astype(spec.dtype)
    raise InputError(f"{where}: array '{name}' has dtype {arr.dtype}, the model input needs {spec.dtype}")


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
                                 f"model input '{spec.name}' of shape {_show(declared)} (stack samples on axis 0)")
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
                        feed[name] = _cast(name, part, spec_by_name[name], str(self.path))
                    yield Batch(feed, lab)
            finally:
                for r in streams.values():
                    r.close()
                if labels is not None:
                    labels.close()


class _RowReader:
    """Reads an array from an npz member a few rows at a time, so memory holds one batch, not the file."""

    def __init__(self, z: Any, key: str) -> None:
        from numpy.lib import format as npformat

        self.key = key
        self.f = z.zip.open(key + ".npy")
        version = npformat.read_magic(self.f)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        self.shape, fortran, self.dtype = reader(self.f)
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
    from numpy.lib import format as npformat

    with z.zip.open(key + ".npy") as f:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, _, _ = npformat.read_array_header_1_0(f)
        else:
            shape, _, _ = npformat.read_array_header_2_0(f)
    return tuple(shape)


class FolderSource(DataSource):
    """One feed per ``.npz`` file in a folder, in sorted order, used as is."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], max_samples: int | None = None) -> None:
        self.path = path
        self.inputs = list(inputs)
        self.files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if max_samples is not None:
            self.files = self.files[:max_samples]
        if not self.files:
            raise InputError(f"{path}: folder holds no .npz files")
        self.description = f"{path.name}/ ({len(self.files)} feeds)"

    def __iter__(self) -> Iterator[Batch]:
        for f in self.files:
            with io.open_npz(f) as z:
                yield _feed_from_mapping({k: z[k] for k in z.files}, self.inputs, str(f))


def _feed_from_mapping(data: dict[str, Any], inputs: Sequence[InputSpec], where: str) -> Batch:
    feed = {}
    for spec in inputs:
        if spec.name not in data:
            if spec.has_default:
                continue
            raise InputError(f"{where}: no array for model input '{spec.name}'")
        value = data[spec.name]
        feed[spec.name] = _cast(spec.name, np.asarray(value), spec, where) if spec.dtype is not None else value
    labels = data.get(LABELS_KEY)
    return Batch(feed, None if labels is None else np.atleast_1d(np.asarray(labels)))


class IterableSource(DataSource):
    """Feeds from a Python iterable or a CalibrationDataReader.

    A re-iterable source (a list, a reader with ``rewind``) is read again on each pass; a one-shot iterator (a
    generator, a reader without ``rewind``) is cached as it streams, so a second pass sees the same feeds.
    """

    def __init__(self, data: Any, inputs: Sequence[InputSpec], max_samples: int | None = None) -> None:
        self.data = data
        self.inputs = list(inputs)
        self.max_samples = max_samples
        if hasattr(data, "get_next"):
            self.one_shot = not hasattr(data, "rewind")
        else:
            self.one_shot = iter(data) is data
        self._cache: list[Batch] = []
        self._live: Iterator[Any] | None = None
        self._exhausted = False
        self.description = type(data).__name__

    def _raw(self) -> Iterator[Any]:
        if hasattr(self.data, "get_next"):
            if hasattr(self.data, "rewind"):
                self.data.rewind()
            while (item := self.data.get_next()) is not None:
                yield item
        else:
            yield from iter(self.data)

    def _convert(self, i: int, item: Any) -> Batch:
        if not isinstance(item, dict):
            raise InputError(f"calibration data item {i} is a {type(item).__name__}, not a dict of arrays")
        return _feed_from_mapping(item, self.inputs, f"calibration data item {i}")

    def __iter__(self) -> Iterator[Batch]:
        limit = self.max_samples
        if not self.one_shot:
            for i, item in enumerate(self._raw()):
                if limit is not None and i >= limit:
                    return
                yield self._convert(i, item)
            return
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
            elif self._exhausted or (limit is not None and i >= limit):
                return
            else:
                if self._live is None:
                    self._live = self._raw()
                item = next(self._live, None)
                if item is None:
                    self._exhausted = True
                    return
                self._cache.append(self._convert(i, item))
                yield self._cache[i]
            i += 1


def open_source(data: Any, model: onnx.ModelProto, *, batch_size: int = DEFAULT_BATCH,
                max_samples: int | None = None) -> DataSource:
    """A DataSource for ``data``: an ``.npz`` path, a folder of ``.npz``, an iterable of dicts, or a reader."""
    inputs = model_inputs(model)
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            return FolderSource(p, inputs, max_samples)
        if not p.exists():
            raise InputError(f"{p}: no such data file or folder")
        if p.suffix != ".npz":
            raise InputError(f"{p}: data must be an .npz file or a folder of .npz files")
        return NpzSource(p, inputs, batch_size, max_samples)
    if isinstance(data, dict):
        return IterableSource([data], inputs, max_samples)
    if hasattr(data, "get_next") or isinstance(data, Iterable):
        return IterableSource(data, inputs, max_samples)
    raise UsageError(f"unsupported data source {type(data).__name__}: give an .npz path, a folder, or an iterable "
                     "of {input_name: array} dicts")


class RandomSource(DataSource):
    """Seeded random feeds of the declared shapes; dynamic dims come from ``shapes`` or are guessed."""

    def __init__(self, inputs: Sequence[InputSpec], shapes: dict[str, list[int]], seed: int, n_feeds: int = 4
                 ) -> None:
        self.inputs = [s for s in inputs if not s.has_default]
        self.seed = seed
        self.n_feeds = n_feeds
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.guesses: list[str] = []
        for spec in self.inputs:
            if spec.dtype is None:
                raise InputError(f"input '{spec.name}' is not a tensor; random inputs cannot be made for it: "
                                 "give --val-data")
            if spec.dtype.kind == "V":  # ml_dtypes: bfloat16, float8, int4...
                raise InputError(f"input '{spec.name}' is {spec.dtype}, which onnxruntime's Python API cannot take "
                                 "from numpy; graphopt cannot validate this model")
            self.shapes[spec.name] = self._resolve(spec, shapes.get(spec.name))
        self.description = f"random inputs (seed {seed}, {n_feeds} feeds)"

    def _resolve(self, spec: InputSpec, given: list[int] | None) -> tuple[int, ...]:
        if given is not None:
            if spec.shape is not None and len(given) != len(spec.shape):
                raise UsageError(f"--input-shape {spec.name}: rank {len(given)} given, the model input has rank "
                                 f"{len(spec.shape)} {_show(spec.shape)}")
            if spec.shape is not None:
                for i, (g, d) in enumerate(zip(given, spec.shape)):
                    if d is not None and g != d:
                        raise UsageError(f"--input-shape {spec.name}: dim {i} is fixed to {d} in the model, not {g}")
            return tuple(given)
        if spec.shape is None:
            raise UsageError(f"input '{spec.name}' has no declared shape: give --input-shape {spec.name}=...")
        dims = []
        for i, d in enumerate(spec.shape):
            if d is None:
                guess = 1 if i == 0 else 64
                label = f" ('{spec.dim_names[i]}')" if spec.dim_names and spec.dim_names[i] else ""
                self.guesses.append(f"input '{spec.name}' dim {i}{label} is dynamic; guessed {guess} "
                                    f"(set it with --input-shape {spec.name}=...)")
                d = guess
            dims.append(d)
        return tuple(dims)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n_feeds):
            feed = {}
            for spec in self.inputs:
                feed[spec.name] = random_array(rng, self.shapes[spec.name], spec.dtype)  # type: ignore[arg-type]
            yield Batch(feed, None)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "OSU":
        return np.full(shape, "a", dtype=object)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    raise InputError(f"cannot make random inputs of dtype {dtype}: give --val-data")


def _show(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "[unknown]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def parse_shape(text: str) -> tuple[str, list[int]]:
    """Parse ``NAME=1x3x224x224`` (``NAME=`` for a scalar)."""
    name, eq, dims = text.rpartition("=")
    if not eq or not name:
        raise UsageError(f"--input-shape '{text}': expected NAME=D1xD2x... (e.g. input=1x3x224x224)")
    try:
        shape = [int(d) for d in dims.lower().split("x")] if dims.strip() else []
    except ValueError:
        raise UsageError(f"--input-shape '{text}': dims must be positive integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape '{text}': dims must be positive integers")
    return name, shape
