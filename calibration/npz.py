"""Feeds cut from one ``.npz`` of arrays stacked along axis 0 (or one ``.npy``, for a model with one input), read lazily
so memory holds one batch, not the file.

For each model input the npz holds an array named after it:
  * of the input's rank: cut into batches along axis 0 (the declared batch size if fixed, else ``batch_size``
    rows; a fixed batch size must divide the rows, and ``max_samples`` is cut to whole batches of it) — "batched";
  * with one more axis than the input: one feed per index of its axis 0 (models with no batch axis) — "stacked".
    A 0-d input (an If's condition, a sample rate) is this case: one value per sample, shape [N];
  * for an input of unknown rank, or a 0-d array for a 0-d input: the whole array, the same in every feed — "whole".
Every array that is cut holds the same samples; when one input has no batch axis ("stacked"), each feed is one
sample, so a batched input with a dynamic batch size is cut one row at a time (and one with a fixed batch size
other than 1 cannot be fed with it). ``__labels__`` holds one label per sample (``metrics.class_indices``). A
``.npy`` is the one array of a model with one input (stacked on axis 0 as in an npz), without labels.

The data is checked on opening (``checks``): every array is read through once, a chunk at a time, so values a cast
would change, bad labels and (in calibration data) NaN/Inf are refused before any pass runs, and a cast or
raw-looking values are said once in ``warnings``. Rows are read straight from the ``.npy`` member (its header gives
shape and dtype, then ``rows × row bytes`` per batch), so an object or Fortran-ordered array cannot be streamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
from numpy.lib import format as npformat

from graphopt import io
from graphopt.errors import InputError, one_line
from graphopt.metrics import class_indices

from .checks import ValueTally, cast_note, check_values, refuses_nonfinite, say_once, target_dtype, unknown_keys
from .feeds import DEFAULT_BATCH, LABELS_KEY, Batch, DataSource, Dim, InputSpec, show_shape

SCAN_BYTES = 64 << 20   # the check on opening reads each array in chunks of at most this many bytes (one row at least)


def _fits(shape: Sequence[int], declared: Sequence[Dim]) -> bool:
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


class _Archive:
    """The arrays of an ``.npz``, or the one array of an ``.npy`` under the name ``npy_name``."""

    def __init__(self, path: Path, npy_name: str | None = None) -> None:
        self.path = path
        self.npy_name = npy_name
        self.z = io.open_npz(path) if npy_name is None else None
        self.keys: list[str] = list(self.z.files) if self.z is not None else [npy_name]  # type: ignore[list-item]

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.z is not None:
            self.z.close()

    def open(self, key: str) -> BinaryIO:
        if self.z is not None:
            return self.z.zip.open(key + ".npy")
        return open(self.path, "rb")

    def load(self, key: str) -> np.ndarray:
        if self.z is not None:
            return np.asarray(self.z[key])
        return np.asarray(np.load(self.path, allow_pickle=False))

    def header(self, key: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
        try:
            with self.open(key) as f:
                return _npy_header(f)
        except Exception as e:
            what = f"array '{key}'" if self.z is not None else "file"
            raise InputError(f"{self.path}: {what} is not a readable .npy: {one_line(e)}") from e


class NpzSource(DataSource):
    """Feeds cut from one ``.npz`` of arrays stacked along axis 0, or from one ``.npy`` for a one-input model."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], batch_size: int = DEFAULT_BATCH,
                 max_samples: int | None = None, purpose: str | None = None) -> None:
        self.path = path
        self.inputs = list(inputs)
        self.batch_size = batch_size
        self.refuse_nonfinite = refuses_nonfinite(purpose)
        self.warnings: list[str] = []
        where = str(path)
        self.npy_name = _npy_input(path, self.inputs) if path.suffix == ".npy" else None
        with self._archive() as z:
            keys = z.keys
            headers = {k: z.header(k) for k in keys}
        shapes = {k: h[0] for k, h in headers.items()}
        self.labels_present = LABELS_KEY in keys
        # name -> (mode, rows per feed, samples used, cast to), in the model's input order
        self.plan: dict[str, tuple[str, int, int, np.dtype[Any] | None]] = {}
        modes: dict[str, tuple[str, int]] = {}        # name -> (mode, samples in the file)
        for spec in self.inputs:
            if spec.name not in keys:
                if spec.has_default:
                    continue
                raise InputError(f"{where}: no array for model input '{spec.name}' "
                                 f"(arrays: {', '.join(k for k in keys if k != LABELS_KEY) or 'none'})")
            modes[spec.name] = (_mode(spec, shapes[spec.name], where), shapes[spec.name][0] if shapes[spec.name] else 1)
        one_per_feed = [n for n, (m, _) in modes.items() if m == "stacked"]
        cut = {n: s for n, (m, s) in modes.items() if m != "whole"}
        if len(set(cut.values())) > 1:
            raise InputError(f"{where}: arrays give different numbers of samples: "
                             + ", ".join(f"'{n}' {s} ({_how(self._spec(n), modes[n][0])})" for n, s in cut.items())
                             + "; stack the same samples on axis 0 in every array (a 0-d input: one value per "
                             "sample, shape [N], or one value for all, shape [])")
        file_samples = next(iter(cut.values()), 1)
        fixed = {n: d for n, (m, _) in modes.items() if m == "batched" and (d := _batch_dim(self._spec(n))) is not None}
        if one_per_feed and any(d != 1 for d in fixed.values()):
            n, d = next((n, d) for n, d in fixed.items() if d != 1)
            raise InputError(f"{where}: input '{one_per_feed[0]}' has no batch axis, so each feed is one sample, but "
                             f"input '{n}' has a fixed batch size of {d}: give '{one_per_feed[0]}' one value for all "
                             f"samples (shape {show_shape(self._spec(one_per_feed[0]).shape)}), not one per sample")
        if len(set(fixed.values())) > 1:
            raise InputError(f"{where}: the model's inputs have different fixed batch sizes ("
                             + ", ".join(f"'{n}' {d}" for n, d in fixed.items()) + "): graphopt cannot cut them")
        step = 1 if one_per_feed else next(iter(fixed.values()), batch_size)
        if fixed and file_samples % step != 0:
            n = next(iter(fixed))
            raise InputError(f"{where}: array '{n}' has {file_samples} rows, not a multiple of the model's fixed "
                             f"batch size {step}")
        samples = file_samples if max_samples is None else min(file_samples, max_samples)
        if fixed and samples % step:      # whole batches of a fixed batch size (one at least)
            samples = max(step, samples - samples % step)
        self.plan = {spec.name: (modes[spec.name][0], step, samples,
                                 target_dtype(spec.name, headers[spec.name][2], spec, where))
                     for spec in self.inputs if spec.name in modes}
        if cut and samples == 0:
            raise InputError(f"{where}: holds no samples (its arrays have 0 rows)" if file_samples == 0 else
                             f"{where}: no samples to read (limited to {max_samples})")
        if self.labels_present and cut and shapes[LABELS_KEY][:1] != (file_samples,):
            raise InputError(f"{where}: '{LABELS_KEY}' has {shapes[LABELS_KEY][:1] or 'no'} entries for "
                             f"{file_samples} samples")
        self.rows_per_feed = step if cut else 0        # 0: every input is whole, one feed
        self.n_feeds = -(-samples // step) if cut else 1
        self.n_samples = samples if cut else 1
        self._check(headers)
        for name, (_, _, _, dst) in self.plan.items():
            say_once(self.warnings, cast_note(name, headers[name][2], dst))
        say_once(self.warnings, unknown_keys(keys, self.inputs, where))
        self.description = path.name   # the report gives the feeds and samples it validated

    def _spec(self, name: str) -> InputSpec:
        return next(s for s in self.inputs if s.name == name)

    def _archive(self) -> _Archive:
        return _Archive(self.path, self.npy_name)

    def _check(self, headers: dict[str, tuple[tuple[int, ...], bool, np.dtype[Any]]]) -> None:
        """Read every array used once, a chunk at a time: refuse NaN/Inf, values the cast would change and bad
        labels; note raw-looking values (``checks``)."""
        where = str(self.path)
        with self._archive() as z:
            for name, (mode, _, samples, dst) in self.plan.items():
                tally = ValueTally()
                for chunk in _chunks(z, name, None if mode == "whole" else samples):
                    tally.update(chunk)
                check_values(name, tally, headers[name][2], dst, where, self.warnings, self.refuse_nonfinite,
                             self._spec(name))
            if self.labels_present:
                cut = any(mode != "whole" for mode, *_ in self.plan.values())
                for chunk in _chunks(z, LABELS_KEY, self.n_samples if cut else None):
                    class_indices(chunk, f"{where}: '{LABELS_KEY}'")

    def __iter__(self) -> Iterator[Batch]:
        with self._archive() as z:
            streams = {name: _RowReader(z, name) for name, p in self.plan.items() if p[0] != "whole"}
            whole = {name: _cast(z.load(name), p[3]) for name, p in self.plan.items() if p[0] == "whole"}
            labels = _RowReader(z, LABELS_KEY) if self.labels_present and streams else None
            try:
                if not streams:   # every input whole: one feed
                    lab = z.load(LABELS_KEY) if self.labels_present else None
                    yield Batch(dict(whole), None if lab is None else class_indices(lab), None)
                    return
                step = self.rows_per_feed
                for i in range(self.n_feeds):
                    take = min(step, self.n_samples - i * step)
                    feed = {}
                    for name, (mode, _, _, dst) in self.plan.items():
                        if mode == "whole":
                            feed[name] = whole[name]
                            continue
                        part = _cast(streams[name].read_rows(take), dst)
                        feed[name] = part.reshape(part.shape[1:]) if mode == "stacked" else part
                    lab = class_indices(labels.read_rows(take)) if labels is not None else None
                    yield Batch(feed, lab, take)
            finally:
                for r in streams.values():
                    r.close()
                if labels is not None:
                    labels.close()


def _mode(spec: InputSpec, shape: tuple[int, ...], where: str) -> str:
    """How an array of ``shape`` feeds the input ``spec``: batched, stacked or whole (module docstring)."""
    declared = spec.shape
    if declared is None or (len(declared) == 0 and len(shape) == 0):
        return "whole"
    if len(shape) == len(declared) + 1 and _fits(shape[1:], declared):
        return "stacked"
    if len(declared) >= 1 and len(shape) == len(declared) and _fits(shape[1:], declared[1:]):
        return "batched"
    expect = ("one value per sample, shape [N], or one value for all samples, shape []" if not declared else
              f"samples stacked on axis 0: {_with_n(declared[1:])} cut into batches, or {_with_n(declared)} one "
              "feed per sample")
    raise InputError(f"{where}: array '{spec.name}' has shape {list(shape)}, which does not match the model input "
                     f"'{spec.name}' of shape {show_shape(declared)} (expected {expect})")


def _batch_dim(spec: InputSpec) -> int | None:
    """The fixed batch size a batched input declares (None: dynamic)."""
    return spec.shape[0] if spec.shape else None


def _with_n(dims: Sequence[Dim]) -> str:
    """``[N,3,?]``: a shape with a sample axis in front, for messages."""
    return "[" + ",".join(["N"] + ["?" if d is None else str(d) for d in dims]) + "]"


def _how(spec: InputSpec, mode: str) -> str:
    """What an array's samples are, for the message about different numbers of samples."""
    if mode == "batched":
        return "rows of axis 0"
    if spec.shape == ():
        return "one value per sample of the 0-d input"
    return f"one feed per index of axis 0, the input {show_shape(spec.shape)} having no batch axis"


def _npy_input(path: Path, inputs: Sequence[InputSpec]) -> str:
    """The model input a ``.npy`` feeds: the model's only input without a default, else an InputError."""
    needed = [s.name for s in inputs if not s.has_default]
    if len(needed) != 1:
        raise InputError(f"{path}: a .npy holds one array but the model has {len(needed)} inputs "
                         f"({', '.join(needed) or 'none'}): give an .npz with one array per input, named after it")
    if not path.is_file():
        raise InputError(f"{path}: no such .npy file")
    return needed[0]


def _cast(arr: np.ndarray, dst: np.dtype[Any] | None) -> np.ndarray:
    return arr if dst is None else arr.astype(dst)


def _chunks(z: _Archive, key: str, samples: int | None) -> Iterator[np.ndarray]:
    """The first ``samples`` rows of an array, a chunk of at most SCAN_BYTES at a time; the whole array for None."""
    if samples is None:
        yield z.load(key)
        return
    reader = _RowReader(z, key)
    try:
        step = max(1, SCAN_BYTES // max(reader.row_bytes, 1))
        for start in range(0, samples, step):
            yield reader.read_rows(min(step, samples - start))
    finally:
        reader.close()


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran order, dtype) from the header of an ``.npy`` stream, leaving it at the first data byte."""
    version = npformat.read_magic(f)
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    shape, fortran, dtype = reader(f)
    return tuple(shape), fortran, dtype


class _RowReader:
    """Reads an array from an npz member (or an .npy) a few rows at a time, so memory holds one batch, not the
    file."""

    def __init__(self, z: _Archive, key: str) -> None:
        self.key = key
        self.where = str(z.path)
        self.f = z.open(key)
        self.shape, fortran, self.dtype = _npy_header(self.f)
        self.streamable = not fortran and not self.dtype.hasobject and len(self.shape) > 0
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize if self.shape else 0

    def read_rows(self, n: int) -> np.ndarray:
        if not self.streamable:
            raise InputError(f"{self.where}: array '{self.key}' cannot be streamed (object or Fortran-ordered); "
                             "re-save it with numpy in C order")
        data = self.f.read(n * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise InputError(f"{self.where}: array '{self.key}' is truncated")
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:])).copy()

    def close(self) -> None:
        self.f.close()
