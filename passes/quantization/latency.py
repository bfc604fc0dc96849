"""``objective=latency``: int8 only where it measures faster on this CPU, and never a model slower than float.

Regions (``regions``): the ops that run int8 in the build the fidelity search chose, joined where they share a
quantized tensor (union-find over ``Built.links``). A region is a connected int8 run with a QuantizeLinear /
DequantizeLinear pair at each boundary to float; it is int8 or float as a whole, never a layer inside an int8 run
(that would add two boundaries). Above MAX_REGIONS, consecutive regions (topological order) form one group.

Timing (``Timer``): onnxruntime's default optimizations (ORT_ENABLE_ALL, as a user runs the model), one intra-op
thread, the calling thread's CPU time (time other processes take from a shared machine is left out), one
calibration sample, runs interleaved (runtime.latency_runs), each timed run right after REWARM untimed ones of the
same model, so it is timed with its weights in the caches as a model run repeatedly is (Zen 4: one 1024x2048 float
MatMul timed straight after three others took 0.35 ms, 0.20 after one untimed run, 0.117 after three, as alone;
models modelled above REWARM_ABOVE_S per run (samples.modelled_cost) outgrow the caches and get one). Each median m
comes with its notch
    notch = 1.57 · IQR / √n        (McGill, Tukey & Larsen 1978: non-overlapping notches ≈ medians differ at 5%)
and "a is faster than b" means m_a + notch_a < m_b − notch_b. The noise reported is (notch_a + notch_b) / m_float.

Choice (``choose``, ``pick``): a table built once (``table_gains``): each region cut out of the model as its float
ops and as its int8 run with its boundary pairs, each cut fed the float model's values at the region's inputs
(``cuts``), timed in (float, int8) pairs; a region's gain is m(float cut) − m(int8 cut). PP-OCRv4 det, 11 regions:
0.5 s of runs, gains of +0.3 to +0.6 ms ± 0.05–0.4 for its two-op regions, where whole models took 8.7 s and gave
−3.9 to +6.9 ms ± 4–10 for the same regions (the whole model's noise). Where no cut can be made, whole models: all
float and each region int8 alone, a gain m_float − m_region. The regions with a positive gain are int8 (taking gains
as adding up), the rest stay float: small layers where int8's overhead exceeds its gain, islands whose boundaries
cost more than they save. That assignment is then timed against all float and all int8 (the fidelity search's
build), interleaved: of the two, those that pay over float (measured faster, and by MIN_GAIN of its median:
``Timing.pays``) are candidates, all int8 taken over the table's choice only where measured faster than it (the
gains need not add up: on mnist_cnn no region alone pays, all three together 1.37x); the fallback's contiguous
candidate (one float run at an end of the model, ``fallback``), where there is one, is timed with them and taken
only where measured faster than the others taken; no candidate: the model stays float. The same model, data and CPU
give the same assignment wherever the gains exceed the noise.
Time: at most TABLE_BUDGET_S + CONFIRM_BUDGET_S of runs (at least 5 rounds per model), the float build and two cut
sessions per region (whole models: one build and session per region). Sequential stop (``separated``): looked at
every 5 rounds from the 10th (a few looks, so the 5% of one look grows little), and once at the 5th for wide gaps
only (notches doubled, no futility: a pair decided there would need its medians to move by about two notches to read
otherwise at the 10th; Magika's int8 at 0.42x float, mnist_wide's at 0.49x), each model leaves the rotation once
every comparison it is in is decided (the table's region against float, or its int8 cut against its float cut; the
final one's every pair), and the timing stops when none is left, before TABLE_RUNS / CONFIRM_RUNS rounds. A
comparison is decided when the notches are apart; with float (and per-channel=auto's with the per-channel build),
also once the other falls short, its gain plus both notches under MIN_GAIN of float's median: a final candidate that
short is never written unless the medians move beyond their notches (MTCNN's near-ties; mnist_wide's per-tensor Gemm
ran to the 60-round cap at 0.376 against 0.373 ms), and a region that short alone is taken at its median's sign, as
at the cap (Magika's third region, 0.7% of float's 8 ms, ran the table to its 30 rounds); futile when the medians'
difference is under FUTILITY times the notches' sum projected to the cap (notch ∝ 1/√n): the two would stay together
at the cap unless the difference grew by 1/FUTILITY, so the cap's answer is the answer now; moot (final comparison)
when it is between two candidates and either is decided not faster than float (never written). On MTCNN O-Net, where
some region's gain sits inside its notch, the table and the final comparison ran to their caps: 1.1 s of the pass's
1.6.

Early decision (``choose_early``): speed does not depend on the biases' values nor on the ranges' (the same ops and
shapes), so right after calibration the all-int8 build (the same QDQ placement, no full mean correction) is timed as
above against float, before the fidelity search. Where neither all int8 nor the regions faster alone pay, the model
is written float there: the fallback and the mean correction are not run. This rules out, untimed, the candidates
the fidelity search would have added, all with fewer int8 ops than all int8 (each a subset of its tensors): the
fallback's harm-ordered build, the regions of that build faster alone, and the contiguous candidate (one float
run at an end); their regions are parts of the regions timed. It assumes that a part of an int8 run does not pay
where neither the whole run nor all of them together did (a slower int8 part inside a region whose total gain is
under MIN_GAIN; each cut adds a boundary's Q/DQ pair too). Where int8 pays early and the fidelity search leaves every
tensor int8 (the same regions), the early choice is the choice (``reusable``): the two builds differ only in bias
values. With several regions, all int8 is timed against float first: where it pays, int8 can pay and the early
decision is taken without the per-region table (one session and run per region: 13 s of PP-OCRv4 det's pass, 12
regions), which the choice after the search times anyway.

Scattered search (``scattered_skipped``): where the fallback found its contiguous candidate, that candidate is timed
against all int8 before the harm-ordered (scattered) search runs; where all int8 is not MIN_GAIN faster, the
scattered search (its sensitivity sweep, binary search, checks: 31 s of PP-OCRv4 det's pass; on EfficientNet-Lite0,
where all int8 is 15% faster than the float run, it runs, 24 s) is not run and the contiguous candidate is the
fidelity search's build. A scattered choice runs a subset of all int8's ops with a QuantizeLinear / DequantizeLinear
pair around each of its float tensors, so it is taken not to beat by MIN_GAIN a candidate that all int8 itself does
not (the early decision's assumption, one step on: PP-OCRv4 det, AMD EPYC Zen 4: one float run 36.1 ms, all int8
38.5, the scattered choice's regions faster alone 37.9).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import Batch

from graphopt.runtime import LatencySessions, latency_runs

from .build import Built
from .cuts import region_cuts
from .samples import modelled_cost

MAX_REGIONS = 12            # regions timed one by one; above, consecutive ones are timed and chosen together
# int8 is written for speed only where it saves at least this much of float's median, beyond the notches: a smaller
# gain is within what one process's state moves on a shared 2-vCPU VM (10-40 us per run) and flipped the choice run
# to run on MTCNN R-Net and O-Net (all int8 and float within 1%), and it would trade fidelity for nothing one feels.
MIN_GAIN = 0.03
TABLE_BUDGET_S = 3.0        # seconds of runs for the per-region table
CONFIRM_BUDGET_S = 1.5      # seconds of runs for the final comparison
TABLE_RUNS = 30          # runs per model in the table, and in the final comparison (tiny models reach them well
CONFIRM_RUNS = 60        # within the budgets)
NOTCH = 1.57
SEQUENTIAL_MIN = 10      # rounds before the sequential stop looks, and how often it looks then
SEQUENTIAL_EVERY = 5
EARLY_LOOK = 5           # one look before: a pair whose notches are apart at EARLY_WIDEN times their width
EARLY_WIDEN = 2.0
FUTILITY = 0.5           # a pair whose difference is under half its notches projected to the cap is futile
REWARM = 3
REWARM_ABOVE_S = 5e-3


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

    def pays(self, other: Timing) -> bool:
        """Worth writing over ``other`` (float, or the per-channel build): measured faster, and by at least MIN_GAIN
        of its median."""
        return self.faster(other) and self.median <= (1 - MIN_GAIN) * other.median


@dataclass(frozen=True)
class Choice:
    """The assignment chosen: the regions, their gains alone (ms; empty where there is one region), which the table
    found faster alone, which are written int8, the timings of the table's choice (None where it is all or none of
    the regions), all int8 and all float, and what is written: "chosen" (the table's choice), "int8" or "float"."""

    regions: tuple[Region, ...]
    gains: tuple[Timing, ...]
    faster: tuple[bool, ...]
    int8: tuple[bool, ...]
    chosen: Timing | None
    all_int8: Timing
    all_float: Timing
    written: str
    contiguous: Timing | None = None
    early: bool = False         # decided before the fidelity search, on the build without the mean correction

    @property
    def timed(self) -> Timing:
        """The timing of what is written."""
        return {"chosen": self.chosen, "int8": self.all_int8, "contiguous": self.contiguous}.get(
            self.written) or self.all_float

    @property
    def noise(self) -> float:
        """The relative noise of the final comparison: float's notch and the best candidate's, over float's median."""
        best = min((t for t in (self.chosen, self.all_int8, self.contiguous) if t is not None),
                   key=lambda t: t.median)
        return (self.all_float.notch + (self.timed if self.written != "float" else best).notch) / self.all_float.median


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
    q1, q3 = (quantile(runs, q) for q in (0.25, 0.75))
    return Timing(statistics.median(runs), NOTCH * (q3 - q1) / math.sqrt(len(runs)))


def quantile(runs: list[float], q: float) -> float:
    """``np.percentile(runs, 100 q)`` to the bit (its default linear method: virtual index n·q + (1 − q) − 1, the
    two neighbours blended from the nearer one's side), without numpy's first call importing numpy.ma (28 ms in
    each pass)."""
    s = sorted(runs)
    v = len(s) * q + (1 - q) - 1
    lo = math.floor(v)
    g = v - lo
    a, b = s[lo], s[min(lo + 1, len(s) - 1)]
    return b - (b - a) * (1 - g) if g >= 0.5 else a + (b - a) * g


def separated(pairs: list[tuple[int, int]], cap: int, anchor: int | None = None, min_gain: float = 0.0
              ) -> Callable[[list[list[float]]], set[int] | None]:
    """The sequential stop (module docstring): looked at every SEQUENTIAL_EVERY rounds from SEQUENTIAL_MIN on, the
    models still needed, those in a pair not yet decided (None between looks). A pair is decided once its notches
    are apart, or once it is futile (``futile``: it would not come apart by ``cap`` rounds), and stays decided; at
    the one look before, EARLY_LOOK rounds, only where its notches are apart at EARLY_WIDEN times their width.
    ``anchor`` (float): a pair of two others is moot once either is decided not faster than the anchor (what is not
    faster than float is never written, so how it compares with another candidate does not matter). ``min_gain``
    (where only a gain of that share of the anchor's median is written: ``Timing.pays``): a pair with the anchor is
    decided too once the other model falls short, its median gain plus both notches under min_gain of the anchor's
    median, and is then moot in its other pairs. A model in no pair stays timed while any other is."""
    decided: set[tuple[int, int]] = set()

    def short(m: int, t: list[Timing]) -> bool:
        """Model m cannot pay min_gain over the anchor unless the medians move beyond their notches."""
        a = t[anchor] if anchor is not None else None
        return a is not None and min_gain > 0 and a.median - t[m].median + a.notch + t[m].notch < min_gain * a.median

    def needed(times: list[list[float]]) -> set[int] | None:
        n = max(len(t) for t in times)
        early = n == EARLY_LOOK < SEQUENTIAL_MIN
        if not early and (n < SEQUENTIAL_MIN or n % SEQUENTIAL_EVERY):
            return None
        t = [timing(x) for x in times]
        for a, b in pairs:
            if early:       # only a wide gap: no futility, notches doubled
                wide = [Timing(x.median, EARLY_WIDEN * x.notch) for x in (t[a], t[b])]
                if wide[0].faster(wide[1]) or wide[1].faster(wide[0]):
                    decided.add((a, b))
            elif (t[a].faster(t[b]) or t[b].faster(t[a]) or futile(t[a], t[b], min(len(times[a]), len(times[b])), cap)
                  or (anchor in (a, b) and short(b if a == anchor else a, t))):
                decided.add((a, b))
        slower = {m for a, b in decided for m in (a, b) if anchor in (a, b) and m != anchor
                  and (not t[m].faster(t[anchor]) or (not early and short(m, t)))}
        left = [(a, b) for a, b in pairs if (a, b) not in decided and not (anchor not in (a, b) and {a, b} & slower)]
        if not left:
            return set()
        return {m for p in left for m in p} | (set(range(len(times))) - {m for p in pairs for m in p})
    return needed


def futile(a: Timing, b: Timing, n: int, cap: int) -> bool:
    """The futility stop: the medians' difference is under FUTILITY times the notches' sum projected to ``cap``
    rounds (notch ∝ 1/√n), so that, unless it grows by 1/FUTILITY over the rounds left, the two stay apart no more
    at ``cap`` than now: the answer at ``cap`` ("neither is faster") is the answer now."""
    return abs(a.median - b.median) < FUTILITY * (a.notch + b.notch) * math.sqrt(n / cap)


def time_models(models: list[onnx.ModelProto], feed: dict[str, np.ndarray] | list[dict[str, Any]], budget_s: float,
                runs: int, rewarm: int, pairs: list[tuple[int, int]], anchor: int | None = None,
                kept: LatencySessions | None = None, min_gain: float = 0.0) -> list[Timing]:
    """Each model's median and notch (module docstring), interleaved, each until the ``pairs`` (indices into
    ``models``) it is in are decided (``separated``, ``anchor``: float's index, or the model the others must pay
    ``min_gain`` over), ``runs`` rounds or ``budget_s``; ``kept``: the sessions of models timed more than once;
    ``feed``: one for all, or one per model."""
    times = latency_runs(models, feed, threads=1, runs=runs, warmup=1, budget_s=budget_s, clock=time.thread_time,
                         rewarm=rewarm, done=separated(pairs, runs, anchor, min_gain), kept=kept)
    return [timing(t) for t in times]


def rewarm_runs(float_model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """Untimed runs before each timed one (module docstring)."""
    cost = modelled_cost(float_model, [Batch(feed, None)])
    return REWARM if cost is not None and cost < REWARM_ABOVE_S else 1


def timing_feed(calib: Iterable[Batch]) -> dict[str, np.ndarray]:
    """The first calibration sample, as one row."""
    for b in calib:
        return first_row_feed(b.feed)
    raise ValueError("no calibration sample")


def choose(built: Built, float_model: onnx.ModelProto, build: Callable[[set[str]], onnx.ModelProto],
           feed: dict[str, np.ndarray], contiguous: onnx.ModelProto | None = None,
           kept: LatencySessions | None = None) -> Choice:
    """The assignment to write (module docstring). ``build(keep_float)`` builds the model with those tensors
    float (on top of those the fidelity search left float), for timing only; ``contiguous``: the fallback's
    contiguous candidate, timed in the final comparison with the others; ``kept``: the sessions of the models timed
    more than once (float, all int8)."""
    found = regions(built)
    rewarm = rewarm_runs(float_model, feed)
    gains = table_gains(built, found, float_model, build, feed, rewarm, kept) if len(found) > 1 else ()
    faster = tuple(g.median > 0 for g in gains) if gains else (True,) * len(found)
    partial = any(faster) and not all(faster)
    models = [float_model, built.model]
    if partial:
        models.append(build({t for r, on in zip(found, faster) if not on for t in r.tensors}))
    if contiguous is not None:
        models.append(contiguous)
    final = time_models(models, feed, CONFIRM_BUDGET_S, CONFIRM_RUNS, rewarm,
                        [(a, b) for a in range(len(models)) for b in range(a + 1, len(models))], 0, kept, MIN_GAIN)
    chosen = final[2] if partial else None
    alt = final[-1] if contiguous is not None else None
    written = pick(final[0], final[1], chosen, alt)
    int8 = {"chosen": faster, "int8": (True,) * len(found)}.get(written, (False,) * len(found))
    return Choice(tuple(found), gains, faster, int8, chosen, final[1], final[0], written, alt)


def table_gains(built: Built, found: list[Region], float_model: onnx.ModelProto,
                build: Callable[[set[str]], onnx.ModelProto], feed: dict[str, np.ndarray], rewarm: int,
                kept: LatencySessions | None) -> tuple[Timing, ...]:
    """Each region's gain alone (module docstring): from its float and int8 cuts (``cuts``: from the build with
    every region float and from ``built``), else from whole models (float against the build with that region alone
    int8)."""
    every = {t for r in found for t in r.tensors}
    writes = [{t for op in r.ops for t in built.produces.get(op, ())} for r in found]
    cut = region_cuts(build(every), built.model, [(w, set(r.tensors)) for w, r in zip(writes, found)], feed)
    if cut is not None:
        models, feeds, sessions = cut
        t = time_models(models, feeds, TABLE_BUDGET_S, TABLE_RUNS, 0,
                        [(i, i + 1) for i in range(0, len(models), 2)], None, sessions)
        return tuple(Timing(f.median - q.median, f.notch + q.notch) for f, q in zip(t[::2], t[1::2]))
    alone = [build(every - set(r.tensors)) for r in found]
    table = time_models([float_model, *alone], feed, TABLE_BUDGET_S, TABLE_RUNS, rewarm,
                        [(0, i) for i in range(1, len(alone) + 1)], 0, kept, MIN_GAIN)
    return tuple(Timing(table[0].median - t.median, table[0].notch + t.notch) for t in table[1:])


def pick(all_float: Timing, all_int8: Timing, chosen: Timing | None, contiguous: Timing | None = None) -> str:
    """What to write: of the table's choice, all int8 and the contiguous candidate, those that pay over float
    (``Timing.pays``); of these, in that order, a later one only where measured faster than the one taken so far
    (all int8 over the table's choice only where faster than it); none: float."""
    fast = [(name, t) for name, t in (("chosen", chosen), ("int8", all_int8), ("contiguous", contiguous))
            if t is not None and t.pays(all_float)]
    if not fast:
        return "float"
    name, best = fast[0]
    for other, t in fast[1:]:
        if t.faster(best):
            name, best = other, t
    return name


def choose_early(built: Built, float_model: onnx.ModelProto, build: Callable[[set[str]], onnx.ModelProto],
                 feed: dict[str, np.ndarray], kept: LatencySessions | None = None) -> Choice:
    """The early decision (module docstring): ``choose`` on ``built``, the all-int8 build without the full mean
    correction, before the fidelity search (``build``, ``kept``: as ``choose``'s). With several regions, all int8
    is timed against float first: where it pays, int8 can pay, and the per-region table is left to the choice after
    the search (the returned choice has no regions: ``reusable`` does not reuse it)."""
    if len(regions(built)) > 1:
        pair = time_models([float_model, built.model], feed, CONFIRM_BUDGET_S, CONFIRM_RUNS,
                           rewarm_runs(float_model, feed), [(0, 1)], 0, kept, MIN_GAIN)
        if pair[1].pays(pair[0]):
            return Choice((), (), (), (), None, pair[1], pair[0], "int8", early=True)
    return dataclasses.replace(choose(built, float_model, build, feed, None, kept), early=True)


def scattered_skipped(all_int8: onnx.ModelProto, contiguous: onnx.ModelProto, float_model: onnx.ModelProto,
                      feed: dict[str, np.ndarray], kept: LatencySessions | None = None) -> str | None:
    """Why the fallback's scattered search is not worth running (None: it is), from the contiguous candidate timed
    against all int8 (the early build), interleaved (module docstring, "Scattered search")."""
    run, every = time_models([contiguous, all_int8], feed, CONFIRM_BUDGET_S, CONFIRM_RUNS,
                             rewarm_runs(float_model, feed), [(0, 1)], 0, kept, MIN_GAIN)
    if every.pays(run):
        return None
    return (f"one float run at an end measured {run.median:.3g} ms, all int8 {every.median:.3g} ms (not "
            f"{100 * MIN_GAIN:.0f}% faster): a scattered choice, fewer int8 ops and more boundaries, is taken not "
            "to pay over it")


def reusable(early_built: Built, early: Choice, built: Built, contiguous: bool) -> Choice | None:
    """``early`` (the choice for ``early_built``) where it is the choice for ``built``, the fidelity search's build:
    the same quantized tensors (so the same regions), its regions timed (not all int8 alone, ``choose_early``) and
    no contiguous candidate to time against them; else None (``choose`` again)."""
    return early if early.regions and not contiguous and set(built.tensors) == set(early_built.tensors) else None
