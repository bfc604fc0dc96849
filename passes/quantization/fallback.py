"""The quantize pass's fallback: leave the most harmful activation tensors float until the fidelity targets hold.

Yardstick: passes/judge.py (``Quality``, ``Judge``) against the float model on up to 256 calibration samples, the
targets checked with a one-sided 95% margin. The search, on fewer samples, steers by the targets themselves and the
chosen model is confirmed with the margins.

Search (``Fallback``): one switchable build (``build``) evaluates any subset of tensors quantized in one session.
Each tensor's sensitivity, the outputs with only that tensor quantized, is measured from the outputs backwards
(``sensitivity_sweep``) on 1 to 8 samples as SENSITIVITY_BUDGET_S allows, on one past it; every budget is spent in
modelled seconds (``samples``), so the result does not depend on the machine or its load. The tensors are ordered
most harmful first (``harm_order``), and a binary search finds the fewest k such that leaving the first k float
meets the targets (``first_k``: k = 1 tried first). The real build of that choice is then checked on every fallback
sample; where the check disagrees the search runs once more above k on the check's samples (if that fits
RESEARCH_BUDGET_S), then k grows by half until the check holds (the integer kernels round differently from the
switchable model's fake quantization). A real check that only has to say whether a candidate fails stops its runs
once the top-1 check cannot hold any more (``Judge.passing``): the same answers, sooner.

Contiguous candidate (``Fallback.contiguous``, objective=latency): the same binary search and check over the tensors
in the order the model computes them, from the input end (a float prefix) and from the output end (a float suffix),
without the sensitivity sweep (the suffix only below the prefix's k, ``shortest_run``). Its float part is one run,
so the int8 model has one boundary where the harm-ordered choice leaves a QuantizeLinear / DequantizeLinear pair
around every tensor it keeps float; the latency search times both and writes the faster (``latency``), and where
the contiguous candidate already measures as fast as all int8 the scattered search is not run at all (``skip``,
``latency.scattered_skipped``). The search is not monotone in k (a longer float prefix can flip a row back), so
it finds a k that meets the targets, not always the smallest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from tqdm import tqdm
import onnx
from graphopt.calibration.readers import Batch

from graphopt.runtime import make_session
from graphopt.validate import Thresholds

from ..judge import Judge, Quality, judge_samples
from .build import Builder, Built
from .samples import first_row, first_rows, sample_cost

SEARCH_SAMPLES = 64         # the binary search itself, on at most this many (as its time budget allows)
SENSITIVITY_SAMPLES = 8
SENSITIVITY_BUDGET_S = 30.0
SEARCH_BUDGET_S = 15.0      # for the binary search over how many tensors stay float
RESEARCH_BUDGET_S = 120.0   # for searching again on the check's samples when the check disagrees with the search
SHORTEN_BUILDS = 4          # real builds to shorten the contiguous float run where the check lengthened it
def harm_order(sites: list[str], sens: Mapping[str, Quality], top1_misses: bool) -> list[str]:
    """``sites`` most harmful first, by their sensitivity (cosine, top-1 with only that tensor int8), for the target
    that fails: top-1 first (then cosine) when every tensor int8 misses the top-1 check, else cosine first (then
    top-1). A recogniser whose top-1 per position already holds with every tensor int8 is then not steered by the
    single flips the sweep sees on one or two lines (PP-OCRv4 rec, AMD EPYC Zen 4: 23 tensors float, 41 of 51 layers
    int8, instead of 7 and 49 for the same cosine target)."""
    return sorted(sites, key=lambda t: (sens[t].top1, sens[t].cosine) if top1_misses else (sens[t].cosine,
                                                                                          sens[t].top1))


def sensitivity_sweep(sites: list[str], measure: Callable[[str, bool], Any], budget_s: float,
                      clock: Callable[[], float]) -> tuple[dict[str, Any], int]:
    """Each site's sensitivity, from the outputs backwards: ``measure(site, quick)``, quick (one sample) once
    ``clock`` has passed ``budget_s``. The clock is the caller's (the fallback's modelled seconds; no wall clock
    by default). Every site is measured: one left out would count as harmless and sort last, so the search could
    only reach it by leaving everything float. Returns the sensitivities and how many were quick."""
    sens: dict[str, Any] = {}
    deadline = clock() + budget_s
    quick = 0
    for t in tqdm(list(reversed(sites)), unit="tensor", desc="sensitivity", leave=False, disable=None):
        late = clock() > deadline
        quick += late
        sens[t] = measure(t, late)
    return sens, quick


class Fallback:
    """The search (module docstring) as explicit state: the switchable model and the samples it measures on, the
    budget and the modelled seconds spent so far, the sensitivities measured so far and the order they give."""

    def __init__(self, judge: Judge, builder: Builder, built: Built, full: Quality) -> None:
        self.judge = judge
        self.builder = builder
        self.full = full                        # every tensor int8
        self.sites = list(built.tensors)
        switchable = builder.build(switchable=True)
        self.switches = switchable.switches
        # the judge's threads (runtime.run_threads): one on small runs, which the search makes hundreds of, where a
        # pool's wake-ups per op cost more than they save; the pool where a run is long enough to split
        self.session = make_session(switchable.model, "switchable quantized model", threads=judge.threads)
        batches = judge.batches
        self.one = first_row(batches)
        self.per_sample = sample_cost(judge.float_model, self.one, lambda: self.quality(set(self.sites), self.one))
        self.budget_s = SENSITIVITY_BUDGET_S
        self.samples = int(min(SENSITIVITY_SAMPLES, max(1, self.budget_s / (self.per_sample * len(self.sites)))))
        self.few = first_rows(batches, self.samples)
        # The search takes few steps, so it can afford more samples than the per-tensor sweep: top-1 flips are rare
        # events that 8 samples seldom show.
        self.steps = math.ceil(math.log2(max(len(self.sites), 2))) + 1
        self.search_feeds = first_rows(batches, int(min(SEARCH_SAMPLES, max(self.samples, SEARCH_BUDGET_S / (
            self.per_sample * self.steps)))))
        self.spent = 0.0                        # modelled seconds the sweep has spent
        self.sens: dict[str, Quality] = {}
        self.late = 0                           # tensors measured on one sample, past the budget
        self.order: list[str] = []

    def quality(self, quantized: set[str], feeds: list[Batch]) -> Quality:
        q = self.judge.switched_quality(self.session, self.switches, quantized, feeds)
        assert q is not None
        return q

    def meets(self, quantized: set[str], feeds: list[Batch], confident: bool) -> bool:
        """Whether the switchable model meets the targets with ``quantized`` int8 on ``feeds``; its runs stop where
        the top-1 check is already lost (``Judge.switched_quality``)."""
        q = self.judge.switched_quality(self.session, self.switches, quantized, feeds, confident)
        return q is not None and self.judge.meets(q, confident)

    def measure(self, t: str, quick: bool) -> Quality:
        """The sensitivity of ``t`` on the sweep's samples (one when ``quick``), its modelled cost spent."""
        feeds = self.one if quick and self.samples > 1 else self.few
        self.spent += self.per_sample * sum(b.rows for b in feeds)
        return self.quality({t}, feeds)

    def sweep(self) -> None:
        self.sens, self.late = sensitivity_sweep(self.sites, self.measure, self.budget_s, clock=lambda: self.spent)
        self.order = harm_order(self.sites, self.sens, top1_misses=self.full.top1_margin < 0)

    def smallest_k(self, lo: int, feeds: list[Batch], confident: bool, hi: int | None = None) -> int:
        """The fewest k in [lo, hi] such that the first k of ``order`` left float meets the targets (binary search
        on the switchable model; ``hi`` taken to meet them, by default every tensor float)."""
        hi = len(self.order) if hi is None else hi
        while lo < hi:
            mid = (lo + hi) // 2
            if self.meets(set(self.order[mid:]), feeds, confident):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def first_k(self) -> int:
        """``smallest_k`` from 1 on the search's samples, trying k = 1 first: where one tensor float already meets
        the targets on them (PP-OCRv4 det's harm order, PP-OCR cls's prefix) that is 1 run instead of log2(n);
        elsewhere 1 run more."""
        if len(self.order) > 1 and self.meets(set(self.order[1:]), self.search_feeds, confident=False):
            return 1
        return self.smallest_k(2 if len(self.order) > 1 else 1, self.search_feeds, confident=False)

    def choose(self) -> tuple[int, Built, Quality]:
        """k, the real build with the first k of ``order`` float, and its quality: searched, then checked."""
        return self.check(self.first_k())

    def check(self, k: int) -> tuple[int, Built, Quality]:
        """The real build with the first k of ``order`` float, checked on every fallback sample; where the check
        fails, searched again above k on them once (within RESEARCH_BUDGET_S), then k grown by half."""
        batches = self.judge.batches
        check_rows = sum(b.rows for b in batches)
        research = (check_rows > sum(b.rows for b in self.search_feeds)
                    and self.per_sample * check_rows * self.steps <= RESEARCH_BUDGET_S)
        while True:
            built = self.builder.build(set(self.order[:k]))
            q = self.judge.passing(built.model) if k < len(self.order) else self.judge.quality(built.model)
            if q is not None:
                return k, built, q
            if research:
                research = False
                k = self.smallest_k(k + 1, batches, confident=True)
            else:
                k = min(len(self.order), max(k + 1, int(k * 1.5)))

    def contiguous(self) -> tuple[str, tuple[str, ...], Built, Quality] | None:
        """The fewest tensors left float as one contiguous run at the input end (prefix) or the output end
        (suffix) of the model, whichever the search finds shorter (prefix on a tie): which end, those tensors, the
        checked build and its quality; None where only every tensor float meets the targets. One run float
        leaves one boundary (one QuantizeLinear or one DequantizeLinear) where scattered tensors leave a pair
        each (``contiguous_order``)."""
        k, side = self.shortest_run(contiguous_order(self.sites, self.judge.float_model))
        if k >= len(self.order):
            return None
        searched = k
        k, built, q = self.check(k)
        if k >= len(self.order) or not built.int8_units or not self.judge.meets(q):
            return None
        k, built, q = self.shorten(searched, k, built, q)
        return side, tuple(self.order[:k]), built, q

    def shortest_run(self, topo: list[str]) -> tuple[int, str]:
        """The search's k and side ("prefix", "suffix") of the shortest float run of ``topo`` (the sites in
        computing order) that meets the targets on the search's samples, ``order`` set to that side's order. The
        suffix is searched only below the prefix's k: one run at k − 1 tells whether a shorter suffix meets the
        targets (the search takes them to hold from some k on), a binary search under it only then (PP-OCRv4 det:
        1 run where a full search took 7, to find a suffix of 120 of 124 tensors against a prefix of 9)."""
        self.order, side = topo, "prefix"
        k = self.first_k()
        suffix = topo[::-1]
        if k > 1 and self.meets(set(suffix[k - 1:]), self.search_feeds, confident=False):
            self.order, side = suffix, "suffix"
            k = self.smallest_k(1, self.search_feeds, confident=False, hi=k - 1)
        return k, side

    def shorten(self, lo: int, k: int, built: Built, q: Quality) -> tuple[int, Built, Quality]:
        """Where the check needed more than the ``lo`` tensors the search found, bisect (lo, k) with real builds,
        at most SHORTEN_BUILDS of them, keeping the shortest that meets the targets: the switchable model has no
        full mean correction, so it asks for a longer run than the real builds need (EfficientNet-Lite0: 32
        tensors, where 13 meet the targets)."""
        for _ in range(SHORTEN_BUILDS):
            if k - lo <= 1:
                break
            mid = (lo + k) // 2
            b = self.builder.build(set(self.order[:mid]))
            mq = self.judge.passing(b.model) if b.int8_units else None
            if mq is not None:
                k, built, q = mid, b, mq
            else:
                lo = mid
        return k, built, q


