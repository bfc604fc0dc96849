"""The trade-off curve: ``graphopt sweep IN.onnx --pass NAME:option=RANGE [--pass ...]`` runs the pipeline once
per value of one option and measures each result as the main command does (``api.optimize``: validation against
the pipeline's targets, model statistics, latency interleaved against the input model, medians).

One option of one ``--pass`` carries the values: a range ``start:stop:step`` (stop included; the values are
``start + i*step`` in decimal arithmetic, so 0.1:0.6:0.1 gives exactly 0.1 ... 0.6, no float drift) on an option
that takes a number, or a list ``a|b|c`` on any option that is not a list of names. ``:`` and ``|`` appear in no
number nor choice, so a value is never mistaken for a range. Row 0 is the input model (the reference point: what the
ratios are against). A value whose pipeline the user's data or options refuse is a row with the reason.

The Pareto front of a cost (latency ratio, size, MACs) are the rows that no other row beats on both the cost (lower)
and the quality (higher: accuracy on labels, else the worst output cosine); the knee is the passing value of least
cost.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Sequence

import onnx

from .api import optimize
from .errors import InputError, UsageError
from .pipeline import PassSpec, check_calibration, check_order, make_spec, registry, split_pass_arg
from .report import Report, environment
from .targets import pipeline_targets

log = logging.getLogger("graphopt")

MAX_VALUES = 50
EXAMPLE = "e.g. --pass prune-channels:ratio=0.1:0.6:0.1 or --pass svd:rank=8|16|32"
COSTS = {"latency_ratio": "latency vs input", "size_bytes": "file size", "macs": "MACs"}


@dataclass(frozen=True)
class Sweep:
    """The pipelines of a sweep: the values of ``option`` of pass ``pass_name``, one pipeline per value."""

    pass_name: str
    option: str
    values: tuple[str, ...]
    pipelines: tuple[tuple[PassSpec, ...], ...]
    shape: str          # the pipeline as given, the swept value shown as <option>

    @property
    def label(self) -> str:
        return f"{self.pass_name}:{self.option}"


def expand(raw: str, numeric: bool, where: str) -> list[str] | None:
    """The values a range ``start:stop:step`` (when ``numeric``) or a list ``a|b|c`` stands for; None when ``raw``
    is a single value."""
    if "|" in raw:
        items = [x.strip() for x in raw.split("|")]
        if len(items) < 2 or not all(items):
            raise UsageError(f"{where}: list '{raw}' has an empty item; give a|b|c")
        return items
    if not numeric or ":" not in raw:
        return None
    parts = raw.split(":")
    try:
        start, stop, step = (Decimal(p.strip()) for p in parts) if len(parts) == 3 else (None,) * 3
    except InvalidOperation:
        start = None
    if start is None or not all(d.is_finite() for d in (start, stop, step)):
        raise UsageError(f"{where}: range '{raw}' is not start:stop:step (three numbers)")
    if step == 0 or (stop - start) * step < 0:
        raise UsageError(f"{where}: range '{raw}' never reaches its stop: the step must be non-zero and go from "
                         "start towards stop")
    count = int((stop - start) / step) + 1
    if count > MAX_VALUES:
        raise UsageError(f"{where}: range '{raw}' has {count} values, more than {MAX_VALUES}; take a larger step")
    return [_decimal_text(start + i * step) for i in range(count)]


def _decimal_text(d: Decimal) -> str:
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


def parse_sweep(pass_args: Sequence[str], have_calib: bool) -> Sweep:
    """The sweep the ``--pass`` texts describe, every value's pipeline parsed and checked (options, bounds, order,
    calibration data where a value needs it); a usage error names the problem before any work."""
    split = [split_pass_arg(text) for text in pass_args]
    found: list[tuple[int, int, str, list[str]]] = []
    for i, (name, pairs) in enumerate(split):
        make_spec(name, [])   # an unknown pass is named first
        specs = {s.name: s for s in registry()[name].option_specs()}
        for j, (key, raw) in enumerate(pairs):
            spec = specs.get(key.replace("_", "-"))
            if spec is None:
                make_spec(name, [(key, raw)])   # names the unknown option and the valid ones
            if spec is None or spec.is_list:
                continue    # a list of names takes ':' and '|' literally
            numeric = any(m in (int, float) for m in spec.members)
            values = expand(raw, numeric, f"--pass '{pass_args[i]}': option '{spec.name}'")
            if values is not None:
                found.append((i, j, spec.name, values))
    if not found:
        raise UsageError(f"sweep: no option of a --pass carries a range or a list of values ({EXAMPLE})")
    if len(found) > 1:
        raise UsageError(f"sweep: values given for both '{found[0][2]}' and '{found[1][2]}'; a sweep varies one "
                         "option (run one sweep per option)")
    i, j, option, values = found[0]
    pipelines = []
    for value in values:
        specs = [make_spec(name, [(k, value if (a, b) == (i, j) else v) for b, (k, v) in enumerate(pairs)])
                 for a, (name, pairs) in enumerate(split)]
        check_order(specs)
        check_calibration(specs, have_calib)
        pipelines.append(tuple(specs))
    name, pairs = split[i]
    shown = ",".join(f"{k}={'<' + option + '>' if b == j else v}" for b, (k, v) in enumerate(pairs))
    shape = " -> ".join(f"{name}:{shown}" if a == i else text for a, text in enumerate(pass_args))
    return Sweep(split[i][0], option, tuple(values), tuple(pipelines), shape)


@dataclass
class Row:
    """One point of the curve: the input model (row 0) or one value's pipeline, as validated and measured."""

    value: str
    passed: bool
    reason: str = ""
    accuracy: float | None = None       # percent, on the data's __labels__
    cosine: float | None = None         # the worst output's
    top1: float | None = None           # the worst top-1 agreement, percent
    latency_ms: float | None = None
    latency_ratio: float | None = None  # latency / the input's, measured interleaved
    size_bytes: int | None = None
    parameters: int | None = None
    macs: int | None = None
    seconds: float | None = None        # the passes' time

    @property
    def measured(self) -> bool:
        return self.size_bytes is not None


