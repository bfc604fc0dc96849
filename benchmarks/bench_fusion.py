"""Measure fold-bn and fuse-conv-relu: node counts and onnxruntime CPU latency, original vs rewritten.

Models: every ``models/*.onnx`` (fed from its ``*_eval.npz``: ``<stem>_eval.npz`` if present, else the first eval
set whose ``input`` array fits the model's input shape), the models of ``benchmarks/fetch_models.py`` (PP-OCRv4
det/rec, PP-OCR cls, MTCNN R/O-Net, cached in ``~/.cache/graphopt-bench``, with their own eval .npz; through its
``fetch_all()``, unless ``--no-fetch``), and any path given on the command line.

Variants: ``original``; ``default`` = the default pipeline (fold-constants, fold-bn); ``+fuse`` = default then
fuse-conv-relu. For each model and each onnxruntime graph-optimization level (``ORT_DISABLE_ALL`` and the default
``ORT_ENABLE_ALL``) the three sessions run in one process, one intra-op thread, on one sample (batch 1):
warm-up, then rounds in which every session runs once, in a rotating order so drift and noise hit all alike.
Reported: median latency per variant and the median over rounds of the per-round ratio original/variant (a paired
speed-up; > 1 is faster) with its 10th-90th percentile spread, for two clocks: ``cpu`` = the calling thread's CPU
time (with one intra-op thread onnxruntime runs every kernel on the calling thread, so this leaves out time stolen by
other processes on a shared machine) and ``wall`` = perf_counter. Exactness: the rewritten models' outputs vs the
original's with ORT_DISABLE_ALL on up to 64 eval samples (max |y-x| / max |x|, top-1 agreement).

    python benchmarks/bench_fusion.py [MODEL.onnx ...] [--budget S] [--no-fetch] [--no-synthetic] [--only SUBSTR]
                                      [--write FILE]

A seeded random-weight ConvNet (``synthetic_convnet``: depthwise/pointwise Conv-BN-ReLU6 blocks, a residual block,
ConvTranspose(group=2)-BN, Gemm-BN) is always added unless ``--no-synthetic``: it has every pattern the passes
target; its latency is real, its weights are not trained.

Prints a markdown table (and writes it with ``--write``), with the CPU model and ISA and the onnxruntime version.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt import io as gio  # noqa: E402
from graphopt.passes.base import PassContext  # noqa: E402
from graphopt.pipeline import make_spec, run_pipeline  # noqa: E402
from graphopt.runtime import cpu_info  # noqa: E402

VARIANTS = {"default": ["fold-constants", "fold-bn"], "+fuse": ["fold-constants", "fold-bn", "fuse-conv-relu"]}
LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# Concrete sizes for dynamic image dims, by model-name hint (PP-OCR's usual inference sizes).
IMAGE_HW = (("rec", (48, 320)), ("cls", (48, 192)), ("det", (640, 640)))


# -------------------------------------------------------------------------------------------------- inputs


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def eval_feeds(model: onnx.ModelProto, path: Path, n: int = 64, eval_npz: Path | None = None
               ) -> tuple[list[dict[str, np.ndarray]], str]:
    """Up to ``n`` single-sample feeds: from the model's eval .npz when one fits, else seeded random ones."""
    inputs = _real_inputs(model)
    candidates = ([eval_npz] if eval_npz else []) + [path.with_name(path.stem + "_eval.npz")] + sorted(
        path.parent.glob("*_eval.npz"))
    if len(inputs) == 1:
        want = _dims(inputs[0])
        for npz in candidates:
            if not npz.exists():
                continue
            with np.load(npz) as data:
                arr = data[inputs[0].name] if inputs[0].name in data else data["input"] if "input" in data else None
                if arr is None or arr.ndim != len(want) or any(w and w != a for w, a in zip(want[1:], arr.shape[1:])):
                    continue
                arr = arr[:n]
            return [{inputs[0].name: arr[i:i + 1]} for i in range(arr.shape[0])], npz.name
    rng = np.random.default_rng(0)
    hw = next((v for k, v in IMAGE_HW if k in path.name.lower()), (224, 224))
    feeds = []
    for _ in range(min(n, 4)):
        feed = {}
        for vi in inputs:
            dims = _dims(vi)
            fill = [1, 3, *hw] if len(dims) == 4 else [1] * len(dims)   # [N, C, H, W] images, else 1
            shape = [d or f for d, f in zip(dims, fill)]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feed[vi.name] = (rng.uniform(0, 1, shape) if dtype.kind == "f" else rng.integers(0, 4, shape)).astype(dtype)
        feeds.append(feed)
    return feeds, "random " + "x".join(map(str, next(iter(feeds[0].values())).shape))


