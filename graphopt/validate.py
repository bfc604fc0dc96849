"""Validation: run the original and the rewritten model in onnxruntime (CPU) on the same feeds and judge the rewrite.

Each output's figures (max abs and rel error, cosine and its standard error, SQNR, top-1 agreement) are accumulated
by ``metrics.OutputStats``; accuracy = argmax vs labels when the data carries ``__labels__`` (class indices, or exact
one-hot rows: ``metrics.class_indices``), graded on a probability output (rows summing to 1) if there is one, else the
first class-score output with a column per label.
A rewritten output that is NaN/Inf where the original is finite, or a changed shape or dtype, always fails.
An exact pipeline must match within EXACT_REL_TOL (float) or exactly (integers, bools, strings). Float rounding
of a deep model can exceed that without any rewrite: the input model run with onnxruntime's optimizations off
differs from it run with them on (PP-OCRv4 rec: 2.8e-4 of the output's range; PP-OCRv4 det on random inputs, whose
Sigmoid outputs are ~1e-7: all of it). Validation of an exact pipeline measures that spread on the same feeds, for the
input model and for the rewritten one (whose own spread can be the larger: on rec's calibration lines 1.4e-4 for the
input, 2.3e-4 for its fold-bn rewrite, which is 4.1e-4 from the input), and accepts a float rel error up to twice the
larger: a rewrite is as exact as onnxruntime's own graph rewrites. Lossy pipelines are
gated by the user's thresholds (min cosine, min top-1, max rel error), else by the targets of the lossy pass
(quantize's min-cosine / min-top1, which it reached on calibration data) checked again on the validation data.
Min-cosine holds for each output and for the worst slice of each sliced output (graphopt.slices); min-top1 for the
class-score outputs and the score outputs the user names (--scores OUTPUT:AXIS, per position); the user's task
metric (graphopt.taskmetric) for --min-metric and --max-metric-drop. ``Comparison`` accumulates all of it feed by
feed, for validation and for the passes' judge alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .slices import SliceSpec, SliceStats, default_slicing
from .taskmetric import MetricInputs, TaskMetric
from .metrics import OutputStats, class_indices, class_score_outputs, label_output, sequence_score_outputs
from .metrics import top1_counts  # noqa: F401  (re-exported: passes.quantize imports it from here)
from .runtime import make_session, numpy_exchange_problem, ort_message

EXACT_REL_TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
DEFAULT_REL_TOL = 1e-2  # bfloat16 and other low-precision floats


@dataclass(frozen=True)
class Thresholds:
    """What a lossy pipeline must keep on the validation data (None: not checked)."""

    min_cosine: float | None = None
    min_top1: float | None = None
    max_rel_error: float | None = None
    max_accuracy_drop: float | None = None     # points of accuracy on labels (when the data has them)
    # The pass whose own targets these are (None: the user's flags), for the failure message. A pass's min-top1
    # holds for class-score outputs only (class_score_outputs), as it did in the pass, so ``top1_outputs`` then
    # names those output indices (None: every output with a top-1 figure).
    source_pass: str | None = None
    top1_outputs: frozenset[int] | None = None
    # What is measured besides each output's figures (graphopt.slices, --scores, graphopt.taskmetric).
    slices: tuple[SliceSpec, ...] = ()
    scores: tuple[tuple[str, int], ...] = ()       # (output, class axis): top-1 per position, gated by min_top1
    metric: TaskMetric | None = None
    min_metric: float | None = None
    max_metric_drop: float | None = None

    def measures(self) -> Thresholds:
        """What these targets measure, with no target: a judge's or an attribution's comparison."""
        return Thresholds(slices=self.slices, scores=self.scores, metric=self.metric)

    @property
    def metric_targets(self) -> bool:
        """Whether the task metric has a target (--min-metric, --max-metric-drop)."""
        return self.metric is not None and (self.min_metric is not None or self.max_metric_drop is not None)

    @property
    def searchable(self) -> bool:
        """Whether a search has a target to search against."""
        return bool(self.min_cosine or self.min_top1 or self.metric_targets)

    @property
    def origin(self) -> str:
        return f"{self.source_pass}'s " if self.source_pass else "--"


# The pipeline's targets unless the user sets them (--min-cosine, --min-top1, --max-accuracy-drop) or turns them off
# (--no-gate): every lossy pipeline is held to them on the validation data.
DEFAULT_TARGETS = Thresholds(min_cosine=0.98, min_top1=0.95, max_accuracy_drop=1.0)


@dataclass
class ValidationResult:
    data: str
    feeds: int = 0
    samples: int = 0
    exact: bool = True
    outputs: list[OutputStats] = field(default_factory=list)
    labelled: int = 0
    correct_before: int = 0
    correct_after: int = 0
    failures: list[str] = field(default_factory=list)
    metric: tuple[str, float, float] | None = None     # (name, float's own value, the rewritten model's)
    stopped: bool = False       # ``validate``'s ``stop`` ended it early: the figures cover ``samples`` only

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy(self) -> tuple[float, float] | None:
        if not self.labelled:
            return None
        return self.correct_before / self.labelled, self.correct_after / self.labelled

    def to_dict(self) -> dict[str, Any]:
        acc = self.accuracy
        return {"data": self.data, "feeds": self.feeds, "samples": self.samples, "exact": self.exact,
                "passed": self.passed, "failures": self.failures,
                "accuracy_before": acc[0] if acc else None, "accuracy_after": acc[1] if acc else None,
                "metric": None if self.metric is None else dict(zip(("name", "reference", "value"), self.metric)),
                "outputs": [o.to_dict() for o in self.outputs]}


def validate(original: onnx.ModelProto, rewritten: onnx.ModelProto, batches: Iterable[Any], *, exact: bool,
             thresholds: Thresholds, description: str = "", sessions: tuple[Any, Any] | None = None,
             roles: onnx.ModelProto | None = None, in_turn: bool = False,
             stop: Callable[[list[OutputStats], int], bool] | None = None) -> ValidationResult:
    """Compare the two models on every batch; the result lists failures (empty when validation passed).

    ``roles``: the model whose graph says which outputs are class scores (``class_score_outputs``,
    ``sequence_score_outputs``), when ``original`` is a rewrite of it (a pass's own float model, whose opset upgrade
    may have wrapped a Softmax in Flatten/Reshape); by default ``original``. ``in_turn``: one onnxruntime session
    at a time (``validate_in_turn``; models over 2 GB), ``batches`` then being re-iterable. ``stop(stats, samples)``
    (for a search that only asks whether a candidate fails; not with ``in_turn``): asked after each batch, True ends
    the comparison there, ``stopped`` set and nothing judged."""
    if in_turn:
        return validate_in_turn(original, rewritten, batches, exact=exact, thresholds=thresholds,
                                description=description, roles=roles)
    ref_sess, new_sess = sessions or (make_session(original, "input model"),
                                      make_session(rewritten, "rewritten model"))
    ref_names = [o.name for o in ref_sess.get_outputs()]
    new_names = [o.name for o in new_sess.get_outputs()]
    res = ValidationResult(data=description, exact=exact)
    if ref_names != new_names:
        res.failures.append(f"outputs changed from {ref_names} to {new_names}")
        return res
    comparison = Comparison(roles or original, ref_names, thresholds)
    # Exact pipelines: each model run with onnxruntime's optimizations off, against itself with them on, measures how
    # far onnxruntime's own rewrites move it (its rounding spread); (session, True for the input model).
    floor_sessions: list[tuple[Any, bool]] = []
    if exact:
        for model, what, is_input in ((original, "input model", True), (rewritten, "rewritten model", False)):
            try:
                floor_sessions.append((make_session(model, what, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                       is_input))
            except InputError:
                pass   # no spread from this model: the other's, or only EXACT_REL_TOL, applies
    for batch in batches:
        try:
            ref = ref_sess.run(None, batch.feed)
        except Exception as e:
            raise InputError(numpy_exchange_problem(e, ref_sess) or
                             f"the input model fails on the validation data: {ort_message(e)}") from e
        try:
            out = new_sess.run(None, batch.feed)
        except Exception as e:
            res.failures.append(f"the rewritten model fails in onnxruntime: {ort_message(e)}")
            return res
        res.feeds += 1
        res.samples += batch.rows
        comparison.add(ref, out, batch.labels, batch.rows)
        if stop is not None and stop(comparison.stats, res.samples):
            res.stopped = True
            return res
        for floor_sess, is_input in list(floor_sessions):
            got = ref if is_input else out
            try:
                unoptimized = floor_sess.run(None, batch.feed)
            except Exception:   # runs only optimized: no spread from it (the other's, or EXACT_REL_TOL, applies)
                floor_sessions.remove((floor_sess, is_input))
                continue
            for s, r, o in zip(comparison.stats, got, unoptimized):
                s.add_noise(r, o)
    comparison.finish(res)
    _judge(res, thresholds)
    return res


def _outputs(model: onnx.ModelProto, what: str, batches: Iterable[Any], level: Any = None
             ) -> tuple[list[str], list[Any]]:
    """The output names and each batch's outputs of ``model``, from one session dropped when done."""
    sess = make_session(model, what, level=level)
    return [o.name for o in sess.get_outputs()], [sess.run(None, b.feed) for b in batches]


