"""``--fix-input NAME=VALUE[,VALUE...]``: a model input that is fixed in deployment becomes a constant.

The input is taken out of the graph's inputs and an initializer of the same name holds the value, in the input's
declared dtype and shape (values in row-major order). Then ``fold-constants`` can compute what depends on it, and
inline an ``If`` whose condition it decides (a VAD model's branches on the sample rate). The model with the input
fixed is the reference that validation compares the rewritten model against; an array for a fixed input in
calibration or validation data matches no model input any more and is ignored, with the data's usual warning.

Refused in one line (exit 2): a name that is no model input (or an input named twice), an input that is not a
tensor or whose shape is not fully declared (no dynamic dims: the value needs one shape), the wrong number of
values, and a value its dtype cannot hold exactly (a fraction for an integer input, 300 for uint8, NaN/Inf, text).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.calibration.feeds import InputSpec, model_inputs

from .errors import UsageError

BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def parse_fix_input(text: str) -> tuple[str, list[str]]:
    """``NAME=V1,V2,...`` as given on the command line -> (name, value texts)."""
    name, eq, values = text.partition("=")
    if not eq or not name or not values.strip():
        raise UsageError(f"--fix-input '{text}': expected NAME=VALUE[,VALUE...] (e.g. sr=16000)")
    return name, [v.strip() for v in values.split(",")]


def with_fixed_inputs(model: onnx.ModelProto, values: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs named in ``values`` are initializers holding those values. A value is a
    number, a sequence of numbers, an array, or (from the command line) a sequence of number texts."""
    if not values:
        return model
    specs = {s.name: s for s in model_inputs(model)}
    arrays = {name: _value(specs, name, v) for name, v in values.items()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [vi for vi in out.graph.input if vi.name not in arrays]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    stale = {name for name in arrays}   # an initializer that was the input's default is replaced by the fixed value
    inits = [t for t in out.graph.initializer if t.name not in stale]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    out.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
    return out


def _value(specs: dict[str, InputSpec], name: str, given: Any) -> np.ndarray:
    flag = f"--fix-input {name}"
    spec = specs.get(name)
    if spec is None:
        raise UsageError(f"{flag}: the model has no input '{name}' (inputs: {', '.join(specs) or 'none'})")
    if spec.dtype is None or spec.shape is None:
        raise UsageError(f"{flag}: input '{name}' is not a tensor of declared type and rank")
    if any(d is None for d in spec.shape):
        shown = "[" + ", ".join(n or "?" if d is None else str(d) for d, n in zip(spec.shape, spec.dim_names)) + "]"
        raise UsageError(f"{flag}: input '{name}' has dynamic dims {shown}; only an input of fixed shape can be fixed")
    flat = _flat(given, flag)
    count = int(np.prod(spec.shape, dtype=np.int64))
    if len(flat) != count:
        raise UsageError(f"{flag}: input '{name}' has shape {list(spec.shape)}, {count} value(s); got {len(flat)}")
    cast = np.array([_convert(v, spec.dtype, flag, name) for v in flat], dtype=spec.dtype)
    return cast.reshape(spec.shape)


def _flat(given: Any, flag: str) -> list[Any]:
    if isinstance(given, str):
        return [given]
    arr = np.asarray(given, dtype=object)
    if arr.dtype == object and arr.ndim == 0 and not np.isscalar(given):
        raise UsageError(f"{flag}: cannot use a {type(given).__name__} as a value: give numbers")
    return list(arr.reshape(-1))


def _convert(v: Any, dtype: np.dtype[Any], flag: str, name: str) -> Any:
    """One value as ``dtype`` holds it, or a UsageError when it cannot hold it exactly (floats: when not finite)."""
    where = f"{flag}: value {str(v)!r} for input '{name}' ({dtype})"
    if isinstance(v, (str, np.str_)):
        text = str(v).strip().lower()
        if dtype.kind == "b":
            if text not in BOOL_WORDS:
                raise UsageError(f"{where}: give true/false or 1/0")
            return BOOL_WORDS[text]
        try:
            v = int(text) if dtype.kind in "iu" and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise UsageError(f"{where}: not a number") from None
    if isinstance(v, (bool, np.bool_)) or dtype.kind == "b":
        if v not in (0, 1):
            raise UsageError(f"{where}: give true/false or 1/0")
        return bool(v)
    if not isinstance(v, (int, float, np.integer, np.floating)):
        raise UsageError(f"{where}: not a number")
    if dtype.kind == "f":
        if not np.isfinite(float(v)):
            raise UsageError(f"{where}: not a finite number")
        if abs(float(v)) > float(np.finfo(dtype).max):
            raise UsageError(f"{where}: outside the range of {dtype}")
        return v
    if dtype.kind in "iu":
        if isinstance(v, (float, np.floating)) and not float(v).is_integer():
            raise UsageError(f"{where}: not a whole number")
        info = np.iinfo(dtype)
        if not info.min <= int(v) <= info.max:
            raise UsageError(f"{where}: outside [{info.min}, {info.max}]")
        return int(v)
    raise UsageError(f"{flag}: input '{name}' has dtype {dtype}: only numbers and bools can be fixed")
