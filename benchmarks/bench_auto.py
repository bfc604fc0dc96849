"""Measure the target-driven settings: ``prune-channels:ratio=auto`` and ``svd:rank=auto``, alone and followed by
``quantize``, against ``quantize`` alone, at the default targets, on held-out data.

    python benchmarks/bench_auto.py [--models SUBSTR ...] [--write FILE] [--latency-runs N]

Models: the four of ``models/`` and the fetched ones cached in ``~/.cache/graphopt-bench`` (PP-OCR det/rec/cls,
MTCNN rnet/onet, Magika, MiniLM when built), each with its calibration and evaluation data. Per model and pipeline,
through ``graphopt.optimize`` exactly as the CLI runs it (default targets: cosine 0.98, top-1 0.95, accuracy drop
1 point; calibration data for the search, the evaluation data for validation): whether validation passed, MACs,
file size and measured latency (the input and the result interleaved in one process, 1 thread, onnxruntime's default
optimizations, medians) against the input, worst output cosine and top-1 agreement on the evaluation data, accuracy
where it has labels, what ratio=auto / rank=auto chose, and the pipeline's time. A pipeline that does not apply
(no prunable group, no factorizable layer) is listed with the pass's reason.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from graphopt import optimize  # noqa: E402
from graphopt.errors import GraphoptError, ValidationFailed  # noqa: E402
from graphopt.runtime import cpu_info  # noqa: E402

CACHE = Path.home() / ".cache" / "graphopt-bench"
MODELS = [("mnist_cnn", ROOT / "models/mnist_cnn.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz"),
          ("mnist_wide", ROOT / "models/mnist_wide.onnx", ROOT / "models/mnist64_calib.npz",
           ROOT / "models/mnist64_eval.npz"),
          ("mnist_mlp", ROOT / "models/mnist_mlp.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz"),
          ("mnist_vit", ROOT / "models/mnist_vit.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz")]
MODELS += [(n, CACHE / f"{n}.onnx", CACHE / f"{n}_calib.npz", CACHE / f"{n}_eval.npz")
           for n in ("ppocr_mobile_v2_cls", "mtcnn_rnet", "mtcnn_onet", "ppocrv4_det", "ppocrv4_rec",
                     "magika_standard_v3_3")]
MODELS += [("minilm", CACHE / "minilm/minilm.onnx", CACHE / "minilm/minilm_calib.npz", CACHE / "minilm/minilm_eval.npz")]
PIPELINES = {"quantize": ["quantize"],
             "prune auto": ["prune-channels:ratio=auto"],
             "prune auto + quantize": ["prune-channels:ratio=auto", "quantize"],
             "svd auto": ["svd:rank=auto"],
             "svd auto + quantize": ["svd:rank=auto", "quantize"]}


def _chosen(rep: dict) -> str:
    out = []
    for step in rep["passes"]:
        c = step["counts"]
        if "ratio chosen" in c:
            out.append(f"{c['ratio chosen']:.3f} of channels")
        if any(d["reason"].startswith("no prunable") for d in step["declined"]) or any(
                n.startswith("no prunable group") for n in step["notes"]):
            out.append("no prunable group")
        for key in ("layers factorized", "rank chosen"):
            if key in c:
                out.append(f"{key} {c[key]:g}")
    return "; ".join(out)


def row(name: str, label: str, model: Path, calib: Path, val: Path, runs: int) -> str:
    t0 = time.perf_counter()
    try:
        _, report = optimize(model, PIPELINES[label], calib_data=calib, val_data=val, latency_runs=runs)
        passed = "yes"
    except ValidationFailed as e:
        report, passed = e.report, "**no**"
    except GraphoptError as e:
        return f"| {name} | {label} | refused: {e} | | | | | | | {time.perf_counter() - t0:.0f} s |"
    seconds = time.perf_counter() - t0
    rep = report.to_dict()
    b, a, v = rep["before"], rep["after"], rep["validation"]
    lat = rep.get("latency_ms") or {}
    speed = f"{lat['before'] / lat['after']:.2f}x" if lat.get("before") and lat.get("after") else ""
    outs = [o for o in v.get("outputs", []) if o.get("cosine") is not None]
    cos = min((o["cosine"] for o in outs), default=float("nan"))
    top1 = min((o["top1"] for o in outs if o.get("top1") is not None), default=None)
    acc = (f"{100 * v['accuracy_before']:.2f}% -> {100 * v['accuracy_after']:.2f}%"
           if v.get("accuracy_before") is not None else "")
    macs = f"{100 * (a['macs'] / b['macs'] - 1):+.1f}%" if b.get("macs") else ""
    size = f"{100 * (a['size_bytes'] / b['size_bytes'] - 1):+.1f}%"
    return (f"| {name} | {label} | {passed} | {_chosen(rep)} | {macs} | {size} | {speed} | {cos:.4f} | "
            f"{'' if top1 is None else f'{top1:.3f}'} | {acc} | {seconds:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="substrings of the model names to run")
    ap.add_argument("--pipelines", nargs="*", help="substrings of the pipeline labels to run")
    ap.add_argument("--write", type=Path, help="append the table to this markdown file")
    ap.add_argument("--latency-runs", type=int, default=100)
    args = ap.parse_args()
    cpu = cpu_info()
    lines = [f"### ratio=auto / rank=auto at the default targets ({datetime.date.today()}, {cpu['model']}; "
             f"{', '.join(cpu['isa'])}; onnxruntime {ort.__version__}; load {os.getloadavg()[0]:.1f})", "",
             "| model | pipeline | passed | chosen | MACs | size | latency | cosine | top-1 | accuracy | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, model, calib, val in MODELS:
        if args.models and not any(s in name for s in args.models):
            continue
        if not model.exists():
            print(f"| {name} | (not cached: run benchmarks/fetch_models.py) |", flush=True)
            continue
        for label in PIPELINES:
            if args.pipelines and not any(s in label for s in args.pipelines):
                continue
            lines.append(row(name, label, model, calib, val, args.latency_runs))
            print(lines[-1], flush=True)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
