"""Validation: run the original and the rewritten model in onnxruntime (CPU) on the same feeds and compare.

Per output, accumulated over all feeds (memory holds one feed's outputs at a time):
  * max abs error  = max |y - x|                      (x: original output, y: rewritten)
  * rel error      = max |y - x| / max |x|            (error relative to the output's range; robust near zero)
  * cosine         = <x, y> / (|x| |y|)               over all elements of all feeds
  * SQNR (dB)      = 10 log10(sum x^2 / sum (y - x)^2)
  * cosine's standard error over the samples (rows of axis 0; jackknife), for a pass that needs a lower bound
  * top-1          = fraction of rows whose argmax agrees, for class-score-shaped outputs ([N, C], C >= 2, float);
                     for a Softmax/LogSoftmax output of rank >= 3 over its last axis ([N, T, C]: a CTC recogniser's
                     classes per step), the fraction of positions whose argmax agrees
  * accuracy       = argmax vs labels when the data carries ``__labels__``, graded on a probability output (rows
                     summing to 1) if there is one, else the first class-score output with a column per label.
A rewritten output that is NaN/Inf where the original is finite, or a changed shape or dtype, always fails.
An exact pipeline must match within EXACT_REL_TOL (float) or exactly (integers, bools, strings). Float rounding
of a deep model can exceed that without any rewrite: the input model run with onnxruntime's optimizations off
differs from it run with them on (PP-OCRv4 rec: 2.8e-4 of the output's range; PP-OCRv4 det on random inputs, whose
Sigmoid outputs are ~1e-7: all of it). Validation of an exact pipeline measures that spread on the same feeds, for the
input model and for the rewritten one (whose own spread can be the larger: on rec's calibration lines 1.4e-4 for the
input, 2.3e-4 for its fold-bn rewrite, which is 4.1e-4 from the input), and accepts a float rel error up to twice the
larger: a rewrite is as exact as onnxruntime's own graph rewrites. Lossy pipelines are
gated by the user's thresholds (min cosine, min top-1, max rel error), else by the targets of the lossy pass
(quantize's min-cosine / min-top1, which it reached on calibration data) checked again on the validation data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputError
from .runtime import make_session, numpy_exchange_problem, ort_message

EXACT_REL_TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}
DEFAULT_REL_TOL = 1e-2  # bfloat16 and other low-precision floats


@dataclass
class Thresholds:
    min_cosine: float | None = None
    min_top1: float | None = None
    max_rel_error: float | None = None
    # Where the thresholds come from, for the failure message: "--" for the user's flags, "quantize's " for a lossy
    # pass's own targets. A pass's min-top1 holds for class-score outputs only (class_score_outputs), as it did in
    # the pass, so ``top1_outputs`` then names those output indices (None: every output with a top-1 figure).
    origin: str = "--"
    top1_outputs: frozenset[int] | None = None


@dataclass
class OutputStats:
    name: str
    kind: str = "float"              # float | exact (ints, bools, strings) | other (sequences, maps)
    dtype: str = ""
    elements: int = 0
    max_abs_error: float = 0.0
    ref_max_abs: float = 0.0
    sum_ref2: float = 0.0
    sum_out2: float = 0.0
    sum_err2: float = 0.0
    dot: float = 0.0
    top1_agree: int = 0
    top1_rows: int = 0
    mismatches: int = 0              # exact kinds: differing elements
    new_nonfinite: int = 0
    noise_abs: float = 0.0           # exact pipelines: max |x - x'| over both models, x' one with optimizations off
    problems: list[str] = field(default_factory=list)
    # per sample (row of axis 0): <x, y>, |x|², |y|², for the cosine's standard error (``cosine_se``)
    row_terms: list[tuple[float, float, float]] = field(default_factory=list)

    def _relative(self, abs_error: float) -> float:
        if abs_error == 0:
            return 0.0
        return abs_error / self.ref_max_abs if self.ref_max_abs > 0 else math.inf

    @property
    def rel_error(self) -> float:
        return self._relative(self.max_abs_error)

    @property
    def noise_rel(self) -> float:
        """onnxruntime's own rounding spread on this output, relative to its range (as ``rel_error``)."""
        return self._relative(self.noise_abs)

    @property
    def cosine(self) -> float | None:
        if self.kind != "float":
            return None
        if self.sum_ref2 == 0 and self.sum_out2 == 0:
            return 1.0
        if self.sum_ref2 == 0 or self.sum_out2 == 0:
            return 0.0
        return self.dot / math.sqrt(self.sum_ref2 * self.sum_out2)

    @property
    def cosine_se(self) -> float:
        """Standard error of ``cosine`` over the samples it was measured on (jackknife: the spread of the cosine
        with one sample left out, sqrt((n-1)/n · Σ (c₋ᵢ - c̄)²)); 0 with fewer than two samples."""
        t = np.array(self.row_terms, dtype=np.float64).reshape(-1, 3)
        if len(t) < 2:
            return 0.0
        rest = t.sum(axis=0) - t                                        # totals without sample i
        norms = np.sqrt(rest[:, 1] * rest[:, 2])
        loo = np.where(norms > 0, rest[:, 0] / np.where(norms > 0, norms, 1.0), 1.0)
        return float(np.sqrt((len(t) - 1) / len(t) * np.sum((loo - loo.mean()) ** 2)))

    @property
    def sqnr_db(self) -> float | None:
        if self.kind != "float":
            return None
        if self.sum_err2 == 0:
            return math.inf
        if self.sum_ref2 == 0:
            return -math.inf
        return 10 * math.log10(self.sum_ref2 / self.sum_err2)

    @property
    def top1(self) -> float | None:
        return self.top1_agree / self.top1_rows if self.top1_rows else None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("sum_ref2", "sum_out2", "sum_err2", "dot",
                                                                 "top1_agree", "row_terms")}
        d.update(rel_error=self.rel_error, cosine=self.cosine, sqnr_db=self.sqnr_db, top1=self.top1)
        return d


