"""Plain output cosine vs the worst slice's cosine (graphopt.slices) after the default quantize pipeline, and whether
the gate's decision changes, on models/ and the fetched models (benchmarks/fetch_models.py).

Each output is cut per entry of its last axis (rank 2 and 3; an NCHW map per channel, axis 1), whatever the default
rule says, to show what per-slice gating would do to each real model. Run from the repository root:
    PYTHONPATH=. python benchmarks/bench_fidelity.py [NAME ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx

from graphopt.api import optimize

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "graphopt-bench"
MODELS = {
    "mnist_cnn": (ROOT / "models/mnist_cnn.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz"),
    "mnist_mlp": (ROOT / "models/mnist_mlp.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz"),
    "mnist_vit": (ROOT / "models/mnist_vit.onnx", ROOT / "models/mnist_calib.npz", ROOT / "models/mnist_eval.npz"),
    "mnist_wide": (ROOT / "models/mnist_wide.onnx", ROOT / "models/mnist64_calib.npz",
                   ROOT / "models/mnist64_eval.npz"),
    **{n: (CACHE / f"{n}.onnx", CACHE / f"{n}_calib.npz", CACHE / f"{n}_eval.npz")
       for n in ("mtcnn_rnet", "mtcnn_onet", "ppocr_mobile_v2_cls", "magika_standard_v3_3", "ppocrv4_rec",
                 "ppocrv4_det")},
}


def slices_of(model: onnx.ModelProto) -> list[str]:
    out = []
    for o in model.graph.output:
        rank = len(o.type.tensor_type.shape.dim)
        if rank >= 2:
            out.append(f"{o.name}:{1 if rank == 4 else rank - 1}")
    return out


def main(names: list[str]) -> None:
    print("| model | output | slices | plain cosine | worst slice (cosine) | gate plain | gate per slice | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names or list(MODELS):
        path, cal, val = MODELS[name]
        if not path.exists():
            print(f"| {name} | not fetched |")
            continue
        model = onnx.load(path)
        t0 = time.perf_counter()
        _, rep = optimize(model, ["quantize"], calib_data=str(cal), val_data=str(val), latency_runs=0,
                          force=True, slices=slices_of(model))
        v = rep.validation
        slice_fail = [f for f in v.failures if " slice " in f]
        plain = "pass" if len(v.failures) == len(slice_fail) else "FAIL"
        sliced = "pass" if not v.failures else "FAIL"
        for o in v.outputs:
            w = o.slices.worst() if o.slices is not None else None
            n = len(o.slices.labels) if o.slices is not None else 1
            flat = int(o.slices.flat().sum()) if o.slices is not None and o.slices.terms is not None else 0
            print(f"| {name} | {o.name} | {n}{f' ({flat} flat)' if flat else ''} | {o.cosine:.5f} | "
                  f"{'-' if w is None else f'{w[0]} ({w[1]:.5f})'} | {plain} | {sliced} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
