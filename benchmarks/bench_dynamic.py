"""quantize-dynamic and quantize-weights against onnxruntime's quantize_dynamic and MatMulNBitsQuantizer, one run.

    python benchmarks/bench_dynamic.py [--only mlp,vit,minilm] [--write benchmarks/results/weightonly.md]

Models: models/mnist_mlp.onnx, models/mnist_vit.onnx (mnist_calib.npz / mnist_eval.npz), MiniLM-L6 from
~/.cache/graphopt-bench/minilm/ (benchmarks/build_minilm.py; skipped when absent). Each quantizer runs in a fresh
process (``--worker``): quantization wall time and peak RSS (ru_maxrss, imports included). Then, in this process:
file size, latency (onnxruntime CPU, 1 thread, default optimizations, interleaved runs, medians; every model of a
row set measured together) at batch 1 and batch 64 (MiniLM: 64 tokens per sentence), and on the evaluation data
the mean per-sample cosine and top-1 agreement with float (MNIST: also accuracy on labels).
onnxruntime's GPTQ needs torch: its worker runs under /work/venv-minilm/bin/python (onnxruntime 1.32.0 there
too) when that exists. Same settings on both sides: dynamic int8 (onnxruntime's defaults: per-tensor weights; graphopt: per channel);
4 bits, block 32, asymmetric, accuracy_level 4 for MatMulNBits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models"
MINILM = Path.home() / ".cache" / "graphopt-bench" / "minilm"
SETS = {"mlp": (MODELS / "mnist_mlp.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
        "vit": (MODELS / "mnist_vit.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
        "minilm": (MINILM / "minilm.onnx", MINILM / "minilm_calib.npz", MINILM / "minilm_eval.npz")}
CONFIGS = ["ort quantize_dynamic", "graphopt quantize-dynamic", "ort MatMulNBits rtn", "ort MatMulNBits gptq",
           "graphopt quantize-weights rtn", "graphopt quantize-weights rtn accuracy-level=0",
           "graphopt quantize-weights gptq", "graphopt quantize-weights awq"]
# onnxruntime's GPTQ imports torch: run that worker with a Python that has it (build_minilm.py's venv)
TORCH_PYTHON = Path("/work/venv-minilm/bin/python")


def worker(spec: dict) -> dict:
    """Quantize in this (fresh) process; time and peak RSS."""
    t0 = time.perf_counter()
    name, src, out, calib = spec["config"], spec["model"], spec["out"], spec["calib"]
    if name == "ort quantize_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    elif name.startswith("ort MatMulNBits"):
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mq
        if name.endswith("gptq"):
            from onnxruntime.quantization.calibrate import CalibrationDataReader

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    d = np.load(calib)
                    keys = [k for k in d.files if not k.startswith("__")]
                    self.it = iter([{k: d[k][i:i + 1] for k in keys} for i in range(min(128, len(d[keys[0]])))])

                def get_next(self):
                    return next(self.it, None)
            algo = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=32)
        else:
            algo = mq.RTNWeightOnlyQuantConfig()
        q = mq.MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=False, accuracy_level=4,
                                    algo_config=algo)
        q.process()
        q.model.save_model_to_file(out, False)
    else:
        from graphopt.api import optimize
        from graphopt import io
        p = "quantize-dynamic" if "dynamic" in name else f"quantize-weights:method={name.split()[2]}" + (
            ",accuracy-level=0" if name.endswith("accuracy-level=0") else "")
        model, _ = optimize(src, [p], calib_data=calib if "rtn" not in p and "dynamic" not in p else None,
                            validate_output=False, latency_runs=0, calib_samples=128)
        io.save_model(model, out)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fidelity(ref_model: str, model: str, data: Path) -> tuple[float, float, float | None]:
    """(mean per-sample cosine of the first output, top-1 agreement, accuracy on labels or None) on ``data``."""
    from graphopt.runtime import make_session
    import onnx
    d = np.load(data)
    feed = {k: d[k] for k in d.files if not k.startswith("__")}
    outs = []
    for path in (ref_model, model):
        sess = make_session(onnx.load(path), path)
        outs.append(np.concatenate([sess.run(None, {k: v[i:i + 64] for k, v in feed.items()})[0]
                                    for i in range(0, len(next(iter(feed.values()))), 64)]))
    a, b = (o.reshape(len(o), -1).astype(np.float64) for o in outs)
    cos = float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))
    top1 = float(np.mean(a.argmax(1) == b.argmax(1)))
    acc = float(np.mean(b.argmax(1) == d["__labels__"])) if "__labels__" in d.files else None
    return cos, top1, acc


def feeds(data: Path, rows: int) -> dict[str, np.ndarray]:
    d = np.load(data)
    return {k: np.ascontiguousarray(np.resize(d[k], (rows, *d[k].shape[1:]))) for k in d.files if not k.startswith("__")}


def bench(key: str, tmp: Path) -> list[str]:
    import onnx
    from graphopt.runtime import measure_latency
    src, calib, evals = SETS[key]
    if not src.exists():
        return [f"| {key} | (absent: run benchmarks/build_minilm.py) |"]
    rows: dict[str, dict] = {"float": {"seconds": 0.0, "peak_rss_mb": float("nan"), "path": str(src)}}
    for cfg in CONFIGS:
        out = tmp / f"{key}_{cfg.replace(' ', '_')}.onnx"
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"config": cfg, "model": str(src), "out": str(out), "calib": str(calib)}))
        python = str(TORCH_PYTHON) if cfg.endswith("MatMulNBits gptq") and TORCH_PYTHON.exists() else sys.executable
        r = subprocess.run([python, __file__, "--worker", str(spec)], capture_output=True, text=True)
        result = [ln for ln in r.stdout.splitlines() if ln.startswith('{"seconds"')]
        if r.returncode or not result:
            rows[cfg] = {"error": (r.stderr.strip().splitlines() or ["no result"])[-1][:120]}
            continue
        rows[cfg] = {**json.loads(result[-1]), "path": str(out)}
    ok = [c for c, r in rows.items() if "error" not in r]
    models = [onnx.load(rows[c]["path"]) for c in ok]
    lat = {n: measure_latency(models, feeds(evals, n), runs=60 if n == 1 else 12, budget_s=60) for n in (1, 64)}
    lines = []
    for i, c in enumerate(ok):
        r = rows[c]
        cos, top1, acc = fidelity(str(src), r["path"], evals)
        size = os.path.getsize(r["path"]) / 1e6
        lines.append(f"| {key} | {c} | {size:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{lat[1][i]:.3f} ({lat[1][0] / lat[1][i]:.2f}x) | {lat[64][i]:.2f} ({lat[64][0] / lat[64][i]:.2f}x) | "
                     f"{cos:.5f} | {top1:.3f} | {'' if acc is None else f'{100 * acc:.1f}'} |")
    lines += [f"| {key} | {c} | failed: {r['error']} |" for c, r in rows.items() if "error" in r]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--only", default="mlp,vit,minilm")
    ap.add_argument("--write")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(Path(a.worker).read_text()))))
        return
    import onnxruntime as ort
    from graphopt.runtime import cpu_info
    head = [f"CPU: {cpu_info()}; onnxruntime {ort.__version__}; load average {os.getloadavg()[0]:.1f} (shared "
            "machine: latency is noisy)", "", "| model | quantizer | file MB | quant s | peak RSS MB | "
            "latency ms batch 1 (vs float) | latency ms batch 64 (vs float) | cosine | top-1 agree | accuracy % |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        lines = [ln for k in a.only.split(",") for ln in bench(k, Path(tmp))]
    text = "\n".join(head + lines)
    print(text)
    if a.write:
        Path(a.write).write_text(text + "\n")


if __name__ == "__main__":
    main()