# -------------------------------------------------------------------------------------------------- running


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rewrite(model: onnx.ModelProto, passes: list[str]) -> tuple[onnx.ModelProto, dict[str, float]]:
    out, records = run_pipeline(model, [make_spec(p, {}) for p in passes], PassContext(original=model))
    counts: Counter[str] = Counter()
    for r in records:
        counts.update(r.result.counts)
        counts["declined"] += len(r.result.declined)
    return out, dict(counts)


def ort_optimized(model: onnx.ModelProto, folder: Path, tag: str) -> Counter[str]:
    """Op counts of the graph onnxruntime runs at its default level (saved with ``optimized_model_filepath``)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(folder / f"{tag}.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in opt.graph.node)


def exactness(models: list[onnx.ModelProto], feeds: list[dict[str, np.ndarray]]) -> list[tuple[float, float | None]]:
    """Per model after the first: max over outputs of max|y-x|/max|x| against the first model with ORT_DISABLE_ALL,
    and top-1 agreement of the first [N, C] output. The last entry is the noise floor: the first model itself run
    with onnxruntime's default optimizations (its own fusions reassociate float arithmetic the same way ours do)."""
    sessions = [session(m, LEVELS["disabled"]) for m in models] + [session(models[0], LEVELS["default"])]
    models = [*models, models[0]]
    err = [0.0] * (len(models) - 1)
    ref_max = [0.0] * (len(models) - 1)
    agree = [0] * (len(models) - 1)
    rows = 0
    for feed in feeds:
        ref = sessions[0].run(None, feed)
        for j, s in enumerate(sessions[1:]):
            out = s.run(None, feed)
            for r, o in zip(ref, out):
                r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
                err[j] = max(err[j], float(np.max(np.abs(o64 - r64))))
                ref_max[j] = max(ref_max[j], float(np.max(np.abs(r64))))
            if ref[0].ndim == 2 and ref[0].shape[1] > 1:
                agree[j] += int(np.count_nonzero(ref[0].argmax(1) == out[0].argmax(1)))
        if ref[0].ndim == 2 and ref[0].shape[1] > 1:
            rows += ref[0].shape[0]
    return [(e / m if m else e, a / rows if rows else None) for e, m, a in zip(err, ref_max, agree)]


def latency(models: list[onnx.ModelProto], feed: dict[str, np.ndarray], level: ort.GraphOptimizationLevel,
            budget_s: float) -> dict[str, Any]:
    """Per clock (``wall``: perf_counter; ``cpu``: this thread's CPU time, which with one intra-op thread is where
    onnxruntime runs every kernel, so time lost to other processes on a shared machine is not counted): median ms
    per model and, for models[1:], (median, p10, p90) of the paired per-round ratio t0 / ti."""
    import _timing  # benchmarks/, first on sys.path when this script runs

    wall, cpu = _timing.paired_rounds([session(m, level) for m in models], feed, budget_s, 40, 3000)
    rounds, k = wall.shape
    out: dict[str, Any] = {"rounds": rounds}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        ratios = []
        for i in range(1, k):
            q = times[:, 0] / np.maximum(times[:, i], 1e-9)
            ratios.append((float(np.median(q)), float(np.percentile(q, 10)), float(np.percentile(q, 90))))
        out[clock] = ([float(np.median(times[:, i])) * 1e3 for i in range(k)], ratios)
    return out


# -------------------------------------------------------------------------------------------------- synthetic


