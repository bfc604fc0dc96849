"""Measure the ``svd`` pass: rank vs MAC reduction, output quality and onnxruntime CPU latency, plain vs data-aware.

    python benchmarks/bench_svd.py [--only mlp,vit,minilm,layers,align] [--write benchmarks/results/svd.md]
    python benchmarks/bench_svd.py --only convs [--cases mnist_cnn,...] --write benchmarks/results/lowrank2.md

Models: ``models/mnist_mlp.onnx`` (Gemm 784→512→256→10) and ``models/mnist_vit.onnx`` (tiny attention model,
constant-weight MatMuls) with ``models/mnist_calib.npz`` / ``mnist_eval.npz``; the sentence-transformers
MiniLM-L6 encoder from ``~/.cache/graphopt-bench/minilm/`` (built by ``benchmarks/build_minilm.py``; skipped with a
note when absent), calibrated on 256 real sentences and evaluated on 256 others.

Sections:
  * ``align``: latency of the factor pair x·A·B for ranks around multiples of 16 (the measurement behind the
    pass's ``align=16``).
  * ``layers``: single layers of the shapes that matter (MiniLM's 384x384, 384x1536, 1536x384 at 64 tokens; the
    MLP's 784x512 at batch 1), dense vs factorized (MatMul + bias Add, as exported), at several ranks: MAC
    reduction, measured latency reduction and their ratio (target: >= 0.7 for layers at least 384 wide).
  * per model: the same rank for every layer (and the default energy=0.99), plain and data-aware: MACs (batch 1,
    counted from real shapes), mean relative output error of the factorized layers on the calibration data (from
    the pass report), on the evaluation data: model-output relative error ‖y−y'‖/‖y‖, mean per-sample cosine,
    top-1 accuracy (MNIST), and whole-model latency ratio.
  * ``convs`` (not in the default set): the conv models (mnist_cnn, mnist_wide, PP-OCR det/rec/cls, MTCNN rnet/onet
    from ~/.cache/graphopt-bench), ``fold-bn`` alone (the exact baseline), then ``svd:rank=auto`` (conv=auto; on
    three models also conv=spatial and conv=tucker), against ``prune-channels:ratio=auto`` at the same default targets (benchmarks/_compare.py: MACs, size, latency ratio,
    cosine and accuracy on held-out data, validation, time).
Latency everywhere: ``graphopt.report.measure_latency`` — onnxruntime CPU, 1 intra-op thread, default graph
optimizations, warm-up then interleaved runs, median. Timings on a shared machine are noisy: the load average is
printed next to them. BLAS threads for the pass's own SVDs are pinned to 1 (OPENBLAS_NUM_THREADS) so a busy machine
does not slow the pass by oversubscription; onnxruntime's threads are unaffected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt import io as gio  # noqa: E402
from graphopt.calibration.readers import open_source  # noqa: E402
from graphopt.passes.base import PassContext  # noqa: E402
from graphopt.pipeline import make_spec, run_pipeline  # noqa: E402
from graphopt.runtime import count_macs, cpu_info, measure_latency  # noqa: E402

import _compare  # noqa: E402  (benchmarks/, first on sys.path when this script runs)

MODELS = ROOT / "models"
MINILM = Path.home() / ".cache" / "graphopt-bench" / "minilm"
# Per model: settings applied to every layer ("" = the pass's default, energy=0.99). rank/ratio settings give plain
# and data-aware the same ranks; energy settings let each mode pick its own.
SETTINGS = {"mlp": ["rank=16", "rank=32", "rank=64", "rank=128", "", "energy=0.999"],
            "vit": ["rank=8", "rank=16", "rank=32", "rank=48", "", "energy=0.999"],
            "minilm": ["ratio=0.5", "rank=128", "ratio=0.75", "ratio=0.9", "", "energy=0.995", "energy=0.999"]}


def env_lines() -> list[str]:
    cpu = cpu_info()
    model = cpu["model"]
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except OSError:
        pass
    return [f"CPU: {model} ({', '.join(cpu['isa']) or 'no AVX2'}; {cpu['cores']} cores); onnxruntime "
            f"{ort.__version__}; onnx {onnx.__version__}; numpy {np.__version__}; 1 intra-op thread; "
            f"load average at start {os.getloadavg()[0]:.1f}"]


def cpu_latency(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int, warmup: int = 5,
                budget_s: float = 30.0) -> list[float]:
    """measure_latency's protocol on the calling thread's CPU time (see its docstring). Milliseconds."""
    return measure_latency(models, feed, runs=runs, warmup=warmup, budget_s=budget_s, clock=time.thread_time)


def both(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], runs: int, budget_s: float
         ) -> tuple[list[float], list[float]]:
    """(wall ms from graphopt.report.measure_latency, CPU ms from cpu_latency)."""
    wall = measure_latency(models, feed, threads=1, runs=runs, warmup=10, budget_s=budget_s)
    return wall, cpu_latency(models, feed, runs=runs, budget_s=budget_s)


def load_note() -> str:
    return f"(load average {os.getloadavg()[0]:.1f})"


# ------------------------------------------------------------------------------------------------- micro


def layer_model(k: int, n: int, rows: list[int], rank: int | None, seed: int = 0) -> onnx.ModelProto:
    """x[rows..., k] -> MatMul(W) -> Add(bias), W dense (rank None) or as a factor pair of the given rank."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [numpy_helper.from_array(rng.standard_normal(n).astype(f), "b")]
    if rank is None:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(f), "W"))
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    else:
        inits += [numpy_helper.from_array((rng.standard_normal((k, rank)) / np.sqrt(k)).astype(f), "A"),
                  numpy_helper.from_array((rng.standard_normal((rank, n)) / np.sqrt(rank)).astype(f), "B")]
        nodes = [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["h"])]
    nodes.append(helper.make_node("Add", ["h", "b"], ["y"]))
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, rows + [k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, rows + [n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def overhead_model(k: int, rows: list[int]) -> onnx.ModelProto:
    """x -> Add(x, 0) -> y: what one onnxruntime run costs besides the layer (Python call, feed/fetch, one op)."""
    g = helper.make_graph([helper.make_node("Add", ["x", "zero"], ["y"])], "overhead",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, rows + [k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, rows + [k])],
                          [numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def bench_align(lines: list[str]) -> None:
    lines += ["", "## Rank alignment: latency of x·A·B vs rank (64 rows)", "",
              "MLAS packs the second GEMM operand in 16-column panels: the first GEMM (K→r) costs the same for every "
              "r in a block of 16 and jumps at r = 16m+1. Rounding a rank up to the next multiple of 16 is "
              "therefore (nearly) free accuracy, which is the pass's `align=16` default. Median µs, wall "
              "(measure_latency) / CPU.", ""]
    ranks = [40, 44, 47, 48, 49, 52, 56, 60, 63, 64, 65, 72, 80]
    shapes = [(384, 384), (1536, 384)]
    lines.append("| rank | " + " | ".join(f"{k}→r→{n} wall | CPU" for k, n in shapes) + " |")
    lines.append("|---:|" + "---:|---:|" * len(shapes))
    results = {}
    for k, n in shapes:
        x = np.random.default_rng(1).standard_normal((64, k)).astype(np.float32)
        results[(k, n)] = both([layer_model(k, n, [64], r) for r in ranks], {"x": x}, runs=300, budget_s=30)
    for i, r in enumerate(ranks):
        lines.append(f"| {r} | " + " | ".join(f"{results[sh][0][i] * 1e3:.1f} | {results[sh][1][i] * 1e3:.1f}"
                                             for sh in shapes) + " |")
    lines.append(f"\n{load_note()}")
    print("\n".join(lines[-len(ranks) - 4:]), flush=True)


def bench_layers(lines: list[str], targets: list[tuple[str, bool]]) -> None:
    lines += ["", "## Single layers: measured latency reduction vs MAC reduction", "",
              "MatMul + bias Add as exported, dense vs factor pair; MAC reduction 1 − r(K+N)/(KN); latency "
              "reduction 1 − t_factorized/t_dense (medians, interleaved, 1 thread; wall = "
              "graphopt.report.measure_latency, CPU = the same protocol on thread CPU time); ratio = latency "
              "reduction / MAC reduction (target ≥ 0.70 for layers ≥ 384 wide, judged on wall time). "
              "'net' subtracts the cost of a run of a one-Add model on the same input (the per-call overhead a "
              "layer inside a model does not pay; inside a model the factor pair's second node costs one more "
              "kernel dispatch instead).", "",
              "| layer K×N | rows | rank | MAC reduction | dense µs (wall / CPU) | factorized µs (wall / CPU) | "
              "speedup (wall / CPU) | ratio wall | ratio CPU | ratio net (wall) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cases = [(384, 384, [1, 64], [64, 96, 128, 160]), (384, 1536, [1, 64], [64, 128, 192, 256]),
             (1536, 384, [1, 64], [64, 128, 192, 256]), (384, 384, [1], [64, 128]),
             (784, 512, [1], [16, 32, 64, 128, 256]), (784, 512, [64], [32, 64, 128])]
    for k, n, rows, ranks in cases:
        x = np.random.default_rng(2).standard_normal(rows + [k]).astype(np.float32)
        models = [layer_model(k, n, rows, None)] + [layer_model(k, n, rows, r) for r in ranks] + [
            overhead_model(k, rows)]
        runs = 3000 if np.prod(rows) == 1 else 400
        wall, cpu = both(models, {"x": x}, runs=runs, budget_s=40)
        base = wall[-1]
        nrows = int(np.prod(rows))
        for i, r in enumerate(ranks, 1):
            mac_red = 1 - r * (k + n) / (k * n)
            ratio_w = (1 - wall[i] / wall[0]) / mac_red
            ratio_c = (1 - cpu[i] / cpu[0]) / mac_red
            ratio_n = (1 - (wall[i] - base) / (wall[0] - base)) / mac_red
            lines.append(f"| {k}×{n} | {nrows} | {r} | {mac_red * 100:.1f}% | {wall[0] * 1e3:.1f} / "
                         f"{cpu[0] * 1e3:.1f} | {wall[i] * 1e3:.1f} / {cpu[i] * 1e3:.1f} | {wall[0] / wall[i]:.2f}x / "
                         f"{cpu[0] / cpu[i]:.2f}x | {ratio_w:.2f} | {ratio_c:.2f} | {ratio_n:.2f} |")
            if min(k, n) >= 384:
                targets.append((f"layer {k}×{n}, {nrows} row{'s' if nrows > 1 else ''}, rank {r}: latency reduction "
                                f"{(1 - wall[i] / wall[0]) * 100:.1f}% (CPU {(1 - cpu[i] / cpu[0]) * 100:.1f}%) vs "
                                f"MAC reduction {mac_red * 100:.1f}%: ratio {ratio_w:.2f} (CPU {ratio_c:.2f}, net "
                                f"{ratio_n:.2f})", ratio_w >= 0.7))
        lines.append(f"| (one-Add run on the same input: {base * 1e3:.1f} µs) | | | | | | | | | |")
        print("\n".join(lines[-len(ranks) - 1:]), flush=True)
    lines.append(f"\n{load_note()}")


# ------------------------------------------------------------------------------------------------- models


def feeds(path: Path, model: onnx.ModelProto, limit: int | None = None) -> tuple[list[dict[str, np.ndarray]],
                                                                                   np.ndarray | None]:
    src = open_source(path, model, batch_size=64, max_samples=limit)
    batches = list(src)
    labels = [b.labels for b in batches]
    return [b.feed for b in batches], (np.concatenate(labels) if all(x is not None for x in labels) else None)


def outputs(model: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in data]).astype(np.float64)


def quality(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    r, o = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cos = np.sum(r * o, 1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1), 1e-30)
    q = {"rel": float(np.linalg.norm(r - o) / np.linalg.norm(r)), "cos": float(cos.mean()),
         "cos_min": float(cos.min())}
    if labels is not None:
        q["acc"] = float(np.mean(out.argmax(1) == labels))
        q["acc_ref"] = float(np.mean(ref.argmax(1) == labels))
    return q


def bench_model(lines: list[str], targets: list[tuple[str, bool]], key: str, path: Path, calib: Path, val: Path,
                settings: list[str]) -> None:
    model = gio.load_model(path)
    eval_feeds, labels = feeds(val, model)
    ref = outputs(model, eval_feeds)
    one = {k: v[:1] for k, v in eval_feeds[0].items()}
    macs0 = count_macs(model, one)
    header = (f"\n## {path.name}: same rank for every layer, plain vs data-aware\n\n"
              f"Calibration {calib.name}, evaluation {val.name} ({len(ref)} samples); MACs at batch 1 "
              f"(original {macs0 / 1e6:.2f} M); layer error = mean relative output error of the factorized layers "
              "on the calibration data (from the pass report); output error/cosine on the evaluation data; latency "
              "ratio = original / factorized, whole model, batch 1.\n")
    lines.append(header.replace("same rank for every layer", "one setting for every layer"))
    acc_cols = " | top-1 acc" if labels is not None else ""
    lines += [f"| setting | mode | layers | MAC reduction | layer error (calib) | output rel error | mean cosine"
              f"{acc_cols} | speedup (wall / CPU) |",
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if labels is not None else "") + "---:|"]
    if labels is not None:
        lines.append(f"| original | | | | | | 1.000000 | {np.mean(ref.argmax(1) == labels) * 100:.1f}% | 1.00 / 1.00 |")
    for opts in settings:
        setting = opts or "default (energy=0.99)"
        variants = {}
        for mode in ("plain", "data-aware"):
            spec = f"svd:{opts + ',' if opts else ''}data-aware={'true' if mode == 'data-aware' else 'false'}"
            ctx = PassContext(original=model, calib=open_source(calib, model))
            t0 = time.perf_counter()
            out, records = run_pipeline(model, [make_spec(*_split(spec))], ctx)
            secs = time.perf_counter() - t0
            layers = [r for r in records[0].result.layers if r["status"] == "factorized"]
            q = quality(ref, outputs(out, eval_feeds), labels)
            variants[mode] = (out, layers, q, count_macs(out, one), secs)
        wall, cpu = both([model] + [v[0] for v in variants.values()], one, runs=200, budget_s=30)
        errs = {}
        for i, (mode, (out, layers, q, macs, secs)) in enumerate(variants.items()):
            layer_err = float(np.mean([r["output_error"] for r in layers])) if layers else 0.0
            errs[mode] = (q["rel"], layer_err, [r["output_error"] for r in layers])
            acc = f" | {q['acc'] * 100:.1f}%" if labels is not None else ""
            lines.append(f"| {setting} | {mode} | {len(layers)} | {(1 - macs / macs0) * 100:.1f}% | {layer_err:.4f} | "
                         f"{q['rel']:.4f} | {q['cos']:.6f}{acc} | {wall[0] / wall[i + 1]:.2f} / "
                         f"{cpu[0] / cpu[i + 1]:.2f} |")
            print(lines[-1], f"[pass {secs:.1f} s]", flush=True)
        if errs["plain"][2]:
            per_layer = all(a < p for a, p in zip(errs["data-aware"][2], errs["plain"][2])) \
                if len(errs["plain"][2]) == len(errs["data-aware"][2]) else None
            ok = errs["data-aware"][0] < errs["plain"][0] and per_layer is not False
            if setting.startswith(("rank", "ratio")):
                targets.append((f"{path.name} {setting}: data-aware output rel error {errs['data-aware'][0]:.4f} < "
                                f"plain {errs['plain'][0]:.4f}" + ("" if per_layer is None else
                                                                   f"; every layer's calib error lower: {per_layer}"),
                                ok))
    lines.append(f"\n{load_note()}")


def _split(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure the svd pass.")
    ap.add_argument("--only", default="align,layers,mlp,vit,minilm")
    ap.add_argument("--write", type=Path, help="write the markdown here")
    ap.add_argument("--cases", default=",".join(CONV_CASES), help="convs: the models")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if only == {"convs"}:
        return _compare.write(["# svd on convolutions (issue 26 item 3) — measurements", "", *env_lines(), "",
                      *bench_convs(args.cases.split(","))], args.write)
    lines = ["# svd: low-rank factorization — measurements", "", *env_lines(), "",
             "Generated by `python benchmarks/bench_svd.py --write benchmarks/results/svd.md`."]
    targets: list[tuple[str, bool]] = []
    if "align" in only:
        bench_align(lines)
    if "layers" in only:
        bench_layers(lines, targets)
    cases = [("mlp", MODELS / "mnist_mlp.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
             ("vit", MODELS / "mnist_vit.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
             ("minilm", MINILM / "minilm.onnx", MINILM / "minilm_calib.npz", MINILM / "minilm_eval.npz")]
    for key, path, calib, val in cases:
        if key not in only:
            continue
        if not path.exists():
            note = " (build it: benchmarks/build_minilm.py)" if key == "minilm" else ""
            lines.append(f"\n## {path.name}: not found, skipped{note}")
            continue
        bench_model(lines, targets, key, path, calib, val, SETTINGS[key])
    if targets:
        lines += ["", "## Targets", ""]
        lines += [f"- {'MET' if ok else 'NOT MET'}: {text}" for text, ok in targets]
        met = sum(ok for _, ok in targets)
        lines.append(f"\n{met} of {len(targets)} met. {load_note()}")
    return _compare.write(lines, args.write)


CONV_CASES = ("mnist_cnn", "mnist_wide", "ppocr_mobile_v2_cls", "mtcnn_rnet", "mtcnn_onet", "ppocrv4_rec",
              "ppocrv4_det")
CONV_PIPELINES = (["fold-bn"], ["fold-bn", "svd:rank=auto"], ["fold-bn", "prune-channels:ratio=auto"],
                  ["fold-bn", "svd:rank=auto,conv=spatial"], ["fold-bn", "svd:rank=auto,conv=tucker"])
SCHEMES_ON = ("mnist_cnn", "mnist_wide", "mtcnn_onet")     # the conv=spatial / conv=tucker rows: these models only


def bench_convs(cases: list[str]) -> list[str]:
    """svd:rank=auto on conv models (each conv scheme) against prune-channels:ratio=auto, at the default targets."""
    rows = []
    for case in cases:
        for passes in CONV_PIPELINES if case in SCHEMES_ON else CONV_PIPELINES[:3]:
            print(f"{case}: {' '.join(passes)} {load_note()}", file=sys.stderr, flush=True)
            rows.append(_compare.run(case, passes))
    return ["Generated by `python benchmarks/bench_svd.py --only convs --write benchmarks/results/lowrank2.md`; "
            "each pipeline through graphopt.api.optimize as the CLI runs it, default targets (min-cosine 0.98, "
            "min-top1 0.95, max-accuracy-drop 1 point), validated on the held-out *_eval.npz; speed-up: the "
            "report's latency ratio against the input model in the same run (1 thread, interleaved, medians). "
            f"Shared machine {load_note()}: latency is noisy.", "", *_compare.table(rows)]


if __name__ == "__main__":
    sys.exit(main())