def contiguous_order(sites: list[str], model: onnx.ModelProto) -> list[str]:
    """``sites`` in the order ``model`` computes them (graph inputs first). A float prefix of this order is the
    model's first layers float and one QuantizeLinear where int8 starts; a float suffix, one DequantizeLinear
    where it ends. On EfficientNet-Lite0 (AMD EPYC Zen 4, onnxruntime 1.32.0) the first 20 tensors float keep 32
    of 50 layers int8 at 1.55x float's speed and top-1 agreement 0.961 on held-out photos, where the harm-ordered
    search's 28 scattered int8 layers measured slower than float."""
    pos = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return sorted(sites, key=lambda t: pos.get(t, -1))


@dataclass(frozen=True)
class SearchSummary:
    """What the search did, for the report: tensors swept, how many of them on one sample, the samples planned
    for the sweep, the rows the sweep and the binary search ran on, and what had to stay float for the targets
    when nothing runs int8 ("every tensor", "every layer"; None otherwise)."""

    sites: int
    late: int
    sweep_samples: int
    sweep_rows: int
    search_rows: int
    nothing_int8: str | None


@dataclass(frozen=True)
class FallbackResult:
    """The fallback's choice: the build, its quality and that of every tensor int8, the rows the top-1 check ran
    on (None: no class-score output), the tensors left float as harmful (most harmful first) with the
    sensitivities measured, and the search's summary (None: every tensor int8 met the targets)."""

    built: Built
    full: Quality
    final: Quality
    check_rows: int | None
    harmful: tuple[str, ...] = ()
    sensitivity: Mapping[str, Quality] = field(default_factory=lambda: MappingProxyType({}))
    search: SearchSummary | None = None
    shape: str | None = None                    # "prefix" / "suffix": ``harmful`` is one contiguous float run
    contiguous: FallbackResult | None = None    # objective=latency: the contiguous candidate (None: none found)
    skipped: str | None = None                  # this is the contiguous candidate: why the scattered search was not run

    @property
    def floated(self) -> tuple[str, ...]:
        """Every tensor left float: the harmful ones, then those no int8 op reads or writes once they are float
        (none where every tensor int8 met the targets)."""
        if self.search is None:
            return ()
        return self.harmful + tuple(t for t in self.built.idle if t not in self.harmful)


