"""Measure graphopt's ``quantize`` against onnxruntime's ``quantize_static`` (the issue's measurement section).

    python benchmarks/bench_quantize.py [--models NAME_OR_PATH ...] [--quick] [--all] [--configs A,B,...]
                                        [--repeats 3] [--latency-budget S] [--write FILE] [--json FILE]
                                        [--no-fetch] [--synthetic] [--work DIR]

Models (each skipped with a note when missing): ``models/*.onnx`` with ``models/mnist_{calib,eval}.npz`` (28x28)
or ``models/mnist64_{calib,eval}.npz`` (64x64), chosen by input shape; the third-party models of
``benchmarks/fetch_models.py`` (``fetch_all(cache)``, or ``cached`` with ``--no-fetch``: PP-OCR det/rec/cls, MTCNN
R-Net/O-Net, Magika); the MiniLM sentence encoder ``benchmarks/build_minilm.py`` writes to
``~/.cache/graphopt-bench/minilm`` and the EfficientNet-Lite0 ImageNet classifier (output role ``scores``: top-1
agreement) ``benchmarks/build_efficientnet_lite.py`` writes to ``~/.cache/graphopt-bench/efficientnet_lite0``;
with ``--synthetic`` a seeded random-weight ConvNet (harness check only).
``--models`` selects by substring or adds .onnx paths (with ``<stem>_calib.npz`` / ``<stem>_eval.npz`` beside them).

Configurations (``CONFIGS``), all QDQ with uint8 asymmetric activations and int8 symmetric per-channel weights unless
said otherwise, on the same calibration samples:
  * ``ours:kl|minmax|percentile|mse`` — graphopt ``quantize:method=...`` (mse and objective=latency are graphopt's
    defaults: int8 only in the regions measured faster, float where nothing is), ``ours:size`` — ``method=mse,
    objective=size`` (int8 wherever the targets hold, blind to speed), run
    through the pipeline the CLI uses (load, pass + checker, save), without the final validation;
    ``ours:kl-nofallback`` — ``method=kl`` with the fallback off (``min-cosine=0,min-top1=0``): every layer int8,
    as onnxruntime quantizes, so its time is the like-for-like one (the fallback's search is work theirs never does);
  * ``ort:minmax|percentile`` — ``quantize_static(per_channel=True, activation_type=QUInt8, weight_type=QInt8,
    calibrate_method=...)``; ``ort:entropy`` — Entropy as quantize_static configures it (128 bins: its
    extra_options cannot reach num_bins / num_quantized_bins in 1.32);
  * ``ort:entropy2048`` — Entropy configured properly: ``create_calibrator(..., Entropy, extra_options={num_bins:
    2048, num_quantized_bins: 128})``, ranges handed to quantize_static through ``calibration_cache_path``
    (``ort:entropy2048-b32``, ``--all`` only: the same with 32-row feeds);
  * ``ort:default`` — ``quantize_static(model_input, model_output, reader)``, nothing else set (per-tensor weights,
    int8 activations, MinMax);
  * ``ort:minmax@prefold`` — for models whose weights are Constant nodes (PP-OCR; onnxruntime leaves those layers
    float), ort:minmax on graphopt's ``fold-constants`` output.
onnxruntime gets the model file itself, upgraded to opset 13 with ``onnx.version_converter`` when older (its
per-channel output is an invalid model below opset 13 — recorded once as ``ort:minmax@opsetN-original``; graphopt
upgrades internally). Calibration samples: the model's calib set, tiled when smaller than N; onnxruntime's reader
gives batch-1 feeds (as its examples do), graphopt reads the .npz in its default batches. N = 256, or fewer for a
model whose activations onnxruntime (which keeps every activation of every sample) could not hold in
``ORT_MEM_FRACTION`` of the free memory.

Figures: (1) wall and CPU time of calibration + quantization + save in a fresh process (``_rss.py``), median of up
to ``--repeats`` runs; (2) peak RSS (VmHWM) of that process, and ours (kl) / onnxruntime (minmax) at 16, 256 and 512
samples; (3) latency in onnxruntime CPU, 1 intra-op thread, batch 1, sessions interleaved in rotating rounds,
median and paired ratios on thread CPU time and wall clock; (4) fidelity on the eval set against float: accuracy
(labels), top-1 agreement of class-score outputs (per position and decoded-line equality for the CTC recogniser),
cosine over all elements and mean per-sample cosine; (5) structure of each int8 model as written and as
onnxruntime runs it. Markdown to ``benchmarks/results/quantize.md`` (``--write``) and stdout.

Cost control (default run; ``--all`` lifts both): ``ort:entropy2048`` is skipped where its estimated time (1.2 s of
Python KL per calibrated tensor, measured here) exceeds ``--ort-entropy-budget``; after a graphopt run slower than
``--slow`` the model's other graphopt configs and growth points are skipped; growth runs on models with more than
50 MiB of activations per sample are ``--all`` only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
import fetch_models  # noqa: E402  (benchmarks/)

CACHE = fetch_models.resolve_cache()  # $GRAPHOPT_BENCH_CACHE, else ~/.cache/graphopt-bench (MiniLM in its minilm/)
RSS = ROOT / "benchmarks" / "_rss.py"
LABELS = "__labels__"
MAIN_N = 256
GROWTH_N = (16, 512)
ORT_Q = {"per_channel": True, "activation": "QUInt8", "weight": "QInt8"}

CONFIGS: dict[str, dict[str, Any]] = {     # in run order
    "ours:kl": {"tool": "graphopt", "options": {"method": "kl"}},
    # what onnxruntime does: calibrate and quantize every layer, no fallback search (min-cosine=0, min-top1=0)
    "ours:kl-nofallback": {"tool": "graphopt", "options": {"method": "kl", "min-cosine": 0, "min-top1": 0}},
    "ort:entropy2048": {"tool": "ort", "method": "Entropy", **ORT_Q,
                        "calibrator": {"num_bins": 2048, "num_quantized_bins": 128}},
    "ours:minmax": {"tool": "graphopt", "options": {"method": "minmax"}},
    "ours:percentile": {"tool": "graphopt", "options": {"method": "percentile"}},
    "ours:mse": {"tool": "graphopt", "options": {"method": "mse"}},     # the default: objective=latency
    # today's int8 wherever the targets hold, blind to speed (what objective=latency starts from)
    "ours:size": {"tool": "graphopt", "options": {"method": "mse", "objective": "size"}},
    "ort:entropy": {"tool": "ort", "method": "Entropy", **ORT_Q},
    "ort:minmax": {"tool": "ort", "method": "MinMax", **ORT_Q},
    "ort:percentile": {"tool": "ort", "method": "Percentile", **ORT_Q},
    "ort:default": {"tool": "ort", "default": True},
    "ort:entropy2048-b32": {"tool": "ort", "method": "Entropy", **ORT_Q, "batch": 32,
                            "calibrator": {"num_bins": 2048, "num_quantized_bins": 128}},
}
ALL_ONLY = {"ort:entropy2048-b32"}
PREFOLD = ("ort:minmax",)          # also run on graphopt's fold-constants output (int8 weights for onnxruntime too)
QUICK = ["ours:kl", "ort:entropy2048", "ours:minmax", "ours:percentile", "ort:minmax", "ort:default"]
# (ours, theirs, column label) of the time table; the first pair is the target's
TIME_PAIRS = [("ours:kl", "ort:entropy2048", "kl / entropy2048"),
              ("ours:kl-nofallback", "ort:entropy2048", "kl-nofallback / entropy2048"),
              ("ours:kl", "ort:entropy", "kl / entropy(128)"), ("ours:minmax", "ort:minmax", "minmax / minmax"),
              ("ours:percentile", "ort:percentile", "pct / pct"),
              # issue 24: the default (mse, objective=latency) and objective=size within 3x of MinMax
              ("ours:mse", "ort:minmax", "mse / minmax"), ("ours:size", "ort:minmax", "size / minmax")]
LATENCY = ["float", "ours:kl", "ours:percentile", "ours:mse", "ours:size", "ort:entropy2048", "ort:entropy", "ort:minmax",
           "ort:minmax@prefold", "ort:default"]
# ours/theirs latency pairs shown; the target uses the first onnxruntime config of THEIRS_SAME_FILE that exists
LATENCY_PAIRS = [("ours:kl", "theirs"), ("ours:percentile", "theirs"), ("ours:mse", "theirs"),
                 ("ours:kl", "ort:minmax@prefold"), ("ours:percentile", "ort:minmax@prefold"),
                 ("ours:percentile", "ort:default"), ("ours:kl", "float"),
                 ("ours:percentile", "float"), ("ours:mse", "float"), ("ours:size", "float"), ("ours:mse", "ours:size"),
                 ("theirs", "float"), ("float-A/A", "float")]
THEIRS_SAME_FILE = ("ort:entropy2048", "ort:entropy", "ort:minmax")
GROWTH_ORT = "ort:percentile"    # onnxruntime's growth series: a histogram calibrator, which (like Entropy) keeps
                                 # every activation of every sample (its MinMax reduces in-graph to two scalars)
ORT_MEM_FRACTION = 0.5           # of MemAvailable: the most an onnxruntime calibration run may need
MIN_ROUNDS = 30
HEAVY_BYTES = 50 << 20           # activations per sample above which growth runs are --all only
ENTROPY_S_PER_TENSOR = 1.2       # onnxruntime's 2048-bin KL threshold search, seconds per tensor (measured here)


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class ModelCase:
    name: str
    path: Path
    calib: Path
    eval: Path
    kind: str = "auto"          # classifier | embedding | regressor | detector | auto (from output shapes)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _fits(model_path: Path, npz: Path) -> bool:
    m = onnx.load(str(model_path), load_external_data=False)
    with np.load(npz) as z:
        for vi in _inputs(m):
            if vi.name not in z.files:
                return False
            want, got = _dims(vi), z[vi.name].shape
            if len(got) == len(want):
                if any(w and w != g for w, g in zip(want[1:], got[1:])):
                    return False
            elif len(got) == len(want) + 1:
                if any(w and w != g for w, g in zip(want, got[1:])):
                    return False
            else:
                return False
    return True


def local_models(notes: list[str]) -> list[ModelCase]:
    d = ROOT / "models"
    cases = []
    onnx_files = sorted(d.glob("*.onnx"))
    if not onnx_files:
        notes.append("models/: no .onnx yet (models/build.py not run): local MNIST models not measured")
    for p in onnx_files:
        pairs = [(d / f"{p.stem}_calib.npz", d / f"{p.stem}_eval.npz")]
        pairs += [(c, c.with_name(c.name.replace("_calib", "_eval"))) for c in sorted(d.glob("*_calib.npz"))]
        for calib, ev in pairs:
            if calib.exists() and ev.exists() and _fits(p, calib):
                cases.append(ModelCase(p.stem, p, calib, ev, "classifier"))
                break
        else:
            notes.append(f"models/{p.name}: no calib/eval .npz that fits its input; skipped")
    return cases


def fetched_models(notes: list[str], no_fetch: bool) -> list[ModelCase]:
    found, failed = fetch_models.for_benchmark(no_fetch, CACHE)
    if failed:
        notes.append(failed)
    return [ModelCase(name, Path(m["onnx"]), Path(m["calib"]), Path(m["eval"]), m["kind"], m["source"])
            for name, m in found.items()]


# Models a benchmarks/build_*.py script writes into CACHE / folder: (folder, kind, script, file, what it is)
BUILT = [("minilm", "embedding", "build_minilm.py", "MiniLM .onnx", "transformer"),
         ("efficientnet_lite0", "classifier", "build_efficientnet_lite.py", "EfficientNet-Lite0 .onnx",
          "depthwise/ReLU6 ImageNet classifier")]


def built_models(notes: list[str]) -> list[ModelCase]:
    """The models of BUILT (MiniLM, EfficientNet-Lite0) whose build script has been run."""
    return [c for b in BUILT for c in _built_models(notes, *b)]


minilm_models = built_models  # the old name, which benchmarks/sweep_ranges.py calls


def _built_models(notes: list[str], folder: str, kind: str, script: str, what: str,
                  stands_for: str) -> list[ModelCase]:
    d = CACHE / folder
    onnx_files = sorted(d.glob("*.onnx")) if d.exists() else []
    onnx_files = [p for p in onnx_files if "quant" not in p.name and "int8" not in p.name]
    if not onnx_files:
        notes.append(f"{d}: no {what} (benchmarks/{script} not run yet): {stands_for} not measured")
        return []
    cases = []
    for p in onnx_files:
        calib = next((c for c in [d / f"{p.stem}_calib.npz", d / "calib.npz", *sorted(d.glob("*calib*.npz"))]
                      if c.exists()), None)
        ev = next((c for c in [d / f"{p.stem}_eval.npz", d / "eval.npz", *sorted(d.glob("*eval*.npz"))]
                   if c.exists()), None)
        if calib is None or ev is None:
            notes.append(f"{p}: no calib/eval .npz beside it; skipped")
            continue
        cases.append(ModelCase(p.stem if p.stem != "model" else folder, p, calib, ev, kind))
    return cases


def synthetic_case(folder: Path) -> ModelCase:
    """Seeded random-weight ConvNet (Conv-ReLU stack, residual Add, pooling, Gemm) with random [0,1] images."""
    from onnx import helper as h, numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, name: str, stride: int = 1, relu: bool = True) -> str:
        w = rng.normal(0, (2 / (cin * 9)) ** .5, (cout, cin, 3, 3)).astype(np.float32)
        inits.extend([nh.from_array(w, f"{name}.w"), nh.from_array(rng.normal(0, .1, cout).astype(np.float32),
                                                                    f"{name}.b")])
        nodes.append(h.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"], name=name, pads=[1] * 4,
                                 strides=[stride] * 2))
        if not relu:
            return f"{name}.y"
        nodes.append(h.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = conv("input", 3, 16, "c1", 2)
    x = conv(x, 16, 32, "c2", 2)
    r = conv(conv(x, 32, 32, "r1"), 32, 32, "r2", relu=False)
    nodes.append(h.make_node("Add", [x, r], ["sum"], name="add"))
    nodes.append(h.make_node("Relu", ["sum"], ["sum.r"], name="add.relu"))
    x = conv("sum.r", 32, 64, "c3", 2)
    nodes.append(h.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(h.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(nh.from_array(rng.normal(0, .3, (10, 64)).astype(np.float32), "fc.w"))
    inits.append(nh.from_array(np.zeros(10, np.float32), "fc.b"))
    nodes.append(h.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    g = h.make_graph(nodes, "synthetic", [h.make_tensor_value_info("input", 1, ["N", 3, 64, 64])],
                     [h.make_tensor_value_info("logits", 1, ["N", 10])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic_convnet.onnx"
    onnx.save(model, path)
    for split, n, seed in (("calib", 200, 1), ("eval", 300, 2)):
        r = np.random.default_rng(seed)
        img = r.uniform(0, 1, (n, 3, 64, 64)).astype(np.float32)
        np.savez(folder / f"synthetic_{split}.npz", input=img)
    return ModelCase("synthetic_convnet", path, folder / "synthetic_calib.npz", folder / "synthetic_eval.npz",
                     "auto", "random weights (harness check only)")


# ---------------------------------------------------------------------------------------------------- data


def input_names(path: Path) -> list[str]:
    return [vi.name for vi in _inputs(onnx.load(str(path), load_external_data=False))]


def make_calib(case: ModelCase, n: int, folder: Path) -> tuple[Path, int]:
    """An .npz with exactly ``n`` samples of the model's inputs: tiled when the calib set has fewer, else ``n``
    evenly spaced ones (fetch_models orders samples round-robin over their documents, so these cover them all)."""
    out = folder / f"{case.name}_calib{n}.npz"
    with np.load(case.calib) as z:
        arrays = {k: z[k] for k in input_names(case.path) if k in z.files}
    have = min(a.shape[0] for a in arrays.values())
    if not out.exists():
        idx = np.arange(n) % have if have <= n else np.linspace(0, have - 1, n).round().astype(int)
        np.savez(out, **{k: np.ascontiguousarray(a[idx]) for k, a in arrays.items()})
    return out, have


def eval_batches(case: ModelCase, limit: int, batch: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    m = onnx.load(str(case.path), load_external_data=False)
    ins = _inputs(m)
    with np.load(case.eval) as z:
        arrays = {vi.name: z[vi.name] for vi in ins}
        labels = z[LABELS] if LABELS in z.files else None
    n = min(min(a.shape[0] for a in arrays.values()), limit)
    fixed = {vi.name: _dims(vi) for vi in ins}
    stacked = any(len(arrays[k].shape) == len(fixed[k]) + 1 for k in arrays)
    b = 1 if stacked or any(d[0] is not None for d in fixed.values() if d) else batch
    feeds = []
    for s in range(0, n, b):
        feeds.append({k: (a[s] if len(a.shape) == len(fixed[k]) + 1 else a[s:s + b]) for k, a in arrays.items()})
    if labels is not None and (labels.dtype.kind not in "iu" or labels.ndim != 1):
        labels = None
    return feeds, (labels[:n] if labels is not None else None)


def activation_bytes_per_sample(case: ModelCase) -> int:
    """Bytes of every float intermediate tensor for one sample (what onnxruntime's calibrators keep per sample)."""
    m = onnx.load(str(case.path))
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:
        pass
    keep = {o.name for o in m.graph.output}
    names = [vi.name for vi in m.graph.value_info if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    names = [n for n in dict.fromkeys(names) if n not in keep]
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    feeds, _ = eval_batches(case, 1, 1)
    try:
        sess = _session(probe, threads=2, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        outs = sess.run(None, feeds[0])
    except Exception:
        return 0
    return int(sum(o.nbytes for o in outs if isinstance(o, np.ndarray) and o.dtype.kind == "f"))


# ---------------------------------------------------------------------------------------------------- runs


def run_tool(case_path: Path, calib: Path, label: str, out: Path, cfg: dict[str, Any], repeats: int,
             slow_s: float = 30.0) -> dict[str, Any]:
    """Quantize in fresh processes: median seconds of up to ``repeats`` runs; RSS of the first run."""
    runs: list[dict[str, Any]] = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench_quant_spec_") as tmp:
            spec_p, res_p = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            tool = cfg["tool"]
            spec = {"tool": tool, "model": str(case_path), "out": str(out), "calib": str(calib),
                    "config": {k: v for k, v in cfg.items() if k != "tool"}}
            spec_p.write_text(json.dumps(spec))
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(RSS), str(spec_p), str(res_p)], capture_output=True,
                                  text=True, timeout=3600)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0 or not res_p.exists():
                err = (proc.stderr or proc.stdout).strip().splitlines()
                return {"error": (err[-1] if err else f"exit {proc.returncode}")[:300], "label": label}
            r = json.loads(res_p.read_text())
        r["process_seconds"] = elapsed
        runs.append(r)
        if r["seconds"] > slow_s:
            break
    first = runs[0]
    return {**first, "seconds": statistics.median(r["seconds"] for r in runs), "runs": len(runs),
            "all_seconds": [round(r["seconds"], 3) for r in runs], "label": label,
            "peak_rss_kb": max(r["peak_rss_kb"] for r in runs), "base_rss_kb": first["base_rss_kb"]}


# ---------------------------------------------------------------------------------------------------- measuring


def _session(model: onnx.ModelProto | Path, threads: int = 1,
             level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = level
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def output_roles(kind: str, shapes: list[tuple[int, ...]]) -> list[str]:
    """What each output is: ``scores`` ([N, C] class scores), ``seq`` ([N, T, C] per-position scores, CTC) or
    ``value`` (embedding, regression, probability map)."""
    roles = ["value"] * len(shapes)
    if kind in ("classifier", "auto"):
        for i, s in enumerate(shapes):
            if len(s) == 2 and s[1] >= 2:
                roles[i] = "scores"
                break
    elif kind in ("face_cls", "ocr_cls", "filetype_cls"):  # fetch_models: labels are the argmax of the LAST output
        roles[-1] = "scores"
    elif kind == "ocr_rec":
        roles = ["seq" if len(s) == 3 else "value" for s in shapes]
    return roles


def _rows(arr: Any) -> np.ndarray:
    a = np.asarray(arr, np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, -1)


def _ctc(idx: np.ndarray) -> list[tuple[int, ...]]:
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append(tuple(row[keep].tolist()))
    return out


def _box_masks(prob: np.ndarray) -> list[np.ndarray]:
    """The text boxes rapidocr would report on one [H, W] probability map, as boolean masks of the map's size."""
    from skimage.draw import polygon

    masks = []
    for box in fetch_models.db_postprocess(prob, prob.shape[0], prob.shape[1]):
        m = np.zeros(prob.shape, bool)
        rr, cc = polygon(box[:, 1], box[:, 0], prob.shape)
        m[rr, cc] = True
        masks.append(m)
    return masks


def box_f1(a: list[np.ndarray], out: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """Text boxes of the int8 map ``out`` against float's box masks ``a`` (``_box_masks`` of float's map), matched
    one-to-one (greedy, best IoU first) at IoU ≥ 0.5: (matched, float boxes, int8 boxes). F1 = 2·matched / (float +
    int8)."""
    b = _box_masks(out)
    pairs = []
    for i, ma in enumerate(a):
        for j, mb in enumerate(b):
            inter = np.count_nonzero(ma & mb)
            if inter:
                pairs.append((inter / np.count_nonzero(ma | mb), i, j))
    used_a, used_b, matched = set(), set(), 0
    for v, i, j in sorted(pairs, reverse=True):
        if v >= iou and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched += 1
    return matched, len(a), len(b)


def fidelity(case: ModelCase, models: dict[str, Path], limit: int) -> dict[str, Any]:
    """Per model: per-output cosine (all elements), mean/min per-sample cosine, top-1 agreement (scores: per
    row; seq: per position, and the share of sequences whose greedy CTC decoding is identical), and accuracy of
    the scores output against the labels."""
    feeds, labels = eval_batches(case, limit, 32)
    sessions = {}
    errors = {}
    for k, p in models.items():
        try:
            sessions[k] = _session(p, threads=2)
        except Exception as e:
            errors[k] = str(e).splitlines()[0][:200]
    ref = [sessions["float"].run(None, f) for f in feeds]
    names = [o.name for o in sessions["float"].get_outputs()]
    shapes = [tuple(np.shape(ref[0][j])) for j in range(len(names))]
    roles = output_roles(case.kind, shapes)
    res: dict[str, Any] = {"roles": roles, "names": names,
                           "samples": sum(_rows(r[0]).shape[0] for r in ref), "labelled": labels is not None,
                           "errors": errors}
    ref_boxes: dict[int, list[list[np.ndarray]]] = {}   # detector: float's text boxes per output, per sample
    for key, sess in sessions.items():
        outs = ref if key == "float" else [sess.run(None, f) for f in feeds]
        per_out = []
        acc = None
        for j, name in enumerate(names):
            x = np.concatenate([_rows(r[j]) for r in ref])
            y = np.concatenate([_rows(o[j]) for o in outs])
            cos = float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-300))
            nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
            ok = (nx > 0) & (ny > 0)
            sc = (x * y).sum(1)[ok] / (nx[ok] * ny[ok])
            d: dict[str, Any] = {"name": name, "role": roles[j], "cosine": cos,
                                 "sample_cos_mean": float(sc.mean()) if sc.size else None,
                                 "sample_cos_min": float(sc.min()) if sc.size else None, "top1": None}
            if roles[j] in ("scores", "seq"):
                c = shapes[j][-1]
                a = np.concatenate([np.asarray(r[j]).reshape(-1, c).argmax(1) for r in ref])
                b = np.concatenate([np.asarray(o[j]).reshape(-1, c).argmax(1) for o in outs])
                d["top1"] = float(np.mean(a == b))
                if roles[j] == "seq":
                    t = shapes[j][1]
                    d["seq_exact"] = float(np.mean([p == q for p, q in zip(_ctc(a.reshape(-1, t)),
                                                                           _ctc(b.reshape(-1, t)))]))
                if roles[j] == "scores" and labels is not None:
                    n = min(len(b), len(labels))
                    acc = float(np.mean(b[:n] == labels[:n]))
            if case.kind == "ocr_det" and key != "float":   # the task: the text boxes rapidocr would find
                if j not in ref_boxes:
                    ref_boxes[j] = [_box_masks(np.asarray(r[j])[i, 0]) for r in ref for i in range(np.shape(r[j])[0])]
                maps = [np.asarray(o[j])[i, 0] for o in outs for i in range(np.shape(o[j])[0])]
                counts = np.array([box_f1(a, m) for a, m in zip(ref_boxes[j], maps)])
                m, na, nb = counts.sum(0)
                d["box_f1"] = float(2 * m / (na + nb)) if na + nb else 1.0
            per_out.append(d)
        res[key] = {"outputs": per_out, "accuracy": acc}
    return res


def latency(models: dict[str, Path], feed: dict[str, np.ndarray], budget_s: float) -> dict[str, Any]:
    """1 intra-op thread, default graph optimizations; rotating rounds; medians and paired ratios (cpu and wall)."""
    keys = list(models)
    import _timing  # benchmarks/, first on sys.path when this script runs

    wall, cpu = _timing.paired_rounds([_session(models[k], threads=1) for k in keys], feed, budget_s, MIN_ROUNDS,
                                      2000)
    return {"rounds": wall.shape[0], "keys": keys, "feed": {n: list(np.shape(v)) for n, v in feed.items()},
            "cpu_ms": (cpu * 1e3).round(5).tolist(), "wall_ms": (wall * 1e3).round(5).tolist()}


def lat_median(lat: dict[str, Any], clock: str, key: str) -> float | None:
    if key not in lat["keys"]:
        return None
    return float(np.median(np.asarray(lat[clock + "_ms"])[:, lat["keys"].index(key)]))


def lat_ratio(lat: dict[str, Any], clock: str, a: str, b: str) -> tuple[float, float, float] | None:
    """Median and p10/p90 over rounds of the paired ratio a/b."""
    if a not in lat["keys"] or b not in lat["keys"]:
        return None
    t = np.asarray(lat[clock + "_ms"])
    q = t[:, lat["keys"].index(a)] / np.maximum(t[:, lat["keys"].index(b)], 1e-9)
    return float(np.median(q)), float(np.percentile(q, 10)), float(np.percentile(q, 90))


def constant_weights(path: Path) -> int:
    """How many Conv/Gemm/MatMul weights come from Constant nodes (onnxruntime's quantizer leaves those float)."""
    m = onnx.load(str(path), load_external_data=False)
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(1 for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
               and n.input[1] in consts)


def dynamic_batch(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return all(_dims(vi) and _dims(vi)[0] is None for vi in _inputs(m))


def _invalid(e: Exception) -> str:
    msg = str(e).splitlines()[0]
    return (msg[msg.rindex(" Error ") + 7:] if " Error " in msg else msg[-200:]).strip()


def model_opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(path: Path, out: Path) -> Path:
    from onnx import version_converter

    if not out.exists():
        onnx.save(version_converter.convert_version(onnx.load(str(path)), 13), out)
    return out


def fold_constants(path: Path, out: Path) -> Path:
    from graphopt import io as gio
    from graphopt.passes.base import PassContext
    from graphopt.pipeline import make_spec, run_pipeline

    model = gio.load_model(path)
    folded, _ = run_pipeline(model, [make_spec("fold-constants", {})], PassContext(original=model))
    gio.save_model(folded, out)
    return out


def int8_summary(path: Path) -> dict[str, int]:
    """QDQ structure of a quantized model: Q/DQ node counts, weighted ops whose weight input is dequantized."""
    m = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in m.graph.node for o in n.output}
    weighted = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    int8 = sum(1 for n in weighted if all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                          for i in n.input[:2]))
    out = {"Q": sum(n.op_type == "QuantizeLinear" for n in m.graph.node),
           "DQ": sum(n.op_type == "DequantizeLinear" for n in m.graph.node),
           "weighted": len(weighted), "weighted_int8": int8}
    out["runtime"] = runtime_ops(path)
    return out


