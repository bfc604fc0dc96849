"""``quantize`` inside Loop/Scan bodies (issue 24 coverage): on a Scan whose body is the trained mnist_mlp and a Loop
whose body is the trained mnist_cnn (tests/graphs.py: mnist_scan_model / mnist_loop_model), over sequences of 4 MNIST
images (models/mnist_calib.npz for calibration, mnist_eval.npz held out, its labels per step), this measures
graphopt's default result and onnxruntime's ``quantize_static`` (MinMax, per channel, QDQ, U8S8) on the same model
and data: held-out accuracy of the per-step logits, their cosine to float, the int8 nodes inside the body, and
latency against float (onnxruntime default optimizations, 1 thread, interleaved runs, medians; wall and thread CPU
time), with the pass's own time.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_qloop.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from graphopt.api import optimize  # noqa: E402
from graphopt.runtime import cpu_info, measure_latency  # noqa: E402
from graphs import mnist_loop_model, mnist_scan_model, mnist_sequences  # noqa: E402


class Reader(CalibrationDataReader):
    def __init__(self, seq: np.ndarray) -> None:
        self.it = iter([{"seq": seq[i:i + 16]} for i in range(0, len(seq), 16)])

    def get_next(self):
        return next(self.it, None)


def body_int8(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes inside the Loop/Scan body."""
    body = next(a.g for n in model.graph.node for a in n.attribute if a.name == "body")
    return sum(n.op_type == "QuantizeLinear" for n in body.node)


def logits(model: onnx.ModelProto, seq: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"seq": seq})[0].reshape(-1, 10)


def main() -> None:
    calib, ev = mnist_sequences("calib"), mnist_sequences("eval")
    labels = ev["__labels__"].reshape(-1)
    print(f"CPU: {cpu_info()}; onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/c.npz", seq=calib["seq"])
        np.savez(f"{tmp}/e.npz", seq=ev["seq"])
        for name, make in (("scan_mlp", mnist_scan_model), ("loop_cnn", mnist_loop_model)):
            model = make()
            onnx.save(model, f"{tmp}/{name}.onnx")
            t0 = time.perf_counter()
            ours, report = optimize(f"{tmp}/{name}.onnx", ["quantize"], calib_data=f"{tmp}/c.npz",
                                    val_data=f"{tmp}/e.npz", force=True, latency_runs=0)
            took = time.perf_counter() - t0
            quantize_static(f"{tmp}/{name}.onnx", f"{tmp}/{name}_ort.onnx", Reader(calib["seq"]),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            theirs = onnx.load(f"{tmp}/{name}_ort.onnx")
            ref = logits(model, ev["seq"])
            feed = {"seq": ev["seq"][:1]}
            for label, m in (("graphopt", ours), ("quantize_static", theirs)):
                got = logits(m, ev["seq"])
                cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
                row = [f"{(got.argmax(1) == labels).mean():.4f}", f"{cos:.6f}", f"{body_int8(m)}"]
                for clock in (time.perf_counter, time.thread_time):
                    ratios = []
                    for _ in range(3):
                        f, q = measure_latency([model, m], feed, runs=400, budget_s=6.0, clock=clock)
                        ratios.append(f"{f / q:.3f}")
                    row.append("/".join(ratios))
                print(f"| {name} | {label} | float acc {(ref.argmax(1) == labels).mean():.4f} | " + " | ".join(row)
                      + (f" | {took:.2f} s |" if label == "graphopt" else " | |"))


if __name__ == "__main__":
    main()
