"""The calibration samples the quantize pass measures on, and the cost model its time budgets are spent in.

A budget (the fallback's sensitivity sweep and search, the full mean correction of each build) is spent in modelled
seconds, not measured ones: one run of the float model on one sample is taken to cost
    RUN_OVERHEAD_S + MACs / RUN_MACS_PER_S
(``modelled_cost``, MACs counted by ``runtime.count_macs``), so how many samples a step uses, and hence what the pass
writes, depends on the model and the data only, never on the machine or its load. Only where the MACs cannot be
counted is a run timed (``sample_cost``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from graphopt.calibration.feeds import first_row_feed
from graphopt.calibration.readers import Batch

from graphopt.runtime import count_macs

from ..judge import FALLBACK_SAMPLES, judge_samples

# The cost model: the switchable model measured 6-10 GMAC/s on an AMD EPYC Zen 2 core pair (PP-OCRv4 det 8.3,
# rec 9.3, MiniLM 10.5; MNIST 6, where the ~0.5 ms per run dominates).
RUN_MACS_PER_S = 8e9
RUN_OVERHEAD_S = 5e-4
REFIT_BUDGET_S = 4.0        # for the full mean correction of each real build (bias-correction)
REFIT_RUNS = 2.5            # ... which runs the float model and the quantized one (fake quantization, ~1.5x)
REFIT_FEED_BYTES = 16 << 20  # ... on feeds of at most this many input bytes (one row at least)


def first_rows(batches: list[Batch], n: int) -> list[Batch]:
    """The first ``n`` samples of ``batches``, cutting the last batch where every input has rows to cut."""
    out: list[Batch] = []
    left = n
    for b in batches:
        if left <= 0:
            break
        rows = b.rows
        if rows > left and all(isinstance(v, np.ndarray) and v.ndim and v.shape[0] == rows for v in b.feed.values()):
            b = Batch({k: v[:left] for k, v in b.feed.items()}, None if b.labels is None else b.labels[:left])
            rows = left
        out.append(b)
        left -= rows
    return out


def first_row(batches: list[Batch]) -> list[Batch]:
    """The first sample of ``batches`` as a one-row batch without labels ([] when there is none)."""
    first = first_rows(batches, 1)
    return [Batch(first_row_feed(first[0].feed), None)] if first else []


def modelled_cost(float_model: onnx.ModelProto, one: list[Batch]) -> float | None:
    """RUN_OVERHEAD_S + MACs / RUN_MACS_PER_S: the modelled seconds of one run of the float model on ``one`` (a
    one-row batch, ``first_row``); None where the MACs cannot be counted."""
    macs = count_macs(float_model, one[0].feed) if one else None
    return RUN_OVERHEAD_S + macs / RUN_MACS_PER_S if macs else None


def sample_cost(float_model: onnx.ModelProto, one: list[Batch], run: Callable[[], Any]) -> float:
    """Seconds one sample of the switchable model is taken to cost: ``modelled_cost``, or, only where the MACs
    cannot be counted, the second of two ``run()`` timed (the first fills the reference outputs' cache)."""
    modelled = modelled_cost(float_model, one)
    if modelled is not None:
        return modelled
    run()
    t0 = time.perf_counter()
    run()
    return max(time.perf_counter() - t0, 1e-4)


def refit_feeds(float_model: onnx.ModelProto, calib: Iterable[Batch]) -> list[dict[str, np.ndarray]]:
    """The first calibration samples, as many as the full mean correction can run in REFIT_BUDGET_S modelled
    seconds (it runs the float and the quantized model: REFIT_RUNS runs), in feeds of at most REFIT_FEED_BYTES of
    inputs (at least one row), since it holds a feed's live tensors at every cut."""
    batches = judge_samples(calib)
    per_sample = modelled_cost(float_model, first_row(batches)) or 1.0
    feeds = []
    for b in first_rows(batches, int(min(FALLBACK_SAMPLES, max(1, REFIT_BUDGET_S / (REFIT_RUNS * per_sample))))):
        arrays = [v for v in b.feed.values() if isinstance(v, np.ndarray)]
        cuttable = b.rows > 1 and all(v.ndim and v.shape[0] == b.rows for v in arrays)
        step = max(1, REFIT_FEED_BYTES * b.rows // max(sum(v.nbytes for v in arrays), 1)) if cuttable else b.rows
        feeds += [{k: v[i:i + step] for k, v in b.feed.items()} if cuttable else b.feed
                  for i in range(0, b.rows, step)]
    return feeds
