"""``ratio=auto``: the largest pruning ratio whose model keeps the pipeline's targets on the calibration data.

Candidates are the ratios k/STEPS, k = 1 .. STEPS-1. Each is built on a copy of the graph as the pass builds the
model it writes (channel selection, the edits, and the least-squares refit when the data allows it), refitted on
the first half of the calibration batches and judged on the other half — a refit judged on the samples it was fitted
to looks better than it is (mnist_cnn: 0.95 passed on them at cosine 0.986 and read 0.980 on held-out digits) —
against the original model, with the one-sided 95% margins of
passes/judge.py (the worst output cosine less 1.645 standard errors must reach --min-cosine; the top-1 agreement of
class-score outputs must clear --min-top1 by what the rows checked ask), so that what holds there holds on other
data drawn like it; validation checks the targets again on --val-data. Fidelity falls as the ratio grows (each
larger ratio removes, per group, the channels a smaller one removes and more), so a binary search finds the
largest passing k in about log2(STEPS) builds. The objective is the ratio itself: the most channels removed, hence
the most MACs and, with round-to=auto's channel blocks, the most measured latency; measuring the latency of each
candidate and a per-group allocation are not done yet.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import onnx_graphsurgeon as gs

from graphopt.calibration.readers import Batch, DataSource
from graphopt.graph import export

from ..base import PassContext, PassResult
from ..judge import FALLBACK_INPUT_BYTES, FALLBACK_SAMPLES, Judge, Quality, take

STEPS = 20          # candidate ratios 0.05, 0.10, ..., 0.95
RATIO_CHOSEN = "ratio chosen"   # PassResult.counts key


class _Batches(DataSource):
    """Some calibration batches, as a data source."""

    def __init__(self, batches: list[Batch], description: str) -> None:
        self.batches, self.description, self.warnings = batches, description, []

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def search_ratio(prune: Callable[[gs.Graph, float, PassContext], None], graph: gs.Graph, ctx: PassContext,
                 res: PassResult) -> float | None:
    """The ratio to prune ``graph`` with (0.0 when even the smallest misses), found by building candidates with
    ``prune(copy, ratio, ctx)``; notes what was tried into ``res``. None, with the reason declined, when the
    pipeline has no target to search against."""
    cos, top = ctx.targets.min_cosine or 0.0, ctx.targets.min_top1 or 0.0
    if not cos and not top:
        res.decline("model", "ratio=auto: the pipeline has no target to search against (--no-gate or targets 0); "
                             "give a ratio")
        return None
    batches = take(ctx.require_calib("prune-channels"), 2 * FALLBACK_SAMPLES, 2 * FALLBACK_INPUT_BYTES)
    half = max(1, len(batches) // 2)
    fit, held = batches[:half], batches[half:] or batches     # one batch: fitted and judged on the same
    fit_ctx = dataclasses.replace(ctx, calib=_Batches(fit, "the first half of the calibration batches"))
    judge = Judge(ctx.original, ctx.original, held, cos, top)
    tried: list[tuple[float, Quality, bool]] = []
    lo, hi = 0, STEPS - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = graph.copy()
        prune(candidate, mid / STEPS, fit_ctx)
        q = judge.quality(export(candidate, ctx.original))
        ok = judge.meets(q)
        tried.append((mid / STEPS, q, ok))
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    ratio = lo / STEPS
    res.counts[RATIO_CHOSEN] = ratio
    rows, fitted = sum(b.rows for b in held), sum(b.rows for b in fit)
    steps = "; ".join(f"{r:.2f}: cosine {q.cosine:.4f} (95% low {q.cosine_low:.4f}), top-1 {q.top1:.4f} "
                      f"{'meets' if ok else 'misses'}" for r, q, ok in sorted(tried))
    res.notes.append(f"ratio=auto: {ratio:.2f}, the largest of 0.05 .. 0.95 that keeps min-cosine {cos} and "
                     f"min-top1 {top} with a one-sided 95% margin on {rows} calibration samples (each candidate refitted on {fitted} others: "
                     f"{steps})")
    return ratio