@dataclass
class SweepResult:
    model: str
    sweep: Sweep
    rows: list[Row]
    targets: dict[str, float | None]
    environment: dict[str, Any] = field(default_factory=environment)
    latency_setup: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)   # the runs' report warnings, each once

    @property
    def quality(self) -> str:
        """What the curve plots upwards: accuracy when the data has labels, else the worst output cosine."""
        return "accuracy" if self.rows and self.rows[0].accuracy is not None else "cosine"

    @property
    def quality_floor(self) -> float | None:
        """The target on the quality axis: the input's accuracy less the allowed drop, or the min cosine."""
        if self.quality == "accuracy":
            drop = self.targets.get("max_accuracy_drop")
            return None if drop is None else self.rows[0].accuracy - drop   # type: ignore[operator]
        return self.targets.get("min_cosine")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "sweep": self.sweep.label, "pipeline": self.sweep.shape,
                "targets": self.targets, "quality": self.quality, "environment": self.environment,
                "latency": self.latency_setup, "warnings": self.warnings, "rows": [asdict(r) for r in self.rows],
                "knee": {cost: (k.value if (k := knee(self.rows, cost)) else None) for cost in COSTS}}


def run_sweep(model: onnx.ModelProto, name: str, sweep: Sweep, settings: Mapping[str, Any], *,
              keep: Callable[[int, str, onnx.ModelProto], None] | None = None,
              on_row: Callable[[Row], None] | None = None) -> SweepResult:
    """Row 0 (the input), then one row per value; ``settings`` are ``optimize``'s data, target and measurement
    arguments, as the main command passes them. ``keep(i, value, model)`` gets each value's model; ``on_row`` each
    row as it is measured (row 0 once a value's validation has measured the input's accuracy).

    Row 0 first opens the data and measures the input (an empty pipeline, no validation): data the input model
    cannot take stops the sweep there, before any value, with its one-line error. After that, a value's user error
    (an option this model refuses) is that value's row, with the reason."""
    _, ref = optimize(model, [], validate_output=False, **{**settings, "latency_runs": 0})
    assert ref.before is not None
    b = ref.before
    rows = [Row("input", passed=True, reason="the input model (reference)", size_bytes=b.size_bytes,
                parameters=b.parameters, macs=b.macs, seconds=0.0)]
    pending: list[Row] = [rows[0]]      # shown once a value's validation gave the input's figures
    known = False
    warnings: dict[str, None] = dict.fromkeys(ref.warnings)
    setup: dict[str, Any] = {}
    before: list[float] = []
    for i, (value, pipeline) in enumerate(zip(sweep.values, sweep.pipelines), 1):
        try:
            out, report = optimize(model, list(pipeline), force=True, **settings)
        except (UsageError, InputError) as e:
            rows.append(Row(value, passed=False, reason=str(e)))
        else:
            if not known:
                _input_quality(rows[0], report)
                known = True
            rows.append(_row(value, report))
            warnings.update(dict.fromkeys(report.warnings))
            if report.latency_ms:
                before.append(report.latency_ms[0])
                setup = report.latency_setup
            if keep:
                keep(i, value, out)
        pending.append(rows[-1])
        if on_row and (known or i == len(sweep.values)):
            for row in pending:
                on_row(row)
            pending.clear()
    if before:
        rows[0].latency_ms = statistics.median(before)
        rows[0].latency_ratio = 1.0
    targets = pipeline_targets(gate=settings.get("gate", True), min_cosine=settings.get("min_cosine"),
                               min_top1=settings.get("min_top1"), max_accuracy_drop=settings.get("max_accuracy_drop"),
                               max_rel_error=settings.get("max_rel_error"))
    return SweepResult(name, sweep, rows, {k: getattr(targets, k) for k in ("min_cosine", "min_top1",
                                                                            "max_accuracy_drop")},
                       latency_setup=setup, warnings=list(warnings))


