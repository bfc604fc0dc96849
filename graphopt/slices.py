"""Cosine per slice of an output along its channel axis: fidelity that one large quantity cannot hide.

One cosine over a whole output weighs each element by its size: a YOLO-style output [N, anchors, 4 + 18] whose box
coordinates (0-320) sit beside class scores (0-0.9) reads 0.9996 while the scores, which decide the detections,
moved a lot. So an output is also cut into slices along a channel axis and the cosine is taken per slice; the
worst slice is held to the same min-cosine as the output.

Which slices (``default_slicing``): a float output of rank >= 3 whose last axis has 2 to SMALL_CHANNELS (128)
entries, per entry of that axis (the channels of [N, anchors, 4 + classes]: YOLOv5's 85, the issue's 22), unless
the output is a Softmax/LogSoftmax over that axis (class scores per position, a recogniser's [N, T, C]: their top-1
per position speaks for them; a rare class's probability column is mostly rounding). Nothing else is cut by
default: [N, C] class scores or box offsets hold one kind of quantity (MTCNN, PP-OCR cls, the MNIST models), and an
NCHW map's channel axis cannot be told from its shape alone (PP-OCR det's is 1). ``--slices OUTPUT:AXIS`` cuts any
output per entry of AXIS (not 0, the samples; YOLOv8's [N, 84, 8400]: axis 1), ``--slices OUTPUT:AXIS:0-3,4-87``
into groups of entries (inclusive ranges: the boxes, the classes), ``--slices OUTPUT:none`` not at all.

Math, per slice s over all feeds, x the original's values and y the candidate's (finite in both):
  cosine_s = <x_s, y_s> / (|x_s| |y_s|), 1 when both are zero, 0 when only y_s is;
  its standard error over the samples is the jackknife of ``metrics.OutputStats.cosine_se``, per slice.
A slice whose original is zero or at most FLAT (1e-6) of the output's largest slice (max |x_s| <= FLAT · max |x|)
carries nothing the output's own cosine and rel error do not already judge: it is reported as flat and not gated
(its cosine would be rounding over rounding). A constant slice c·1 needs no such rule: the uncentred cosine of c·1
and c·1 + e is 1 - O(|e|²/|c|²). Nothing here divides by zero, so no slice is NaN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from .errors import InputError, UsageError

SMALL_CHANNELS = 128
FLAT = 1e-6
_GROUPS = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


@dataclass(frozen=True)
class SliceSpec:
    """Cut ``output`` along ``axis`` (None: not at all), per entry, or into ``groups`` (inclusive index ranges)."""

    output: str
    axis: int | None
    groups: tuple[tuple[int, int], ...] = ()

    def __str__(self) -> str:
        if self.axis is None:
            return f"{self.output}:none"
        return f"{self.output}:{self.axis}" + (":" + ",".join(f"{a}-{b}" for a, b in self.groups)
                                               if self.groups else "")


def parse_slices(text: str) -> SliceSpec:
    """``OUTPUT:AXIS``, ``OUTPUT:AXIS:a-b,c,...`` or ``OUTPUT:none`` (an output name may hold ':')."""
    parts = text.rsplit(":", 2)
    groups: tuple[tuple[int, int], ...] = ()
    if len(parts) == 3 and re.fullmatch(r"-?\d+", parts[1]) and _GROUPS.match(parts[2]):
        head, last = parts[0], parts[1]
        groups = tuple(_range(g) for g in parts[2].split(","))
    else:
        head, _, last = text.rpartition(":")
    if not head:
        raise UsageError(f"--slices '{text}': give OUTPUT:AXIS, OUTPUT:AXIS:a-b,c-d or OUTPUT:none")
    if last == "none":
        return SliceSpec(head, None)
    if not re.match(r"^-?\d+$", last):
        raise UsageError(f"--slices '{text}': the axis '{last}' is not an integer (or 'none')")
    return SliceSpec(head, int(last), groups)


def _range(text: str) -> tuple[int, int]:
    a, _, b = text.partition("-")
    lo, hi = int(a), int(b or a)
    if hi < lo:
        raise UsageError(f"--slices: range {text} runs backwards")
    return lo, hi


def check_slices(specs: Sequence[SliceSpec], model: onnx.ModelProto) -> None:
    """Refuse, before any work, a spec naming no output, twice the same output, or an axis the output's rank (when
    the graph states it) does not have or that is 0 (the samples)."""
    outputs = {o.name: o for o in model.graph.output}
    seen: set[str] = set()
    for s in specs:
        if s.output not in outputs:
            raise UsageError(f"--slices names no output '{s.output}'; outputs: {', '.join(outputs)}")
        if s.output in seen:
            raise UsageError(f"--slices names output '{s.output}' twice")
        seen.add(s.output)
        t = outputs[s.output].type.tensor_type
        rank = len(t.shape.dim) if t.HasField("shape") else None
        if s.axis is not None and rank is not None and not -rank <= s.axis < rank:
            raise UsageError(f"--slices {s}: output '{s.output}' has rank {rank}")
        if s.axis is not None and rank is not None and s.axis % rank == 0:
            raise UsageError(f"--slices {s}: axis 0 holds the samples; give a channel axis")


def default_slicing(name: str, shape: Sequence[int], sequence: bool) -> SliceSpec | None:
    """The module docstring's rule for an output of this shape (``sequence``: a Softmax over its last axis)."""
    if len(shape) >= 3 and 2 <= shape[-1] <= SMALL_CHANNELS and not sequence:
        return SliceSpec(name, len(shape) - 1)
    return None


