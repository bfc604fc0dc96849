"""Checks on calibration and validation data on the way in, the same for every source (``.npz``, ``.npy``, a folder,
an iterable of dicts): what is refused with one line, what is used with a warning.

Refused (``InputError``, one line naming the input):
  * data of a dtype the input cannot take without changing values: another kind (float data for an int64 input),
    integers that do not fit the input's integer type, floats past the range of a narrower float, integers other
    than 0/1 for a bool input;
  * NaN or Inf values (with how many) in calibration data, whose ranges they would poison. In validation data they
    are said in a warning instead: validation compares the outputs where both models give NaN/Inf, and some models
    take them on purpose (missing values of a tabular model, onnx's own Cast tests);
  * no samples at all (an ``.npz`` whose arrays have 0 rows, an empty iterable, a feed whose arrays are all empty
    along axis 0);
  * integer ids outside the table the input indexes (a Gather's constant data: ``InputSpec.index_rows``), which
    onnxruntime would fail on;
  * labels that are neither class indices [N] nor exact one-hot rows [N, C] (``metrics.class_indices``).
Used, with a warning said once per source (``DataSource.warnings``, which the report lists):
  * a cast within the kind: "input 'x': float64 data cast to float32";
  * whole numbers above ``UNNORMALIZED_MAX`` for a float input (raw pixels, say): the model may expect normalized
    input;
  * arrays named after no model input: ignored, and when the name looks like labels, ``__labels__`` is named.
Every value a feed holds is an ``np.ndarray`` of the input's dtype, a 0-d input's too (onnxruntime refuses numpy
scalars such as ``np.bool_``).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from graphopt.errors import InputError
from graphopt.metrics import class_indices

from .feeds import LABELS_KEY, Batch, InputSpec

PURPOSES = ("calibration", "validation")
UNNORMALIZED_MAX = 2          # whole-number data above this, for a float input, may be raw (e.g. 0..255 pixels)
LABEL_LIKE = {"labels", "label", "y", "target", "targets", "classes"}


def refuses_nonfinite(purpose: str | None) -> bool:
    """Whether a source opened for ``purpose`` refuses NaN/Inf: calibration data does; validation data, or data
    opened without saying what for, has them said in a warning."""
    if purpose is not None and purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}: expected one of {PURPOSES} or None")
    return purpose == "calibration"


def say_once(warnings: list[str], text: str | None, unless: str | None = None) -> None:
    """Append ``text`` to ``warnings`` unless it is None or already there, or (given ``unless``) a warning holding
    ``unless`` is: an iterable's items each have their own figures, and the first item's are said."""
    if text and text not in warnings and not (unless and any(unless in w for w in warnings)):
        warnings.append(text)


def target_dtype(name: str, src: np.dtype[Any], spec: InputSpec, where: str) -> np.dtype[Any] | None:
    """The dtype data of dtype ``src`` is cast to for the input ``spec`` (None: used as it is), or an InputError for
    a cast that would change values whatever they are (another kind: float to int, int to string...). Casts within
    a kind (ints to any ints), ints to floats and bools to numbers are allowed (their values are checked:
    ``check_values``); so are ints to bool, when the values are 0 and 1."""
    want = spec.dtype
    if want is None or src == want:
        return None
    if want.kind in "OSU" and src.kind in "OSU":
        return want
    if want.kind == "b" and src.kind in "iu":
        return want
    if want.kind in "iu" and src.kind in "iu":    # any integers: the values must fit (a Python int is int64)
        return want
    if src.kind in "biuf" and want.kind in "biufc" and np.can_cast(src, want, casting="same_kind"):
        return want
    if src.kind == "c" and want.kind == "c":
        return want
    hint = " (class ids, token ids and indices are integers: round them if they are whole numbers)" \
        if src.kind == "f" and want.kind in "iu" else ""
    raise InputError(f"{where}: array '{name}' has dtype {src}, which the model input '{name}' ({want}) cannot take "
                     f"without changing its values{hint}")


def cast_note(name: str, src: np.dtype[Any], dst: np.dtype[Any] | None) -> str | None:
    return None if dst is None else f"input '{name}': {src} data cast to {dst}"


class ValueTally:
    """What the checks need of an input's values, accumulated over the batches of one source: how many are NaN/Inf,
    the finite min and max, and whether every finite value is a whole number."""

    def __init__(self) -> None:
        self.size = 0
        self.nonfinite = 0
        self.lo: float | None = None
        self.hi: float | None = None
        self.whole = True

    def update(self, a: np.ndarray) -> None:
        if a.dtype.kind not in "biufc" or a.size == 0:
            return
        self.size += a.size
        vals = a
        if a.dtype.kind in "fc":
            finite = np.isfinite(a)
            bad = a.size - int(np.count_nonzero(finite))
            self.nonfinite += bad
            vals = a[finite] if bad else a
            if a.dtype.kind == "c":
                return
        if vals.size == 0:
            return
        if vals.dtype.kind == "b":
            vals = vals.view(np.uint8)
        lo, hi = vals.min().item(), vals.max().item()
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        if self.whole and vals.dtype.kind == "f":
            self.whole = bool(np.all(vals == np.floor(vals)))


def check_values(name: str, tally: ValueTally, src: np.dtype[Any], dst: np.dtype[Any] | None, where: str,
                 warnings: list[str], refuse_nonfinite: bool = True, spec: InputSpec | None = None) -> None:
    """Refuse values the cast from ``src`` to ``dst`` (None: no cast) would change, indices outside the table the
    input indexes (``spec.index_rows``), and NaN/Inf (else, with ``refuse_nonfinite`` False, warn about them); warn
    once about whole numbers above UNNORMALIZED_MAX for a float input."""
    if tally.nonfinite:
        counted = f"{where}: input '{name}' has {tally.nonfinite} NaN/Inf values (of {tally.size})"
        if refuse_nonfinite:
            raise InputError(f"{counted}; remove or replace them (calibration ranges cannot use them)")
        say_once(warnings, f"{counted}; validation compares the outputs where both models give NaN/Inf",
                 unless=f"input '{name}' has ")
    to = dst if dst is not None else src
    if tally.lo is not None and tally.hi is not None and dst is not None:
        if to.kind == "b" and src.kind in "iu" and (tally.lo < 0 or tally.hi > 1):
            raise InputError(f"{where}: input '{name}' is bool and the {src} data holds values other than 0 and 1 "
                             f"({tally.lo:g} to {tally.hi:g})")
        if to.kind in "iu" and src.kind in "iu":
            info = np.iinfo(to)
            if tally.lo < info.min or tally.hi > info.max:
                raise InputError(f"{where}: input '{name}': the {src} data ({tally.lo} to {tally.hi}) does not fit "
                                 f"the model's {to}")
        if to.kind == "f":
            top = float(np.finfo(to).max)
            if max(abs(tally.lo), abs(tally.hi)) > top:
                raise InputError(f"{where}: input '{name}': the {src} data ({tally.lo:g} to {tally.hi:g}) overflows "
                                 f"the model's {to} (max {top:g})")
    rows = spec.index_rows if spec is not None else None
    if (spec is not None and rows and to.kind in "iu" and tally.lo is not None and tally.hi is not None
            and (tally.lo < -rows or tally.hi >= rows)):
        raise InputError(f"{where}: input '{name}' holds values from {tally.lo:g} to {tally.hi:g}, but the table "
                         f"'{spec.index_table}' it indexes has {rows} rows (ids 0 to {rows - 1})")
    if (to.kind == "f" and src.kind in "iuf" and tally.whole and tally.hi is not None
            and tally.hi > UNNORMALIZED_MAX):
        say_once(warnings, f"input '{name}': the data is whole numbers up to {tally.hi:g} for a {to} input; if the "
                           "model expects normalized input (e.g. [0, 1] or mean/std scaled), normalize the data first",
                 unless=f"input '{name}': the data is whole numbers")


def as_input(name: str, value: Any, spec: InputSpec, where: str, warnings: list[str],
             refuse_nonfinite: bool = True) -> np.ndarray:
    """``value`` as the model input ``spec`` takes it: an ndarray of the input's dtype, with every check of this
    module applied (refusals raise, warnings go to ``warnings`` once)."""
    arr = np.asarray(value)
    dst = target_dtype(name, arr.dtype, spec, where)
    tally = ValueTally()
    tally.update(arr)
    check_values(name, tally, arr.dtype, dst, where, warnings, refuse_nonfinite, spec)
    say_once(warnings, cast_note(name, arr.dtype, dst))
    return arr if dst is None else arr.astype(dst)


def unknown_keys(keys: Iterable[str], inputs: Sequence[InputSpec], where: str) -> str | None:
    """A warning naming the arrays that match no model input (None if there are none), and ``__labels__`` when one
    of them is named like labels."""
    names = {s.name for s in inputs}
    extra = [str(k) for k in keys if k not in names and k != LABELS_KEY]
    if not extra:
        return None
    text = (f"{where}: {'array' if len(extra) == 1 else 'arrays'} {', '.join(repr(k) for k in extra)} "
            f"{'matches' if len(extra) == 1 else 'match'} no model input and {'is' if len(extra) == 1 else 'are'} "
            f"ignored (inputs: {', '.join(s.name for s in inputs) or 'none'})")
    labels = [k for k in extra if k.lower() in LABEL_LIKE]
    if labels:
        text += f"; for labels, name the array '{LABELS_KEY}' instead of '{labels[0]}'"
    return text


def has_samples(feed: dict[str, Any]) -> bool:
    """False when every array of rank >= 1 in ``feed`` is empty along axis 0 (a feed of no samples). Arrays empty
    on another axis (a decoder's past key/values of length 0) are a real feed."""
    ranked = [v for v in feed.values() if isinstance(v, np.ndarray) and v.ndim]
    return not ranked or any(v.shape[0] for v in ranked)


def feed_from_mapping(data: dict[str, Any], inputs: Sequence[InputSpec], where: str,
                      warnings: list[str] | None = None, unknown_where: str | None = None,
                      refuse_nonfinite: bool = True) -> Batch:
    """One feed from a mapping of input names to arrays (plus ``__labels__``), each checked (``as_input``); the
    source's ``warnings`` gain what was said (``unknown_where``: how a warning about unknown keys names the source,
    so that it is said once for the source, not once per item)."""
    notes = warnings if warnings is not None else []
    feed: dict[str, Any] = {}
    for spec in inputs:
        if spec.name not in data:
            if spec.has_default:
                continue
            raise InputError(f"{where}: no array for model input '{spec.name}'")
        value = data[spec.name]
        feed[spec.name] = (as_input(spec.name, value, spec, where, notes, refuse_nonfinite) if spec.dtype is not None
                           else value)
    if not has_samples(feed):
        raise InputError(f"{where}: holds no samples (every array is empty along axis 0)")
    say_once(notes, unknown_keys(data.keys(), inputs, unknown_where or where))
    labels = data.get(LABELS_KEY)
    return Batch(feed, None if labels is None else class_indices(labels, f"{where}: '{LABELS_KEY}'"))