def runtime_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (default optimizations, CPU): integer kernels, leftover
    Q/DQ (requantization or float islands) and float compute ops."""
    from collections import Counter

    with tempfile.TemporaryDirectory(prefix="bench_quant_opt_") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    integer = sum(v for k, v in ops.items() if k.startswith("QLinear") or k in (
        "QGemm", "MatMulInteger", "ConvInteger", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"))
    float_compute = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm",
                                                           "FusedGemm", "ConvTranspose", "NchwcConv"))
    return {"int8 kernels": integer, "Q": ops.get("QuantizeLinear", 0), "DQ": ops.get("DequantizeLinear", 0),
            "float Conv/MatMul/Gemm": float_compute, "nodes": sum(ops.values())}


# ---------------------------------------------------------------------------------------------------- per model


def ort_tensor_count(path: Path) -> int:
    """How many tensors onnxruntime's calibrator observes (quantize_static's op types)."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="bench_quant_aug_") as tmp:
        cal = MinMaxCalibrater(str(path), list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                               str(Path(tmp) / "aug.onnx"))
        tensors, _ = cal.select_tensors_to_calibrate(cal.model)
    return len(tensors)


def plan_n(per_sample: int, avail: int) -> int:
    """Samples for the head-to-head runs: 256, or fewer when onnxruntime (which keeps every activation of every
    sample) would need more than ORT_MEM_FRACTION of the free memory."""
    n = MAIN_N
    while n > 8 and per_sample * n > ORT_MEM_FRACTION * avail:
        n //= 2
    return n