def validate_in_turn(original: onnx.ModelProto, rewritten: onnx.ModelProto, batches: Iterable[Any], *, exact: bool,
                     thresholds: Thresholds, description: str = "", roles: onnx.ModelProto | None = None
                     ) -> ValidationResult:
    """``validate`` with one onnxruntime session alive at a time, for models whose sessions each hold gigabytes:
    the original runs over every batch and its session is dropped, then the rewritten model; their outputs are
    kept (small next to the weights) and compared batch by batch. Exact pipelines add the two unoptimized runs
    (the rounding spread), each in its own turn. ``batches`` is iterated once per run."""
    res = ValidationResult(data=description, exact=exact)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ref_names, ref_all = _outputs(original, "input model", batches)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"the input model fails on the validation data: {ort_message(e)}") from e
    spread = _unoptimized(original, "input model", batches, level, True) if exact else []
    try:
        names, new_all = _outputs(rewritten, "rewritten model", batches)
    except InputError:
        raise
    except Exception as e:
        res.failures.append(f"the rewritten model fails in onnxruntime: {ort_message(e)}")
        return res
    if ref_names != names:
        res.failures.append(f"outputs changed from {ref_names} to {names}")
        return res
    if exact:
        spread += _unoptimized(rewritten, "rewritten model", batches, level, False)
    comparison = Comparison(roles or original, names, thresholds)
    for i, (batch, ref, out) in enumerate(zip(batches, ref_all, new_all)):
        res.feeds += 1
        res.samples += batch.rows
        comparison.add(ref, out, batch.labels, batch.rows)
        for unoptimized, is_input in spread:
            for s, r, o in zip(comparison.stats, ref if is_input else out, unoptimized[i]):
                s.add_noise(r, o)
    comparison.finish(res)
    _judge(res, thresholds)
    return res


