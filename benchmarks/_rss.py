"""Run one quantizer in a fresh Python process and measure it: wall time and peak RSS (helper of bench_quantize).

    python benchmarks/_rss.py SPEC.json RESULT.json

SPEC: ``{"tool": "graphopt" | "ort", "model": IN.onnx, "out": OUT.onnx, "calib": CALIB.npz, "config": {...}}``.
The process imports only what its tool needs (graphopt imports onnxruntime too; onnxruntime's quantizer does not
import graphopt), records its RSS after the imports (``base_rss_kb``), quantizes IN into OUT with the calibration
samples of CALIB (an .npz with exactly the samples to use) and writes RESULT: ``seconds`` (perf_counter around
calibration + quantization + saving; imports and interpreter start-up are outside), ``cpu_seconds`` (user +
system time of the process over the same span, all threads), ``peak_rss_kb`` (VmHWM of
/proc/self/status: the high-water mark of the whole process, imports included), ``base_rss_kb`` and tool details.

Both tools read the calibration samples *streaming* from the .npz (graphopt through its own reader; onnxruntime
through ``NpzReader`` below, a CalibrationDataReader that reads ``batch`` rows at a time from the zip member), so
neither process holds the whole calibration set as input arrays: what the peak shows is what the quantizer itself
keeps.

graphopt config: ``{"options": {"method": "kl", ...}}`` — the ``quantize`` pass alone, through the same pipeline
the CLI runs (load, pass, cleanup + checker, save), without the final validation on evaluation data.
onnxruntime config: ``{"method": "MinMax"|"Entropy"|"Percentile", "per_channel": bool, "activation": "QUInt8"|
"QInt8", "calibrator": {"num_bins": 2048, ...} | null, "batch": 1, "extra_options": {...}}``. With ``calibrator``
set, the ranges are computed by ``create_calibrator(..., extra_options=calibrator)`` (quantize_static's own
extra_options cannot reach num_bins / num_quantized_bins in onnxruntime 1.32: it only forwards
CalibTensorRangeSymmetric, CalibMovingAverage(Constant), CalibMaxIntermediateOutputs and CalibPercentile), saved
with ``save_tensors_data`` and handed to ``quantize_static(..., calibration_cache_path=...)``; everything else is
quantize_static as a user calls it. quantize_static's augmented model goes to its own temporary directory.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cpu() -> float:
    """User + system CPU seconds of this process, all threads (robust to other processes on the machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class NpzReader:
    """onnxruntime CalibrationDataReader over an .npz of arrays stacked on axis 0, ``batch`` rows per feed, read
    from the zip member as it goes (the labels key ``__labels__`` is skipped)."""

    def __init__(self, path: str, input_names: list[str], batch: int = 1) -> None:
        import zipfile

        from numpy.lib import format as npformat

        self.batch = batch
        self.zip = zipfile.ZipFile(path)
        self.members = {}
        self.n = None
        for name in input_names:
            f = self.zip.open(name + ".npy")
            version = npformat.read_magic(f)
            reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            assert not fortran
            self.members[name] = (f, shape, dtype)
            self.n = shape[0] if self.n is None else min(self.n, shape[0])
        self.i = 0

    def get_next(self):
        import numpy as np

        if self.i >= self.n:
            return None
        take = min(self.batch, self.n - self.i)
        feed = {}
        for name, (f, shape, dtype) in self.members.items():
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            feed[name] = np.frombuffer(f.read(take * row), dtype=dtype).reshape((take, *shape[1:])).copy()
        self.i += take
        return feed

    def __len__(self) -> int:
        return -(-self.n // self.batch)


def run_graphopt(spec: dict) -> dict:
    from graphopt import io as gio
    from graphopt.calibration.readers import open_source
    from graphopt.passes.base import PassContext
    from graphopt.pipeline import make_spec, run_pipeline

    base = _status_kb("VmRSS")
    c0 = _cpu()
    t0 = time.perf_counter()
    model = gio.load_model(spec["model"])
    calib = open_source(spec["calib"], model)
    ctx = PassContext(original=model, calib=calib)
    out, records = run_pipeline(model, [make_spec("quantize", spec["config"].get("options", {}))], ctx)
    gio.save_model(out, spec["out"])
    seconds = time.perf_counter() - t0
    step = next(rec for rec in records if rec.spec.startswith("quantize"))   # after its prerequisites
    r = step.result
    return {"seconds": seconds, "cpu_seconds": _cpu() - c0, "base_rss_kb": base, "counts": r.counts,
            "pass_seconds": step.seconds,
            "notes": [n for n in r.notes if not n.startswith(("layer ", "left float"))][:12],
            "left_float": [n.split("'")[1] for n in r.notes if n.startswith("left float: tensor '")],
            "float_layers": sum(1 for row in r.layers if row["status"] != "int8")}


def run_ort(spec: dict) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, create_calibrator, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    base = _status_kb("VmRSS")
    cfg = spec["config"]
    method = getattr(CalibrationMethod, cfg.get("method", "MinMax"))
    c0 = _cpu()
    t0 = time.perf_counter()
    m = onnx.load(spec["model"], load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    del m
    reader = NpzReader(spec["calib"], names, cfg.get("batch", 1))
    kwargs = dict(quant_format=QuantFormat.QDQ, per_channel=cfg.get("per_channel", False),
                  activation_type=getattr(QuantType, cfg.get("activation", "QInt8")),
                  weight_type=getattr(QuantType, cfg.get("weight", "QInt8")), calibrate_method=method,
                  extra_options=cfg.get("extra_options") or None)
    if cfg.get("default"):  # quantize_static(model_input, model_output, reader): every other argument at its default
        kwargs = {}
    with tempfile.TemporaryDirectory(prefix="bench_ort_calib_") as tmp:
        if cfg.get("calibrator"):
            op_types = list(set(QLinearOpsRegistry) | set(QDQRegistry))   # what quantize_static calibrates
            cal = create_calibrator(Path(spec["model"]), op_types,
                                    augmented_model_path=str(Path(tmp) / "augmented_model.onnx"),
                                    calibrate_method=method, extra_options=cfg["calibrator"])
            cal.collect_data(reader)
            ranges = cal.compute_data()
            del cal
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(ranges, cache)
            quantize_static(spec["model"], spec["out"], None, calibration_cache_path=cache, **kwargs)
        else:
            quantize_static(spec["model"], spec["out"], reader, **kwargs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": _cpu() - c0, "base_rss_kb": base}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    with tempfile.TemporaryDirectory(prefix="bench_quant_cwd_") as cwd:
        os.chdir(cwd)   # anything a tool writes to the working directory lands here and is removed
        res = run_graphopt(spec) if spec["tool"] == "graphopt" else run_ort(spec)
        os.chdir("/")
    res["peak_rss_kb"] = _status_kb("VmHWM")
    res["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(sys.argv[2]).write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
