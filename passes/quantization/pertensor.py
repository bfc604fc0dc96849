"""quantize's ``per-channel=auto`` under objective=latency: one weight scale per tensor where that measures faster.

onnxruntime's integer Gemm/MatMul kernels (QGemm, MatMulIntegerToFloat) pay ~2 µs per call for per-column weight
scales (Zen 4, onnxruntime 1.32: MNIST MLP's three Gemms 38.6-41.9 µs per channel, 31.5-34.5 per tensor). After
objective=latency has chosen the int8/float assignment (``latency.choose``), one more candidate is built: the same
assignment with per-tensor scales on its int8 Gemm/MatMul layers whose per-tensor rounding error is small
(``weights.per_tensor_error`` ≤ MAX_PER_TENSOR_ERROR, the rule quantize-dynamic's per-channel=auto uses); Convs keep
per-channel scales (one scale per tensor over filters of different sizes errs most there). It is written only where

  * it is measured faster than the per-channel build, interleaved with it and float on the same timing as the choice
    (``latency.time_models``: medians, notches apart, and by MIN_GAIN, 3%: a smaller gain flipped mnist_wide's
    one Gemm run to run; timed without the full mean correction, whose bias values do
    not change the latency: the corrected build is made only where it is faster), and
  * it meets the same targets on calibration data with the same judge and margins (``passes.judge``, as the
    fallback checks them; no targets: not checked, as the per-channel build is not);

else the per-channel build stays. ``PerTensor`` says which, with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.runtime import LatencySessions

from ..judge import Judge
from .build import Built
from .latency import CONFIRM_BUDGET_S, CONFIRM_RUNS, MIN_GAIN, Timing, rewarm_runs, time_models
from .plan import Plan
from .weights import MAX_PER_TENSOR_ERROR, per_tensor_error

OPS = ("Gemm", "MatMul")


@dataclass(frozen=True)
class PerTensor:
    """The candidate's units (with their per-tensor errors), whether it is written, why not, and the timings
    (float, per channel, per tensor; None where it was not timed)."""

    units: tuple[tuple[str, float], ...]
    written: bool
    reason: str
    timings: tuple[Timing, Timing, Timing] | None = None

    def line(self) -> str:
        """The report's line."""
        if not self.units:
            return f"per-channel=auto: weights per channel ({self.reason})"
        worst = max(e for _, e in self.units)
        head = (f"per-channel=auto: {len(self.units)} int8 Gemm/MatMul layers' weights per "
                f"{'tensor' if self.written else 'channel'}")
        if self.timings is None:
            return f"{head} ({self.reason}; per-tensor error up to {100 * worst:.1f}%)"
        f, pc, pt = self.timings
        return (f"{head} ({self.reason}: per tensor {pt.median:.3g} ms ±{pt.notch:.2g}, per channel {pc.median:.3g} "
                f"ms ±{pc.notch:.2g}, float {f.median:.3g} ms; per-tensor error up to {100 * worst:.1f}%)")


def eligible(plan: Plan, built: Built, reduce_range: bool) -> tuple[list[tuple[str, float]], list[str]]:
    """The int8 Gemm/MatMul units of ``built`` whose per-tensor error is within MAX_PER_TENSOR_ERROR (with it),
    and those refused by the rule (named with theirs)."""
    ok: list[tuple[str, float]] = []
    refused: list[str] = []
    for u in plan.units:
        w = u.node.inputs[1] if len(u.node.inputs) > 1 else None
        if (u.node.op not in OPS or u.weight_axis is None or u.name not in built.int8_units
                or not isinstance(w, gs.Constant)):
            continue
        error = per_tensor_error(np.asarray(w.values, np.float32), reduce_range)
        if error <= MAX_PER_TENSOR_ERROR:
            ok.append((u.name, error))
        else:
            refused.append(f"{u.name} {100 * error:.0f}%")
    return ok, refused


def try_per_tensor(plan: Plan, built: Built, reduce_range: bool, rebuild: Callable[[frozenset[str], bool], Built],
                   judge: Judge | None, float_model: onnx.ModelProto, feed: dict[str, np.ndarray],
                   kept: LatencySessions | None = None) -> tuple[Built, PerTensor]:
    """The build to write (``built``, per channel, or its per-tensor rebuild) and the decision (module docstring);
    ``rebuild(units, refit)``: the same assignment with those units' weights per tensor, with or without the full
    mean correction; ``judge``: None without targets; ``kept``: the latency sessions objective=latency's choice
    made of the float model and ``built``. Timed first, on the build without the mean correction (the biases' values
    do not change its latency): the corrected build, and its check, only where per tensor is faster."""
    units, refused = eligible(plan, built, reduce_range)
    if not units:
        why = (f"one scale per tensor errs over {100 * MAX_PER_TENSOR_ERROR:.0f}% of the weight: "
               + ", ".join(refused[:4])) if refused else "no int8 Gemm or MatMul"
        return built, PerTensor((), False, why)
    names = frozenset(u for u, _ in units)
    rewarm = rewarm_runs(float_model, feed)
    t = time_models([float_model, built.model, rebuild(names, False).model], feed, CONFIRM_BUDGET_S, CONFIRM_RUNS,
                    rewarm, [(1, 2)], 1, kept, MIN_GAIN)
    timings = (t[0], t[1], t[2])
    if not t[2].pays(t[1]):
        return built, PerTensor(tuple(units), False, f"per tensor not measured {100 * MIN_GAIN:.0f}% faster", timings)
    candidate = rebuild(names, True)
    if judge is not None and not judge.meets(judge.quality(candidate.model)):
        return built, PerTensor(tuple(units), False, "per tensor misses the targets on calibration data", timings)
    return candidate, PerTensor(tuple(units), True, "measured faster", timings)