def _unoptimized(model: onnx.ModelProto, what: str, batches: Iterable[Any], level: Any,
                 is_input: bool) -> list[tuple[list[Any], bool]]:
    """The model's outputs with onnxruntime's optimizations off (its rounding spread), or none when it cannot run
    so (the other model's spread, or EXACT_REL_TOL, applies)."""
    try:
        return [(_outputs(model, what, batches, level)[1], is_input)]
    except Exception:
        return []


class Comparison:
    """One pair of models' outputs compared feed by feed: ``OutputStats`` per output (with the slices and score
    axes ``t`` asks for), accuracy on the labels, and what the task metric is called with."""

    def __init__(self, roles: onnx.ModelProto, names: list[str], t: Thresholds) -> None:
        self.stats = [OutputStats(n, score_axis=dict(t.scores).get(n)) for n in names]
        # Top-1 agreement for the class scores: the Softmax/LogSoftmax outputs if the model has any (MTCNN's box
        # offsets beside its face score have an argmax that means nothing), else every [N, C] output (logits).
        self.scored = class_score_outputs(roles) or set(range(len(names)))
        self.sequences = sequence_score_outputs(roles)
        self.slicing = {s.output: s for s in t.slices}
        self.metric = t.metric
        self.inputs = MetricInputs(names) if t.metric is not None else None
        self.feeds = self.labelled = self.correct_before = self.correct_after = 0
        self.score_index: int | None = None

    def add(self, ref: list[Any], out: list[Any], labels: np.ndarray | None, rows: int) -> None:
        if not self.feeds:
            self._slice(ref)
        self.feeds += 1
        for i, (s, r, o) in enumerate(zip(self.stats, ref, out)):
            s.update(r, o, top1=i in self.scored or s.score_axis is not None, sequence=i in self.sequences)
        if self.inputs is not None:
            self.inputs.add(ref, out, labels, rows)
        if labels is not None:
            labels = class_indices(labels)   # one-hot rows become class indices; other shapes are refused
            if self.score_index is None:
                self.score_index = label_output(ref, labels)
            if self.score_index >= 0 and ref[self.score_index].shape[0] == labels.shape[0]:
                self.labelled += labels.shape[0]
                self.correct_before += int(np.count_nonzero(ref[self.score_index].argmax(1) == labels))
                self.correct_after += int(np.count_nonzero(out[self.score_index].argmax(1) == labels))

    def _slice(self, ref: list[Any]) -> None:
        """Each float output's slicing: the user's, else the default rule (graphopt.slices) for its shape."""
        for i, (s, r) in enumerate(zip(self.stats, ref)):
            if isinstance(r, np.ndarray) and r.dtype.kind == "f":
                spec = self.slicing.get(s.name) or default_slicing(s.name, r.shape, i in self.sequences)
                s.slices = SliceStats(spec) if spec is not None and spec.axis is not None else None

    def metric_values(self) -> tuple[float, float] | None:
        """(float's own value, the candidate's) of the task metric; None without one."""
        return self.inputs.values(self.metric) if self.inputs is not None and self.metric is not None else None

    def finish(self, res: ValidationResult) -> None:
        res.outputs = self.stats
        res.labelled, res.correct_before, res.correct_after = self.labelled, self.correct_before, self.correct_after
        values = self.metric_values()
        if values is not None and self.metric is not None:
            res.metric = (self.metric.name, *values)


