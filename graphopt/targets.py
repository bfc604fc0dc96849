"""The pipeline's targets: what every lossy pipeline must keep on the validation data, and what the passes that
search (quantize's fallback) search against.

Defaults (validate.DEFAULT_TARGETS): output cosine >= 0.98, top-1 agreement >= 0.95 on class-score outputs
(validate.class_score_outputs), accuracy on labels down by at most 1.0 point. The user sets each
(--min-cosine, --min-top1 0 turns one off; --max-accuracy-drop) or turns them all off (--no-gate). A pass's own
target (quantize:min-cosine=0.995) replaces a default and tightens a target the user set; it is checked on the
validation data too, named in the failure message. What is measured besides each output's cosine and top-1 (the
worst slice, --scores outputs, the task metric with --min-metric / --max-metric-drop: graphopt.validate) travels
with the targets, so that validation and every search measure the same.
Exact pipelines are judged by their own tolerance (validate), not by these.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import onnx

from .errors import UsageError
from .pipeline import PassSpec
from .slices import SliceSpec, check_slices, parse_slices
from .taskmetric import as_metric
from .validate import DEFAULT_TARGETS, Thresholds, class_score_outputs

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def pipeline_targets(*, gate: bool, min_cosine: float | None, min_top1: float | None,
                     max_accuracy_drop: float | None, max_rel_error: float | None,
                     defaults: bool = True, fidelity: Thresholds = Thresholds()) -> Thresholds:
    """The user's targets, the defaults where they gave none (unless ``defaults`` is False: on synthetic data,
    which says nothing of accuracy, only what the user asked is checked); only ``max_rel_error`` without the gate.
    ``fidelity`` carries what is measured (slices, score outputs, the task metric) and the metric's targets, which
    the gate keeps (--no-gate: measured and reported, not checked)."""
    if not gate:
        return dataclasses.replace(fidelity.measures(), max_rel_error=max_rel_error)
    d = DEFAULT_TARGETS if defaults else Thresholds()
    return dataclasses.replace(fidelity, min_cosine=(d.min_cosine if min_cosine is None else min_cosine) or None,
                               min_top1=(d.min_top1 if min_top1 is None else min_top1) or None,
                               max_rel_error=max_rel_error,
                               max_accuracy_drop=d.max_accuracy_drop if max_accuracy_drop is None
                               else max_accuracy_drop)


def validation_targets(base: Thresholds, specs: Sequence[PassSpec], model: onnx.ModelProto,
                       given: frozenset[str]) -> Thresholds:
    """What validation checks: ``base`` (the pipeline's targets; ``given`` names those the user set) with the
    pipeline's passes' own targets (``Pass.targets``, e.g. quantize:min-cosine=0.9; 0: off). A pass's target
    replaces a default and tightens one the user set; the pass is named where its target binds. A default min-top1 covers the
    model's class-score outputs; one the user gave, every output with a top-1 figure."""
    values = {"min_cosine": base.min_cosine, "min_top1": base.min_top1}
    source = None
    for key in values:
        own = [(getattr(t, key), s.name) for s in specs
               if (t := s.build().targets()) is not None and getattr(t, key) is not None]
        if not own:
            continue
        value, name = max(own)
        if key not in given or value > (values[key] or 0.0):
            values[key], source = value or None, name     # a pass's own 0 turns the target off
    return dataclasses.replace(base, min_cosine=values["min_cosine"], min_top1=values["min_top1"],
                               source_pass=source, top1_outputs=None if "min_top1" in given else
                               frozenset(class_score_outputs(model)))


def parse_scores(text: str) -> tuple[str, int]:
    """``--scores OUTPUT[:AXIS]``: an output of class scores and its class axis (default -1, the last)."""
    head, sep, last = text.rpartition(":")
    if sep and re.fullmatch(r"-?\d+", last):
        return head, int(last)
    return text, -1


def fidelity_targets(model: onnx.ModelProto, *, slices: Sequence[str | SliceSpec] = (),
                     scores: Sequence[str | tuple[str, int]] = (), metric: Any = None,
                     min_metric: float | None = None, max_metric_drop: float | None = None) -> Thresholds:
    """What the user asks to be measured besides each output (``--slices``, ``--scores``, ``--metric``) and the
    metric's targets, checked against the model's outputs before any work (one-line usage errors)."""
    specs = tuple(parse_slices(s) if isinstance(s, str) else s for s in slices)
    check_slices(specs, model)
    outputs = {o.name: o for o in model.graph.output}
    pairs = tuple(parse_scores(s) if isinstance(s, str) else (str(s[0]), int(s[1])) for s in scores)
    for name, axis in pairs:
        if name not in outputs:
            raise UsageError(f"--scores names no output '{name}'; outputs: {', '.join(outputs)}")
        t = outputs[name].type.tensor_type
        rank = len(t.shape.dim) if t.HasField("shape") else None
        if rank is not None and (rank < 2 or not -rank <= axis < rank):
            raise UsageError(f"--scores {name}:{axis}: output '{name}' has rank {rank}; give its class axis")
        if rank is not None and t.elem_type not in FLOAT_TYPES:
            raise UsageError(f"--scores {name}: output '{name}' is not float")
    task = as_metric(metric)
    if task is None and (min_metric is not None or max_metric_drop is not None):
        raise UsageError(f"--{'min-metric' if min_metric is not None else 'max-metric-drop'} needs --metric "
                         "FILE.py:function")
    return Thresholds(slices=specs, scores=tuple((n, a % len(outputs[n].type.tensor_type.shape.dim)
                                                  if outputs[n].type.tensor_type.HasField("shape") else a)
                                                 for n, a in pairs),
                      metric=task, min_metric=min_metric, max_metric_drop=max_metric_drop)


def check_metric(t: Thresholds, session: Any, batch: Any) -> None:
    """Call the task metric once, on the model's outputs of ``batch`` against themselves (labels as the batch has
    them), so that a broken metric is a one-line error before any pass runs."""
    if t.metric is None or batch is None:
        return
    names = [o.name for o in session.get_outputs()]
    ref = dict(zip(names, session.run(None, batch.feed)))
    t.metric(ref, ref, batch.labels)
