"""quantize-dynamic and quantize-weights against onnxruntime's quantize_dynamic and MatMulNBitsQuantizer, one run.

    python benchmarks/bench_dynamic.py [--only decoder,minilm,mlp,vit] [--blocks 32,128] [--write FILE.md]

Models: models/decoder.onnx (byte-level GPT, decoder_calib/eval.npz), MiniLM-L6 from ~/.cache/graphopt-bench/minilm/
(benchmarks/build_minilm.py; skipped when absent), models/mnist_mlp.onnx and mnist_vit.onnx (mnist_calib/eval.npz).
Each quantizer runs alone in a fresh process (``--worker SPEC RESULT``, the result written to a file): wall time from
the worker's start (its imports included) and peak RSS (VmHWM). Settings are the same on both sides: dynamic
int8 with each tool's defaults (onnxruntime: one weight scale per tensor; graphopt: per-channel=auto); weight-only
4 bits, asymmetric, accuracy_level 4, at each block size of ``--blocks``: onnxruntime's MatMulNBitsQuantizer with
its default (C++ round-to-nearest, asked to take MatMul and Gather, as graphopt's embeddings=true), its RTN and
its GPTQ (both Intel Neural Compressor code, MatMul only); calibration for GPTQ/AWQ: the first 128
samples of the calibration file on both sides (onnxruntime's reader gives them in batches of 16: its GPTQ runs the
whole model once per batch for every distinct MatMul input, see benchmarks/results/weightonly.md).
Then, in this process, every model of a set together: file size; latency (onnxruntime CPU, 1 intra-op thread,
default optimizations, runs interleaved, medians of the calling thread's CPU time, ``graphopt.runtime``) at 1 and
64 samples; fidelity on the evaluation data against float: the decoder's perplexity on all 16,384 next-byte targets
(models/decoder_metric.py) and per-position next-byte top-1 agreement; MiniLM's mean embedding cosine; MNIST's
mean output cosine, top-1 agreement and accuracy on labels.
onnxruntime's GPTQ imports torch (neural_compressor.util.to_numpy): its worker runs under /work/venv-minilm/bin/python
(onnxruntime 1.32.0 there too) when that exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _rss import _status_kb  # noqa: E402  (benchmarks/ is this script's directory)
MODELS = ROOT / "models"
MINILM = Path.home() / ".cache" / "graphopt-bench" / "minilm"
SETS = {"decoder": (MODELS / "decoder.onnx", MODELS / "decoder_calib.npz", MODELS / "decoder_eval.npz"),
        "minilm": (MINILM / "minilm.onnx", MINILM / "minilm_calib.npz", MINILM / "minilm_eval.npz"),
        "mlp": (MODELS / "mnist_mlp.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
        "vit": (MODELS / "mnist_vit.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz")}
CALIB_SAMPLES = 128
ORT_BATCH = 16
TORCH_PYTHON = Path("/work/venv-minilm/bin/python")


def configs(key: str, blocks: list[int]) -> list[dict]:
    """The quantizers run on one model set."""
    out = [{"label": "ort quantize_dynamic", "tool": "ort-dynamic"},
           {"label": "graphopt quantize-dynamic", "tool": "graphopt", "pass": "quantize-dynamic"}]
    for b in blocks:
        out += [{"label": f"ort MatMulNBits default b{b}", "tool": "ort-nbits", "algo": "default", "block": b},
                {"label": f"ort MatMulNBits rtn b{b}", "tool": "ort-nbits", "algo": "rtn", "block": b},
                {"label": f"ort MatMulNBits gptq b{b}", "tool": "ort-nbits", "algo": "gptq", "block": b}]
        for m in ("rtn", "gptq", "awq") if key != "minilm" or b == blocks[0] else ("rtn", "gptq"):
            p = f"quantize-weights:method={m},block-size={b}"
            out.append({"label": f"graphopt quantize-weights {m} b{b}", "tool": "graphopt", "pass": p})
            if key == "minilm" and b == blocks[0] and m != "awq":   # the embedding table is half of MiniLM
                out.append({"label": f"graphopt quantize-weights {m} b{b} embeddings=false", "tool": "graphopt",
                            "pass": p + ",embeddings=false"})
    if key == "minilm":
        out.append({"label": "graphopt quantize-weights rtn b32 format=qdq", "tool": "graphopt",
                    "pass": "quantize-weights:method=rtn,block-size=32,format=qdq", "opset21": True})
    return out


class NpzBatches:
    """onnxruntime CalibrationDataReader over the first CALIB_SAMPLES samples of an .npz, ORT_BATCH at a time."""

    def __init__(self, path: str) -> None:
        d = np.load(path)
        keys = [k for k in d.files if not k.startswith("__")]
        n = min(CALIB_SAMPLES, len(d[keys[0]]))
        self.batches = iter([{k: d[k][i:i + ORT_BATCH] for k in keys} for i in range(0, n, ORT_BATCH)])

    def get_next(self):
        return next(self.batches, None)

    def __iter__(self):
        return iter(self.get_next, None)


def worker(spec: dict) -> dict:
    """Quantize in this (fresh) process."""
    src, out, tool = spec["model"], spec["out"], spec["tool"]
    if tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    elif tool == "ort-nbits":
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mq
        if spec["algo"] == "gptq":
            algo = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzBatches(spec["calib"]))
        elif spec["algo"] == "rtn":
            algo = mq.RTNWeightOnlyQuantConfig()
        else:           # the C++ quantizer (round to nearest), MatMul and the embedding Gather
            algo = mq.DefaultWeightOnlyQuantConfig(block_size=spec["block"], is_symmetric=False, accuracy_level=4,
                                                   op_types_to_quantize=("MatMul", "Gather"))
        q = mq.MatMulNBitsQuantizer(onnx.load(src), block_size=spec["block"], is_symmetric=False, accuracy_level=4,
                                    algo_config=algo)
        q.process()
        q.model.save_model_to_file(out, False)
    else:
        from graphopt import io
        from graphopt.api import optimize
        model = src
        if spec.get("opset21"):
            import onnx
            model = onnx.version_converter.convert_version(onnx.load(src), 21)
        data = "method=rtn" not in spec["pass"] and "dynamic" not in spec["pass"]
        m, _ = optimize(model, [spec["pass"]], calib_data=spec["calib"] if data else None, validate_output=False,
                        latency_runs=0, calib_samples=CALIB_SAMPLES)
        io.save_model(m, out)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so every worker reported the parent's peak
    return {"seconds": time.perf_counter() - T0, "peak_rss_mb": _status_kb("VmHWM") / 1024}


def quantize(key: str, cfg: dict, tmp: Path) -> dict:
    """Run one quantizer in a fresh process; its result or the reason it failed."""
    src, calib, _ = SETS[key]
    out, spec, result = (tmp / f"{key}_{cfg['label'].replace(' ', '_')}{s}" for s in (".onnx", ".json", ".out.json"))
    spec.write_text(json.dumps({**cfg, "model": str(src), "out": str(out), "calib": str(calib)}))
    python = str(TORCH_PYTHON) if cfg.get("algo") == "gptq" and TORCH_PYTHON.exists() else sys.executable
    r = subprocess.run([python, __file__, "--worker", str(spec), str(result)], capture_output=True, text=True,
                       env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if r.returncode or not result.exists():
        lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
        return {"error": f"exit {r.returncode}: " + (lines[-1][:160] if lines else "no output")}
    return {**json.loads(result.read_text()), "path": str(out)}


def outputs(path: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnx
    from graphopt.runtime import make_session
    sess = make_session(onnx.load(path), path)
    n = len(next(iter(feed.values())))
    return np.concatenate([sess.run(None, {k: v[i:i + 64] for k, v in feed.items()})[0] for i in range(0, n, 64)])


def fidelity(key: str, ref: np.ndarray, out: np.ndarray, data) -> dict:
    """Fidelity of ``out`` against float's ``ref`` on the evaluation data (module docstring)."""
    if key == "decoder":
        from models.decoder_metric import log_perplexity
        labels = np.concatenate([data["ids"][:, 1:], data["__labels__"][:, None]], axis=1)
        return {"ppl": float(np.exp(log_perplexity(out, labels))),
                "top1": float(np.mean(out.argmax(-1) == ref.argmax(-1)))}
    a, b = (o.reshape(len(o), -1).astype(np.float64) for o in (ref, out))
    r = {"cosine": float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))}
    if key in ("mlp", "vit"):
        r["top1"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        r["accuracy"] = float(np.mean(b.argmax(1) == data["__labels__"]))
    return r


def feeds(data, rows: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.resize(data[k], (rows, *data[k].shape[1:]))) for k in data.files
            if not k.startswith("__")}


