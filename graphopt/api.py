"""The Python API: ``optimize(model_or_path, passes=[...], ...) -> (model, report)``; the CLI is a thin shell over it.

Steps (DESIGN.md §1): load, check that onnxruntime runs the input, run the pass pipeline (each pass verified),
validate rewritten vs original on the same feeds, measure both models, assemble the report. Nothing is written
here; the caller saves the returned model (the CLI through ``graphopt.io.save_model``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from graphopt.calibration.readers import (Batch, DataSource, Preprocess, RandomSource, check_preprocess_used,
                                          data_warnings, model_inputs, open_source)
from graphopt.passes.base import PassContext

from . import io
from .attribution import advice, step_losses
from .slices import SliceSpec
from .targets import check_metric, fidelity_targets, pipeline_targets, validation_targets
from .errors import UsageError, ValidationFailed
from .fixed_inputs import with_fixed_inputs
from .pipeline import (PassSpec, StepRecord, check_calibration, check_order, default_pipeline, make_spec,
                       parse_pass_arg, run_pipeline, with_prerequisites)
from .report import Report, model_stats
from .runtime import make_session, measure_latency, ort_message
from .validate import Thresholds, validate

log = logging.getLogger("graphopt")

PassArg = str | PassSpec | tuple[str, Mapping[str, Any]]


def resolve_passes(passes: Sequence[PassArg] | None) -> list[PassSpec]:
    """Turn ``"name:k=v"`` strings, ``(name, {k: v})`` pairs or PassSpecs into PassSpecs (default if None)."""
    if passes is None:
        passes = default_pipeline()
    specs = []
    for p in passes:
        if isinstance(p, PassSpec):
            specs.append(p)
        elif isinstance(p, str):
            specs.append(parse_pass_arg(p))
        elif isinstance(p, tuple) and len(p) == 2:
            specs.append(make_spec(p[0], p[1]))
        else:
            raise UsageError(f"cannot understand pass {p!r}: give 'name:key=value' or (name, options)")
    return specs


def one_row(batch: Batch, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The feed for latency and MAC counting: the first batch, cut to one row where the batch axis is dynamic."""
    specs = {s.name: s for s in model_inputs(model)}
    feed = {}
    for name, arr in batch.feed.items():
        spec = specs.get(name)
        if (isinstance(arr, np.ndarray) and arr.ndim >= 1 and spec is not None and spec.shape
                and spec.shape[0] is None and arr.shape[0] > 1):
            arr = arr[:1]
        feed[name] = arr
    return feed