def _judge(res: ValidationResult, t: Thresholds) -> None:
    if res.feeds == 0:
        res.failures.append("no validation data: the data source gave no feeds")
    for i, s in enumerate(res.outputs):
        for p in dict.fromkeys(s.problems):
            res.failures.append(f"output '{s.name}': {p}")
        if s.new_nonfinite:
            res.failures.append(f"output '{s.name}': {s.new_nonfinite} values became NaN/Inf")
        if s.mismatches:
            res.failures.append(f"output '{s.name}': {s.mismatches} values differ from the original")
        if s.kind != "float" or s.problems:
            continue
        if res.exact:
            tol = max(_exact_tol(s), 2 * s.noise_rel)
            if s.rel_error > tol:
                floor = (f" (twice onnxruntime's own rounding spread on these models, {s.noise_rel:.3g})"
                         if tol > _exact_tol(s) else "")
                res.failures.append(f"output '{s.name}': rel error {s.rel_error:.3g} exceeds {tol:.3g}{floor} for an "
                                    "exact pipeline")
            continue
        cos = s.cosine
        if t.min_cosine is not None and cos is not None and cos < t.min_cosine:
            res.failures.append(f"output '{s.name}': cosine {cos:.5f} below {t.origin}min-cosine {t.min_cosine}"
                                + _on_validation(t))
        worst = s.slices.worst() if s.slices is not None else None
        if t.min_cosine is not None and worst is not None and worst[1] < t.min_cosine:
            res.failures.append(f"output '{s.name}': slice {worst[0]} of axis {s.slices.spec.axis} has cosine "  # type: ignore[union-attr]
                                f"{worst[1]:.5f} below {t.origin}min-cosine {t.min_cosine} (the whole output "
                                f"{_num(cos)})" + _on_validation(t))
        if (t.min_top1 is not None and s.top1 is not None and s.top1 < t.min_top1
                and (t.top1_outputs is None or i in t.top1_outputs or s.score_axis is not None)):
            per = f" per position over axis {s.score_axis}" if s.score_axis is not None else ""
            res.failures.append(f"output '{s.name}': top-1 agreement{per} {s.top1:.4f} below {t.origin}min-top1 "
                                f"{t.min_top1}" + _on_validation(t))
        if t.max_rel_error is not None and s.rel_error > t.max_rel_error:
            res.failures.append(f"output '{s.name}': rel error {s.rel_error:.3g} above --max-rel-error "
                                f"{t.max_rel_error}")
    if res.metric is not None and not res.exact:
        name, reference, value = res.metric
        if t.min_metric is not None and value < t.min_metric:
            res.failures.append(f"metric {name} {value:.6g} below --min-metric {t.min_metric:g}")
        if t.max_metric_drop is not None and reference - value > t.max_metric_drop:
            res.failures.append(f"metric {name} {value:.6g} is {reference - value:.6g} below float's "
                                f"{reference:.6g}, more than --max-metric-drop {t.max_metric_drop:g}")
    acc = res.accuracy
    if not res.exact and acc and t.max_accuracy_drop is not None and (acc[0] - acc[1]) * 100 > t.max_accuracy_drop:
        res.failures.append(f"accuracy on labels dropped {(acc[0] - acc[1]) * 100:.2f} points ({acc[0] * 100:.2f}% "
                            f"-> {acc[1] * 100:.2f}%), more than --max-accuracy-drop {t.max_accuracy_drop}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.5f}"


def _on_validation(t: Thresholds) -> str:
    """Where a pass's own target was missed (empty for the user's flags); what to do is the caller's to say, once
    it knows which pass lost what (graphopt.api)."""
    return "" if t.source_pass is None else " on the validation data (the pass's target on the calibration data)"


def _exact_tol(s: OutputStats) -> float:
    """Float tolerance for exact passes: rounding differences from reassociated arithmetic, by output dtype."""
    return EXACT_REL_TOL.get(np.dtype(s.dtype), DEFAULT_REL_TOL) if s.dtype else DEFAULT_REL_TOL
