"""Calibration of the quantize pass: the activation ranges every build uses, and, streamed in the same run, what the
weights' rounding needs.

Activations are quantized per tensor (uint8 asymmetric by default) over a range (lo, hi) from one streamed histogram
per tensor (``calibration.ranges``): mse (the default: the clip c minimising the expected squared error of 8-bit
rounding, Σ over clipped bins of (x − c)² + (in-range count) · step² / 12), minmax, kl (Migacz 2017) or
percentile. A graph output (what the user reads) and a bounded activation's output (Softmax, Sigmoid, ...: their
large values are the signal) are never clipped: they take their observed min and max whatever the method.
``percentile=auto`` gives two candidate sets of ranges from the same histograms, the 99.99th percentile of |x| and
the 99.999th (``AUTO_PERCENTILES``); the pass keeps whichever leaves the most units int8 after the fallback. mse
is the default as one candidate that weighs, tensor by tensor, what clipping an outlier costs against what the wider
step costs every other value, with no tuned constant.

Streamed in the same run, by unit: for ``rounding=gptq`` each weighted unit's input second moments H = Σ x xᵀ
(``calibration.gptq``), for ``bias-correction`` each Conv's and Gemm's mean input patch E[x]
(``calibration.bias_correction``); layers reading one tensor the same way (attention's Q/K/V) share one observer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs
from graphopt.calibration.bias_correction import PatchMeanObserver
from graphopt.calibration.collector import collect
from graphopt.calibration.gptq import ConvGeometry, Fanout, HessianObserver
from graphopt.calibration.observers import HistogramObserver, MinMaxObserver
from graphopt.calibration.ranges import compute_range
from graphopt.calibration.readers import Batch
from graphopt.passes.base import PassContext

from graphopt.errors import UsageError
from graphopt.graph import is_float32

from .plan import Plan, candidate_tensors

Ranges = dict[str, tuple[float, float]]
BOUNDED = {"Softmax", "Sigmoid", "HardSigmoid", "Tanh"}
# ops whose output holds exactly their data input's values, rearranged: observed once, as their input (``same_values``)
COPIES = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
# percentile=auto tries these in order (benchmarks/RESULTS.md, results/ranges.md): with every layer int8, 99.99 is
# better than 99.999 where they differ on the convolutional models (PP-OCRv4 rec eval cosine 0.985 / 0.988 against
# 0.978 / 0.971, PP-OCR cls top-1 agreement 0.977 / 0.977 against 0.932 / 0.977); a transformer's LayerNorm outputs
# carry outlier features that 99.99 clips, and there 99.999 keeps every unit int8 (MiniLM: 48 of 48, against about
# half with 99.99).
AUTO_PERCENTILES = (99.99, 99.999)


@dataclass(frozen=True)
class Calibration:
    """Candidate range sets ``[(label, ranges)]`` in order of preference; by unit name, the input second moments
    (rounding=gptq) and mean input patches (bias-correction); the samples seen (None: the data did not run) and
    the tensors whose ranges were loaded (None: calibrated here)."""

    candidates: list[tuple[str, Ranges]]
    hessians: dict[str, HessianObserver]
    means: dict[str, PatchMeanObserver]
    samples: int | None
    loaded: int | None


def calibrate(graph: gs.Graph, float_model: onnx.ModelProto, plan: Plan, options: Any, ctx: PassContext,
              pass_name: str) -> Calibration:
    """(lo, hi) of every tensor any build may quantize, and the weights' statistics (module docstring). With
    ``--load-calibration`` (``ctx.calibration_ranges``) the data runs only for the weights' statistics."""
    o = options
    wanted = candidate_tensors(plan)
    loaded = ctx.calibration_ranges
    if loaded is not None:
        missing = [t for t in wanted if t not in loaded]
        if missing:
            raise UsageError(f"--load-calibration has no range for {len(missing)} tensor(s) this model needs, "
                             f"e.g. '{missing[0]}'; calibrate again")
    copies = same_values(plan, wanted)
    observers: dict[str, MinMaxObserver] = {} if loaded is not None else {
        t: (MinMaxObserver() if o.method == "minmax" else HistogramObserver(o.bins)) for t in wanted if t not in copies}
    readers: dict[str, list[Any]] = {t: [obs] for t, obs in observers.items()}
    if loaded is None:      # a copy's statistics are its source's: one observer, the copy not fetched for it
        observers = {t: observers[copies.get(t, t)] for t in wanted}
    hessians: dict[str, HessianObserver] = {}
    means: dict[str, PatchMeanObserver] = {}
    if ctx.calib is not None:
        _weight_observers(plan, o, readers, hessians, means)
    seen = None
    if readers:
        fanned: dict[str, Any] = {t: obs[0] if len(obs) == 1 else Fanout(obs) for t, obs in readers.items()}
        feed_names = {i.name for i in graph.inputs}
        fetch = [t for t in fanned if t not in feed_names]
        batches = with_inputs_observed(ctx.require_calib(pass_name), fanned, feed_names)
        # one intra-op thread: the observers' numpy work runs between the runs, while a pool's threads spin
        # (Magika, 256 samples: 2.6 s of CPU against 3.6 with the default pool, and no slower)
        seen = collect(float_model, fetch, batches, fanned, max_samples=o.samples, threads=1)
    if loaded is not None:
        candidates = [("loaded", {t: tuple(loaded[t]) for t in wanted})]
        return Calibration(candidates, hessians, means, seen, len(wanted))  # type: ignore[arg-type]
    keep = {t.name for t in graph.outputs} | {n.outputs[0].name for n in graph.nodes if n.op in BOUNDED and n.outputs}

    def ranges_at(p: float) -> Ranges:
        return {t: compute_range(obs, "minmax" if t in keep else o.method, p) for t, obs in observers.items()}

    if o.method != "percentile":
        return Calibration([(o.method, ranges_at(AUTO_PERCENTILES[0]))], hessians, means, seen, None)
    percentiles = AUTO_PERCENTILES if o.percentile == "auto" else (o.percentile,)
    return Calibration([(str(p), ranges_at(p)) for p in percentiles], hessians, means, seen, None)