def optimize(model: onnx.ModelProto | str | os.PathLike[str], passes: Sequence[PassArg] | None = None, *,
             calib_data: Any = None, val_data: Any = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
             validate_output: bool = True, min_cosine: float | None = None, min_top1: float | None = None,
             max_rel_error: float | None = None, max_accuracy_drop: float | None = None, gate: bool = True,
             force: bool = False, seed: int = 0, verify: bool = True,
             dump_dir: str | os.PathLike[str] | None = None, latency_runs: int = 20, threads: int = 1,
             calib_samples: int | None = None, on_dump: Callable[[onnx.ModelProto, Path], None] | None = None,
             calibration_ranges: Mapping[str, Sequence[float]] | None = None,
             on_step: Callable[[dict[str, Any]], None] | None = None,
             preprocess: Preprocess | str | Mapping[str, Any] | None = None,
             slices: Sequence[str | SliceSpec] = (), scores: Sequence[str | tuple[str, int]] = (),
             metric: Callable[..., float] | str | None = None, min_metric: float | None = None,
             max_metric_drop: float | None = None, fix_inputs: Mapping[str, Any] | None = None
             ) -> tuple[onnx.ModelProto, Report]:
    """Rewrite ``model`` with ``passes`` and validate it; return the rewritten model and the report.

    ``calib_data``/``val_data``: an ``.npz`` path, a folder of ``.npz``, an iterable of ``{input: array}`` dicts, or
    an onnxruntime ``CalibrationDataReader``, or a folder of images read with ``preprocess`` (a Preprocess, its
    ``--preprocess`` text ``"resize=256,crop=224,..."`` or a dict of its keys). ``calibration_ranges``
    ({tensor: (lo, hi)}, as saved from a previous run's report) replaces running calibration. ``on_step`` gets
    each step's report row as the step finishes. Raises ``ValidationFailed`` (carrying model and report) when the
    result fails validation, unless ``force``. A lossy pipeline is held to the pipeline's targets (graphopt.targets:
    ``min_cosine`` 0.98, ``min_top1`` 0.95, ``max_accuracy_drop`` 1.0 point by default; ``gate=False`` drops
    them), which quantize's fallback also searches against.
    ``slices``, ``scores``, ``metric`` (f(ref_outputs, candidate_outputs, labels) -> float), ``min_metric``,
    ``max_metric_drop``: as the CLI's options (docs/fidelity.md).
    ``fix_inputs`` ({input: value}) makes those inputs constants first (graphopt.fixed_inputs): the model with them
    fixed is the reference validation compares with."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = io.load_model(model)
    model = with_fixed_inputs(model, fix_inputs or {})
    fidelity = fidelity_targets(model, slices=slices, scores=scores, metric=metric, min_metric=min_metric,
                                max_metric_drop=max_metric_drop)
    specs = resolve_passes(passes)
    check_order(specs)
    check_calibration(specs, calib_data is not None or calibration_ranges is not None)
    shapes = _input_shapes(model, input_shapes)
    report = Report(input=path or "<model>", output=None)
    ref_session = make_session(model, "input model")
    calib, val = _open_data(model, calib_data, val_data, calib_samples, shapes, seed, preprocess)
    ranges = {k: (float(v[0]), float(v[1])) for k, v in calibration_ranges.items()} if calibration_ranges else None
    check_metric(fidelity, ref_session, next(iter(val), None))
    # Over 2 GB: one session at a time (each holds the weights), none while the passes run.
    ref_session = None if io.is_big(model) else ref_session
    targets = pipeline_targets(gate=gate, min_cosine=min_cosine, min_top1=min_top1, fidelity=fidelity,
                               max_accuracy_drop=max_accuracy_drop, max_rel_error=max_rel_error)
    ctx = PassContext(original=model, calib=calib, input_shapes=shapes, seed=seed, calibration_ranges=ranges,
                      targets=targets)
    dump = _dump_dir(dump_dir)
    lossy = [s.name for s in with_prerequisites(specs) if not s.build().exact]
    if lossy and val is calib:
        report.warnings.append("validated on the calibration data itself (no --val-data): what the lossy passes "
                               "reached on these samples is easier to meet here than on held-out data")
    out, records = run_pipeline(model, specs, ctx, verify=verify, dump_dir=dump, on_dump=on_dump,
                                keep_lossy=validate_output and len(lossy) > 1,
                                on_step=None if on_step is None else lambda r: on_step(_step_row(r)))
    report.passes = [_step_row(r) for r in records]

    first = next(iter(val), None)
    feed = one_row(first, model) if first is not None else None
    thresholds = _checked_targets(targets, specs, model, synthetic=isinstance(val, RandomSource), user=(
        min_cosine, min_top1, max_accuracy_drop)) if gate else targets
    if gate and lossy and isinstance(val, RandomSource) and validate_output:
        report.warnings.append("the lossy pipeline's default targets were not checked on synthetic data: give "
                               "--val-data (or set --min-cosine/--min-top1 to check them on random inputs)")
    if validate_output:
        report.validation = _validate(model, out, val, ref_session, exact=not lossy, thresholds=thresholds)
    report.warnings.extend(data_warnings(calib, val if validate_output else None))
    _measure(report, model, out, feed, latency_runs, threads, [s.name for s in specs],
             in_turn=ref_session is None or io.is_big(out), synthetic=isinstance(val, RandomSource))
    if validate_output and len(lossy) > 1:
        report.losses = step_losses(model, [(r.spec, *r.models) for r in records if r.models], val)
    if report.validation is not None and not report.validation.passed and not force:
        what = advice(report.losses, searched=any(s.build().targets() is not None for s in specs))
        raise ValidationFailed(f"validation failed: {report.validation.failures[0]}" + (f": {what}" if what else ""),
                               model=out, report=report)
    return out, report


def _dump_dir(dump_dir: str | os.PathLike[str] | None) -> Path | None:
    if dump_dir is None:
        return None
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    return Path(dump_dir)


def _measure(report: Report, model: onnx.ModelProto, out: onnx.ModelProto, feed: dict[str, Any] | None,
             latency_runs: int, threads: int, passes: list[str], in_turn: bool, synthetic: bool) -> None:
    """The report's before/after figures: size, parameters, MACs, and the latency when asked. A random feed
    (no data given) that a model rejects (a Pad or reshape that needs real sizes) leaves the latency out with a
    warning: that says nothing of the rewrite, which the user's data would time."""
    report.before = model_stats(model, feed)
    report.after = model_stats(out, feed)
    if latency_runs <= 0 or feed is None:
        return
    try:
        _measure_latency(report, model, out, feed, latency_runs, threads, passes, in_turn=in_turn)
    except Exception as e:  # onnxruntime's run errors have no common base class
        if not synthetic:
            raise
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feed.items())
        report.warnings.append(f"latency not measured: a model rejects the random input ({shapes}: "
                               f"{ort_message(e)}); give --val-data or --calib-data to time it on real inputs")