def synthetic_convnet(path: Path) -> Path:
    """A seeded random-weight ConvNet with the patterns the passes target, written to ``path``: stem Conv-BN-ReLU,
    MobileNet-style blocks (depthwise 3x3 Conv-BN-ReLU6, pointwise Conv-BN), a residual Conv-BN + Add + ReLU,
    ConvTranspose(group 2)-BN-ReLU upsampling, global pool, Gemm-BN. Input [1, 3, 128, 128]."""
    from onnx import helper as h, numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(nh.from_array(arr.astype(np.float32), name))
        return name

    def bn(x: str, c: int, name: str) -> str:
        p = [const(f"{name}.{k}", v) for k, v in (("gamma", rng.uniform(0.5, 1.5, c)), ("beta", rng.normal(0, .1, c)),
                                                   ("mean", rng.normal(0, .1, c)), ("var", rng.uniform(.5, 2, c)))]
        nodes.append(h.make_node("BatchNormalization", [x, *p], [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    def conv(x: str, cin: int, cout: int, k: int, name: str, group: int = 1, stride: int = 1) -> str:
        w = const(f"{name}.weight", rng.normal(0, (2 / (cin // group * k * k)) ** .5, (cout, cin // group, k, k)))
        nodes.append(h.make_node("Conv", [x, w], [f"{name}.out"], name=name, group=group, strides=[stride] * 2,
                                 pads=[k // 2] * 4))
        return f"{name}.out"

    def act(x: str, op: str, name: str) -> str:
        ins = [x] + ([const(f"{name}.min", np.array(0.)), const(f"{name}.max", np.array(6.))] if op == "Clip" else [])
        nodes.append(h.make_node(op, ins, [f"{name}.out"], name=name))
        return f"{name}.out"

    x = act(bn(conv("input", 3, 32, 3, "stem", stride=2), 32, "stem.bn"), "Relu", "stem.relu")
    c = 32
    for i, (cout, stride) in enumerate([(64, 2), (64, 1), (128, 2), (128, 1)]):
        d = act(bn(conv(x, c, c, 3, f"b{i}.dw", group=c, stride=stride), c, f"b{i}.dw.bn"), "Clip", f"b{i}.relu6")
        x = bn(conv(d, c, cout, 1, f"b{i}.pw"), cout, f"b{i}.pw.bn")
        c = cout
    r = act(bn(conv(x, c, c, 3, "res.a"), c, "res.a.bn"), "Relu", "res.a.relu")
    r = bn(conv(r, c, c, 3, "res.b"), c, "res.b.bn")
    nodes.append(h.make_node("Add", [x, r], ["res.sum"], name="res.add"))
    x = act("res.sum", "Relu", "res.relu")
    w = const("up.weight", rng.normal(0, .05, (c, c // 4, 2, 2)))
    nodes.append(h.make_node("ConvTranspose", [x, w], ["up.out"], name="up", group=2, strides=[2, 2]))
    x = act(bn("up.out", c // 2, "up.bn"), "Relu", "up.relu")
    nodes.append(h.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(h.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    nodes.append(h.make_node("Gemm", ["flat", const("fc.weight", rng.normal(0, .1, (10, c // 2)))], ["fc.out"],
                             name="fc", transB=1))
    nodes.append(h.make_node("BatchNormalization", ["fc.out"] + [const(f"fc.bn.{k}", v) for k, v in (
        ("gamma", rng.uniform(.5, 1.5, 10)), ("beta", rng.normal(0, .1, 10)), ("mean", rng.normal(0, .1, 10)),
        ("var", rng.uniform(.5, 2, 10)))], ["logits"], name="fc.bn"))
    graph = h.make_graph(nodes, "synthetic_convnet", [h.make_tensor_value_info("input", 1, [1, 3, 128, 128])],
                         [h.make_tensor_value_info("logits", 1, [1, 10])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], producer_name="bench_fusion")
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# -------------------------------------------------------------------------------------------------- discovery


def fetch_ppocr(no_fetch: bool) -> tuple[list[tuple[Path, Path | None]], str]:
    """The models of benchmarks/fetch_models.py (PP-OCR det/rec/cls, MTCNN) with their eval .npz, via its
    ``fetch_all()`` (which downloads only what its cache lacks)."""
    if no_fetch:
        return [], "--no-fetch: PP-OCR models not measured"
    import fetch_models  # benchmarks/, first on sys.path when this script runs

    models, failed = fetch_models.for_benchmark(False)
    return [(Path(m["onnx"]), Path(m["eval"])) for m in models.values()], failed


def environment() -> str:
    cpu = cpu_info()
    try:
        name = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        name = cpu["model"]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU: {name} ({', '.join(cpu['isa'])}; {cpu['cores']} cores available), onnxruntime {ort.__version__}, "
            f"onnx {onnx.__version__}, Python {platform.python_version()}; 1 intra-op thread, batch 1; "
            f"load average at start {load}")


# -------------------------------------------------------------------------------------------------- main


def bench(path: Path, budget: float, eval_npz: Path | None = None) -> dict[str, Any]:
    model = gio.load_model(path)
    feeds, data = eval_feeds(model, path, eval_npz=eval_npz)
    rewritten = {}
    counts = {}
    for name, passes in VARIANTS.items():
        rewritten[name], counts[name] = rewrite(model, passes)
    models = [model, *rewritten.values()]
    exact = exactness(models, feeds)
    row: dict[str, Any] = {"model": path.name, "data": data, "nodes": [len(m.graph.node) for m in models],
                           "ops": [Counter(n.op_type for n in m.graph.node) for m in models],
                           "counts": counts, "exact": exact, "latency": {}}
    with tempfile.TemporaryDirectory(prefix="bench_fusion_opt_") as tmp:
        row["ort_ops"] = [ort_optimized(m, Path(tmp), str(i)) for i, m in enumerate(models)]
    for level_name, level in LEVELS.items():
        row["latency"][level_name] = latency(models, feeds[0], level, budget)
    return row


def _ops_changed(row: dict[str, Any]) -> str:
    before, after = row["ops"][0], row["ops"][2]
    keys = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
    return ", ".join(f"{k} {before.get(k, 0)}→{after.get(k, 0)}" for k in keys if before.get(k, 0) != after.get(k, 0))


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | nodes orig → default → +fuse | ORT graph opt. | clock | orig ms | default ms | +fuse ms | "
             "speed-up default (p10–p90) | speed-up +fuse (p10–p90) | rounds |",
             "|---|---|---|---|---:|---:|---:|---|---|---:|"]
    for row in rows:
        for level in LEVELS:
            lat = row["latency"][level]
            for clock in ("cpu", "wall"):
                medians, ratios = lat[clock]
                sp = [f"{m:.3f}× ({lo:.2f}–{hi:.2f})" for m, lo, hi in ratios]
                lines.append(f"| {row['model']} | {' → '.join(map(str, row['nodes']))} | {level} | {clock} | "
                             f"{medians[0]:.3f} | {medians[1]:.3f} | {medians[2]:.3f} | {sp[0]} | {sp[1]} | "
                             f"{lat['rounds']} |")
    lines.append("")
    lines.append("| model | feed | ops changed (orig → +fuse) | max rel err default / +fuse (ORT_DISABLE_ALL) | "
                 "noise floor: orig at ORT default level vs disabled | top-1 agreement | declined sites | "
                 "nodes onnxruntime runs at default level orig / default / +fuse |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        (e1, a1), (e2, a2), (e0, _) = row["exact"]
        agree = "-" if a1 is None else f"{a1 * 100:.1f}% / {a2 * 100:.1f}%"
        o = row["ort_ops"]
        same = ["same ops" if c == o[0] else "differs: " + ", ".join(
            f"{k} {o[0].get(k, 0)}→{c.get(k, 0)}" for k in sorted(set(o[0]) | set(c)) if o[0].get(k, 0) != c.get(k, 0))
            for c in o[1:]]
        lines.append(f"| {row['model']} | {row['data']} | {_ops_changed(row) or 'none'} | {e1:.2e} / {e2:.2e} | "
                     f"{e0:.2e} | {agree} | {row['counts']['+fuse'].get('declined', 0)} | "
                     f"{' / '.join(str(sum(c.values())) for c in o)} (default: {same[0]}; +fuse: {same[1]}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="extra .onnx files")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per model and level")
    ap.add_argument("--no-fetch", action="store_true", help="do not run benchmarks/fetch_models.py")
    ap.add_argument("--only", help="only models whose file name contains this")
    ap.add_argument("--write", type=Path, help="also write the markdown here")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the seeded random-weight synthetic ConvNet")
    args = ap.parse_args(argv)
    paths: list[tuple[Path, Path | None]] = [(p, None) for p in sorted((ROOT / "models").glob("*.onnx"))]
    if not args.no_synthetic:
        paths.append((synthetic_convnet(Path(tempfile.mkdtemp(prefix="bench_fusion_")) / "synthetic_convnet.onnx"),
                      None))
    fetched, note = fetch_ppocr(args.no_fetch)
    paths += fetched + [(p, None) for p in args.models]
    if args.only:
        paths = [(p, e) for p, e in paths if args.only in p.name]
    header = environment()
    print(header, flush=True)
    rows = []
    for p, e in paths:
        print(f"  {p} ...", file=sys.stderr, flush=True)
        try:
            rows.append(bench(p, args.budget, e))
        except Exception as ex:  # report and go on: one broken model must not hide the others
            print(f"  {p.name}: failed: {type(ex).__name__}: {ex}", file=sys.stderr)
    text = "\n".join([header, "", table(rows)] + ([f"\nnote: {note}"] if note else []))
    print("\n" + text)
    if args.write:
        args.write.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