def same_values(plan: Plan, wanted: list[str]) -> dict[str, str]:
    """{tensor: the observed tensor it holds the same values as}: the outputs of the planned ops that move values
    without computing any (COPIES), whose data input is observed too, through chains of them. Same values, batch by
    batch, give the same histogram, min, max and counts (``HistogramObserver``: updating in pieces is exact), so the
    copy's range is its source's by whatever method either takes."""
    observed = set(wanted)
    source: dict[str, str] = {}
    for n in plan.others:       # topological order: a chain's source is resolved before the copies after it
        if n.op in COPIES and n.inputs and n.outputs and n.inputs[0].name in observed \
                and n.outputs[0].name in observed and is_float32(n.outputs[0]):
            x = n.inputs[0].name
            source[n.outputs[0].name] = source.get(x, x)
    return source


def _weight_observers(plan: Plan, o: Any, readers: dict[str, list[Any]], hessians: dict[str, HessianObserver],
                      means: dict[str, PatchMeanObserver]) -> None:
    """Add (in place) to ``readers`` the observers of the units' inputs the options ask for, one per (input,
    geometry, kind), and name them by unit in ``hessians`` and ``means``."""
    shared: dict[tuple[str, ConvGeometry | None, type], Any] = {}
    for u in plan.units:
        geometry = conv_geometry(u.node) if u.node.op == "Conv" else None
        if u.weight_axis is None or (u.node.op == "Conv" and geometry is None):
            continue
        x = u.node.inputs[0].name
        for kind, wanted_here, by_unit in ((HessianObserver, o.rounding == "gptq", hessians),
                                           (PatchMeanObserver, o.bias_correction and u.node.op != "MatMul", means)):
            if not wanted_here:
                continue
            if (x, geometry, kind) not in shared:
                shared[x, geometry, kind] = kind(geometry)
                readers.setdefault(x, []).append(shared[x, geometry, kind])
            by_unit[u.name] = shared[x, geometry, kind]


def conv_geometry(node: gs.Node) -> ConvGeometry | None:
    """A 1-D or 2-D Conv's (group, kernel, strides, pads, dilations) as its input patches need them; for auto_pad
    SAME_* the pads onnx's formula gives for the input's static size, total = max((⌈n/s⌉ − 1)·s + (k − 1)·d + 1 − n,
    0), SAME_UPPER putting the odd one at the end. None for other ranks and for SAME_* on an input of unknown size:
    such layers round to nearest and keep their bias as it is."""
    w = node.inputs[1]
    rank = w.values.ndim - 2 if isinstance(w, gs.Constant) else 0
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if rank not in (1, 2) or auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    a = node.attrs
    kernel = tuple(int(k) for k in w.values.shape[2:])
    strides = tuple(int(v) for v in a.get("strides", [1] * rank))
    dilations = tuple(int(v) for v in a.get("dilations", [1] * rank))
    if auto_pad.startswith("SAME"):
        shape = node.inputs[0].shape
        spatial = list(shape[2:]) if shape is not None and len(shape) == rank + 2 else []
        if len(spatial) != rank or not all(isinstance(d, int) and d > 0 for d in spatial):
            return None
        total = [max((-(-n // st) - 1) * st + (k - 1) * d + 1 - n, 0)
                 for n, k, st, d in zip(spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        pads = tuple(begin) + tuple(t - b for t, b in zip(total, begin))
    else:
        pads = tuple(int(p) for p in a.get("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else (0,) * (2 * rank)
    return (int(a.get("group", 1)), kernel, strides, pads[:rank], pads[rank:], dilations)


def with_inputs_observed(calib: Iterable[Batch], observers: dict[str, Any], feed_names: set[str]) -> Iterator[Batch]:
    """Batches of ``calib`` with the graph inputs that are observed fed to their observers on the way through."""
    for batch in calib:
        for name in feed_names & observers.keys():
            if name in batch.feed:
                observers[name].update(batch.feed[name])
        yield batch
