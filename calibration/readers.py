"""Data readers: turn calibration/validation data into a re-iterable stream of feeds for a given model.

Sources (DESIGN.md §2), each a ``feeds.DataSource`` of ``feeds.Batch`` (one feed ``{input_name: ndarray}`` and its
labels):
  * an ``.npz`` whose keys are input names and whose arrays are stacked along axis 0 (``npz.NpzSource``: cut into
    batches, read lazily, so memory does not grow with the number of samples); or one ``.npy`` for a model with one
    input, read the same way;
  * a folder of ``.npz`` files, one feed per file (sorted by name), used as they are;
  * a folder of images, one sample per image, preprocessed as ``--preprocess`` states (``images.ImageSource``);
  * any iterable of feed dicts, including onnxruntime's ``CalibrationDataReader`` (``get_next()`` until None);
  * seeded random feeds of the declared shapes, when no data is given (``RandomSource``).
Every source applies the same checks on the way in (``checks``) and lists what it said about the data in its
``warnings``; ``data_warnings`` gathers them for the report. ``open_source`` picks the reader; ``parse_shape`` reads
``--input-shape``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from graphopt import io
from graphopt.errors import InputError, UsageError

from .checks import feed_from_mapping, refuses_nonfinite
from .feeds import DEFAULT_BATCH, LABELS_KEY, Batch, DataSource, InputSpec, model_inputs, show_shape
from .images import IMAGE_SUFFIXES, ImageSource, as_preprocess, check_preprocess_used, is_image_folder
from .npz import NpzSource
from .preprocess import Preprocess

__all__ = ["DEFAULT_BATCH", "LABELS_KEY", "Batch", "DataSource", "FolderSource", "ImageSource", "InputSpec",
           "IterableSource", "NpzSource", "Preprocess", "RandomSource", "as_preprocess", "check_preprocess_used",
           "data_warnings", "model_inputs", "open_source", "parse_shape", "random_array"]


class FolderSource(DataSource):
    """One feed per ``.npz`` file in a folder, in sorted order, used as is."""

    def __init__(self, path: Path, inputs: Sequence[InputSpec], max_samples: int | None = None,
                 purpose: str | None = None) -> None:
        self.path = path
        self.inputs = list(inputs)
        self.refuse_nonfinite = refuses_nonfinite(purpose)
        self.files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if max_samples is not None:
            self.files = self.files[:max_samples]
        if not self.files:
            raise InputError(f"{path}: folder holds no .npz files")
        self.warnings: list[str] = []
        self.description = f"{path.name}/"   # the report gives the feeds and samples it validated

    def __iter__(self) -> Iterator[Batch]:
        for f in self.files:
            with io.open_npz(f) as z:
                yield feed_from_mapping({k: z[k] for k in z.files}, self.inputs, str(f), self.warnings,
                                        unknown_where=f"{self.path}/*.npz", refuse_nonfinite=self.refuse_nonfinite)


class IterableSource(DataSource):
    """Feeds from a Python iterable or a CalibrationDataReader.

    A re-iterable source (a list, a reader with ``rewind``) is read again on each pass; a one-shot iterator (a
    generator, a reader without ``rewind``) is cached as it streams, so a second pass sees the same feeds.
    """

    def __init__(self, data: Any, inputs: Sequence[InputSpec], max_samples: int | None = None,
                 purpose: str | None = None) -> None:
        self.data = data
        self.inputs = list(inputs)
        self.max_samples = max_samples
        self.refuse_nonfinite = refuses_nonfinite(purpose)
        if hasattr(data, "get_next"):
            self.one_shot = not hasattr(data, "rewind")
        else:
            self.one_shot = iter(data) is data
        self._cache: list[Batch] = []
        self._live: Iterator[Any] | None = None
        self._exhausted = False
        self.warnings: list[str] = []
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
            raise InputError(f"data item {i} is a {type(item).__name__}, not a dict of arrays")
        return feed_from_mapping(item, self.inputs, f"data item {i}", self.warnings, unknown_where="the data's dicts",
                                 refuse_nonfinite=self.refuse_nonfinite)

    def __iter__(self) -> Iterator[Batch]:
        n = 0
        for batch in self._batches():
            n += 1
            yield batch
        if n == 0 and self.max_samples != 0:
            raise InputError(f"the data ({self.description}) gave no feeds: give at least one sample")

    def _batches(self) -> Iterator[Batch]:
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
                max_samples: int | None = None, purpose: str | None = None,
                preprocess: Preprocess | str | Mapping[str, Any] | None = None) -> DataSource:
    """A DataSource for ``data``: an ``.npz`` path (or an ``.npy`` for a one-input model), a folder of ``.npz``, a
    folder of images (read with ``preprocess``: a Preprocess, its ``--preprocess`` text or a mapping of its keys),
    an iterable of dicts, or a reader. ``purpose`` ("calibration", "validation" or None): calibration data with
    NaN/Inf is refused, other data has them said in a warning (``checks``)."""
    inputs = model_inputs(model)
    if isinstance(data, DataSource):
        return data
    refuses_nonfinite(purpose)
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir() and is_image_folder(p):
            return ImageSource(p, inputs, batch_size, max_samples, purpose, as_preprocess(preprocess))
        if p.is_dir():
            if not any(p.glob("*.npz")):
                raise InputError(f"{p}: folder holds no .npz files and no images ({', '.join(IMAGE_SUFFIXES)})")
            return FolderSource(p, inputs, max_samples, purpose)
        if not p.exists():
            raise InputError(f"{p}: no such data file or folder")
        if p.suffix not in (".npz", ".npy"):
            raise InputError(f"{p}: data must be an .npz file, a folder of .npz files, or one .npy for a model with "
                             "one input")
        return NpzSource(p, inputs, batch_size, max_samples, purpose)
    if isinstance(data, dict):
        return IterableSource([data], inputs, max_samples, purpose)
    if hasattr(data, "get_next") or isinstance(data, Iterable):
        return IterableSource(data, inputs, max_samples, purpose)
    raise UsageError(f"unsupported data source {type(data).__name__}: give an .npz path, a folder, or an iterable "
                     "of {input_name: array} dicts")


class RandomSource(DataSource):
    """Seeded random feeds of the declared shapes; dynamic dims come from ``shapes`` or are guessed.

    Floats are standard normal; an integer input that indexes a constant table (``InputSpec.index_rows``: a
    Gather's data, an embedding) is drawn in [0, rows), an input named like a mask (``attention_mask``) is 0/1 (ones,
    then zeros along the last axis, as padding leaves it; at least one 1), other integers in [0, 4); bools are fair
    coins. Every value is an ndarray of the input's dtype, a 0-d input's too. ``warnings`` say first that the data
    is synthetic, then each guessed dim and how the integers were drawn."""

    def __init__(self, inputs: Sequence[InputSpec], shapes: dict[str, list[int]], seed: int, n_feeds: int = 4
                 ) -> None:
        self.inputs = [s for s in inputs if not s.has_default]
        self.seed = seed
        self.n_feeds = n_feeds
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.warnings: list[str] = [
            f"validated on seeded random inputs (synthetic data, seed {seed}): the figures say how closely the "
            "rewrite matches the original, not how well either does on real data; give --val-data for that"]
        for spec in self.inputs:
            if spec.dtype is None:
                raise InputError(f"input '{spec.name}' is not a tensor; random inputs cannot be made for it: "
                                 "give --val-data")
            if spec.dtype.kind == "V":  # ml_dtypes: bfloat16, float8, int4...
                raise InputError(f"input '{spec.name}' is {spec.dtype}, which onnxruntime's Python API cannot take "
                                 "from numpy; graphopt cannot validate this model")
            self.shapes[spec.name] = self._resolve(spec, shapes.get(spec.name))
        drawn = [f"'{s.name}' {_drawn(s)}" for s in self.inputs if s.dtype is not None and s.dtype.kind in "iu"]
        if drawn:
            self.warnings.append("random integer inputs: " + ", ".join(drawn))
        self.description = f"random inputs (seed {seed})"

    @property
    def guesses(self) -> list[str]:
        """The warnings (the older name, which the report read): synthetic data, guessed dims, integer ranges."""
        return self.warnings

    def _resolve(self, spec: InputSpec, given: list[int] | None) -> tuple[int, ...]:
        if given is not None:
            if spec.shape is not None and len(given) != len(spec.shape):
                raise UsageError(f"--input-shape {spec.name}: rank {len(given)} given, the model input has rank "
                                 f"{len(spec.shape)} {show_shape(spec.shape)}")
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
                self.warnings.append(f"input '{spec.name}' dim {i}{label} is dynamic; guessed {guess} "
                                     f"(set it with --input-shape {spec.name}=...)")
                d = guess
            dims.append(d)
        return tuple(dims)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.n_feeds):
            feed = {}
            for spec in self.inputs:
                shape, dtype = self.shapes[spec.name], spec.dtype
                assert dtype is not None
                if is_mask(spec.name) and dtype.kind in "biuf":
                    feed[spec.name] = random_mask(rng, shape, dtype)
                else:
                    feed[spec.name] = random_array(rng, shape, dtype, high=spec.index_rows or RANDOM_INT_HIGH)
            yield Batch(feed, None)


RANDOM_INT_HIGH = 4     # integers that index nothing the graph tells are drawn in [0, 4)


def is_mask(name: str) -> bool:
    """An input named like a mask (attention_mask, input_mask, mask): random values are 0/1."""
    return "mask" in name.lower()


def _drawn(spec: InputSpec) -> str:
    """How RandomSource draws an integer input, for its warning."""
    if is_mask(spec.name):
        return "0/1 (named like a mask)"
    if spec.index_rows:
        return f"in [0, {spec.index_rows}) (the rows of the table '{spec.index_table}' it indexes)"
    return f"in [0, {RANDOM_INT_HIGH})"


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A 0/1 mask of ``shape``: along the last axis, ones then zeros (a random length >= 1 of ones per row)."""
    if not shape:
        return np.asarray(1, dtype=dtype)
    length = rng.integers(1, max(shape[-1], 1) + 1, size=shape[:-1])
    return np.asarray(np.arange(shape[-1]) < np.expand_dims(length, -1), dtype=dtype)


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype[Any],
                 high: int = RANDOM_INT_HIGH) -> np.ndarray:
    """Seeded random values of ``shape`` as an ndarray of ``dtype`` (a 0-d array for ``shape`` ()): floats
    standard normal, integers in [0, ``high``), bools fair coins."""
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape), dtype=dtype)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, max(min(int(high), int(np.iinfo(dtype).max) + 1), 1), size=shape),
                          dtype=dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5, dtype=dtype)
    if dtype.kind in "OSU":
        return np.full(shape, "a", dtype=object)
    if dtype.kind == "c":
        return np.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape), dtype=dtype)
    raise InputError(f"cannot make random inputs of dtype {dtype}: give --val-data")


def data_warnings(*sources: DataSource | None) -> list[str]:
    """The warnings of ``sources`` for the report, each once (the calibration data is often the validation data
    too); a source without ``warnings`` (a user's own DataSource) has none."""
    out: list[str] = []
    for src in sources:
        for w in getattr(src, "warnings", None) or []:
            if w not in out:
                out.append(w)
    return out


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