def bench_model(case: ModelCase, configs: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folder = work / case.name
    folder.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"name": case.name, "path": str(case.path), "kind": case.kind, "note": case.note,
                           "runs": {}, "growth": {}, "skipped": {}}
    per_sample = activation_bytes_per_sample(case)
    avail = _mem_available_kb() * 1024
    n_main = plan_n(per_sample, avail)
    row.update(activation_mb_per_sample=per_sample / 2**20, n_main=n_main, ort_tensors=ort_tensor_count(case.path),
               constant_weights=constant_weights(case.path), float_runtime=runtime_ops(case.path))
    calib, have = make_calib(case, n_main, folder)
    row["calib_available"] = have
    heavy = per_sample > HEAVY_BYTES
    # onnxruntime's input: the model file, upgraded to opset 13 when older (quantize_static writes per-channel
    # DequantizeLinear with an `axis` that opset < 13 does not have, an invalid model; graphopt upgrades itself)
    ort_src = case.path
    opset = model_opset(case.path)
    if opset < 13:
        ort_src = upgrade_opset(case.path, folder / "opset13.onnx")
        row["ort_input"] = f"opset {opset} upgraded to 13 with onnx.version_converter"
    sources = {"": ort_src}
    if row["constant_weights"]:
        sources["@prefold"] = fold_constants(ort_src, folder / "prefold.onnx")
    model_paths: dict[str, Path] = {"float": case.path}
    ours_slow = None
    for label in configs:
        for suffix, src in sources.items():
            if suffix and label not in PREFOLD:
                continue
            cfg = CONFIGS[label]
            key = label + suffix
            if cfg.get("batch", 1) > 1 and not dynamic_batch(case.path):
                row["skipped"][key] = "the model's batch axis is fixed"
                continue
            if cfg["tool"] == "ort" and per_sample * n_main > ORT_MEM_FRACTION * avail:
                row["skipped"][key] = f"needs ≥ {per_sample * n_main / 2**30:.1f} GiB of activations"
                continue
            est = ENTROPY_S_PER_TENSOR * row["ort_tensors"]
            if cfg.get("calibrator") and est > args.ort_entropy_budget and not args.all:
                row["skipped"][key] = (f"est. ≥ {est:.0f} s ({row['ort_tensors']} tensors x ~{ENTROPY_S_PER_TENSOR}"
                                       " s of 2048-bin KL in Python); --all runs it")
                continue
            if cfg["tool"] == "graphopt" and ours_slow and not args.all:
                row["skipped"][key] = f"graphopt took {ours_slow:.0f} s on an earlier config; --all runs it"
                continue
            out = folder / f"{key.replace(':', '_').replace('@', '_')}.onnx"
            print(f"    {key} ({n_main} samples) ...", file=sys.stderr, flush=True)
            r = run_tool(case.path if cfg["tool"] == "graphopt" else src, calib, key, out, cfg, args.repeats)
            row["runs"][key] = r
            if "error" not in r:
                try:
                    r["structure"] = int8_summary(out)
                except Exception as e:
                    r["error"] = f"output is not a valid model for onnxruntime: {_invalid(e)}"
            if "error" in r:
                print(f"      failed: {r['error']}", file=sys.stderr)
                continue
            print(f"      {r['seconds']:.1f} s (cpu {r['cpu_seconds']:.1f} s), peak {r['peak_rss_kb'] / 1024:.0f} MiB",
                  file=sys.stderr, flush=True)
            if cfg["tool"] == "graphopt" and r["seconds"] > args.slow:
                ours_slow = r["seconds"]
            model_paths[key] = out
    if opset < 13 and "ort:minmax" in configs and per_sample * 16 <= ORT_MEM_FRACTION * avail:
        # what a user gets calling quantize_static(per_channel=True) on the original file
        key = f"ort:minmax@opset{opset}-original"
        cal16, _ = make_calib(case, 16, folder)
        print(f"    {key} (16 samples) ...", file=sys.stderr, flush=True)
        r = run_tool(case.path, cal16, key, folder / "orig_opset.onnx", CONFIGS["ort:minmax"], 1)
        if "error" not in r:
            try:
                r["structure"] = int8_summary(folder / "orig_opset.onnx")
            except Exception as e:
                r["error"] = f"output is not a valid model for onnxruntime: {_invalid(e)}"
        row["runs"][key] = r
    # memory: ours at 256 (when the head-to-head ran with fewer) and growth 16 -> 512
    points = [n for n in (GROWTH_N[0], MAIN_N, GROWTH_N[1]) if n != n_main]
    if heavy and not args.all:
        row["skipped"]["growth"] = (f"{per_sample / 2**20:.0f} MiB of activations per sample: only ours at "
                                    f"{MAIN_N} in the default run; --all measures {GROWTH_N[0]} and {GROWTH_N[1]}")
        points = [n for n in points if n == MAIN_N]
    for n in points:
        cal_n, _ = make_calib(case, n, folder)
        for label in ("ours:kl", GROWTH_ORT):
            if label not in configs:
                continue
            cfg = CONFIGS[label]
            key = f"{label}@{n}"
            if cfg["tool"] == "ort" and per_sample * n > ORT_MEM_FRACTION * avail:
                row["growth"][key] = {"error": f"needs ≥ {per_sample * n / 2**30:.0f} GiB", "estimate": True}
                continue
            if cfg["tool"] == "graphopt" and ours_slow and n != MAIN_N and not args.all:
                row["growth"][key] = {"error": "skipped (slow model)"}
                continue
            print(f"    {key} ...", file=sys.stderr, flush=True)
            r = run_tool(case.path, cal_n, label, folder / "growth.onnx", cfg, 1)
            row["growth"][key] = r
            if "error" not in r:
                print(f"      {r['seconds']:.1f} s, peak {r['peak_rss_kb'] / 1024:.0f} MiB", file=sys.stderr)
    for label in ("ours:kl", GROWTH_ORT):
        r = row["runs"].get(label)
        if r is not None:
            row["growth"][f"{label}@{n_main}"] = r
    print("    fidelity ...", file=sys.stderr, flush=True)
    row["fidelity"] = fidelity(case, model_paths, args.eval_max)
    lat_models = {k: model_paths[k] for k in LATENCY if k in model_paths}
    lat_models["float-A/A"] = case.path     # a second session of the float model: the bias/noise floor of a ratio
    feeds, _ = eval_batches(case, 1, 1)
    print("    latency ...", file=sys.stderr, flush=True)
    row["latency"] = latency(lat_models, feeds[0], args.latency_budget)
    return row