def _input_quality(row: Row, report: Report) -> None:
    """Row 0's accuracy (and the reference cosine and top-1) from a value's validation, which ran the input too."""
    v = report.validation
    assert v is not None
    row.accuracy = v.accuracy[0] * 100 if v.accuracy else None
    row.cosine = 1.0 if any(o.cosine is not None for o in v.outputs) else None
    row.top1 = 100.0 if any(o.top1 is not None for o in v.outputs) else None
    row.latency_ratio = 1.0 if report.latency_ms else None


def _row(value: str, report: Report) -> Row:
    """A value's row from its report."""
    v, after = report.validation, report.after
    assert v is not None and after is not None
    cosines = [o.cosine for o in v.outputs if o.cosine is not None]
    top1 = [o.top1 for o in v.outputs if o.top1 is not None]
    lat = report.latency_ms
    return Row(value, passed=v.passed, reason="; ".join(v.failures),
               accuracy=v.accuracy[1] * 100 if v.accuracy else None,
               cosine=min(cosines) if cosines else None, top1=min(top1) * 100 if top1 else None,
               latency_ms=lat[1] if lat else None, latency_ratio=lat[1] / lat[0] if lat and lat[0] > 0 else None,
               size_bytes=after.size_bytes, parameters=after.parameters, macs=after.macs,
               seconds=round(sum(p["seconds"] for p in report.passes), 3))


def quality_of(row: Row, quality: str) -> float | None:
    return row.accuracy if quality == "accuracy" else row.cosine


def pareto(rows: Sequence[Row], cost: str, quality: str) -> list[Row]:
    """The rows no other row beats on both ``cost`` (lower) and ``quality`` (higher), by increasing cost."""
    points = sorted((r for r in rows if getattr(r, cost) is not None and quality_of(r, quality) is not None),
                    key=lambda r: (getattr(r, cost), -quality_of(r, quality)))   # type: ignore[operator]
    front: list[Row] = []
    for r in points:
        if not front or quality_of(r, quality) > quality_of(front[-1], quality):   # type: ignore[operator]
            front.append(r)
    return front


def knee(rows: Sequence[Row], cost: str) -> Row | None:
    """The passing value (row 0 aside) of least ``cost``; ties go to the first value."""
    passing = [r for r in rows[1:] if r.passed and getattr(r, cost) is not None]
    return min(passing, key=lambda r: getattr(r, cost)) if passing else None
