"""Which pass lost what: in a pipeline of several lossy passes, each lossy step's output compared on the
validation data with the step's own input and with the original model.

Per comparison the headline figures are the lowest output cosine and the lowest top-1 agreement over the outputs
that have one (validate's metrics, class-score outputs as the original model's graph says). A failed pipeline's
one-line error carries these, so a user sees that pruning, not quantization, lost the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import onnx

from .validate import Thresholds, ValidationResult, validate


@dataclass(frozen=True)
class Fidelity:
    cosine: float | None
    top1: float | None

    @staticmethod
    def of(res: ValidationResult) -> Fidelity:
        cosines = [o.cosine for o in res.outputs if o.cosine is not None]
        top1s = [o.top1 for o in res.outputs if o.top1 is not None]
        return Fidelity(min(cosines) if cosines else None, min(top1s) if top1s else None)

    def __str__(self) -> str:
        parts = ([f"cosine {self.cosine:.4f}"] if self.cosine is not None else []) + \
                ([f"top-1 {self.top1 * 100:.1f}%"] if self.top1 is not None else [])
        return ", ".join(parts) or "no float output"


@dataclass(frozen=True)
class StepLoss:
    step: str
    vs_input: Fidelity
    vs_original: Fidelity

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.step, "vs_input": vars(self.vs_input), "vs_original": vars(self.vs_original)}

    def __str__(self) -> str:
        return f"{self.step}: {self.vs_input} vs its input, {self.vs_original} vs the original"


def step_losses(original: onnx.ModelProto, steps: Iterable[tuple[str, onnx.ModelProto, onnx.ModelProto]],
                data: Any) -> list[StepLoss]:
    """For each (step, its input model, its output model): fidelity against the input and against ``original``,
    on ``data`` (re-iterable batches)."""
    def fidelity(ref: onnx.ModelProto, out: onnx.ModelProto) -> Fidelity:
        return Fidelity.of(validate(ref, out, data, exact=False, thresholds=Thresholds(), roles=original))

    return [StepLoss(step, fidelity(before, after), fidelity(original, after)) for step, before, after in steps]


def advice(losses: list[StepLoss], searched: bool) -> str:
    """What to do about a target missed on the validation data, for the one-line error: which pass lost what (when
    several lossy passes ran) and where most was lost (the pass whose output is furthest from its own input); else,
    where a pass ``searched`` against the targets on the calibration data, that these samples differ from those."""
    if losses:
        worst = min(losses, key=lambda s: s.vs_input.cosine if s.vs_input.cosine is not None else 1.0)
        by_pass = "; ".join(f"{s.step} {s.vs_input} vs its input" for s in losses)
        return f"by pass: {by_pass}; most was lost by {worst.step}"
    if searched:
        return ("the pass met the targets on the calibration data: calibrate on more samples like these, or set "
                "--min-cosine/--min-top1 to accept it")
    return "a milder setting keeps more; --min-cosine, --min-top1, --max-accuracy-drop set the targets, --no-gate drops them"