def _mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 8 << 20


# ---------------------------------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    flags: set[str] = set()
    name = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("Flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    import hashlib

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "?"
    except OSError:
        rev = "?"
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "passes" / "quantize").glob("*.py"), *(ROOT / "calibration").glob("*.py")]):
        h.update(f.read_bytes())
    return {"graphopt": f"git {rev}, sha256 of passes/quantize/*.py + calibration/*.py {h.hexdigest()[:12]}",
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": name, "isa": isa,
            "cores": len(os.sched_getaffinity(0)), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "load": [round(x, 2) for x in os.getloadavg()]}


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r


def floors(row: dict[str, Any], key: str) -> tuple[bool | None, str]:
    """The issue's floors, per output: scores -> top-1 agreement ≥ 0.95 (and accuracy within 1 point of float
    when labelled); seq -> per-position top-1 ≥ 0.95; value -> cosine ≥ 0.98."""
    fid = row["fidelity"].get(key)
    if fid is None:
        return None, "–"
    ok, why = True, []
    for o in fid["outputs"]:
        if o["role"] in ("scores", "seq"):
            ok &= o["top1"] >= 0.95
            why.append(f"top1 {o['top1']:.3f}" + (f" seq {o['seq_exact']:.2f}" if "seq_exact" in o else ""))
        else:
            ok &= o["cosine"] >= 0.98
            why.append(f"cos {o['cosine']:.4f}" + (f" boxes F1 {o['box_f1']:.3f}" if "box_f1" in o else ""))
    acc, acc0 = fid["accuracy"], row["fidelity"]["float"]["accuracy"]
    if acc is not None and acc0 is not None:
        ok &= acc >= acc0 - 0.01
        why.append(f"Δacc {100 * (acc - acc0):+.1f}")
    if all_float(row, key):
        why.append("NOT QUANTIZED: every layer left float")
    return bool(ok), ", ".join(why)


