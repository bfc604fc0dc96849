"""The collector: observe chosen tensors of a model while calibration data streams through it.

It adds the tensors to observe as extra outputs of an in-memory *copy* of the model (no files anywhere), runs the
copy in onnxruntime (CPU) batch by batch, hands each batch's arrays to the tensors' observers and drops them, so
memory holds one batch of activations however many samples there are. A tqdm progress bar counts samples when
stderr is a terminal.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from graphopt.errors import InputError, one_line

from .observers import MinMaxObserver
from .readers import Batch


def collect(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[Batch],
            observers: Mapping[str, MinMaxObserver], *, max_samples: int | None = None,
            threads: int | None = None) -> int:
    """Feed every batch through the model and update ``observers[name]`` with each tensor; return samples seen."""
    names = list(dict.fromkeys(tensors))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnxruntime cannot run the model for calibration: {one_line(e)}") from e
    seen = 0
    with tqdm(total=max_samples, unit="sample", desc="calibrating", leave=False, disable=None) as bar:
        for batch in batches:
            try:
                values = sess.run(names, batch.feed)
            except Exception as e:
                raise InputError(f"the model fails on the calibration data: {one_line(e)}") from e
            for name, value in zip(names, values):
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    observers[name].update(value)
            first = next(iter(batch.feed.values()), None)
            n = first.shape[0] if isinstance(first, np.ndarray) and first.ndim else 1
            seen += n
            bar.update(n)
            del values
            if max_samples is not None and seen >= max_samples:
                break
    return seen
