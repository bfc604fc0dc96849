"""The user's task metric: ``--metric FILE.py:function`` (or ``metric=`` in graphopt.api.optimize), loaded, checked
and called on the outputs of a set of feeds.

Contract: ``function(reference_outputs, candidate_outputs, labels) -> float``, higher is better. The outputs are
``{output name: ndarray}``, each the feeds' arrays stacked on axis 0 (the samples); where an output's shape differs
between feeds and they cannot be stacked, the function is called per feed and its values averaged, weighted by the
feed's samples. ``labels`` are the data's ``__labels__`` (class indices [N]), None when a feed has none.
Targets (graphopt.validate): ``--min-metric X``, the value must reach X; ``--max-metric-drop D``, it must be at
most D below the float model's own value, ``function(reference, reference, labels)`` (what a metric against labels,
such as a detector's mAP, reaches with float: the drop bound needs no guess of it). A metric that compares the
candidate with float's outputs reads its best on the reference itself, so the drop bound reads as a floor there too.
Bad metrics are one-line usage errors (exit 2) naming FILE.py:function: a missing file, an import that fails, no
such function, a call that raises, a value that is not a finite number. ``check`` calls it once, on the
reference's outputs of the first validation feed against themselves, before any pass runs.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UsageError, one_line


@dataclass(frozen=True)
class TaskMetric:
    """A metric function and the name messages give it (FILE.py:function, or the callable's name)."""

    fn: Callable[..., Any] = field(compare=False)
    name: str

    def __call__(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
        try:
            value = self.fn(ref, out, labels)
        except Exception as e:
            raise UsageError(f"--metric {self.name} raised {type(e).__name__}: {one_line(e)}") from None
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UsageError(f"--metric {self.name} returned {type(value).__name__}, not a number")
        if not math.isfinite(float(value)):
            raise UsageError(f"--metric {self.name} returned {value}, not a finite number")
        return float(value)


def load_metric(text: str) -> TaskMetric:
    """The function ``FILE.py:function`` names, imported from that file."""
    path_text, sep, name = text.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise UsageError(f"--metric '{text}': give FILE.py:function")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"--metric {text}: no file {path_text}")
    spec = importlib.util.spec_from_file_location(f"graphopt_metric_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--metric {text}: {path_text} cannot be imported as Python (name it .py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:    # a SyntaxError, an import the file needs, a sys.exit() in it
        raise UsageError(f"--metric {text}: importing {path_text} failed: {type(e).__name__}: {one_line(e)}") \
            from None
    fn = getattr(module, name, None)
    if fn is None:
        raise UsageError(f"--metric {text}: {path_text} has no function '{name}'")
    if not callable(fn):
        raise UsageError(f"--metric {text}: '{name}' in {path_text} is a {type(fn).__name__}, not a function")
    return TaskMetric(fn, text)


def as_metric(metric: Any) -> TaskMetric | None:
    """``metric`` as the API takes it: None, a TaskMetric, 'FILE.py:function', or a callable."""
    if metric is None or isinstance(metric, TaskMetric):
        return metric
    if isinstance(metric, str):
        return load_metric(metric)
    if callable(metric):
        return TaskMetric(metric, getattr(metric, "__qualname__", None) or repr(metric))
    raise UsageError(f"metric= takes a function or 'FILE.py:function', not {type(metric).__name__}")


@dataclass
class MetricInputs:
    """The outputs of both models and the labels, feed by feed, until the metric is called."""

    names: list[str]
    feeds: list[tuple[list[Any], list[Any], np.ndarray | None, int]] = field(default_factory=list)

    def add(self, ref: list[Any], out: list[Any], labels: np.ndarray | None, rows: int) -> None:
        self.feeds.append((ref, out, labels, rows))

    def values(self, metric: TaskMetric) -> tuple[float, float] | None:
        """(the reference's value against itself, the candidate's); None with no feed."""
        if not self.feeds:
            return None
        stacked = _stack([f[0] for f in self.feeds]), _stack([f[1] for f in self.feeds])
        labels = None if any(f[2] is None for f in self.feeds) else np.concatenate([f[2] for f in self.feeds])
        if stacked[0] is not None and stacked[1] is not None:
            ref, out = (dict(zip(self.names, s)) for s in stacked)
            return metric(ref, ref, labels), metric(ref, out, labels)
        total = sum(f[3] for f in self.feeds) or 1
        pairs = [(metric(dict(zip(self.names, r)), dict(zip(self.names, r)), lab),
                  metric(dict(zip(self.names, r)), dict(zip(self.names, o)), lab)) for r, o, lab, _ in self.feeds]
        return (sum(p[0] * f[3] for p, f in zip(pairs, self.feeds)) / total,
                sum(p[1] * f[3] for p, f in zip(pairs, self.feeds)) / total)


def _stack(feeds: list[list[Any]]) -> list[np.ndarray] | None:
    """Each output's arrays stacked on axis 0 over the feeds; None when some cannot be (other shapes, not arrays)."""
    if len(feeds) == 1:
        return list(feeds[0])
    out = []
    for arrays in zip(*feeds):
        if not all(isinstance(a, np.ndarray) and a.ndim and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
            return None
        out.append(np.concatenate(arrays))
    return out