def row(key: str, label: str, r: dict, lat: dict, i: int, fid: dict, base: dict) -> str:
    size = os.path.getsize(r["path"]) / 1e6
    quality = (f"ppl {fid['ppl']:.3f} ({100 * (fid['ppl'] / base['ppl'] - 1):+.1f}%)" if "ppl" in fid
               else f"cos {fid['cosine']:.5f}")
    acc = f"{100 * fid['accuracy']:.1f}" if "accuracy" in fid else ""
    top1 = f"{fid['top1']:.4f}" if "top1" in fid else ""
    return (f"| {key} | {label} | {size:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{lat[1][i]:.3f} ({lat[1][0] / lat[1][i]:.2f}x) | {lat[64][i]:.2f} ({lat[64][0] / lat[64][i]:.2f}x) | "
            f"{quality} | {top1} | {acc} |")


def bench(key: str, blocks: list[int], tmp: Path) -> list[str]:
    import onnx
    from graphopt.errors import InputError
    from graphopt.runtime import measure_latency
    src, _, evals = SETS[key]
    if not src.exists():
        return [f"| {key} | (absent: run benchmarks/build_minilm.py) |"]
    rows: dict[str, dict] = {"float": {"seconds": 0.0, "peak_rss_mb": float("nan"), "path": str(src)}}
    for cfg in configs(key, blocks):
        rows[cfg["label"]] = quantize(key, cfg, tmp)
        print(key, cfg["label"], {k: v for k, v in rows[cfg["label"]].items() if k != "path"}, flush=True)
    data = np.load(evals)
    feed = feeds(data, len(data[data.files[0]]))
    ref = outputs(str(src), feed)
    fids = {}
    for c in [c for c, r in rows.items() if "error" not in r]:
        try:
            fids[c] = fidelity(key, ref, outputs(rows[c]["path"], feed), data)
        except InputError as e:         # a quantizer wrote a model onnxruntime refuses
            rows[c] = {"error": str(e).replace(str(tmp) + "/", "")[:300]}
    ok = [c for c, r in rows.items() if "error" not in r]
    models = [onnx.load(rows[c]["path"]) for c in ok]
    lat = {n: measure_latency(models, feeds(data, n), runs=300 if n == 1 else 25, budget_s=90, clock=time.thread_time)
           for n in (1, 64)}
    lines = [row(key, c, rows[c], lat, i, fids[c], fids["float"]) for i, c in enumerate(ok)]
    return lines + [f"| {key} | {c} | failed: {r['error']} |" for c, r in rows.items() if "error" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2)
    ap.add_argument("--only", default="decoder,minilm,mlp,vit")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--write")
    a = ap.parse_args()
    if a.worker:
        result = worker(json.loads(Path(a.worker[0]).read_text()))
        Path(a.worker[1]).write_text(json.dumps(result))
        return
    import onnxruntime as ort
    from graphopt.runtime import cpu_info
    head = [f"CPU: {cpu_info()}; onnxruntime {ort.__version__}; load average at start {os.getloadavg()[0]:.1f}", "",
            "| model | quantizer | file MB | quant s | peak RSS MB | ms, 1 sample (vs float) | ms, 64 samples (vs float)"
            " | perplexity / cosine | top-1 agree | accuracy % |", "|---|---|---|---|---|---|---|---|---|---|"]
    blocks = [int(b) for b in a.blocks.split(",")]
    lines = head
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.only.split(","):
            lines += bench(k, blocks, Path(tmp))
            print("\n".join(lines), flush=True)
            if a.write:             # each model set's rows as soon as they are measured
                Path(a.write).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
