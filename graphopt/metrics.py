"""What validation measures on one output, accumulated feed by feed: OutputStats, and which outputs are scores.

Per output, over all feeds (memory holds one feed's outputs at a time), x the original output and y the rewritten:
  * max abs error  = max |y - x|
  * rel error      = max |y - x| / max |x|            (error relative to the output's range; robust near zero)
  * cosine         = <x, y> / (|x| |y|)               over all elements of all feeds
  * SQNR (dB)      = 10 log10(Σ x² / Σ (y - x)²)
  * cosine's standard error over the samples (rows of axis 0): the jackknife, sqrt((n-1)/n · Σ (c₋ᵢ - c̄)²) with
    c₋ᵢ the cosine without sample i, from the per-sample terms <xᵢ, yᵢ>, |xᵢ|², |yᵢ|²
  * top-1          = fraction of rows whose argmax agrees, for class-score-shaped outputs ([N, C], C >= 2, float);
                     for a Softmax/LogSoftmax output of rank >= 3 over its last axis ([N, T, C]: a CTC recogniser's
                     classes per step), the fraction of positions whose argmax agrees; for an output the user names
                     (--scores OUTPUT:AXIS, ``score_axis``: logits [T, N, C] without a Softmax), per position over
                     that axis
  * cosine per slice along a channel axis, and the worst slice (graphopt.slices: ``slices``)
  * integer, bool and string outputs: the count of differing elements; NaN/Inf of the original must be reproduced
    at the same positions, and a value that becomes NaN/Inf is counted.
Which outputs are class scores is read from the graph (``class_score_outputs``, ``sequence_score_outputs``); which
output labels grade, from the values (``label_output``); labels are class indices (``class_indices``: one int per
sample, or exact one-hot rows turned into their argmax).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from .errors import InputError
from .slices import SliceStats

_RESHAPING = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


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
    slices: SliceStats | None = None     # cosine per slice along a channel axis (graphopt.slices)
    score_axis: int | None = None        # the class axis the user named (--scores): top-1 per position over it

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
    def update(self, ref: Any, out: Any, top1: bool = True, sequence: bool = False) -> None:
        """Add one feed's original (``ref``) and rewritten (``out``) values of this output; ``top1``: count its
        argmax agreement if it looks like scores, ``sequence``: per position of an [N, ..., C] output."""
        if not isinstance(ref, np.ndarray) or not isinstance(out, np.ndarray):
            self.kind = "other"
            if not _equal_nested(ref, out):
                self.mismatches += 1
            return
        if ref.shape != out.shape:
            self.problems.append(f"shape changed from {list(ref.shape)} to {list(out.shape)}")
            return
        if ref.dtype != out.dtype:
            self.problems.append(f"dtype changed from {ref.dtype} to {out.dtype}")
            return
        self.elements += ref.size
        self.dtype = str(ref.dtype)
        if ref.dtype.kind not in "fc":
            self.kind = "exact"
            self.mismatches += int(np.count_nonzero(ref != out))
            return
        x = ref.astype(np.float64)
        y = out.astype(np.float64)
        # Where every value of both is finite (the common case), the masked copies below equal x and y themselves
        # (boolean indexing keeps C order), so the sums run on the arrays as they are: the same values in the same
        # order, the same figures to the last bit, without a third of the passes over the output.
        finite = ref.dtype.kind == "f" and bool(np.isfinite(ref).all()) and bool(np.isfinite(out).all())
        both: Any = True
        if not finite:
            fin_x = np.isfinite(x)
            fin_y = np.isfinite(y)
            self.new_nonfinite += int(np.count_nonzero(fin_x & ~fin_y))
            # Non-finite values in the original must be reproduced exactly (same NaN/Inf positions and signs).
            nf = ~fin_x
            if nf.any():
                same = (np.isnan(x[nf]) & np.isnan(y[nf])) | (x[nf] == y[nf])
                self.mismatches += int(np.count_nonzero(~same))
            both = fin_x & fin_y
        xb, yb = (x.ravel(), y.ravel()) if finite else (x[both], y[both])
        if xb.size:
            err = np.abs(yb - xb)
            self.max_abs_error = max(self.max_abs_error, float(err.max()))
            self.ref_max_abs = max(self.ref_max_abs, float(np.abs(xb).max()))
            self.sum_ref2 += float(np.dot(xb.ravel(), xb.ravel()) if xb.dtype.kind == "f" else np.sum(np.abs(xb) ** 2))
            self.sum_out2 += float(np.sum(np.abs(yb) ** 2))
            self.sum_err2 += float(np.sum(err ** 2))
            self.dot += float(np.real(np.sum(xb * (yb if finite else np.conj(yb)))))
            if x.ndim and x.dtype.kind == "f":
                xm, ym = (x, y) if finite else (np.where(both, x, 0.0), np.where(both, y, 0.0))
                xr, yr = xm.reshape(x.shape[0], -1), ym.reshape(x.shape[0], -1)
                self.row_terms += zip(np.einsum("ij,ij->i", xr, yr).tolist(), np.einsum("ij,ij->i", xr, xr).tolist(),
                                       np.einsum("ij,ij->i", yr, yr).tolist())
                if self.slices is not None and x.ndim > 1:
                    self.slices.update(xm, ym)
        if self.score_axis is not None and ref.ndim > 1:
            ref, out, top1, sequence = np.moveaxis(ref, self.score_axis, -1), np.moveaxis(out, self.score_axis, -1), \
                True, True
        counts = top1_counts(ref, out, sequence) if top1 else None
        if counts is not None:
            self.top1_agree += counts[0]
            self.top1_rows += counts[1]

    def add_noise(self, got: Any, unoptimized: Any) -> None:
        """Widen ``noise_abs`` by max |x - x'| of one model's output run with onnxruntime's optimizations on and off."""
        if isinstance(got, np.ndarray) and got.dtype.kind == "f" and got.shape == unoptimized.shape:
            both = np.isfinite(got) & np.isfinite(unoptimized)
            if both.any():
                spread = float(np.abs(got[both].astype(np.float64) - unoptimized[both]).max())
                self.noise_abs = max(self.noise_abs, spread)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("sum_ref2", "sum_out2", "sum_err2", "dot",
                                                                 "top1_agree", "row_terms", "slices")}
        d.update(rel_error=self.rel_error, cosine=self.cosine, sqnr_db=self.sqnr_db, top1=self.top1,
                 slices=self.slices.to_dict() if self.slices is not None else None)
        return d


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            np.all((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    return bool(a == b) if not isinstance(a, np.ndarray) else False


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


LABELS_SHAPE = "class indices, shape [N] (one int >= 0 per sample), or exact one-hot rows, shape [N, C]"


def class_indices(labels: Any, where: str = "'__labels__'") -> np.ndarray:
    """Labels as int64 class indices, shape [N]: as given when they are whole numbers >= 0 of shape [N] (a scalar
    is one sample); the argmax of each row when they are exact one-hot rows [N, C] (C >= 2, every value 0 or 1,
    one 1 per row). Anything else (probabilities, an [N, 1] column, rank 3) raises an InputError naming ``where``
    and saying which shape is expected: a soft or multi-label row has no one class to grade."""
    arr = np.atleast_1d(np.asarray(labels))
    shape = "[" + ", ".join(str(d) for d in arr.shape) + "]"
    if arr.dtype.kind not in "iufb":
        raise InputError(f"{where} has dtype {arr.dtype}: give {LABELS_SHAPE}")
    if arr.ndim == 2 and arr.shape[1] >= 2:
        if arr.size and not (np.isin(arr, (0, 1)).all() and (arr.sum(axis=1) == 1).all()):
            raise InputError(f"{where} has shape {shape} but its rows are not one-hot (one 1, zeros elsewhere): "
                             f"give {LABELS_SHAPE}")
        return arr.argmax(axis=1).astype(np.int64)
    if arr.ndim != 1:
        raise InputError(f"{where} has shape {shape}: give {LABELS_SHAPE}")
    if arr.dtype.kind == "f" and arr.size and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise InputError(f"{where} holds values that are not whole numbers: give {LABELS_SHAPE}")
    if arr.size and arr.min() < 0:
        raise InputError(f"{where} holds negative values ({arr.min():g}): give {LABELS_SHAPE}")
    return arr.astype(np.int64)


def label_output(outputs: list[Any], labels: np.ndarray) -> int:
    """Index of the output the labels grade: among class-score outputs with a row per label and a column for every
    label, a probability output (rows >= 0 summing to 1: a Softmax) first, else the first; -1 if none fits."""
    fits = [i for i, r in enumerate(outputs) if isinstance(r, np.ndarray) and looks_like_scores(r)
            and r.shape[0] == labels.shape[0] and (labels.size == 0 or r.shape[1] > int(labels.max()))]
    probs = [i for i in fits if np.all(outputs[i] >= 0) and np.allclose(outputs[i].sum(1), 1.0, atol=1e-3)]
    return (probs or fits or [-1])[0]
