"""ratio=auto's allocation: how much of each dependency group to prune, from each group's own sensitivity and cost.

1. Levels. A group of C channels may be cut at ratios 1/8, 2/8, ..., 7/8, each rounded as the pass rounds
   (``selection.round_keep``: round-to blocks, min-channels); levels that keep all C are dropped.
2. Sensitivity and saving, per group and level: the model with that group alone pruned at that level (and the
   layers after it refitted on the first half of the calibration batches, as the pass writes it) is judged against
   the original on up to SENSITIVITY_SAMPLES of those batches. Its loss is the share of the targets' budget it uses,
   ``max((1 − cosine)/(1 − min-cosine), (1 − top-1)/(1 − min-top1))``; its saving is what ``objective`` counts:
   latency (the candidates timed interleaved with the unpruned model, medians, on this CPU), MACs, or parameter
   bytes (size).
3. The path. Starting from nothing pruned, each step moves one group up to the level with the most saving per unit
   of loss added (losses taken as adding up across groups; a level whose own loss exceeds the whole budget, or that
   saves nothing, is never taken). Each step's allocation prunes a superset of the one before, so the path runs
   from mild to strong and ``autosearch.search`` binary-searches it for the strongest allocation whose whole model
   keeps the targets on the other half of the batches, with the one-sided margins — which corrects the additivity
   guess where groups interact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.feeds import first_row_feed
from graphopt.graph import export
from graphopt.runtime import count_macs, measure_latency
from graphopt.tensor_data import data_bytes
from graphopt.validate import Thresholds

from ..base import PassContext
from ..judge import Judge, Quality, take
from .selection import round_keep

LEVELS = tuple(k / 8 for k in range(1, 8))
SENSITIVITY_SAMPLES = 64       # samples a level is refitted on and judged on, alone
SEARCH_SAMPLES = 128           # samples a step of the path is refitted on in the search
LATENCY_BUDGET_S = 30.0        # measuring the candidates' latency, over all groups

Objective = Literal["latency", "macs", "size"]


@dataclass(frozen=True)
class Allocation:
    """Ratios per group name; ``removed``: the fraction of the prunable channels they remove (how it is shown)."""

    ratios: tuple[tuple[str, float], ...]
    removed: float

    def __str__(self) -> str:
        return f"{self.removed:.3f}"


@dataclass(frozen=True)
class Level:
    """One group at one ratio: the loss share it uses alone and what it saves."""

    group: str
    ratio: float
    kept: int
    loss: float
    saving: float


def levels(groups: Sequence[tuple[str, int]], o) -> list[tuple[str, float, int]]:
    """(group, ratio, kept) for each distinct kept count below the group's size."""
    out = []
    for name, c in groups:
        seen = set()
        for r in LEVELS:
            keep = round_keep(o, c, c - int(math.floor(r * c + 1e-9)))
            if keep < c and keep not in seen:
                seen.add(keep)
                out.append((name, r, keep))
    return out


def loss_share(q: Quality, t: Thresholds) -> float:
    """The share of the targets' budget a candidate's loss uses (1: at the targets)."""
    shares = [0.0]
    if t.min_cosine:
        shares.append((1 - q.cosine) / max(1 - t.min_cosine, 1e-9))
    if t.min_top1:
        shares.append((1 - q.top1) / max(1 - t.min_top1, 1e-9))
    return max(shares)


def _cost(model: onnx.ModelProto, objective: Objective, feed: dict) -> float:
    if objective == "macs":
        return float(count_macs(model, feed) or 0)
    return float(sum(data_bytes(t) for t in model.graph.initializer))


def measure(graph: gs.Graph, ctx: PassContext, fit_ctx: PassContext, cands: list[tuple[str, float, int]],
            build: Callable[[gs.Graph, dict[str, float], PassContext], None], objective: Objective) -> list[Level]:
    """Each candidate level's loss share (judged on the fit half) and saving (see the module docstring)."""
    fit = take(fit_ctx.calib, SENSITIVITY_SAMPLES)
    t = ctx.targets
    judge = Judge(ctx.original, ctx.original, fit, dataclasses.replace(t, max_accuracy_drop=None))
    feed = first_row_feed(fit[0].feed)
    base = export(graph, ctx.original)
    models: dict[str, list[tuple[float, onnx.ModelProto]]] = {}
    out = []
    for name, r, kept in cands:
        cand = graph.copy()
        build(cand, {name: r}, fit_ctx)
        m = export(cand, ctx.original)
        models.setdefault(name, []).append((r, m))
        out.append(Level(name, r, kept, loss_share(judge.quality(m), t), 0.0))
    if objective == "latency":
        saving = _latency_savings(base, models, feed)
    else:
        ref = _cost(base, objective, feed)
        saving = {(n, r): ref - _cost(m, objective, feed) for n, ms in models.items() for r, m in ms}
    return [dataclasses.replace(lv, saving=max(0.0, saving[(lv.group, lv.ratio)])) for lv in out]


def _latency_savings(base: onnx.ModelProto, models: dict[str, list[tuple[float, onnx.ModelProto]]],
                     feed: dict) -> dict[tuple[str, float], float]:
    """ms saved by each candidate, timed interleaved with the unpruned model group by group (medians)."""
    budget = max(0.5, LATENCY_BUDGET_S / max(1, len(models)))
    out = {}
    for name, ms in models.items():
        times = measure_latency([base] + [m for _, m in ms], feed, runs=30, warmup=2, budget_s=budget)
        out.update({(name, r): times[0] - t for (r, _), t in zip(ms, times[1:])})
    return out


def path(found: list[Level], sizes: dict[str, int]) -> list[Allocation]:
    """The allocations from nothing pruned to the most (see the module docstring); the first is nothing."""
    by_group: dict[str, list[Level]] = {}
    for lv in found:
        if lv.loss < 1.0 and lv.saving > 0:
            by_group.setdefault(lv.group, []).append(lv)
    current: dict[str, Level | None] = {g: None for g in by_group}
    total = sum(sizes.values()) or 1
    out = [Allocation((), 0.0)]
    while True:
        best, best_eff = None, 0.0
        for g, options in by_group.items():
            cur = current[g]
            for lv in options:
                if cur is not None and lv.ratio <= cur.ratio:
                    continue
                gain = lv.saving - (cur.saving if cur else 0.0)
                added = max(lv.loss - (cur.loss if cur else 0.0), 0.0)
                eff = gain / (added + 1e-3)
                if gain > 0 and eff > best_eff:
                    best, best_eff = lv, eff
        if best is None:
            return out
        current[best.group] = best
        chosen = [lv for lv in current.values() if lv is not None]
        ratios = tuple(sorted((lv.group, lv.ratio) for lv in chosen))
        removed = sum(sizes[lv.group] - lv.kept for lv in chosen) / total
        out.append(Allocation(ratios, removed))


def sensitivity_lines(found: list[Level], objective: Objective, most: int = 6) -> list[str]:
    """The most sensitive groups' levels, for the report: loss share of the budget and saving."""
    unit = {"latency": "ms", "macs": "MACs", "size": "bytes"}[objective]
    worst = sorted(found, key=lambda lv: (-lv.loss, lv.group, lv.ratio))[:most]
    return [f"{lv.group} at {lv.ratio:.2f} alone uses {lv.loss:.2f} of the budget, saves {lv.saving:.3g} {unit}"
            for lv in worst]