def all_float(row: dict[str, Any], key: str) -> bool:
    return row["runs"].get(key, {}).get("structure", {}).get("weighted_int8") == 0


def metric(row: dict[str, Any], key: str) -> list[tuple[str, float]] | None:
    """What ours-vs-theirs compares, in this order: accuracy (when labelled), the worst top-1 agreement
    (class-score and sequence outputs), the worst output cosine."""
    f = row["fidelity"].get(key)
    if f is None:
        return None
    t = [o["top1"] for o in f["outputs"] if o["top1"] is not None]
    out = [] if f["accuracy"] is None else [("acc", float(f["accuracy"]))]
    out += [("top1", float(min(t)))] if t else []
    return out + [("cos", float(min(o["cosine"] for o in f["outputs"])))]


def compare(row: dict[str, Any], ours: list[str], theirs: list[str]) -> str:
    """Best of ours against best of theirs, compared lexicographically on metric(); a config that left every
    layer float does not count as ours."""
    def best(keys: list[str], skip_float: bool) -> tuple[list[tuple[str, float]], str] | None:
        found = [(m, k) for k in keys if (m := metric(row, k)) is not None
                 and not (skip_float and all_float(row, k))]
        return max(found, key=lambda mk: [v for _, v in mk[0]]) if found else None
    a, b = best(ours, True), best(theirs, False)
    if a is None or b is None:
        return "–"
    (ma, ka), (mb, kb) = a, b
    tag = "≥" if [v for _, v in ma] >= [v for _, v in mb] else "**<**"
    nums = " · ".join(f"{n} {x:.4f}/{y:.4f}" for (n, x), (_, y) in zip(ma, mb))
    who = "" if len(ours) == 1 and len(theirs) == 1 else f"{ka} vs {kb}: "
    return f"{who}{nums} → {tag}"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, field: str) -> float | None:
    return a[field] / b[field] if _ok(a) and _ok(b) and b[field] else None


