"""The sweep's picture (``graphopt sweep --plot curve.png``): one panel per cost — latency against the input's,
file size, MACs — with the quality (accuracy on labels, else the worst output cosine) upwards.

Each value is a point labelled with its value: filled where it met the pipeline's targets, a red cross where it
did not; the input model is a black star. The target is a dashed line; the Pareto front (the best quality at each
cost or less, ``sweep.pareto``) a staircase. Points far below the target are drawn on the panel's floor as
down-pointing triangles with their figure, so that the region around the target stays readable. Matplotlib is an
optional extra (``pip install 'graphopt[plot]'``), imported when a plot is drawn; the object-oriented API only (no
pyplot state).
"""

from __future__ import annotations

import importlib
import importlib.util
from io import BytesIO
from typing import Any

from .sweep import COSTS, Row, SweepResult, knee, pareto, quality_of

# The optional extra: pip install 'graphopt[plot]'. Loaded when a plot is drawn, not when graphopt starts: importing
# matplotlib.figure takes 0.5 s on a quiet Zen 4 (1.6 s loaded), which every command would pay for the one that plots.
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'graphopt[plot]'"
PASS, FAIL, FRONT, TARGET = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"
LABELS = {"latency_ratio": "latency (x the input's, lower is faster)", "size_bytes": "file size", "macs": "MACs per run"}


def render(result: SweepResult) -> bytes:
    """The figure as PNG bytes (the caller writes them through graphopt.io)."""
    costs = [c for c in COSTS if any(getattr(r, c) is not None for r in result.rows)]
    figure = importlib.import_module("matplotlib.figure")
    fig = figure.Figure(figsize=(4.6 * max(len(costs), 1), 4.6), dpi=90, layout="constrained")
    axes = fig.subplots(1, max(len(costs), 1), sharey=True, squeeze=False)[0]
    lo, hi = _quality_range(result)
    for ax, cost in zip(axes, costs):
        _panel(ax, result, cost, lo, hi)
    axes[0].set_ylabel("accuracy on labels (%)" if result.quality == "accuracy" else "worst output cosine")
    handles = _legend(axes[0], result, lo)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    env = result.environment
    setup = result.latency_setup
    threads = setup.get("threads")
    timing = (f"latency: median of {setup.get('runs')} runs interleaved with the input, {threads} "
              f"thread{'s' if threads != 1 else ''}" if setup else "latency not measured")
    pipeline = f"  ({result.sweep.shape})" if " -> " in result.sweep.shape else ""
    errors = [f"{result.sweep.option}={r.value}: {r.reason}" for r in result.rows[1:] if not r.measured]
    note = ("\nnot measured: " + "; ".join(errors))[:200] if errors else ""
    cpu = env["cpu"]
    fig.suptitle(f"{result.model}: sweep of {result.sweep.label}{pipeline}\n{cpu['model']} ("
                 f"{', '.join(cpu['isa']) or 'no AVX2'}; {cpu['cores']} cores), onnxruntime {env['onnxruntime']}; "
                 f"{timing}{note}", fontsize=10)
    buf = BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _quality_range(result: SweepResult) -> tuple[float, float]:
    """The quality axis: from a little under the target (or the lowest point) to a little over the best point."""
    values = [q for r in result.rows if (q := quality_of(r, result.quality)) is not None]
    if not values:     # no value ran: an empty panel under the title that lists why
        return 0.0, 1.0
    floor = result.quality_floor
    top = max(values + ([floor] if floor is not None else []))
    bottom = min(values + ([floor] if floor is not None else []))
    if floor is not None and top > floor:
        bottom = max(bottom, floor - 3 * (top - floor))   # failures far below go on the floor, marked
    pad = (top - bottom) * 0.08 or 0.01 * abs(top) or 0.01
    return bottom - pad, top + pad