def class_score_outputs(model: onnx.ModelProto) -> set[int]:
    """Indices of the graph outputs that are class scores: made by Softmax or LogSoftmax, possibly reshaped; in a
    model with no such output, the [N, C] outputs (C >= 2) of a final Gemm or MatMul (+ bias Add): a classifier's
    logits (EfficientNet-Lite0's ImageNet head). Beside a Softmax output, an [N, C] from a Gemm is something else
    (MTCNN's box offsets and landmarks), and an output made by anything else (a sentence encoder's mean-pooled
    vector) has an argmax that means nothing. quantize's min-top1 target holds for these outputs only; validation
    reports top-1 for these when the model has any (else for every [N, C] output)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                         for o in n.output}

    def source(name: str) -> onnx.NodeProto | None:
        n = producer.get(name)
        while n is not None and n.op_type in _RESHAPING and n.input:
            n = producer.get(n.input[0])
        return n

    found = set()
    logits = set()
    for i, out in enumerate(model.graph.output):
        n = source(out.name)
        if n is not None and n.op_type in ("Softmax", "LogSoftmax"):
            found.add(i)
            continue
        dims = out.type.tensor_type.shape.dim if out.type.tensor_type.HasField("shape") else []
        if n is not None and n.op_type == "Add" and len(n.input) == 2:
            biased = [producer.get(t) for t in n.input if t not in consts]
            n = biased[0] if len(biased) == 1 else None
        if (n is not None and n.op_type in ("Gemm", "MatMul") and len(dims) == 2
                and (not dims[1].HasField("dim_value") or dims[1].dim_value >= 2)):
            logits.add(i)
    return found or logits


_RESHAPING = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def sequence_score_outputs(model: onnx.ModelProto) -> set[int]:
    """Indices of the graph outputs of rank >= 3 made directly by Softmax or LogSoftmax over their last axis: class
    scores per position (a recogniser's [N, T, C]). Their top-1 agreement is taken per position."""
    producer = {out: n for n in model.graph.node for out in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    found = set()
    for i, out in enumerate(model.graph.output):
        n = producer.get(out.name)
        rank = len(out.type.tensor_type.shape.dim) if out.type.tensor_type.HasField("shape") else 0
        if n is None or n.op_type not in ("Softmax", "LogSoftmax") or rank < 3:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        if axis % rank == rank - 1:
            found.add(i)
    return found


def looks_like_scores(arr: np.ndarray, sequence: bool = False) -> bool:
    """[N, C] float scores (C >= 2); with ``sequence``, also [N, ..., C]."""
    return arr.dtype.kind == "f" and (arr.ndim == 2 or (sequence and arr.ndim > 2)) and arr.shape[-1] >= 2


def top1_counts(ref: np.ndarray, out: np.ndarray, sequence: bool = False) -> tuple[int, int] | None:
    """(positions whose argmax over the last axis agrees, positions) for scores (``looks_like_scores``) with finite
    values; None for anything else."""
    if not looks_like_scores(ref, sequence) or ref.shape != out.shape or not np.isfinite(ref).all():
        return None
    a, b = ref.argmax(-1), out.argmax(-1)
    return int(np.count_nonzero(a == b)), int(a.size)


@dataclass
class ValidationResult:
    data: str
    feeds: int = 0
    samples: int = 0
    exact: bool = True
    outputs: list[OutputStats] = field(default_factory=list)
    labelled: int = 0
    correct_before: int = 0
    correct_after: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy(self) -> tuple[float, float] | None:
        if not self.labelled:
            return None
        return self.correct_before / self.labelled, self.correct_after / self.labelled

    def to_dict(self) -> dict[str, Any]:
        acc = self.accuracy
        return {"data": self.data, "feeds": self.feeds, "samples": self.samples, "exact": self.exact,
                "passed": self.passed, "failures": self.failures,
                "accuracy_before": acc[0] if acc else None, "accuracy_after": acc[1] if acc else None,
                "outputs": [o.to_dict() for o in self.outputs]}


def _compare(stats: OutputStats, ref: Any, out: Any, top1: bool = True, sequence: bool = False) -> None:
    if not isinstance(ref, np.ndarray) or not isinstance(out, np.ndarray):
        stats.kind = "other"
        if not _equal_nested(ref, out):
            stats.mismatches += 1
        return
    if ref.shape != out.shape:
        stats.problems.append(f"shape changed from {list(ref.shape)} to {list(out.shape)}")
        return
    if ref.dtype != out.dtype:
        stats.problems.append(f"dtype changed from {ref.dtype} to {out.dtype}")
        return
    stats.elements += ref.size
    stats.dtype = str(ref.dtype)
    if ref.dtype.kind not in "fc":
        stats.kind = "exact"
        stats.mismatches += int(np.count_nonzero(ref != out))
        return
    x = ref.astype(np.float64)
    y = out.astype(np.float64)
    fin_x = np.isfinite(x)
    fin_y = np.isfinite(y)
    stats.new_nonfinite += int(np.count_nonzero(fin_x & ~fin_y))
    # Non-finite values in the original must be reproduced exactly (same NaN/Inf positions and signs).
    nf = ~fin_x
    if nf.any():
        same = (np.isnan(x[nf]) & np.isnan(y[nf])) | (x[nf] == y[nf])
        stats.mismatches += int(np.count_nonzero(~same))
    both = fin_x & fin_y
    xb, yb = x[both], y[both]
    if xb.size:
        err = np.abs(yb - xb)
        stats.max_abs_error = max(stats.max_abs_error, float(err.max()))
        stats.ref_max_abs = max(stats.ref_max_abs, float(np.abs(xb).max()))
        stats.sum_ref2 += float(np.dot(xb.ravel(), xb.ravel()) if xb.dtype.kind == "f" else np.sum(np.abs(xb) ** 2))
        stats.sum_out2 += float(np.sum(np.abs(yb) ** 2))
        stats.sum_err2 += float(np.sum(err ** 2))
        stats.dot += float(np.real(np.sum(xb * np.conj(yb))))
        if x.ndim and x.dtype.kind == "f":
            xr, yr = np.where(both, x, 0.0).reshape(x.shape[0], -1), np.where(both, y, 0.0).reshape(x.shape[0], -1)
            stats.row_terms += zip(np.einsum("ij,ij->i", xr, yr).tolist(), np.einsum("ij,ij->i", xr, xr).tolist(),
                                   np.einsum("ij,ij->i", yr, yr).tolist())
    counts = top1_counts(ref, out, sequence) if top1 else None
    if counts is not None:
        stats.top1_agree += counts[0]
        stats.top1_rows += counts[1]


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            np.all((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    return bool(a == b) if not isinstance(a, np.ndarray) else False


def validate(original: onnx.ModelProto, rewritten: onnx.ModelProto, batches: Iterable[Any], *, exact: bool,
             thresholds: Thresholds, description: str = "", sessions: tuple[Any, Any] | None = None,
             roles: onnx.ModelProto | None = None) -> ValidationResult:
    """Compare the two models on every batch; the result lists failures (empty when validation passed).

    ``roles``: the model whose graph says which outputs are class scores (``class_score_outputs``,
    ``sequence_score_outputs``), when ``original`` is a rewrite of it (a pass's own float model, whose opset upgrade
    may have wrapped a Softmax in Flatten/Reshape); by default ``original``."""
    ref_sess, new_sess = sessions or (make_session(original, "input model"),
                                      make_session(rewritten, "rewritten model"))
    ref_names = [o.name for o in ref_sess.get_outputs()]
    new_names = [o.name for o in new_sess.get_outputs()]
    res = ValidationResult(data=description, exact=exact)
    if ref_names != new_names:
        res.failures.append(f"outputs changed from {ref_names} to {new_names}")
        return res
    stats = [OutputStats(n) for n in ref_names]
    # Exact pipelines: each model run with onnxruntime's optimizations off, against itself with them on, measures how
    # far onnxruntime's own rewrites move it (its rounding spread); (session, True for the input model).
    floor_sessions: list[tuple[Any, bool]] = []
    if exact:
        for model, what, is_input in ((original, "input model", True), (rewritten, "rewritten model", False)):
            try:
                floor_sessions.append((make_session(model, what, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                       is_input))
            except InputError:
                pass   # no spread from this model: the other's, or only EXACT_REL_TOL, applies
    # Top-1 agreement for the class scores: the Softmax/LogSoftmax outputs if the model has any (MTCNN's box
    # offsets beside its face score have an argmax that means nothing), else every [N, C] output (logits).
    scored = class_score_outputs(roles or original) or set(range(len(stats)))
    sequences = sequence_score_outputs(roles or original)
    score_index: int | None = None
    for batch in batches:
        try:
            ref = ref_sess.run(None, batch.feed)
        except Exception as e:
            raise InputError(numpy_exchange_problem(e, ref_sess) or
                             f"the input model fails on the validation data: {ort_message(e)}") from e
        try:
            out = new_sess.run(None, batch.feed)
        except Exception as e:
            res.failures.append(f"the rewritten model fails in onnxruntime: {ort_message(e)}")
            return res
        res.feeds += 1
        first = next(iter(batch.feed.values()), None)
        res.samples += first.shape[0] if isinstance(first, np.ndarray) and first.ndim > 0 else 1
        for i, (s, r, o) in enumerate(zip(stats, ref, out)):
            _compare(s, r, o, top1=i in scored, sequence=i in sequences)
        for floor_sess, is_input in list(floor_sessions):
            got = ref if is_input else out
            try:
                unoptimized = floor_sess.run(None, batch.feed)
            except Exception:   # runs only optimized: no spread from it (the other's, or EXACT_REL_TOL, applies)
                floor_sessions.remove((floor_sess, is_input))
                continue
            for s, r, o in zip(stats, got, unoptimized):
                if isinstance(r, np.ndarray) and r.dtype.kind == "f" and r.shape == o.shape:
                    both = np.isfinite(r) & np.isfinite(o)
                    if both.any():
                        s.noise_abs = max(s.noise_abs, float(np.abs(r[both].astype(np.float64) - o[both]).max()))
        if batch.labels is not None:
            if score_index is None:
                score_index = label_output(ref, batch.labels)
            if score_index >= 0 and ref[score_index].shape[0] == batch.labels.shape[0]:
                labels = batch.labels.astype(np.int64)
                res.labelled += labels.shape[0]
                res.correct_before += int(np.count_nonzero(ref[score_index].argmax(1) == labels))
                res.correct_after += int(np.count_nonzero(out[score_index].argmax(1) == labels))
    res.outputs = stats
    _judge(res, thresholds)
    return res


def label_output(outputs: list[Any], labels: np.ndarray) -> int:
    """Index of the output the labels grade: among class-score outputs with a row per label and a column for every
    label, a probability output (rows >= 0 summing to 1: a Softmax) first, else the first; -1 if none fits."""
    fits = [i for i, r in enumerate(outputs) if isinstance(r, np.ndarray) and looks_like_scores(r)
            and r.shape[0] == labels.shape[0] and (labels.size == 0 or r.shape[1] > int(labels.max()))]
    probs = [i for i in fits if np.all(outputs[i] >= 0) and np.allclose(outputs[i].sum(1), 1.0, atol=1e-3)]
    return (probs or fits or [-1])[0]


def _judge(res: ValidationResult, t: Thresholds) -> None:
    if res.feeds == 0:
        res.failures.append("no validation data: the data source gave no feeds")
    for i, s in enumerate(res.outputs):
        for p in dict.fromkeys(s.problems):
            res.failures.append(f"output '{s.name}': {p}")
        if s.new_nonfinite:
            res.failures.append(f"output '{s.name}': {s.new_nonfinite} values became NaN/Inf")
        if s.mismatches:
            res.failures.append(f"output '{s.name}': {s.mismatches} values differ from the original")
        if s.kind != "float" or s.problems:
            continue
        if res.exact:
            tol = max(_exact_tol(s), 2 * s.noise_rel)
            if s.rel_error > tol:
                floor = (f" (twice onnxruntime's own rounding spread on these models, {s.noise_rel:.3g})"
                         if tol > _exact_tol(s) else "")
                res.failures.append(f"output '{s.name}': rel error {s.rel_error:.3g} exceeds {tol:.3g}{floor} for an "
                                    "exact pipeline")
            continue
        cos = s.cosine
        if t.min_cosine is not None and cos is not None and cos < t.min_cosine:
            res.failures.append(f"output '{s.name}': cosine {cos:.5f} below {t.origin}min-cosine {t.min_cosine}"
                                + _on_validation(t))
        if (t.min_top1 is not None and s.top1 is not None and s.top1 < t.min_top1
                and (t.top1_outputs is None or i in t.top1_outputs)):
            res.failures.append(f"output '{s.name}': top-1 agreement {s.top1:.4f} below {t.origin}min-top1 "
                                f"{t.min_top1}" + _on_validation(t))
        if t.max_rel_error is not None and s.rel_error > t.max_rel_error:
            res.failures.append(f"output '{s.name}': rel error {s.rel_error:.3g} above --max-rel-error "
                                f"{t.max_rel_error}")


def _on_validation(t: Thresholds) -> str:
    """What a pass's own target missed on the validation data means, and what to do (empty for the user's flags)."""
    if t.origin == "--":
        return ""
    return (" on the validation data (the pass's target on the calibration data): calibrate on more samples like "
            "these, or set --min-cosine/--min-top1 to accept it")


def _exact_tol(s: OutputStats) -> float:
    """Float tolerance for exact passes: rounding differences from reassociated arithmetic, by output dtype."""
    return EXACT_REL_TOL.get(np.dtype(s.dtype), DEFAULT_REL_TOL) if s.dtype else DEFAULT_REL_TOL