def render(env: dict[str, Any], rows: list[dict[str, Any]], notes: list[str], configs: list[str],
           args: argparse.Namespace, total_s: float) -> str:
    L: list[str] = []
    w = L.append
    w("# graphopt `quantize` vs onnxruntime `quantize_static`")
    w("")
    w(f"Generated by `python benchmarks/bench_quantize.py{' ' + ' '.join(args.argv) if args.argv else ''}` on "
      f"{env['date']} in {total_s / 60:.0f} min.")
    w("")
    w(f"- CPU: {env['cpu']} (lscpu), {env['cores']} cores available; ISA flags present: "
      f"{', '.join(env['isa']) or 'none'} (checked: avx2, avx512f, avx512_vnni, avx_vnni, amx_int8)")
    w(f"- graphopt: {env['graphopt']} (working tree, uncommitted changes included)")
    w(f"- onnxruntime {env['onnxruntime']} (CPUExecutionProvider), onnx {env['onnx']}, numpy {env['numpy']}, "
      f"Python {env['python']}")
    w(f"- load average at start {env['load']}: the machine is shared, timings are noisy; every ratio is taken "
      "within one run, and the quantization time is given as wall time and as process CPU time (user + system, "
      "all threads), which other processes do not inflate")
    w(f"- calibration: both tools get the same samples (`N` column: {MAIN_N}, fewer only where onnxruntime would "
      f"need more than {ORT_MEM_FRACTION:.0%} of the free memory), the model's calib set tiled when it has fewer; "
      "onnxruntime's reader gives batch-1 feeds, graphopt reads the .npz in 16-row batches (and runs the model on "
      "at most 16 rows at a time whatever the source); both QDQ, uint8 asymmetric activations, int8 symmetric "
      "per-channel weights (except `ort:default`); each quantization runs in a fresh process")
    w(f"- wall time: median of up to {args.repeats} fresh-process runs (1 when a run takes > 30 s; `runs`)")
    w("")
    w("Configs: `ours:minmax|kl|percentile|mse` = `quantize:method=...` (mse is graphopt's default; percentile "
      "with percentile=auto); `ours:kl-nofallback` = method=kl with the fallback off (every layer int8, as "
      "onnxruntime does); "
      "`ort:minmax|percentile` = quantize_static(QDQ, per_channel=True, QUInt8 activations, QInt8 weights, "
      "MinMax|Percentile); `ort:entropy` = the same with Entropy as quantize_static sets it up (128 histogram bins "
      "— its extra_options cannot reach num_bins/num_quantized_bins in 1.32); `ort:entropy2048` = Entropy "
      "configured properly: create_calibrator(Entropy, extra_options={num_bins: 2048, num_quantized_bins: 128}), "
      "ranges handed to quantize_static via calibration_cache_path; `ort:entropy2048-b32` = the same fed 32-row "
      "batches; `ort:default` = quantize_static(in, out, reader), nothing else set (per-tensor, int8 "
      "activations, MinMax); `@prefold` = onnxruntime run on graphopt's fold-constants output (models whose "
      "weights are Constant nodes, which onnxruntime leaves float).")
    w("")
    cols = [c for c in configs]
    for pre in PREFOLD:
        if pre in configs and any(pre + "@prefold" in r["runs"] or pre + "@prefold" in r["skipped"] for r in rows):
            cols.insert(cols.index(pre) + 1, pre + "@prefold")

    # ---- 1. time
    w("## 1. Calibration + quantization time")
    w("")
    w("Target: ours kl / ort entropy2048 ≤ 0.2 (ours with its fallback search; `kl-nofallback` quantizes every layer, "
      "as theirs does). Cells: wall s (CPU s) [runs]. Ratios ours/theirs on wall time "
      "(on CPU time in brackets).")
    w("")
    w("| model | N | " + " | ".join(cols + [label for _, _, label in TIME_PAIRS]) + " | target ≤ 0.2 |")
    w("|---|---:|" + "---:|" * (len(cols) + len(TIME_PAIRS)) + "---|")
    for row in rows:
        cells = []
        for c in cols:
            r = row["runs"].get(c)
            if r is None:
                cells.append("skip" if c in row["skipped"] else "–")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['seconds']:.1f} ({r['cpu_seconds']:.1f}) [{r['runs']}]")
        rat = []
        for a, b, _ in TIME_PAIRS:
            ra, rb = row["runs"].get(a), row["runs"].get(b)
            x, y = _ratio(ra, rb, "seconds"), _ratio(ra, rb, "cpu_seconds")
            rat.append((x, y))
        x = rat[0][0]
        met = "–" if x is None else ("met" if x <= 0.2 else "**missed**")
        w(f"| {row['name']} | {row['n_main']} | " + " | ".join(cells) + " | " +
          " | ".join("–" if x is None else f"{x:.3f} ({y:.3f})" for x, y in rat) + f" | {met} |")
    w("")

    # ---- 2. memory
    w("## 2. Peak memory (RSS of a fresh process)")
    w("")
    w(f"Targets: ours ≤ 0.5 × theirs with {MAIN_N} samples; ours (kl) growing ≤ 10 % from {GROWTH_N[0]} to "
      f"{GROWTH_N[1]} samples. Peak = VmHWM of the process in MiB, imports included (`base` = RSS after the "
      "imports: ours / ort). `act/sample` = MiB of float activations of one sample: onnxruntime keeps them all "
      "for every calibration sample, so where its run could not be made the estimate `≥ act/sample × N` is "
      "shown instead (`est`).")
    w("")
    mcols = [c for c in cols if not c.endswith("@prefold")]
    w("| model | act/sample | base | " + " | ".join(mcols) + " | kl / entropy2048 (¹) | same, above base | "
      "minmax / minmax | target ≤ 0.5 |")
    w("|---|---:|---|" + "---:|" * len(mcols) + "---:|---:|---:|---|")
    for row in rows:
        if row["n_main"] != MAIN_N:
            continue
        cells = [("skip" if c in row["skipped"] else "–") if row["runs"].get(c) is None else
                 "error" if "error" in row["runs"][c] else f"{row['runs'][c]['peak_rss_kb'] / 1024:.0f}"
                 for c in mcols]
        theirs = next((k for k in ("ort:entropy2048", "ort:entropy", "ort:percentile") if _ok(row["runs"].get(k))),
                      None)
        r1 = _ratio(row["runs"].get("ours:kl"), row["runs"].get(theirs), "peak_rss_kb") if theirs else None
        r2 = _ratio(row["runs"].get("ours:minmax"), row["runs"].get("ort:minmax"), "peak_rss_kb")
        ra, rb = row["runs"].get("ours:kl"), row["runs"].get(theirs) if theirs else None
        above = ((ra["peak_rss_kb"] - ra["base_rss_kb"]) / max(rb["peak_rss_kb"] - rb["base_rss_kb"], 1)
                 if _ok(ra) and _ok(rb) else None)
        met = "–" if r1 is None else ("met" if r1 <= 0.5 else "**missed**")
        if r1 is not None and theirs != "ort:entropy2048":
            met += f" (vs {theirs}: same collection)"
        bo = next((r["base_rss_kb"] for k, r in row["runs"].items() if k.startswith("ours") and _ok(r)), None)
        bt = next((r["base_rss_kb"] for k, r in row["runs"].items() if k.startswith("ort") and _ok(r)), None)
        w(f"| {row['name']} | {row['activation_mb_per_sample']:.1f} | {_f(bo and bo / 1024, '.0f')} / "
          f"{_f(bt and bt / 1024, '.0f')} | " + " | ".join(cells) + f" | {_f(r1)} | {_f(above)} | {_f(r2)} | {met} |")
    w("")
    w("(¹) ours kl against onnxruntime entropy2048, or, where that was not run, against ort:entropy / "
      "ort:percentile, whose calibration keeps the same activations (only the threshold search differs).")
    w("")
    w(f"Growth with the number of calibration samples (MiB): ours kl vs onnxruntime `{GROWTH_ORT}` (a histogram "
      "calibrator: like Entropy it keeps every activation of every sample until the end; its MinMax reduces "
      "in-graph to two scalars per tensor and sample, so it hardly grows). Where onnxruntime could not run, "
      "`est` = act/sample × N; ours/ort is then against that estimate.")
    w("")
    ns = [GROWTH_N[0], MAIN_N, GROWTH_N[1]]
    w("| model | act/sample | " + " | ".join(f"ours @{n}" for n in ns) + f" | ours growth {ns[0]}→{ns[2]} | "
      f"ours {MAIN_N}→{ns[2]} | target ≤ 10 % | " + " | ".join(f"ort @{n}" for n in ns) +
      f" | ort growth {ns[0]}→{ns[2]} | ours / ort @{MAIN_N} |")
    w("|---|---:|" + "---:|" * 3 + "---:|---:|---|" + "---:|" * 3 + "---:|---:|")
    for row in rows:
        g = row["growth"]

        def peak(key: str) -> tuple[float | None, str]:
            r = g.get(key)
            if r is None:
                return None, "–"
            if "error" in r:
                return None, ("est ≥ " + r["error"].split("≥ ")[1]) if r.get("estimate") else "skip"
            return r["peak_rss_kb"] / 1024, f"{r['peak_rss_kb'] / 1024:.0f}"

        o = [peak(f"ours:kl@{n}") for n in ns]
        t = [peak(f"{GROWTH_ORT}@{n}") for n in ns]
        gr = o[2][0] / o[0][0] - 1 if o[0][0] and o[2][0] else None
        gr2 = o[2][0] / o[1][0] - 1 if o[1][0] and o[2][0] else None
        gt = t[2][0] / t[0][0] - 1 if t[0][0] and t[2][0] else None
        est = None
        if o[1][0] is not None:
            if t[1][0] is not None:
                est = f"{o[1][0] / t[1][0]:.3f}"
            elif row["activation_mb_per_sample"]:
                est = f"≤ {o[1][0] / (row['activation_mb_per_sample'] * MAIN_N):.3f} (vs est)"
        met = "–" if gr is None else ("met" if gr <= 0.10 else "**missed**")
        w(f"| {row['name']} | {row['activation_mb_per_sample']:.1f} | " + " | ".join(x[1] for x in o) +
          f" | {_f(gr and 100 * gr, '+.1f')} % | {_f(gr2 and 100 * gr2, '+.1f')} % | {met} | " +
          " | ".join(x[1] for x in t) + f" | {_f(gt and 100 * gt, '+.0f')} % | {est or '–'} |")
    w("")

    # ---- 3. latency
    w("## 3. Latency of the int8 models (onnxruntime CPU, 1 intra-op thread, batch 1, median ms)")
    w("")
    w("Target: ours / theirs ≤ 1.0, ours = kl, theirs = onnxruntime on the same file, first of "
      f"{', '.join(THEIRS_SAME_FILE)} that exists (the ranges differ, the graph is the same; `theirs` column). "
      "`cpu` = the calling thread's CPU time (with one intra-op thread onnxruntime runs every kernel on it, so "
      "time taken by other processes is not counted); `wall` = perf_counter. Ratios: median of per-round paired "
      "ratios (p10–p90); sessions interleaved in rotating rounds; `@prefold` = onnxruntime with int8 weights "
      "on models whose weights are Constant nodes; `float-A/A/float` = a second session of the same float model "
      "against the first: how far from 1.000 a ratio of identical graphs lands in this run.")
    w("")
    lcols = [c for c in LATENCY if any(c in (r.get("latency") or {}).get("keys", []) for r in rows)]
    rcols = [f"{a}/{b}" for a, b in LATENCY_PAIRS]
    w("| model | clock | " + " | ".join(lcols) + " | theirs | " + " | ".join(rcols) + " | rounds | target ≤ 1.0 |")
    w("|---|---|" + "---:|" * len(lcols) + "---|" + "---|" * len(rcols) + "---:|---|")
    for row in rows:
        lat = row.get("latency")
        if not lat:
            continue
        theirs = next((k for k in THEIRS_SAME_FILE if k in lat["keys"]), None)
        kl_float = row["runs"].get("ours:kl", {}).get("structure", {}).get("weighted_int8") == 0
        for clock in ("cpu", "wall"):
            cells = [_f(lat_median(lat, clock, k), ".3f") for k in lcols]
            rs = []
            for a, b in LATENCY_PAIRS:
                r = lat_ratio(lat, clock, a if a != "theirs" else theirs or "", b if b != "theirs" else theirs or "")
                rs.append("–" if r is None else f"{r[0]:.3f} ({r[1]:.2f}–{r[2]:.2f})")
            main_r = lat_ratio(lat, clock, "ours:kl", theirs) if theirs else None
            met = "–" if main_r is None else ("met" if main_r[0] <= 1.0 else "**missed**")
            if kl_float and main_r is not None:
                met += " (ours kl left the whole model float)"
            w(f"| {row['name']} | {clock} | " + " | ".join(cells) + f" | {theirs or '–'} | " + " | ".join(rs) +
              f" | {lat['rounds']} | {met} |")
    w("")

    # ---- 4. fidelity
    w("## 4. Fidelity against the float model (eval set)")
    w("")
    w("Floors: top-1 agreement ≥ 0.95 for class-score outputs (per position for the CTC recogniser), cosine ≥ "
      "0.98 for embedding / regression / probability-map outputs, accuracy within 1 point of float; and ours ≥ "
      "theirs per model. Cells: accuracy % (labelled sets) \\| top-1 agreement (worst score output) \\| cosine over "
      "all elements (worst output) \\| mean per-sample cosine (worst output); for the recogniser also the share of "
      "text lines whose greedy CTC decoding equals float's (`seq`); for the detector also the F1 of the text "
      "boxes rapidocr's post-processing finds in the int8 map against those it finds in float's, matched one-to-one "
      "at IoU ≥ 0.5 (`boxes F1`, the task; shown beside the cosine floor, not instead of it).")
    w("")
    fcols = ["float"] + cols
    w("| model | kind (output roles) | eval samples | " + " | ".join(fcols) + " |")
    w("|---|---|---:|" + "---|" * len(fcols))
    for row in rows:
        fid = row["fidelity"]
        cells = []
        for c in fcols:
            f = fid.get(c)
            if f is None:
                cells.append("skip" if c in row["skipped"] else "error" if c in row["runs"] else "–")
                continue
            t1 = [o["top1"] for o in f["outputs"] if o["top1"] is not None]
            seq = [o["seq_exact"] for o in f["outputs"] if "seq_exact" in o]
            cos = min(o["cosine"] for o in f["outputs"])
            sc = [o["sample_cos_mean"] for o in f["outputs"] if o["sample_cos_mean"] is not None]
            acc = f"{100 * f['accuracy']:.1f}%" if f["accuracy"] is not None else "–"
            cell = f"{acc} \\| {_f(min(t1) if t1 else None)} \\| {cos:.4f} \\| {_f(min(sc) if sc else None, '.4f')}"
            if seq:
                cell += f" \\| seq {min(seq):.2f}"
            boxes = [o["box_f1"] for o in f["outputs"] if "box_f1" in o]
            if boxes:
                cell += f" \\| boxes F1 {min(boxes):.3f}"
            if all_float(row, c):
                cell = "**all float** " + cell
            cells.append(cell)
        w(f"| {row['name']} | {row['kind']} ({', '.join(fid['roles'])}) | {fid['samples']} | " +
          " | ".join(cells) + " |")
    w("")
    w("Floors per config, and ours vs theirs (ours/theirs: accuracy when labelled, worst top-1 agreement, worst "
      "output cosine, compared in that order; a config that left the whole model float is not counted as ours):")
    w("")
    w("| model | " + " | ".join(cols) + " | kl vs entropy2048 | minmax vs minmax | pct vs pct | "
      "best ours vs best ort |")
    w("|---|" + "---|" * len(cols) + "---|---|---|---|")
    for row in rows:
        cells = []
        for c in cols:
            ok, why = floors(row, c)
            cells.append(("skip" if c in row["skipped"] else "–") if ok is None else
                         f"{'met' if ok else '**missed**'} ({why})")
        ent = "ort:entropy2048" if "ort:entropy2048" in row["fidelity"] else "ort:entropy"
        cmp_ = [compare(row, [a], [b]) + (" (vs 128-bin)" if b == "ort:entropy" and b in row["fidelity"] else "")
                for a, b in (("ours:kl", ent), ("ours:minmax", "ort:minmax"), ("ours:percentile", "ort:percentile"))]
        cmp_.append(compare(row, [c for c in cols if c.startswith("ours")], [c for c in cols if c.startswith("ort")]))
        w(f"| {row['name']} | " + " | ".join(cells) + " | " + " | ".join(cmp_) + " |")
    w("")

    # ---- 5. details
    w("## 5. Details")
    w("")
    w("`runtime` = the graph onnxruntime runs after its default optimizations (CPU): integer kernels (QLinear*, "
      "QGemm, MatMulInteger, ...) / QuantizeLinear / DequantizeLinear left over (requantizations, float islands) "
      "/ float Conv-MatMul-Gemm / all nodes. `left float` = activations graphopt's sensitivity fallback kept float.")
    w("")
    w("| model | config | file Q / DQ | weighted ops int8 / all | runtime int8 / Q / DQ / float / all | "
      "graphopt counts | left float | notes |")
    w("|---|---|---|---|---|---|---|---|")
    for row in rows:
        fr = row["float_runtime"]
        w(f"| {row['name']} | float | – | – | 0 / 0 / 0 / {fr['float Conv/MatMul/Gemm']} / {fr['nodes']} | "
          f"ORT tensors calibrated: {row['ort_tensors']} | – | |")
        for k, r in row["runs"].items():
            if "error" in r:
                w(f"| {row['name']} | {k} | – | – | – | – | – | error: {r['error'][:200]} |")
                continue
            s_ = r.get("structure", {})
            rt = s_.get("runtime", {})
            rts = " / ".join(str(rt.get(x, "–")) for x in ("int8 kernels", "Q", "DQ", "float Conv/MatMul/Gemm",
                                                            "nodes"))
            counts = ", ".join(f"{a}: {b}" for a, b in r.get("counts", {}).items())
            lf = r.get("left_float")
            lf_s = "–" if lf is None else (f"{len(lf)}" + (f": {', '.join(lf[:4])}{', ...' if len(lf) > 4 else ''}"
                                                           if lf else ""))
            notes_ = "; ".join(n for n in r.get("notes", []) if n.startswith(("fallback", "opset")))
            w(f"| {row['name']} | {k} | {s_.get('Q')} / {s_.get('DQ')} | {s_.get('weighted_int8')} / "
              f"{s_.get('weighted')} | {rts} | {counts} | {lf_s} | {notes_[:200]} |")
    w("")
    for row in rows:
        extra = [f"N = {row['n_main']}"]
        if row["constant_weights"]:
            extra.append(f"{row['constant_weights']} Conv/Gemm/MatMul weights are Constant-node outputs "
                         "(onnxruntime's quantizer leaves those layers float; `@prefold` shows it on folded weights)")
        if row.get("ort_input"):
            extra.append("onnxruntime input: " + row["ort_input"])
        if row["calib_available"] < row["n_main"]:
            extra.append(f"calib set has {row['calib_available']} distinct samples, tiled")
        elif row["calib_available"] > row["n_main"]:
            extra.append(f"{row['n_main']} evenly spaced of the calib set's {row['calib_available']} samples")
        if row["note"]:
            extra.append(row["note"])
        for k, v in row["skipped"].items():
            extra.append(f"{k}: {v}")
        w(f"- {row['name']}: " + "; ".join(extra))
    for n in notes:
        w(f"- note: {n}")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=[], help="substrings to select models, or .onnx paths to add")
    ap.add_argument("--quick", action="store_true", help=f"configs {', '.join(QUICK)}; 1 run each; short latency")
    ap.add_argument("--all", action="store_true", help="also the slow runs the default run skips (hours)")
    ap.add_argument("--configs", help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs per timing (median)")
    ap.add_argument("--latency-budget", type=float, default=6.0, help="seconds of timed rounds per model")
    ap.add_argument("--eval-max", type=int, default=1000, help="at most this many eval samples")
    ap.add_argument("--ort-entropy-budget", type=float, default=150.0,
                    help="skip ort:entropy2048 where its estimated time exceeds this (without --all)")
    ap.add_argument("--slow", type=float, default=300.0,
                    help="after a graphopt run slower than this, skip the model's other graphopt configs")
    ap.add_argument("--no-fetch", action="store_true", help="use only models fetch_models already cached")
    ap.add_argument("--synthetic", action="store_true", help="add a seeded random-weight ConvNet")
    ap.add_argument("--write", default=str(ROOT / "benchmarks" / "results" / "quantize.md"),
                    help="markdown output ('-' to not write)")
    ap.add_argument("--json", type=Path, help="also dump the raw figures here")
    ap.add_argument("--work", type=Path, help="keep calibration sets and quantized models here")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="--json files of earlier runs: their models are added to the tables (a model measured "
                         "in this run replaces theirs); every ratio still comes from one run")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.quick:
        args.repeats = 1
        args.latency_budget = min(args.latency_budget, 3.0)
    default = [c for c in CONFIGS if c not in ALL_ONLY]   # ALL_ONLY configs run only when named in --configs
    configs = args.configs.split(",") if args.configs else (QUICK if args.quick else default)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}")
    configs = [c for c in CONFIGS if c in configs]      # canonical order: ours:kl and ort:entropy2048 first
    notes: list[str] = []
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    cases = local_models(notes) + fetched_models(notes, args.no_fetch) + built_models(notes)
    if args.synthetic:
        cases.append(synthetic_case(work / "_synthetic"))
    selectors = [m for m in args.models if not m.endswith(".onnx")]
    for m in args.models:
        if m.endswith(".onnx"):
            p = Path(m)
            c, e = p.with_name(p.stem + "_calib.npz"), p.with_name(p.stem + "_eval.npz")
            if p.exists() and c.exists() and e.exists():
                cases.append(ModelCase(p.stem, p, c, e))
            else:
                notes.append(f"{m}: missing model or {c.name}/{e.name}; skipped")
    if selectors:
        missing = [s for s in selectors if not any(s in c.name for c in cases)]
        cases = [c for c in cases if any(s in c.name for s in selectors) or str(c.path) in args.models]
        notes += [f"--models {s}: no such model available; skipped" for s in missing]
    env = environment()
    print(f"{env['cpu']} ({', '.join(env['isa'])}), onnxruntime {env['onnxruntime']}; work dir {work}",
          file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        print(f"  {case.name} ({case.path})", file=sys.stderr, flush=True)
        t1 = time.perf_counter()
        try:
            rows.append(bench_model(case, configs, args, work))
        except Exception as e:  # one broken model must not hide the others
            import traceback

            traceback.print_exc()
            notes.append(f"{case.name}: harness failed: {type(e).__name__}: {str(e)[:200]}")
        print(f"  {case.name}: {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    for old in args.merge:
        data = json.loads(old.read_text())
        have = {r["name"] for r in rows}
        added = [r for r in data["rows"] if r["name"] not in have]
        rows += added
        configs += [c for r in added for c in r["runs"] if c in CONFIGS and c not in configs]
        e = data["environment"]
        notes.append(f"from {old.name} (run {e['date']}, load {e['load']}, graphopt {e.get('graphopt', '?')}): "
                     + ", ".join(r["name"] for r in added))
    configs = [c for c in CONFIGS if c in configs]
    group = ["mnist", "ppocr", "mtcnn", "minilm"]
    rows.sort(key=lambda r: (next((i for i, g in enumerate(group) if g in r["name"]), len(group)), r["name"]))
    text = render(env, rows, notes, configs, args, total)
    print(text)
    if args.write != "-":
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows, "notes": notes}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
