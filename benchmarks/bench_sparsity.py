"""Benchmark of prune-weights and cluster-weights against quantize and prune-channels:ratio=auto at the same
(default) targets: file size raw and zipped (zlib -6), measured latency ratio, session load time, fidelity and
accuracy on held-out data. Writes benchmarks/results/sparsity.md (and .json).

    python benchmarks/bench_sparsity.py [--models mnist_cnn,ppocrv4_det,...] [--pipelines "quantize;..."]
        [--out benchmarks/results/sparsity.md] [--resume]

Every pipeline runs through graphopt.optimize with the pipeline's default targets (min-cosine 0.98, min-top1 0.95,
max-accuracy-drop 1 point) and ``force=True``, so a result that misses them is still measured (marked FAIL).
Latency: graphopt's own interleaved measurement (medians, 1 thread). Load: median wall time of creating an
onnxruntime session from the serialized model (with default optimizations: where constant folding of the codebook
lookups and the densifying of sparse initializers happen), CPU time of this process, 15 rounds, alternating input
and output models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from graphopt.runtime import cpu_info  # noqa: E402

CACHE = Path.home() / ".cache" / "graphopt-bench"
LOCAL = {"mnist_cnn": "mnist", "mnist_mlp": "mnist", "mnist_vit": "mnist", "mnist_wide": "mnist64"}
FETCHED = ("ppocrv4_det", "ppocrv4_rec", "ppocr_mobile_v2_cls", "mtcnn_rnet", "mtcnn_onet")
PIPELINES = {
    "quantize": ["quantize"],
    "prune-channels:ratio=auto": ["prune-channels:ratio=auto"],
    "prune-weights:sparsity=auto": ["prune-weights:sparsity=auto"],
    "prune-weights:pattern=2:4": ["prune-weights:pattern=2:4"],
    "prune-weights:sparsity=auto + quantize": ["prune-weights:sparsity=auto", "quantize"],
    "cluster-weights:bits=8": ["cluster-weights:bits=8"],
    "cluster-weights:bits=6": ["cluster-weights:bits=6"],
    "cluster-weights:bits=4": ["cluster-weights:bits=4"],
    "cluster-weights:bits=4,data-aware=true": ["cluster-weights:bits=4,data-aware=true"],
}


def cases(names: list[str]) -> list[tuple[str, Path, Path, Path]]:
    out = []
    for name in names:
        if name in LOCAL:
            d = ROOT / "models"
            out.append((name, d / f"{name}.onnx", d / f"{LOCAL[name]}_calib.npz", d / f"{LOCAL[name]}_eval.npz"))
        elif (CACHE / f"{name}.onnx").exists():
            out.append((name, CACHE / f"{name}.onnx", CACHE / f"{name}_calib.npz", CACHE / f"{name}_eval.npz"))
        else:
            print(f"skipped {name}: not in models/ nor {CACHE} (run benchmarks/fetch_models.py)", file=sys.stderr)
    return out


def load_ms(a: onnx.ModelProto, b: onnx.ModelProto, rounds: int = 15) -> tuple[float, float]:
    """Median session-creation time (ms of this process's CPU time: on a shared machine wall time mostly measures
    the other processes) of two models, alternated."""
    blobs = [a.SerializeToString(), b.SerializeToString()]
    times: list[list[float]] = [[], []]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    for r in range(rounds):
        for i in (r % 2, 1 - r % 2):
            t = time.process_time()
            ort.InferenceSession(blobs[i], so, providers=["CPUExecutionProvider"])
            times[i].append((time.process_time() - t) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(name: str, path: Path, calib: Path, ev: Path, label: str, passes: list[str]) -> dict[str, Any]:
    model = onnx.load(path)
    t = time.perf_counter()
    try:
        out, rep = graphopt.optimize(model, passes, calib_data=str(calib), val_data=str(ev), force=True)
    except graphopt.GraphoptError as e:
        return {"model": name, "pipeline": label, "error": str(e)}
    seconds = time.perf_counter() - t
    v = rep.validation
    acc = v.accuracy if v else None
    lb, la = load_ms(model, out)
    notes = [n for p in rep.passes for n in p.get("notes", []) if "=auto:" in n]
    return {"model": name, "pipeline": label, "seconds": round(seconds, 1),
            "size": (rep.before.size_bytes, rep.after.size_bytes),
            "zipped": (rep.before.zipped_bytes, rep.after.zipped_bytes),
            "latency_ms": rep.latency_ms, "load_ms": (lb, la), "sparse_initializers": len(out.graph.sparse_initializer),
            "cosine": min((o.cosine for o in v.outputs if o.cosine is not None), default=None) if v else None,
            "top1": min((o.top1 for o in v.outputs if o.top1 is not None), default=None) if v else None,
            "accuracy": acc, "passed": bool(v and v.passed), "auto": notes[:1]}


def render(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = ["# prune-weights and cluster-weights against quantize and prune-channels (issue 26)", "",
             f"CPU: {env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']}; {env['date']}. "
             f"Command: `{command}`.", "",
             "Default targets (min-cosine 0.98, min-top1 0.95, max-accuracy-drop 1 point) checked on the held-out "
             "eval data; FAIL rows were written with force=True to be measured. Sizes: the file, then zlib level 6 "
             "(zip's DEFLATE). Latency: graphopt's interleaved median, 1 thread (speed-up >1 is faster). Load: median "
             "onnxruntime session creation (process CPU time), after/before.", "",
             "| model | pipeline | file KB (ratio) | zipped KB (ratio) | speed-up | load ratio | cosine | top-1 "
             "| accuracy | targets | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['pipeline']} | error: {r['error']} |||||||||")
            continue
        (sb, sa), (zb, za), (lb, la) = r["size"], r["zipped"], r["load_ms"]
        lat, acc, top1 = r["latency_ms"], r["accuracy"], r["top1"]
        top1_text = "-" if top1 is None else f"{top1 * 100:.1f}%"
        acc_text = "-" if not acc else f"{acc[0] * 100:.1f}->{acc[1] * 100:.1f}%"
        speed = f"{lat[0] / lat[1]:.2f}x" if lat else "-"
        lines.append(
            f"| {r['model']} | {r['pipeline']} | {sa / 1024:.0f} ({sb / sa:.2f}x) | {za / 1024:.0f} ({zb / za:.2f}x) "
            f"| {speed} | {la / lb:.2f} | {r['cosine']:.4f} | {top1_text} | {acc_text} | "
            f"{'pass' if r['passed'] else 'FAIL'} | {r['seconds']} |")
    auto = [f"- {r['model']}, {r['pipeline']}: {r['auto'][0]}" for r in rows if r.get("auto")]
    return "\n".join(lines + ["", "Auto settings chosen:", ""] + auto) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join([*LOCAL, *FETCHED]))
    ap.add_argument("--pipelines", default=";".join(PIPELINES), help="labels of PIPELINES, separated by ';'")
    ap.add_argument("--resume", action="store_true", help="keep the rows of --out's .json and measure the others")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparsity.md"))
    a = ap.parse_args(argv)
    info = cpu_info()
    env = {"cpu": info["model"], "cores": info["cores"], "onnxruntime": ort.__version__,
           "date": datetime.date.today().isoformat()}
    out = Path(a.out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if a.resume else []
    done = {(r["model"], r["pipeline"]) for r in rows}
    for name, path, calib, ev in cases(a.models.split(",")):
        for label in a.pipelines.split(";"):
            if (name, label) in done:
                continue
            rows.append(measure(name, path, calib, ev, label, PIPELINES[label]))
            print(json.dumps(rows[-1], default=str), flush=True)
            out.write_text(render(rows, env, "python benchmarks/bench_sparsity.py " + " ".join(argv or sys.argv[1:])))
            out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