def _validate(model: onnx.ModelProto, out: onnx.ModelProto, val: DataSource, ref_session: Any, *, exact: bool,
              thresholds: Thresholds) -> Any:
    """The rewritten model against the input on ``val``: beside the input's session, or one session at a time when
    either model is over 2 GB (``ref_session`` None; each session holds the weights: validate_in_turn)."""
    if ref_session is None or io.is_big(out):
        return validate(model, out, val, exact=exact, description=val.description, thresholds=thresholds,
                        in_turn=True)
    return validate(model, out, val, exact=exact, description=val.description, thresholds=thresholds,
                    sessions=(ref_session, make_session(out, "rewritten model")))


def _checked_targets(targets: Thresholds, specs: Sequence[PassSpec], model: onnx.ModelProto, *, synthetic: bool,
                     user: tuple[float | None, float | None, float | None]) -> Thresholds:
    """What validation checks: the pipeline's targets with the passes' own; on synthetic data only what the user
    set (random inputs say nothing of accuracy)."""
    min_cosine, min_top1, max_accuracy_drop = user
    if synthetic:
        targets = pipeline_targets(gate=True, min_cosine=min_cosine, min_top1=min_top1, defaults=False,
                                   max_accuracy_drop=max_accuracy_drop, max_rel_error=targets.max_rel_error,
                                   fidelity=targets)
        specs = []   # nor the passes' own targets, as before: they were reached on calibration data
    given = frozenset(k for k, v in (("min_cosine", min_cosine), ("min_top1", min_top1)) if v is not None)
    return validation_targets(targets, specs, model, given)


def _input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """The user's concrete input shapes, checked against the model's input names."""
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    unknown = set(shapes) - {s.name for s in model_inputs(model)}
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: "
                         f"{', '.join(s.name for s in model_inputs(model))}")
    return shapes


def _open_data(model: onnx.ModelProto, calib_data: Any, val_data: Any, calib_samples: int | None,
               shapes: dict[str, list[int]], seed: int, preprocess: Any = None
               ) -> tuple[DataSource | None, DataSource]:
    """The calibration source (None without data) and the validation source: the validation data, else the
    calibration data, else seeded random inputs. Each source checks its data as it opens (and keeps warnings);
    ``preprocess`` applies to folders of images, and is refused when neither data is one."""
    check_preprocess_used(preprocess, calib_data, val_data)
    calib = (open_source(calib_data, model, max_samples=calib_samples, purpose="calibration", preprocess=preprocess)
             if calib_data is not None else None)
    if val_data is not None:
        return calib, open_source(val_data, model, purpose="validation", preprocess=preprocess)
    if calib is not None:
        return calib, calib
    return calib, RandomSource(model_inputs(model), shapes, seed)