def _unit(result: SweepResult, cost: str) -> tuple[float, str]:
    """The divisor and axis label of a cost: sizes in KB or MB, MACs in millions or billions."""
    top = max(getattr(r, cost) or 0 for r in result.rows)
    if cost == "size_bytes":
        return (2.0 ** 20, "file size (MB)") if top >= 10 * 2 ** 20 else (1024.0, "file size (KB)")
    if cost == "macs":
        return (1e9, "MACs per run (billions)") if top >= 1e10 else (1e6, "MACs per run (millions)")
    return 1.0, LABELS[cost]


def _panel(ax: Any, result: SweepResult, cost: str, lo: float, hi: float) -> None:
    scale, label = _unit(result, cost)
    quality = result.quality
    points = [r for r in result.rows if getattr(r, cost) is not None and quality_of(r, quality) is not None]
    front = pareto(points, cost, quality)
    if front:
        xs = [getattr(r, cost) / scale for r in front]
        ys = [quality_of(r, quality) for r in front]
        right = max(getattr(r, cost) for r in points) / scale
        ax.plot(xs + [right], ys + ys[-1:], drawstyle="steps-post", color=FRONT, lw=1.5, alpha=0.8, zorder=1)
    if result.quality_floor is not None:
        ax.axhline(result.quality_floor, color=TARGET, ls="--", lw=1, zorder=0)
        ax.axhspan(lo, result.quality_floor, color=FAIL, alpha=0.04, lw=0, zorder=0)
    best = knee(result.rows, cost)
    if best is not None and quality_of(best, quality) is not None:
        ax.scatter([getattr(best, cost) / scale], [quality_of(best, quality)], marker="o", s=240,
                   facecolors="none", edgecolors=FRONT, linewidths=2, zorder=2)
    for r in points:
        _point(ax, r, getattr(r, cost) / scale, quality_of(r, quality), lo, result.quality)  # type: ignore[arg-type]
    ax.set_ylim(lo, hi)
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12)


def _point(ax: Any, r: Row, x: float, y: float, lo: float, quality: str) -> None:
    text, offset = r.value, (4, 5)
    if r.value == "input":
        ax.scatter([x], [y], marker="*", s=160, color="black", zorder=4)
        offset = (4, -12)   # below: a value next to the input keeps its label above
    elif y < lo:     # far below the target: on the floor, with its figure
        ax.scatter([x], [lo], marker="v", s=60, color=PASS if r.passed else FAIL, zorder=3, clip_on=False)
        text += f" ({y:.1f}%)" if quality == "accuracy" else f" ({y:.3f})"
        y = lo
    elif r.passed:
        ax.scatter([x], [y], marker="o", s=50, color=PASS, zorder=3)
    else:
        ax.scatter([x], [y], marker="o", s=60, facecolors="none", edgecolors=FAIL, zorder=3)
        ax.scatter([x], [y], marker="x", s=40, color=FAIL, zorder=3)
    ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", fontsize=8,
                color="black" if r.passed else FAIL, annotation_clip=False)


def _legend(ax: Any, result: SweepResult, lo: float) -> list[Any]:
    from_marker = ax.scatter   # proxies: empty scatters carry the legend's markers
    floor = result.quality_floor
    target = (f"target: >= {floor:.2f}% (input - {result.targets['max_accuracy_drop']} pt)"
              if result.quality == "accuracy" else f"target: cosine >= {floor}") if floor is not None else None
    handles = [from_marker([], [], marker="o", s=50, color=PASS, label="meets the targets"),
               from_marker([], [], marker="x", s=40, color=FAIL, label="misses them"),
               from_marker([], [], marker="*", s=160, color="black", label="input model"),
               ax.plot([], [], color=FRONT, lw=1.5, label="Pareto front")[0],
               from_marker([], [], marker="o", s=240, facecolors="none", edgecolors=FRONT, linewidths=2,
                           label="knee: cheapest that meets them")]
    if any(r.measured and (q := quality_of(r, result.quality)) is not None and q < lo for r in result.rows):
        handles.insert(2, from_marker([], [], marker="v", s=60, color=FAIL, label="misses them, below the scale"))
    if target:
        handles.append(ax.plot([], [], color=TARGET, ls="--", lw=1, label=target)[0])
    return handles
