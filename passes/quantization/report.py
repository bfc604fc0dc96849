"""The quantize pass's report: the PassResult (counts, per-layer rows, notes, declined sites, artifacts) made from
what the plan, the calibration, the builds and the fallback returned. Every text the pass reports is written here;
count keys are the constants below (tests read them by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from graphopt.calibration.gptq import MIN_ROWS_PER_DIM
from graphopt.passes.base import PassResult

from .build import Built
from .calibrate import Calibration, Ranges
from ..judge import Quality, top1_required
from .fallback import SENSITIVITY_BUDGET_S, FallbackResult
from .latency import MIN_GAIN, Choice
from .plan import Plan

CALIBRATION_SAMPLES = "calibration samples"
COSINE = "output cosine (calibration)"
COSINE_LOW = "output cosine, 95% lower bound (calibration)"
TOP1 = "top-1 agreement (calibration)"
TENSORS_FLOAT = "tensors left float"
UNITS_INT8 = "units int8"
UNITS_FLOAT = "units float"
TENSORS_QUANTIZED = "tensors quantized"
BIASES_CORRECTED = "biases corrected"
GPTQ_ROUNDED = "weights gptq-rounded"
REGIONS_INT8 = "int8 regions kept (latency)"
REGIONS_FLOAT = "int8 regions left float (latency)"
SPEEDUP = "measured speed vs float (x)"

MAX_NOTES = 12              # "left float" lines in the printed report; --report has them all
_AUTO_WHY = {True: " (auto: this CPU's u8·s8 kernel saturates in int16)",
             False: " (auto: this CPU's u8·s8 kernel adds in int32)"}


class Upgrade(NamedTuple):
    """The opset conversion before planning: from, to, and why it failed (None: it worked)."""

    old: int
    target: int
    error: str | None


@dataclass(frozen=True)
class Setup:
    """How the pass ran: the options, the opset conversion (None: none needed), whether weights are per channel
    (False where the model could not reach opset 13), 7-bit weights, whether there is calibration data, and
    whether the fallback runs."""

    options: Any
    upgrade: Upgrade | None
    per_channel: bool
    reduce_range: bool
    calib: bool
    fallback: bool


class Trial(NamedTuple):
    """One candidate set of ranges, built and (if the fallback ran) brought to the targets."""

    label: str
    ranges: Ranges
    built: Built
    fallback: FallbackResult | None

    @property
    def floated(self) -> tuple[str, ...]:
        return self.fallback.floated if self.fallback is not None else ()

    @property
    def rank(self) -> tuple[int, int]:
        """Most units int8 first, then fewest tensors float."""
        return len(self.built.int8_units), -len(self.floated)


def declined(setup: Setup, plan: Plan | None, reason: str) -> PassResult:
    """The result of a model declined as a whole after preparing it (``reason``), with what was done so far."""
    res = PassResult()
    _setup_notes(res, setup)
    if plan is not None:
        for site, why in plan.declined:
            res.decline(site, why)
    res.decline("model", reason)
    return res


def report(setup: Setup, plan: Plan, calibration: Calibration, best: Trial, tried: list[Trial],
           choice: Choice | None = None) -> PassResult:
    """The pass's result for the trial written (``best``) among those ``tried``, with objective=latency's
    ``choice`` (None: objective=size, or nothing to time)."""
    o = setup.options
    res = PassResult(changed=True)
    _setup_notes(res, setup)
    for site, why in plan.declined:
        res.decline(site, why)
    if calibration.loaded is not None:
        res.notes.append(f"ranges loaded for {calibration.loaded} tensors")
    if calibration.samples is not None:
        res.counts[CALIBRATION_SAMPLES] = calibration.samples
    if not setup.fallback and (o.min_cosine > 0 or o.min_top1 > 0):
        res.notes.append("sensitivity fallback skipped: no calibration data to measure it on")
    floated = _left_float(best.fallback, o) if best.fallback is not None else {}
    if best.fallback is not None:
        _fallback(res, best.fallback, o, len(floated))
    if len(tried) > 1:
        res.notes.append(f"percentile=auto: {best.label} kept the most int8 ("
                         + "; ".join(f"{t.label}: {len(t.built.int8_units)} of {len(plan.units)} units int8, "
                                     f"{len(t.floated)} tensors float" for t in tried) + ")")
    built = best.built
    _layers(res, plan, built, floated, setup.per_channel, choice)
    if choice is not None:
        _latency(res, choice, best.fallback)
    elif o.objective == "latency" and not setup.calib:
        res.notes.append("objective=latency: no calibration sample to time on, so int8 wherever the targets hold "
                         "(as objective=size)")
    res.counts[UNITS_INT8] = len(built.int8_units)
    if len(built.int8_units) < len(plan.units):
        res.counts[UNITS_FLOAT] = len(plan.units) - len(built.int8_units)
    res.counts[TENSORS_QUANTIZED] = len(built.tensors)
    if built.corrected:
        res.counts[BIASES_CORRECTED] = len(built.corrected)
    _weight_notes(res, setup, plan, built, calibration)
    method = f"percentile {best.label}" if o.method == "percentile" and best.label != "loaded" else o.method
    reduce = "on" if setup.reduce_range else "off"
    res.notes.append(f"method={method}, activations={o.activations}, reduce-range={reduce}"
                     f"{_AUTO_WHY[setup.reduce_range] if o.reduce_range == 'auto' else ''}"
                     f", weights {'per-channel' if setup.per_channel else 'per-tensor'}")
    for name, why in list(floated.items())[:MAX_NOTES]:
        res.notes.append(f"left float: tensor '{name}': {why}")
    if len(floated) > MAX_NOTES:
        res.notes.append(f"left float: {len(floated) - MAX_NOTES} more tensors (--report lists them all)")
        res.artifacts[TENSORS_FLOAT] = floated
    slow = [row for row in res.layers if row["status"] != "int8"]
    for row in slow[:MAX_NOTES]:
        res.notes.append(f"layer {row['layer']} ({row['op']}) runs float: {row['status'][7:]}")
    if len(slow) > MAX_NOTES:
        res.notes.append(f"{len(slow) - MAX_NOTES} more layers run float (--report lists every layer)")
    res.artifacts["calibration"] = {"method": method, "ranges": {k: list(v) for k, v in best.ranges.items()}}
    return res


def _setup_notes(res: PassResult, setup: Setup) -> None:
    up = setup.upgrade
    if up is None:
        return
    if up.error is None:
        res.notes.append(f"opset upgraded {up.old} -> {up.target}")
        return
    res.notes.append(f"opset upgrade {up.old} -> {up.target} failed: {up.error.splitlines()[0][:120]}")
    if up.old >= 10:
        res.notes.append(f"opset {up.old}: per-tensor weights (per-channel needs opset 13)")


def opset_declined(old: int) -> str:
    return f"opset {old} has no QuantizeLinear and conversion failed"


NO_UNITS = "no Conv, Gemm or MatMul to quantize"


def _said(q: Quality) -> str:
    return f"cosine {q.cosine:.4f}" + (f", top-1 {q.top1:.3f}" if q.top1 < 1.0 else "")


def _left_float(fb: FallbackResult, o: Any) -> dict[str, str]:
    """Each tensor the fallback left float, with the reason."""
    if fb.shape is not None:
        end = "input" if fb.shape == "prefix" else "output"
        reasons = {t: f"float {fb.shape}: the {len(fb.harmful)} tensors nearest the model's {end} stay float for the "
                      f"targets (one int8/float boundary)" for t in fb.harmful}
        return reasons | {t: "no op next to it runs int8 once the tensors above stay float" for t in fb.built.idle
                          if t not in reasons}
    reasons = {t: f"quantizing it alone gives {_said(fb.sensitivity[t])} (all int8: {_said(fb.full)}; targets "
                  f"min-cosine {o.min_cosine}, min-top1 {o.min_top1})" for t in fb.harmful}
    reasons.update({t: "no op next to it runs int8 once the tensors above stay float (a quantize/dequantize pair "
                       "there would only add error)" for t in fb.floated if t not in reasons})
    return reasons


def _fallback(res: PassResult, fb: FallbackResult, o: Any, floated: int) -> None:
    """The fallback's counts and notes: the quality on calibration data, the search's samples and outcome."""
    if o.min_top1 > 0 and fb.check_rows is not None:
        res.notes.append(f"top-1 agreement checked on {fb.check_rows} calibration rows: at least "
                         f"{top1_required(o.min_top1, fb.check_rows):.4f} asked (min-top1 {o.min_top1} plus a "
                         "one-sided 95% margin for rows not seen)")
    res.counts[COSINE] = round(fb.final.cosine, 6)
    if o.min_cosine > 0:
        res.counts[COSINE_LOW] = round(fb.final.cosine_low, 6)
    if fb.full.top1 < 1.0 or fb.final.top1 < 1.0:
        res.counts[TOP1] = round(fb.final.top1, 4)
    s = fb.search
    if s is None:
        return
    if fb.shape is not None:
        res.notes.append(f"fallback: a float {fb.shape} of {len(fb.harmful)} tensors (searched on {s.search_rows} "
                         "samples in the order the model computes them, checked on every calibration sample)")
        if fb.skipped is not None:
            res.notes.append(f"fallback: scattered search (tensors float by harm) not run: {fb.skipped}")
        res.counts[TENSORS_FLOAT] = floated
        return
    if s.late and s.sweep_samples > 1:
        res.notes.append(f"sensitivity of {s.late} of {s.sites} tensors measured on 1 sample (time budget "
                         f"{SENSITIVITY_BUDGET_S:.0f} s)")
    if s.nothing_int8:
        res.notes.append(f"fallback: min-cosine {o.min_cosine} and min-top1 {o.min_top1} hold only with "
                         f"{s.nothing_int8} float, so nothing runs int8; lower them to accept int8 error")
    res.notes.append(f"sensitivity measured on {s.sweep_rows} sample(s) per tensor, search on {s.search_rows}")
    res.counts[TENSORS_FLOAT] = floated


def kept_float(setup: Setup, plan: Plan, best: Trial, choice: Choice) -> PassResult:
    """objective=latency where no int8 assignment is faster: the input written as it is, and why in one line."""
    res = PassResult(changed=False)
    _setup_notes(res, setup)
    for site, why in plan.declined:
        res.decline(site, why)
    floated = _left_float(best.fallback, setup.options) if best.fallback is not None else {}
    _layers(res, plan, best.built, floated, setup.per_channel, choice)
    _latency(res, choice, best.fallback)
    res.artifacts["calibration"] = {"method": setup.options.method,
                                    "ranges": {k: list(v) for k, v in best.ranges.items()}}
    return res


def _ms(t: Any) -> str:
    return f"{t.median:.3g} ms"


def _latency(res: PassResult, c: Choice, fb: FallbackResult | None) -> None:
    """objective=latency's line: what was written and the timings it was decided on; its counts. ``fb``: the
    fallback's result (where it skipped the scattered search, its build is the one float run at an end)."""
    chosen = f", the {sum(c.faster)} regions faster alone {_ms(c.chosen)}" if c.chosen is not None else ""
    run = f", one float run at an end {_ms(c.contiguous)}" if c.contiguous is not None else ""
    searched = "one float run at an end" if fb is not None and fb.skipped is not None else "all int8"
    timed = (f"{searched} {_ms(c.all_int8)}{chosen}{run}, float {_ms(c.all_float)}; median per run, 1 thread, "
             f"noise ±{100 * c.noise:.1f}%")
    if c.written == "float" and c.early:
        res.notes.append(f"objective=latency: kept float, decided before the fidelity search: neither all int8 nor "
                         f"the regions faster alone is measured {100 * MIN_GAIN:.0f}% faster on this CPU ({timed}); "
                         "the search could only leave more tensors float (parts of these regions, or one float run "
                         "at an end), so it and the bias correction were not run")
        return
    if c.written == "float":
        res.notes.append(f"objective=latency: kept float: no int8 assignment that meets the targets is measured "
                         f"{100 * MIN_GAIN:.0f}% faster on this CPU ({timed})")
        return
    if c.written == "contiguous":
        res.notes.append(f"objective=latency: one float run at an end, the rest int8, measured fastest ({timed}; "
                         "'all int8' is the fallback's scattered choice)")
        res.counts[SPEEDUP] = round(c.all_float.median / c.timed.median, 3)
        return
    n = len(c.regions)
    early = "; timed before the fidelity search, which left every tensor int8" if c.early else ""
    res.notes.append(f"objective=latency: {sum(c.int8)} of {n} int8 regions kept ({timed}{early})")
    res.counts[REGIONS_INT8] = sum(c.int8)
    if not all(c.int8):
        res.counts[REGIONS_FLOAT] = n - sum(c.int8)
    res.counts[SPEEDUP] = round(c.all_float.median / c.timed.median, 3)