def _step_row(r: StepRecord) -> dict[str, Any]:
    """One pipeline step as the report's ``passes`` list holds it."""
    return {"pass": r.spec, "options": r.options, "seconds": round(r.seconds, 3), "changed": r.result.changed,
            "counts": r.result.counts, "layers": r.result.layers, "declined": r.result.declined,
            "notes": r.result.notes, "removed_nodes": r.removed_nodes, "nodes_after": r.nodes_after,
            "artifacts": r.result.artifacts}


def _measure_latency(report: Report, model: onnx.ModelProto, out: onnx.ModelProto, feed: dict[str, np.ndarray],
                     runs: int, threads: int, pass_names: list[str], in_turn: bool = False) -> None:
    """Both models' median latency on ``feed`` into the report, with the setup and a slowdown warning; interleaved,
    or with ``in_turn`` (models over 2 GB, whose sessions are not held at once) one model after the other."""
    # In turn, machine noise no longer hits both alike: with one thread (onnxruntime then runs every kernel on the
    # calling thread) time that thread's CPU time, which leaves out what other processes take.
    cpu = in_turn and threads == 1

    def measure(n: int) -> list[float]:
        if in_turn:
            return [measure_latency([m], feed, threads=threads, runs=n, clock=time.thread_time if cpu else
                                    time.perf_counter)[0] for m in (model, out)]
        return measure_latency([model, out], feed, threads=threads, runs=n)

    lat = measure(runs)
    if sum(lat) * runs < MIN_TIMED_MS:  # a fast model: so few runs are jitter, take as many as the floor holds
        runs = min(MAX_RUNS, math.ceil(MIN_TIMED_MS / max(sum(lat), 1e-6)))
        lat = measure(runs)
    report.latency_ms = (lat[0], lat[1])
    report.latency_setup = {"threads": threads, "runs": runs, "warmup": 3,
                            "optimization": "onnxruntime default graph optimizations",
                            "feed_shapes": {k: list(np.shape(v)) for k, v in feed.items()}}
    if in_turn:
        report.latency_setup["order"] = "one model after the other (over 2 GB)" + (", thread CPU time" if cpu else "")
    slower = slowdown_warning(*report.latency_ms, pass_names)
    if slower:
        report.warnings.append(slower)


SLOWER_MARGIN = 1.10   # a 20-run median moves by a few percent between runs: flag only a clear slowdown
# Timed rounds (both models) last at least this long: 5 runs of a 10 µs model are jitter, and measured a spurious
# slowdown (over 1.1x) of an exact rewrite; 200 ms of rounds hold the median within a few percent.
MIN_TIMED_MS = 200.0
MAX_RUNS = 100_000


def slowdown_warning(before_ms: float, after_ms: float, passes: Sequence[str]) -> str | None:
    """A warning when the rewritten model measured clearly slower than the original on this CPU, else None.

    The int8 kernels are where this happens: on a small, elementwise-heavy model (PP-OCR's MobileNetV3 angle
    classifier, 1 ms) the quantize/dequantize steps and onnxruntime's integer convolutions cost more than the
    float convolutions they replace, though onnxruntime fuses every unit."""
    if after_ms <= before_ms * SLOWER_MARGIN:
        return None
    why = (" (int8 kernels do not pay off on this model and CPU; the model is still smaller)"
           if "quantize" in passes else "")
    return (f"the rewritten model runs {after_ms / before_ms:.2f}x slower than the original here "
            f"({after_ms:.3f} vs {before_ms:.3f} ms){why}")
