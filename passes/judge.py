"""Judging a candidate model against a reference on calibration samples, with the margins that make what holds
there hold on other data drawn like them: what a pass that searches (quantize's fallback, prune-channels'
ratio=auto) asks of each candidate.

Yardstick (``Quality``): the worst cosine of an output or of one of its slices (graphopt.slices) and, for
class-score outputs (``validate.class_score_outputs``; per position for [N, T, C]) and the score outputs the user
names (--scores), the worst top-1 agreement; the user's task metric where one is given (graphopt.taskmetric: its
--min-metric / --max-metric-drop, checked as they are, no margin). Both targets are checked with a margin, since a model
stopped at a target on calibration data is as likely below it as above on other data: n rows must agree on top-1 at
least t + z·√(t(1−t)/n), z = 1.645 (a one-sided 95% test that the agreement on other data is above t; at most
(n−1)/n, ``top1_required``), and the output cosine less z standard errors over the samples (jackknife,
``OutputStats.cosine_se``) must reach min-cosine. A search on fewer samples may steer by the targets themselves
(``meets(confident=False)``) and confirm its choice with the margins.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
import onnx

from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import Batch
from graphopt.io import is_big
from graphopt.runtime import count_macs, make_session, run_threads, spare_core
from graphopt.metrics import OutputStats
from graphopt.validate import Comparison, Thresholds, class_score_outputs, validate

# A judge checks its targets on up to 256 calibration samples (at most 256 MB of inputs held): with 64, the
# top-1 agreement of a 1000-class head that the search stopped at (EfficientNet-Lite0: 0.953) was 0.938 on all 256.
FALLBACK_SAMPLES = 256
FALLBACK_INPUT_BYTES = 256 << 20


def take(source: Iterable[Batch], n: int, max_bytes: int | None = None) -> list[Batch]:
    """The first batches of ``source`` up to ``n`` samples (and, given ``max_bytes``, up to that many bytes of
    inputs; always at least one batch)."""
    out: list[Batch] = []
    seen = held = 0
    for b in source:
        size = sum(v.nbytes for v in b.feed.values() if isinstance(v, np.ndarray))
        if out and max_bytes is not None and held + size > max_bytes:
            break
        out.append(b)
        seen += b.rows
        held += size
        if seen >= n:
            break
    return out


def judge_samples(source: Iterable[Batch]) -> list[Batch]:
    """The calibration samples a judge checks on: the first FALLBACK_SAMPLES, FALLBACK_INPUT_BYTES at most."""
    return take(source, FALLBACK_SAMPLES, FALLBACK_INPUT_BYTES)

# The float model's outputs on the judge's samples are kept for every later check, up to this many bytes (PP-OCRv4
# rec's [16, 40, 6625] scores: 17 MB per 16 samples); past it they are computed again for each check.
REFERENCE_BYTES = 256 << 20

# The check asks for what a one-sided 95% test needs to put the targets' true values above them, on other data
# drawn like the calibration samples: stopping exactly at min-top1 on 256 calibration crops left EfficientNet-Lite0
# at 0.941 on other photos (``top1_required``), and PP-OCRv4 det stopped at cosine 0.9832 on its 47 calibration
# windows (standard error 0.0044) read 0.9795 on the other documents' windows.
MARGIN_Z = 1.645


class Quality(NamedTuple):
    """How a candidate's outputs agree with float's on calibration samples: the worst cosine of an output or of a
    slice of one (graphopt.slices), the worst top-1 agreement of class-score outputs (and of the score outputs the
    user names), the worst margin of an agreement over what the check asks of its rows (``top1_required``), and the
    worst cosine less 1.645 of its standard error over the samples (a one-sided 95% lower bound for other data
    drawn like these); the task metric's value and float's own (None without a metric)."""

    cosine: float
    top1: float
    top1_margin: float
    cosine_low: float
    accuracy_drop: float = 0.0     # points of accuracy on the samples' labels lost (0 without labels)
    labelled: int = 0              # ... over this many labelled samples
    metric: float | None = None
    metric_reference: float | None = None


def top1_required(target: float, rows: int, z: float = MARGIN_Z) -> float:
    """Top-1 agreement the check asks of ``rows`` calibration rows for a target ``target``: the target plus z
    standard errors of an agreement at the target, t + z·√(t(1−t)/n) (a one-sided test at 95% for z = 1.645: an
    agreement measured at the target itself is as likely below it as above on other data), but never more than
    (n−1)/n, so that one disagreement is always allowed and small calibration sets are judged on the target alone.
    """
    if rows <= 0 or target <= 0:
        return target
    return max(target, min(target + z * math.sqrt(target * (1 - target) / rows), (rows - 1) / rows))


class Judge:
    """Measures models against the float model on the judge's samples, and says whether ``targets`` hold (the
    pipeline's, or a pass's own min-cosine/min-top1 in their place; 0 or None: not checked)."""

    def __init__(self, float_model: onnx.ModelProto, roles: onnx.ModelProto, batches: list[Batch],
                 targets: Thresholds) -> None:
        self.float_model = float_model
        self.roles = roles          # output roles from the user's model (an opset upgrade may have hidden them)
        self.batches = batches
        self.targets = targets
        self.min_cosine = targets.min_cosine or 0.0
        self.min_top1 = targets.min_top1 or 0.0
        self.max_accuracy_drop = targets.max_accuracy_drop   # points, on the samples' labels where they have them
        self.scores = class_score_outputs(roles)
        self.threads = check_threads(float_model, batches)
        self.ref = Reference(make_session(float_model, "float model", threads=self.threads))  # for every check
        self.names = [o.name for o in self.ref.get_outputs()]
        self.checked: dict[str, int] = {}    # class-score output -> rows its top-1 agreement is checked on

    def judged(self, stats: list[OutputStats], metric: tuple[float, float] | None, spread: bool = True) -> Quality:
        """``Quality`` from the outputs' figures (``spread``: with the cosines' standard errors, else none) and the
        task metric's (float's own value, the candidate's)."""
        cosines = [(s.cosine, s.cosine_se if spread else 0.0) for s in stats if s.cosine is not None]
        worst = [w for s in stats if s.slices is not None and (w := s.slices.worst()) is not None]
        cosines += [(c, se if spread else 0.0) for _, c, se in worst]
        agree = [(s.top1_agree, s.top1_rows) for i, s in enumerate(stats)
                 if s.top1_rows and (i in self.scores or s.score_axis is not None)]
        return Quality(min((c for c, _ in cosines), default=1.0), min((a / n for a, n in agree), default=1.0),
                       min((a / n - top1_required(self.min_top1, n) for a, n in agree), default=1.0),
                       min((c - MARGIN_Z * se for c, se in cosines), default=1.0),
                       metric=None if metric is None else metric[1],
                       metric_reference=None if metric is None else metric[0])

    def meets(self, q: Quality, confident: bool = True) -> bool:
        """The targets hold with the check's margins (``confident``), or at the targets alone (the search's guide
        on fewer samples, confirmed by a confident check). The task metric has no margin: it is the user's."""
        kept = not self.judges_accuracy(q) or q.accuracy_drop <= self.max_accuracy_drop
        t = self.targets
        if q.metric is not None and q.metric_reference is not None:
            kept = kept and (t.min_metric is None or q.metric >= t.min_metric) and (
                t.max_metric_drop is None or q.metric_reference - q.metric <= t.max_metric_drop)
        if confident:
            return q.cosine_low >= self.min_cosine and q.top1_margin >= 0 and kept
        return q.cosine >= self.min_cosine and q.top1 >= self.min_top1 and kept

    def judges_accuracy(self, q: Quality) -> bool:
        """Whether the accuracy drop is checked: a target is set and the labelled samples are enough that one of
        them weighs at most half the allowed drop (on fewer, one sample decides; validation checks it anyway)."""
        return self.max_accuracy_drop is not None and q.labelled * self.max_accuracy_drop >= 200

    def start(self) -> None:
        """A one-thread judge: start the float model's runs on its samples on a worker thread (``Reference.ahead``),
        to overlap the caller's work until the first check, or that check's candidate runs."""
        if self.threads == 1 and spare_core():
            self.ref.ahead([b.feed for b in self.batches])

    def quality(self, model: onnx.ModelProto) -> Quality:
        """``judged`` for ``model`` against float on every judge sample."""
        q = self._measured(model, early=False)
        assert q is not None
        return q

    def passing(self, model: onnx.ModelProto) -> Quality | None:
        """``quality`` where ``model`` meets the targets with the check's margins, else None: a search that only
        asks whether a candidate fails stops its runs as soon as the top-1 check cannot hold (``top1_lost``)."""
        q = self._measured(model, early=True)
        return q if q is not None and self.meets(q) else None

    def _measured(self, model: onnx.ModelProto, early: bool) -> Quality | None:
        self.start()
        total = sum(b.rows for b in self.batches)
        stop = (lambda stats, seen: seen < total and self.top1_lost(stats, seen, total, True)) if early else None
        v = validate(self.float_model, model, self.batches, exact=False, thresholds=self.targets.measures(),
                     sessions=(self.ref, make_session(model, "quantized model", threads=self.threads)),
                     roles=self.roles, stop=stop)
        if v.stopped:
            return None
        self.checked.update({s.name: s.top1_rows for i, s in enumerate(v.outputs)
                             if s.top1 is not None and (i in self.scores or s.score_axis is not None)})
        q = self.judged(v.outputs, None if v.metric is None else v.metric[1:])
        acc = v.accuracy
        return q._replace(accuracy_drop=(acc[0] - acc[1]) * 100, labelled=v.labelled) if acc else q

    def reference(self, b: Batch) -> list[Any]:
        """The float model's outputs on ``b`` (kept: ``Reference``)."""
        return self.ref.run(None, b.feed)

    def switched_quality(self, sess: Any, switches: Mapping[str, str], quantized: set[str], feeds: list[Batch],
                         confident: bool | None = None) -> Quality | None:
        """``judged`` for the switchable model's session with the tensors in ``quantized`` switched to int8 (the
        cosines over all rows of ``feeds``, standard error 0). Given ``confident`` (a search that only asks
        ``meets(q, confident)``): None as soon as the top-1 target cannot hold on ``feeds`` (``top1_lost``), the
        rest of the feeds not run."""
        flags = {name: np.array(t in quantized) for t, name in switches.items()}
        comparison = Comparison(self.roles, self.names, self.targets.measures())
        total, seen = sum(b.rows for b in feeds), 0
        for b in feeds:
            comparison.add(self.reference(b), sess.run(None, {**b.feed, **flags}), b.labels, b.rows)
            seen += b.rows
            if confident is not None and seen < total and self.top1_lost(comparison.stats, seen, total, confident):
                return None
        return self.judged(comparison.stats, comparison.metric_values(), spread=False)

    def top1_lost(self, stats: list[OutputStats], seen: int, total: int, confident: bool) -> bool:
        """Whether ``meets`` must fail on its top-1 check after ``seen`` of ``total`` rows: a class-score output
        with one position per row whose agreement stays below what is asked even if every row left agrees (the
        same expression as ``judged``'s, at its largest possible value; exact, as agreement only adds)."""
        if self.min_top1 <= 0:
            return False
        for i, s in enumerate(stats):
            if s.top1_rows == seen and (i in self.scores or s.score_axis is not None):
                best = (s.top1_agree + total - seen) / total
                if (best < top1_required(self.min_top1, total)) if confident else best < self.min_top1:
                    return True
        return False


