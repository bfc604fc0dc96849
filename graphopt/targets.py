"""The pipeline's targets: what every lossy pipeline must keep on the validation data, and what the passes that
search (quantize's fallback) search against.

Defaults (validate.DEFAULT_TARGETS): output cosine >= 0.98, top-1 agreement >= 0.95 on class-score outputs
(validate.class_score_outputs), accuracy on labels down by at most 1.0 point. The user sets each
(--min-cosine, --min-top1 0 turns one off; --max-accuracy-drop) or turns them all off (--no-gate). A pass's own
target (quantize:min-cosine=0.995) replaces a default and tightens a target the user set; it is checked on the
validation data too, named in the failure message.
Exact pipelines are judged by their own tolerance (validate), not by these.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from .pipeline import PassSpec
from .validate import DEFAULT_TARGETS, Thresholds, class_score_outputs


def pipeline_targets(*, gate: bool, min_cosine: float | None, min_top1: float | None,
                     max_accuracy_drop: float | None, max_rel_error: float | None,
                     defaults: bool = True) -> Thresholds:
    """The user's targets, the defaults where they gave none (unless ``defaults`` is False: on synthetic data,
    which says nothing of accuracy, only what the user asked is checked); only ``max_rel_error`` without the gate."""
    if not gate:
        return Thresholds(max_rel_error=max_rel_error)
    d = DEFAULT_TARGETS if defaults else Thresholds()
    return Thresholds(min_cosine=(d.min_cosine if min_cosine is None else min_cosine) or None,
                      min_top1=(d.min_top1 if min_top1 is None else min_top1) or None,
                      max_rel_error=max_rel_error,
                      max_accuracy_drop=d.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop)


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
    return Thresholds(values["min_cosine"], values["min_top1"], base.max_rel_error, base.max_accuracy_drop,
                      source_pass=source, top1_outputs=None if "min_top1" in given else
                      frozenset(class_score_outputs(model)))