@dataclass
class SliceStats:
    """Per slice sums over all feeds: <x, y>, |x|², |y|², max |x|, and per sample the same three terms."""

    spec: SliceSpec
    labels: list[str] = field(default_factory=list)
    terms: np.ndarray | None = None              # [slices, 3]
    ref_max: np.ndarray | None = None            # [slices]
    rows: list[np.ndarray] = field(default_factory=list)    # per feed [samples, slices, 3]

    def _members(self, size: int) -> list[np.ndarray]:
        if not self.spec.groups:
            return [np.array([i]) for i in range(size)]
        if max(hi for _, hi in self.spec.groups) >= size:
            raise InputError(f"--slices {self.spec}: axis {self.spec.axis} of output '{self.spec.output}' has "
                             f"{size} entries")
        return [np.arange(lo, hi + 1) for lo, hi in self.spec.groups]

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add one feed (float64, non-finite values already zeroed in both)."""
        axis = self.spec.axis % x.ndim if self.spec.axis is not None else 0
        size = x.shape[axis]
        xs = np.moveaxis(x, axis, -1).reshape(x.shape[0], -1, size)
        ys = np.moveaxis(y, axis, -1).reshape(x.shape[0], -1, size)
        per = np.stack([np.einsum("ijk,ijk->ik", xs, ys), np.einsum("ijk,ijk->ik", xs, xs),
                        np.einsum("ijk,ijk->ik", ys, ys)], axis=-1)              # [samples, channels, 3]
        members = self._members(size)
        grouped = np.stack([per[:, m].sum(axis=1) for m in members], axis=1)
        top = np.abs(xs).max(axis=(0, 1)) if xs.size else np.zeros(size)
        peak = np.array([top[m].max() for m in members])
        if self.terms is None:
            self.labels = [f"{m[0]}" if len(m) == 1 else f"{m[0]}-{m[-1]}" for m in members]
            self.terms, self.ref_max = np.zeros((len(members), 3)), np.zeros(len(members))
        if grouped.shape[1] != len(self.labels):
            raise InputError(f"output '{self.spec.output}': axis {axis} changed size between feeds ({size} entries "
                             f"now); give --slices {self.spec.output}:none")
        self.terms += grouped.sum(axis=0)
        self.ref_max = np.maximum(self.ref_max, peak)
        self.rows.append(grouped)

    def cosines(self) -> np.ndarray:
        """Cosine per slice; NaN for a flat slice (not gated; see the module docstring)."""
        assert self.terms is not None and self.ref_max is not None
        return _cosine(self.terms) + np.where(self.flat(), np.nan, 0.0)

    def flat(self) -> np.ndarray:
        assert self.ref_max is not None
        return self.ref_max <= FLAT * max(float(self.ref_max.max()), 0.0) if self.ref_max.size else self.ref_max > 0

    def worst(self) -> tuple[str, float, float] | None:
        """(label, cosine, standard error) of the worst slice that is not flat; None when every slice is flat."""
        if self.terms is None:
            return None
        cos = self.cosines()
        if np.isnan(cos).all():
            return None
        k = int(np.nanargmin(cos))
        return self.labels[k], float(cos[k]), self._se(k)

    def _se(self, k: int) -> float:
        t = np.concatenate([r[:, k] for r in self.rows])          # [samples, 3]
        if len(t) < 2:
            return 0.0
        loo = _cosine(t.sum(axis=0) - t)
        return float(np.sqrt((len(t) - 1) / len(t) * np.sum((loo - loo.mean()) ** 2)))

    def to_dict(self) -> dict[str, Any]:
        w = self.worst()
        return {"spec": str(self.spec), "slices": len(self.labels),
                "flat": int(self.flat().sum()) if self.terms is not None else 0,
                "worst": None if w is None else {"slice": w[0], "cosine": w[1], "se": w[2]}}


def _cosine(t: np.ndarray) -> np.ndarray:
    """Cosine from (<x, y>, |x|², |y|²) on the last axis: 1 when both norms are 0, 0 when one is."""
    dot, a, b = t[..., 0], t[..., 1], t[..., 2]
    norms = np.sqrt(a * b)
    both_zero = (a == 0) & (b == 0)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
