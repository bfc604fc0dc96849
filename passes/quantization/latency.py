"""``objective=latency``: int8 only where it measures faster on this CPU, and never a model slower than float.

Regions (``regions``): the ops that run int8 in the build the fidelity search chose, joined where they share a
quantized tensor (union-find over ``Built.links``). A region is a connected int8 run with a QuantizeLinear /
DequantizeLinear pair at each boundary to float; it is int8 or float as a whole, never a layer inside an int8 run
(that would add two boundaries). Above MAX_REGIONS, consecutive regions (topological order) form one group.

Timing (``Timer``): onnxruntime's default optimizations (ORT_ENABLE_ALL, as a user runs the model), one intra-op
thread, the calling thread's CPU time (time other processes take from a shared machine is left out), one
calibration sample, runs interleaved (runtime.latency_runs). Each median m comes with its notch
    notch = 1.57 · IQR / √n            (McGill, Tukey & Larsen 1978: non-overlapping notches ≈ medians differ at 5%)
and "a is faster than b" means m_a + notch_a < m_b − notch_b. The noise reported is (notch_a + notch_b) / m_float.

Choice (``choose``): a table built once, all float and each region int8 alone; a region's gain is
m_float − m_region. The regions with a positive gain are int8 (largest gain first; ties: the earlier region),
the rest stay float: small layers where int8's overhead exceeds its gain, islands whose boundaries cost more than
they save. That assignment is then timed against all float and all int8 (the fidelity search's build): all int8
is taken over it only where measured faster, and either is written only where measured faster than float;
otherwise the model stays float. The same model, data and CPU give the same assignment wherever the gains are
larger than the noise. Time: at most TABLE_BUDGET_S + CONFIRM_BUDGET_S of running (at least 5 runs per model).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx
from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import Batch

from graphopt.runtime import latency_runs

from .build import Built

MAX_REGIONS = 12            # regions timed one by one; above, consecutive ones are timed and chosen together
TABLE_BUDGET_S = 3.0        # seconds of runs for the per-region table
CONFIRM_BUDGET_S = 1.5      # seconds of runs for the final comparison
MAX_RUNS = 60               # runs per model (tiny models reach it well within the budget)
NOTCH = 1.57


@dataclass(frozen=True)
class Region:
    """A connected int8 run: its ops (unit or node names, in the build's order) and its quantized tensors."""

    ops: tuple[str, ...]
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Timing:
    """A median latency (ms) and its notch (ms)."""

    median: float
    notch: float

    def faster(self, other: Timing) -> bool:
        return self.median + self.notch < other.median - other.notch


@dataclass(frozen=True)
class Choice:
    """The assignment chosen: the regions, their gains alone (ms), which are int8, the timings of the choice, all
    int8 and all float (None where the table found no region worth it, or one region only), and what is written:
    "chosen", "int8" (all int8) or "float"."""

    regions: tuple[Region, ...]
    gains: tuple[Timing, ...]
    int8: tuple[bool, ...]
    chosen: Timing | None
    all_int8: Timing
    all_float: Timing
    written: str

    @property
    def noise(self) -> float:
        """The relative noise of the final comparison: both notches over float's median."""
        other = self.chosen if self.written == "chosen" and self.chosen is not None else self.all_int8
        return (self.all_float.notch + other.notch) / self.all_float.median


def regions(built: Built) -> list[Region]:
    """The connected int8 runs of ``built`` (module docstring), grouped to at most MAX_REGIONS."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for _, tensors in built.links:
        for t in tensors[1:]:
            parent[find(t)] = find(tensors[0])
    groups: dict[str, tuple[list[str], dict[str, None]]] = {}
    for op, tensors in built.links:
        if tensors:
            ops, ts = groups.setdefault(find(tensors[0]), ([], {}))
            ops.append(op)
            ts.update(dict.fromkeys(tensors))
    found = [Region(tuple(ops), tuple(ts)) for ops, ts in groups.values()]
    per = math.ceil(len(found) / MAX_REGIONS) if found else 1
    return [Region(tuple(o for r in found[i:i + per] for o in r.ops), tuple(t for r in found[i:i + per]
                                                                             for t in r.tensors))
            for i in range(0, len(found), per)]


def timing(runs: list[float]) -> Timing:
    q = np.percentile(runs, [25, 75])
    return Timing(statistics.median(runs), NOTCH * float(q[1] - q[0]) / math.sqrt(len(runs)))


def time_models(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], budget_s: float) -> list[Timing]:
    """Each model's median and notch (module docstring), interleaved."""
    runs = latency_runs(models, feed, threads=1, runs=MAX_RUNS, warmup=2, budget_s=budget_s, clock=time.thread_time)
    return [timing(r) for r in runs]


def timing_feed(calib: Iterable[Batch]) -> dict[str, np.ndarray]:
    """The first calibration sample, as one row."""
    for b in calib:
        return first_row_feed(b.feed)
    raise ValueError("no calibration sample")


def choose(built: Built, float_model: onnx.ModelProto, build: Callable[[set[str]], onnx.ModelProto],
           feed: dict[str, np.ndarray]) -> Choice:
    """The assignment to write (module docstring). ``build(keep_float)`` builds the model with those tensors
    float (on top of those the fidelity search left float), for timing only."""
    found = regions(built)
    every = {t for r in found for t in r.tensors}
    if len(found) > 1:
        alone = [build(every - set(r.tensors)) for r in found]
        table = time_models([float_model, *alone], feed, TABLE_BUDGET_S)
        gains = tuple(Timing(table[0].median - t.median, table[0].notch + t.notch) for t in table[1:])
    else:
        gains = ()
    order = sorted(range(len(gains)), key=lambda i: (-gains[i].median, i))
    int8 = tuple(i in {j for j in order if gains[j].median > 0} for i in range(len(found))) if gains else \
        (True,) * len(found)
    partial = not all(int8) and any(int8)
    models = [float_model, built.model]
    if partial:
        models.append(build({t for r, on in zip(found, int8) if not on for t in r.tensors}))
    final = time_models(models, feed, CONFIRM_BUDGET_S)
    all_float, all_int8 = final[0], final[1]
    chosen = final[2] if partial else None
    if chosen is not None and not all_int8.faster(chosen):
        written = "chosen" if chosen.faster(all_float) else "float"
    else:
        written = "int8" if all_int8.faster(all_float) else "float"
        if written == "int8":
            int8 = (True,) * len(found)
    if written == "float":
        int8 = (False,) * len(found)
    return Choice(tuple(found), gains, int8, chosen, all_int8, all_float, written)
