"""The search behind the passes' ``auto`` settings (prune-channels:ratio=auto, svd:rank=auto): the strongest setting
whose model keeps the pipeline's targets on the calibration data.

Settings come ordered from mildest to strongest, the first being "no change" (never built). Fidelity is taken to
fall as the setting grows (a larger pruning ratio removes, per group, what a smaller one removes and more; a larger
error bound gives each layer a lower rank), so a binary search finds the strongest passing setting in about
log2(len) builds. Each candidate is built on a copy of the graph as the pass builds what it writes, with the first
half of the calibration batches (for its refit or its statistics), and judged against the original model on the
other half with the one-sided 95% margins of passes/judge.py — a model judged on the samples it was fitted to looks
better than it is (mnist_cnn pruned: 0.95 passed on them at cosine 0.986 and read 0.980 on held-out digits).
Validation then checks the targets again on --val-data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import onnx_graphsurgeon as gs

from graphopt.calibration.readers import Batch, DataSource
from graphopt.graph import export
from graphopt.validate import Thresholds

from .base import PassContext
from .judge import FALLBACK_INPUT_BYTES, FALLBACK_SAMPLES, Judge, Quality, take


class _Batches(DataSource):
    """Some calibration batches, as a data source."""

    def __init__(self, batches: list[Batch], description: str) -> None:
        self.batches, self.description, self.warnings = batches, description, []

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


@dataclass(frozen=True)
class Searched:
    """What the search chose (``index`` into the settings; 0: no change) and what it tried."""

    index: int
    tried: tuple[tuple[Any, Quality, bool], ...]
    judged_rows: int
    fitted_rows: int

    def note(self, setting: str, chosen: str, targets: Thresholds) -> str:
        steps = "; ".join(f"{v}: cosine {q.cosine:.4f} (95% low {q.cosine_low:.4f}), top-1 {q.top1:.4f}, accuracy "
                          f"{-q.accuracy_drop:+.2f} points{_metric(q)} {'meets' if ok else 'misses'}"
                          for v, q, ok in self.tried)
        metric = "" if targets.metric is None else (f", the metric {targets.metric.name} (min {targets.min_metric}, "
                                                     f"max drop {targets.max_metric_drop})")
        return (f"{setting}=auto: {chosen}, the strongest that keeps min-cosine {targets.min_cosine} and min-top1 "
                f"{targets.min_top1} with a one-sided 95% margin, and max-accuracy-drop {targets.max_accuracy_drop} "
                f"where the samples have labels{metric}, on {self.judged_rows} calibration samples (each candidate fitted on "
                f"{self.fitted_rows} others: {steps})")


def _metric(q: Quality) -> str:
    return "" if q.metric is None else f", metric {q.metric:.4g}"


def no_targets(ctx: PassContext, setting: str) -> str | None:
    """Why ``setting=auto`` cannot search (the pipeline has no target: --no-gate, or targets set to 0), or None."""
    if ctx.targets.searchable:
        return None
    return f"{setting}=auto: the pipeline has no target to search against (--no-gate or targets 0)"


def halves(ctx: PassContext, pass_name: str) -> tuple[PassContext, list[Batch]]:
    """The context a candidate is built with (its calibration data: the first half of the batches) and the other
    half, which judges it (one batch: fitted and judged on the same)."""
    batches = take(ctx.require_calib(pass_name), 2 * FALLBACK_SAMPLES, 2 * FALLBACK_INPUT_BYTES)
    half = max(1, len(batches) // 2)
    fit, held = batches[:half], batches[half:] or batches
    return dataclasses.replace(ctx, calib=_Batches(fit, "the first half of the calibration batches")), held


def search(settings: Sequence[Any], build: Callable[[gs.Graph, Any, PassContext], None], graph: gs.Graph,
           ctx: PassContext, pass_name: str, split: tuple[PassContext, list[Batch]] | None = None) -> Searched:
    """The strongest of ``settings`` (``settings[0]``: no change) whose model, made by ``build(copy, setting,
    fit_ctx)``, keeps the pipeline's targets; see the module docstring. ``split``: ``halves(ctx, pass_name)`` when
    the caller has it already."""
    fit_ctx, held = split or halves(ctx, pass_name)
    fit = list(fit_ctx.calib)
    judge = Judge(ctx.original, ctx.original, held, ctx.targets)
    tried: list[tuple[Any, Quality, bool]] = []
    lo, hi = 0, len(settings) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = graph.copy()
        build(candidate, settings[mid], fit_ctx)
        q = judge.quality(export(candidate, ctx.original))
        ok = judge.meets(q)
        tried.append((settings[mid], q, ok))
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return Searched(lo, tuple(sorted(tried, key=lambda t: settings.index(t[0]))),
                    sum(b.rows for b in held), sum(b.rows for b in fit))
