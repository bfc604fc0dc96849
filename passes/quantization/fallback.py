"""The quantize pass's fallback: leave the most harmful activation tensors float until the fidelity targets hold.

Yardstick (``Quality``, ``Judge``): against the float model on up to FALLBACK_SAMPLES calibration samples, the worst
output cosine and, for class-score outputs (``validate.class_score_outputs``; per position for [N, T, C]), the
worst top-1 agreement. Both targets are checked with a margin, since a model stopped at a target on calibration data
is as likely below it as above on other data: n rows must agree on top-1 at least t + z·√(t(1−t)/n), z = 1.645 (a
one-sided 95% test that the agreement on other data is above t; at most (n−1)/n, ``top1_required``), and the output
cosine less z standard errors over the samples (jackknife, ``OutputStats.cosine_se``) must reach min-cosine. The
search, on fewer samples, steers by the targets themselves and the chosen model is confirmed with the margins.

Search (``Fallback``): one switchable build (``build``) evaluates any subset of tensors quantized in one session.
Each tensor's sensitivity, the outputs with only that tensor quantized, is measured from the outputs backwards
(``sensitivity_sweep``) on 1 to 8 samples as SENSITIVITY_BUDGET_S allows, on one past it; every budget is spent in
modelled seconds (``samples``), so the result does not depend on the machine or its load. The tensors are ordered
most harmful first (``harm_order``), and a binary search finds the fewest k such that leaving the first k float
meets the targets. The real build of that choice is then checked on every fallback sample; where the check
disagrees the search runs once more above k on the check's samples (if that fits RESEARCH_BUDGET_S), then k grows
by half until the check holds (the integer kernels round differently from the switchable model's fake quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
from tqdm import tqdm
import onnx
from graphopt.calibration.readers import Batch

from graphopt.runtime import make_session
from graphopt.validate import Thresholds, class_score_outputs, sequence_score_outputs, top1_counts, validate

from .build import Builder, Built
from .samples import FALLBACK_INPUT_BYTES, FALLBACK_SAMPLES, first_row, first_rows, sample_cost, take

SEARCH_SAMPLES = 64         # the binary search itself, on at most this many (as its time budget allows)
SENSITIVITY_SAMPLES = 8
SENSITIVITY_BUDGET_S = 30.0
SEARCH_BUDGET_S = 15.0      # for the binary search over how many tensors stay float
RESEARCH_BUDGET_S = 120.0   # for searching again on the check's samples when the check disagrees with the search
# The check asks for what a one-sided 95% test needs to put the targets' true values above them, on other data
# drawn like the calibration samples: stopping exactly at min-top1 on 256 calibration crops left EfficientNet-Lite0
# at 0.941 on other photos (``top1_required``), and PP-OCRv4 det stopped at cosine 0.9832 on its 47 calibration
# windows (standard error 0.0044) read 0.9795 on the other documents' windows.
MARGIN_Z = 1.645


class Quality(NamedTuple):
    """How a quantized model's outputs agree with float's on calibration samples: the worst output cosine, the
    worst top-1 agreement of class-score outputs, the worst margin of an agreement over what the check asks of its
    rows (``top1_required``), and the worst cosine less 1.645 of its standard error over the samples (a one-sided
    95% lower bound for other data drawn like these)."""

    cosine: float
    top1: float
    top1_margin: float
    cosine_low: float


def top1_required(target: float, rows: int, z: float = MARGIN_Z) -> float:
    """Top-1 agreement the check asks of ``rows`` calibration rows for a target ``target``: the target plus z
    standard errors of an agreement at the target, t + z·√(t(1−t)/n) (a one-sided test at 95% for z = 1.645: an
    agreement measured at the target itself is as likely below it as above on other data), but never more than
    (n−1)/n, so that one disagreement is always allowed and small calibration sets are judged on the target alone.
    """
    if rows <= 0 or target <= 0:
        return target
    return max(target, min(target + z * math.sqrt(target * (1 - target) / rows), (rows - 1) / rows))


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


class Judge:
    """Measures models against the float model on the fallback's samples, and says whether the targets hold."""

    def __init__(self, float_model: onnx.ModelProto, roles: onnx.ModelProto, batches: list[Batch],
                 min_cosine: float, min_top1: float) -> None:
        self.float_model = float_model
        self.roles = roles          # output roles from the user's model (an opset upgrade may have hidden them)
        self.batches = batches
        self.min_cosine = min_cosine
        self.min_top1 = min_top1
        self.scores = class_score_outputs(roles)
        self.sequences = sequence_score_outputs(roles)
        self.ref = make_session(float_model, "float model")   # one float session for every check
        self.checked: dict[str, int] = {}    # class-score output -> rows its top-1 agreement is checked on
        self._ref_outputs: dict[int, list[Any]] = {}

    def judged(self, cosines: Iterable[tuple[float, float]], agree: Iterable[tuple[int, int]]) -> Quality:
        """``Quality`` from per-output (cosine, its standard error) and (agreeing, rows) of class-score outputs."""
        cosines, agree = list(cosines), list(agree)
        return Quality(min((c for c, _ in cosines), default=1.0), min((a / n for a, n in agree if n), default=1.0),
                       min((a / n - top1_required(self.min_top1, n) for a, n in agree if n), default=1.0),
                       min((c - MARGIN_Z * se for c, se in cosines), default=1.0))

    def meets(self, q: Quality, confident: bool = True) -> bool:
        """The targets hold with the check's margins (``confident``), or at the targets alone (the search's guide
        on fewer samples, confirmed by a confident check)."""
        if confident:
            return q.cosine_low >= self.min_cosine and q.top1_margin >= 0
        return q.cosine >= self.min_cosine and q.top1 >= self.min_top1

    def quality(self, model: onnx.ModelProto) -> Quality:
        """``judged`` for ``model`` against float on every fallback sample."""
        v = validate(self.float_model, model, self.batches, exact=False, thresholds=Thresholds(),
                     sessions=(self.ref, make_session(model, "quantized model")), roles=self.roles)
        scored = [s for i, s in enumerate(v.outputs) if s.top1 is not None and i in self.scores]
        self.checked.update({s.name: s.top1_rows for s in scored})
        return self.judged([(s.cosine, s.cosine_se) for s in v.outputs if s.cosine is not None],
                           [(s.top1_agree, s.top1_rows) for s in scored])

    def reference(self, b: Batch) -> list[Any]:
        """The float model's outputs on ``b`` (cached)."""
        if id(b) not in self._ref_outputs:
            self._ref_outputs[id(b)] = self.ref.run(None, b.feed)
        return self._ref_outputs[id(b)]

    def switched_quality(self, sess: Any, switches: Mapping[str, str], quantized: set[str], feeds: list[Batch]
                         ) -> Quality:
        """``judged`` for the switchable model's session with the tensors in ``quantized`` switched to int8 (the
        cosine over all rows of ``feeds``, standard error 0)."""
        flags = {name: np.array(t in quantized) for t, name in switches.items()}
        dots: dict[int, list[float]] = {}
        agree: dict[int, list[int]] = {}
        for b in feeds:
            outs = sess.run(None, {**b.feed, **flags})
            for i, (r, out) in enumerate(zip(self.reference(b), outs)):
                if isinstance(r, np.ndarray) and r.dtype.kind == "f":
                    r64, o64 = r.astype(np.float64).ravel(), out.astype(np.float64).ravel()
                    acc = dots.setdefault(i, [0.0, 0.0, 0.0])
                    acc[0] += float(r64 @ o64)
                    acc[1] += float(r64 @ r64)
                    acc[2] += float(o64 @ o64)
                    counts = top1_counts(r, out, i in self.sequences) if i in self.scores else None
                    if counts is not None:
                        a = agree.setdefault(i, [0, 0])
                        a[0] += counts[0]
                        a[1] += counts[1]
        cosines = [(float(d / np.sqrt(a * b)) if a > 0 and b > 0 else float(a == b), 0.0) for d, a, b in dots.values()]
        return self.judged(cosines, [(a, n) for a, n in agree.values()])


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
        self.session = make_session(switchable.model, "switchable quantized model")
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
        return self.judge.switched_quality(self.session, self.switches, quantized, feeds)

    def measure(self, t: str, quick: bool) -> Quality:
        """The sensitivity of ``t`` on the sweep's samples (one when ``quick``), its modelled cost spent."""
        feeds = self.one if quick and self.samples > 1 else self.few
        self.spent += self.per_sample * sum(b.rows for b in feeds)
        return self.quality({t}, feeds)

    def sweep(self) -> None:
        self.sens, self.late = sensitivity_sweep(self.sites, self.measure, self.budget_s, clock=lambda: self.spent)
        self.order = harm_order(self.sites, self.sens, top1_misses=self.full.top1_margin < 0)

    def smallest_k(self, lo: int, feeds: list[Batch], confident: bool) -> int:
        """The fewest k >= lo such that the first k of ``order`` left float meets the targets (binary search on the
        switchable model)."""
        hi = len(self.order)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.judge.meets(self.quality(set(self.order[mid:]), feeds), confident):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def choose(self) -> tuple[int, Built, Quality]:
        """k, the real build with the first k of ``order`` float, and its quality: searched, then checked."""
        k = self.smallest_k(1, self.search_feeds, confident=False)
        batches = self.judge.batches
        check_rows = sum(b.rows for b in batches)
        research = (check_rows > sum(b.rows for b in self.search_feeds)
                    and self.per_sample * check_rows * self.steps <= RESEARCH_BUDGET_S)
        while True:
            built = self.builder.build(set(self.order[:k]))
            q = self.judge.quality(built.model)
            if self.judge.meets(q) or k >= len(self.order):
                return k, built, q
            if research:
                research = False
                k = self.smallest_k(k + 1, batches, confident=True)
            else:
                k = min(len(self.order), max(k + 1, int(k * 1.5)))


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

    @property
    def floated(self) -> tuple[str, ...]:
        """Every tensor left float: the harmful ones, then those no int8 op reads or writes once they are float
        (none where every tensor int8 met the targets)."""
        if self.search is None:
            return ()
        return self.harmful + tuple(t for t in self.built.idle if t not in self.harmful)


def fall_back(builder: Builder, built: Built, float_model: onnx.ModelProto, roles: onnx.ModelProto,
              calib: Iterable[Batch], min_cosine: float, min_top1: float) -> FallbackResult:
    """``built`` (every tensor int8) if it meets the targets, else the build the search chooses."""
    judge = Judge(float_model, roles, take(calib, FALLBACK_SAMPLES, FALLBACK_INPUT_BYTES), min_cosine, min_top1)
    full = judge.quality(built.model)
    check_rows = min(judge.checked.values()) if judge.checked else None
    if judge.meets(full):
        return FallbackResult(built, full, full, check_rows)
    search = Fallback(judge, builder, built, full)
    search.sweep()
    k, chosen, final = search.choose()
    nothing = None
    if k >= len(search.order) or not chosen.int8_units:
        nothing = "every tensor" if k >= len(search.order) else "every layer"
    summary = SearchSummary(len(search.sites), search.late, search.samples, sum(b.rows for b in search.few),
                            sum(b.rows for b in search.search_feeds), nothing)
    return FallbackResult(chosen, full, final, check_rows, tuple(search.order[:k]),
                          MappingProxyType(dict(search.sens)), summary)