def check_threads(float_model: onnx.ModelProto, batches: list[Batch]) -> int | None:
    """Intra-op threads for the judge's sessions (``runtime.run_threads``): from the MACs of a run on its first
    batch (counted on one row, times the batch's rows)."""
    if not batches or is_big(float_model):     # counting would load a model over 2 GB once more
        return None
    macs = count_macs(float_model, first_row_feed(batches[0].feed))
    return run_threads(None if macs is None else macs * batches[0].rows)


class Reference:
    """The float model's session, its outputs on each feed kept (by the feed's identity, the feed held so that
    the identity stays its own) while they fit REFERENCE_BYTES: a judge checks every candidate on the same
    samples, and validation asks it as it asks any session (``get_outputs``, ``run(None, feed)``). ``ahead``
    (one-thread sessions): the outputs on every feed after the first are computed on a worker thread while the
    first check runs its candidate (the same runs; MTCNN O-Net's first check 0.29 s of runs in about half)."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess
        self.kept: dict[int, tuple[Mapping[str, Any], list[Any] | Future[list[Any]]]] = {}
        self.held = 0
        self.started = False        # ``ahead`` was asked
        self.once: tuple[Mapping[str, Any], list[Any]] | None = None

    def get_outputs(self) -> Any:
        return self.sess.get_outputs()

    def ahead(self, feeds: list[Mapping[str, Any]]) -> None:
        """Start the runs on ``feeds[1:]`` on a worker thread, in order, where the first feed's outputs times the
        feeds fit REFERENCE_BYTES (they are all kept)."""
        if len(feeds) < 2 or self.started:
            return
        self.started = True
        first = self.sess.run(None, feeds[0])
        size = sum(v.nbytes for v in first if isinstance(v, np.ndarray))
        if size * len(feeds) > REFERENCE_BYTES:
            self.once = (feeds[0], first)       # handed to the check's first run, then dropped as before
            return
        self.kept[id(feeds[0])] = (feeds[0], first)
        self.held += size
        pool = ThreadPoolExecutor(1, thread_name_prefix="graphopt-reference")
        for feed in feeds[1:]:
            self.kept[id(feed)] = (feed, pool.submit(self.sess.run, None, feed))
        pool.shutdown(wait=False)       # the runs submitted go on; the thread ends with them

    def run(self, names: None, feed: Mapping[str, Any]) -> list[Any]:
        if self.once is not None and self.once[0] is feed:
            out, self.once = self.once[1], None
            return out
        hit = self.kept.get(id(feed))
        if hit is not None and hit[0] is feed:
            if isinstance(hit[1], Future):
                out = hit[1].result()
                self.kept[id(feed)] = (feed, out)
                self.held += sum(v.nbytes for v in out if isinstance(v, np.ndarray))
                return out
            return hit[1]
        out = self.sess.run(names, feed)
        size = sum(v.nbytes for v in out if isinstance(v, np.ndarray))
        if self.held + size <= REFERENCE_BYTES:
            self.kept[id(feed)] = (feed, out)
            self.held += size
        return out