def fall_back(builder: Builder, built: Built, float_model: onnx.ModelProto, roles: onnx.ModelProto,
              calib: Iterable[Batch], targets: Thresholds, contiguous: bool = False, judge: Judge | None = None,
              skip: Callable[[Built], str | None] | None = None) -> FallbackResult:
    """``built`` (every tensor int8) if it meets ``targets``, else the build the search chooses; ``contiguous``
    (objective=latency): with the best contiguous float run as a second candidate, for the latency search, and
    ``skip(its build)`` saying why the scattered search need not run (None: it runs; ``latency.scattered_skipped``):
    then that candidate is the result. ``judge``: the caller's judge of ``float_model`` on ``calib`` against
    ``targets`` (its float outputs kept for the caller's later checks), else one made here."""
    judge = judge if judge is not None else Judge(float_model, roles, judge_samples(calib), targets)
    full = judge.quality(built.model)
    check_rows = min(judge.checked.values()) if judge.checked else None
    if judge.meets(full):
        return FallbackResult(built, full, full, check_rows)
    search = Fallback(judge, builder, built, full)
    run = search.contiguous() if contiguous else None
    alt = None
    if run is not None:
        side, floated, alt_built, alt_q = run
        alt = FallbackResult(alt_built, full, alt_q, check_rows, floated,
                             search=SearchSummary(len(search.sites), 0, 0, 0,
                                                  sum(b.rows for b in search.search_feeds), None), shape=side)
        why = skip(alt_built) if skip is not None else None
        if why is not None:
            return dataclasses.replace(alt, skipped=why)
    search.sweep()
    k, chosen, final = search.choose()
    nothing = None
    if k >= len(search.order) or not chosen.int8_units:
        nothing = "every tensor" if k >= len(search.order) else "every layer"
    summary = SearchSummary(len(search.sites), search.late, search.samples, sum(b.rows for b in search.few),
                            sum(b.rows for b in search.search_feeds), nothing)
    return FallbackResult(chosen, full, final, check_rows, tuple(search.order[:k]),
                          MappingProxyType(dict(search.sens)), summary, contiguous=alt)
