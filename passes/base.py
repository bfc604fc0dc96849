"""The pass contract: what a rewrite declares and what the pipeline checks before and after running it.

A pass is a class with a kebab-case ``name``, a one-line ``summary``, a frozen ``Options`` dataclass (its CLI
options, see passes.options), and:
  * ``requires(graph, ctx)``: the precondition, checked by the pipeline before ``run``; a reason string when the
    graph does not qualify (the pass is then declined as a whole, the graph untouched), else None;
  * ``prerequisites``: passes that must have run before this one; the pipeline runs each (default options) right
    before it unless the pipeline already runs it earlier. A pass never runs another pass inside itself;
  * ``must_not_follow``: passes after which this one makes no sense, each with the reason (refused before any work);
  * ``needs_calibration()``: whether these options need calibration data (refused before any work without it);
    ``calibrates``: whether it records activation ranges (``--save-calibration`` is refused before any work
    without such a pass);
  * ``searches()``: whether these options search against the pipeline's targets (``ctx.targets``; with several
    lossy passes, each gets a share of them: pipeline.share);
  * ``targets()``: the fidelity targets the pass itself searches against (quantize's fallback), which validation
    checks again on held-out data; None for passes that do not search;
  * ``run(graph, ctx) -> PassResult``: rewrites the onnx-graphsurgeon graph in place. A site that does not qualify
    is skipped with a reason (``result.decline``), never an exception. Result count keys are module constants.
Passes are added to the registry with ``@register``; importing ``graphopt.passes.catalog`` registers the built-in
ones. This module imports no pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from graphopt.calibration.readers import DataSource

from graphopt.errors import UsageError
from graphopt.validate import DEFAULT_TARGETS, Thresholds

from .options import OptionSpec, option_specs

log = logging.getLogger("graphopt")


def as_values(values: Any, dtype: Any = None) -> np.ndarray:
    """``values`` as the C-contiguous ndarray a ``gs.Constant`` needs, of its own shape (0-d stays 0-d, which
    ``np.ascontiguousarray`` would make 1-d). numpy returns scalars, not 0-d arrays, from arithmetic, ufuncs and
    reductions over 0-d arrays (``np.maximum(a, b).astype(np.float32)`` is an ``np.float32``), and onnx-graphsurgeon
    rejects a scalar: so every value a pass puts into the graph goes through here."""
    return np.asarray(values, dtype=dtype, order="C")


def constant(name: str, values: Any, dtype: Any = None) -> gs.Constant:
    """A new constant tensor holding a computed value; the only way passes make one (see ``as_values``;
    tests/test_every_option.py checks that no pass calls ``gs.Constant`` or ``Tensor.to_constant`` directly).
    Types of fewer than 8 bits (int4/uint4 as ml_dtypes arrays), which onnx-graphsurgeon would write one value per
    byte, go in as the TensorProto onnx packs (two per byte)."""
    arr = as_values(values, dtype)
    if arr.dtype.itemsize == 1 and arr.dtype.name in ("int4", "uint4"):
        return gs.Constant(name, LazyValues(numpy_helper.from_array(arr, name)))
    return gs.Constant(name, arr)


@dataclass
class PassResult:
    """What a pass did, for the report: counts, per-layer rows, and the sites it declined with reasons."""

    changed: bool = False
    counts: dict[str, float] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Data for the caller rather than the report (e.g. quantize's calibration ranges for --save-calibration).
    artifacts: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, n: float = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def decline(self, site: str, reason: str) -> None:
        log.info("  declined %s: %s", site, reason)
        self.declined.append({"site": site, "reason": reason})


@dataclass
class PassContext:
    """What a pass may use besides the graph: the original model (the teacher), data, shapes, seed."""

    original: onnx.ModelProto
    calib: DataSource | None = None
    # Tensor ranges from --load-calibration: {tensor name: (lo, hi)}; used instead of running calibration.
    calibration_ranges: dict[str, tuple[float, float]] | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    # The pipeline's targets (--min-cosine, --min-top1, ...): what a pass that searches (quantize's fallback)
    # searches against unless the pass is given its own. No targets: the user turned the gates off.
    targets: Thresholds = DEFAULT_TARGETS

    def require_calib(self, pass_name: str) -> DataSource:
        if self.calib is None:
            raise UsageError(f"pass '{pass_name}' needs calibration data: give --calib-data")
        return self.calib


class Pass:
    """Base class of every rewrite pass. Subclasses set the ClassVars and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type]
    exact: ClassVar[bool] = True
    prerequisites: ClassVar[tuple[str, ...]] = ()
    calibrates: ClassVar[bool] = False    # writes activation ranges (artifacts["calibration"], --save-calibration)
    must_not_follow: ClassVar[Mapping[str, str]] = {}

    def __init__(self, options: Any) -> None:
        self.options = options

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        """Why this graph does not qualify for the pass at all (checked before ``run``), or None."""
        return None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        """Whether these options need calibration data (checked before the pipeline starts)."""
        return False

    def searches(self) -> bool:
        """Whether these options make the pass search against the pipeline's targets (``PassContext.targets``:
        an ``auto`` setting, quantize's fallback); the pipeline shares the targets among its lossy passes."""
        return False

    def targets(self) -> Thresholds | None:
        """The fidelity targets this pass searches against, to be checked again on validation data; None if it
        does not search."""
        return None

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        return option_specs(cls.Options)


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"duplicate pass name {cls.name}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    """The passes registered so far, by name."""
    return dict(_REGISTRY)