def _speed_reasons(c: Choice | None) -> dict[str, tuple[int, str | None]]:
    """Each unit in a region: the region's number and, where the region is left float, why (speed); nothing where
    the contiguous candidate is written (its float layers are float for fidelity)."""
    if c is None or c.written == "contiguous":
        return {}
    out: dict[str, tuple[int, str | None]] = {}
    for i, (r, on) in enumerate(zip(c.regions, c.int8)):
        why = None
        if not on:
            alone = f"; int8 alone saves {c.gains[i].median:+.3g} ms (±{c.gains[i].notch:.2g})" if c.gains else ""
            why = (f"speed: region {i + 1} is faster float" if c.written == "chosen" else
                   f"speed: no int8 assignment is measured {100 * MIN_GAIN:.0f}% faster") + alone
        out.update({op: (i + 1, why) for op in r.ops})
    return out


def _layers(res: PassResult, plan: Plan, built: Built, floated: dict[str, str], per_channel: bool,
            choice: Choice | None = None) -> None:
    """One row per unit: its op, its weights' granularity, its int8 region (objective=latency), int8 or why it
    runs float (fidelity: an input left float; speed: its region measured slower)."""
    speed = _speed_reasons(choice)
    for u in plan.units:
        why = [f"input '{t}' left float" for t in u.data_inputs() if t in floated]
        region, slow = speed.get(u.name, (None, None))
        status = "float: " + slow if slow else "int8" if u.name in built.int8_units else \
            "float: " + ("; ".join(why) or "input not quantized")
        row = {"layer": u.name, "op": u.op, "weights": "per-channel" if per_channel and u.weight_axis is not None
               else ("per-tensor" if u.weight_axis is not None else "activation"), "status": status}
        if region is not None:
            row["region"] = region
        res.layers.append(row)


def _weight_notes(res: PassResult, setup: Setup, plan: Plan, built: Built, calibration: Calibration) -> None:
    """Bias correction's and GPTQ's notes and counts."""
    o = setup.options
    if built.refit_skipped:
        res.notes.append(f"bias correction: layer-by-layer mean matching skipped ({built.refit_skipped}); the "
                         "weights' rounding offsets stay corrected")
    elif o.bias_correction and not setup.calib and built.int8_units:
        res.notes.append("bias correction skipped: no calibration data to take the layers' mean inputs from "
                         "(give --calib-data with --load-calibration)")
    if built.gptq_rounded:
        res.counts[GPTQ_ROUNDED] = len(built.gptq_rounded)
    if o.rounding == "gptq":
        few = [u.name for u in plan.units if u.name in built.int8_units and u.weight_axis is not None
               and u.name not in built.gptq_rounded]
        if few:
            res.notes.append(f"weights rounded to nearest in {len(few)} layer(s) ({', '.join(few[:3])}"
                             f"{', ...' if len(few) > 3 else ''}): fewer than {MIN_ROWS_PER_DIM} calibration "
                             "input vectors per input dimension, no calibration data, or a Conv with auto_pad "
                             "SAME on an input of unknown size")
