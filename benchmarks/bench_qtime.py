"""The quantize pass's own time against onnxruntime's quantize_static MinMax, before and after a change (issue 24).

    python benchmarks/bench_qtime.py --trees base=/tmp/base new=. --models mnist_cnn ppocr --repeats 3 --json r.json

Each tree (a graphopt source checkout) runs ``quantize`` with its defaults (objective=latency, mse, the fallback
search) through benchmarks/_rss.py of that tree, in a fresh process; onnxruntime's ``quantize_static`` MinMax
(QDQ, per-channel, uint8 activations, int8 weights: bench_quantize's ``ort:minmax``) runs from this tree's
_rss.py. Rounds are interleaved (every config once per round, the order rotating), so the machine's load hits all
alike; per config the median wall time and CPU time (user + system, all threads) of the rounds, and the load
average at each run's start. The calibration set is bench_quantize's (256 samples, fewer where onnxruntime would
need more than half the free memory), the same for every config.

Besides the time, what each tree wrote: the weighted ops (Conv, Gemm, MatMul, ConvTranspose) that run int8 and
the tensors quantized (an activation is int8 where a QuantizeLinear writes it), per run (objective=latency decides
from timings, which a loaded machine can tip where int8 and float are close), and bench_quantize's held-out
fidelity (cosine, top-1, accuracy on the eval set's labels). ``--size-check`` adds one objective=size run per tree:
the fidelity search's own assignment, which no timing decides, compared between trees ("same size assignment":
the same int8 ops, quantized tensors and tensors left float). ``--repeats 0`` runs only that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quantize as bq  # noqa: E402  (benchmarks/)

ORT = bq.CONFIGS["ort:minmax"]


def assignment(path: Path) -> dict[str, list[str]]:
    """The int8 weighted ops (by name) and the quantized activation tensors of a QDQ model."""
    m = onnx.load(str(path), load_external_data=False)
    producers = {o: n for n in m.graph.node for o in n.output}
    int8 = [n.name or n.output[0] for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
            and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input[:2])]
    quantized = [n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    return {"int8_ops": sorted(int8), "quantized": sorted(set(quantized))}


def run_once(tree: Path, tool: str, model: Path, calib: Path, out: Path, config: dict[str, Any]) -> dict[str, Any]:
    """One fresh-process run of ``tree``'s benchmarks/_rss.py: its figures and the load average at the start."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_qtime_") as tmp:
        spec_p, res_p = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_p.write_text(json.dumps({"tool": tool, "model": str(model), "out": str(out), "calib": str(calib),
                                      "config": config}))
        proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "_rss.py"), str(spec_p), str(res_p)],
                              capture_output=True, text=True, timeout=3600,
                              env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        if proc.returncode != 0 or not res_p.exists():
            err = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": (err[-1] if err else f"exit {proc.returncode}")[:300], "load": load}
        r = json.loads(res_p.read_text())
    return {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "load": load,
            "left_float": r.get("left_float"), "float_layers": r.get("float_layers"), "assignment": assignment(out)}


def bench_case(case: bq.ModelCase, trees: dict[str, Path], repeats: int, work: Path, eval_max: int,
               size_check: bool) -> dict[str, Any]:
    folder = work / case.name
    folder.mkdir(parents=True, exist_ok=True)
    n = bq.plan_n(bq.activation_bytes_per_sample(case), bq._mem_available_kb() * 1024)
    calib, have = bq.make_calib(case, n, folder)
    src = case.path if bq.model_opset(case.path) >= 13 else bq.upgrade_opset(case.path, folder / "opset13.onnx")
    configs = {**{f"ours@{t}": ("graphopt", case.path, {"options": {}}) for t in trees},
               "ort:minmax": ("ort", src, {k: v for k, v in ORT.items() if k != "tool"})}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    outs = {k: folder / f"{k.replace(':', '_').replace('@', '_')}.onnx" for k in configs}
    names = list(configs)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:      # rotating order
            tool, model, cfg = configs[k]
            tree = trees[k.split("@", 1)[1]] if tool == "graphopt" else ROOT
            res = run_once(tree, tool, model, calib, outs[k], cfg)
            runs[k].append(res)
            print(f"    {case.name} {k} round {r + 1}: " + (res.get("error") or
                  f"{res['seconds']:.1f} s wall, {res['cpu_seconds']:.1f} s cpu, load {res['load']:.1f}"),
                  file=sys.stderr, flush=True)
    row: dict[str, Any] = {"name": case.name, "n": n, "calib_available": have, "configs": {}, "size": {}}
    if size_check:      # objective=size: the fidelity search's assignment alone, which no timing decides
        for t, tree in trees.items():
            row["size"][t] = run_once(tree, "graphopt", case.path, calib, folder / f"size_{t}.onnx",
                                      {"options": {"objective": "size"}})
    for k, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        row["configs"][k] = {"runs": rs, "error": None if ok else rs[0].get("error") if rs else "not run",
                             "per_run": [(len(x["assignment"]["int8_ops"]), len(x["assignment"]["quantized"]))
                                         for x in ok],
                             "wall": statistics.median(x["seconds"] for x in ok) if ok else None,
                             "cpu": statistics.median(x["cpu_seconds"] for x in ok) if ok else None,
                             "load": [round(x["load"], 1) for x in rs],
                             "assignment": assignment(outs[k]) if ok else None}
    done = {k: outs[k] for k in configs if row["configs"][k]["error"] is None}
    try:
        row["fidelity"] = bq.fidelity(case, {"float": case.path, **done}, eval_max)
    except ImportError as e:    # a detector's box F1 needs scikit-image
        row["fidelity"] = {"error": str(e)}
    return row


def summary(row: dict[str, Any], first: str) -> list[str]:
    """Markdown table rows: per config wall, CPU, ratio to MinMax, same assignment as ``first``, fidelity."""
    c = row["configs"]
    ort = c["ort:minmax"]
    fid = row["fidelity"]
    lines = []
    for k, v in c.items():
        if v["error"] == "not run":
            continue
        if v["error"]:
            lines.append(f"| {row['name']} | {k} | error: {v['error']} ||||||||||")
            continue
        ratio = (f"{v['wall'] / ort['wall']:.2f} ({v['cpu'] / ort['cpu']:.2f})" if ort["wall"] else "–")
        size = row.get("size", {})
        t = k.split("@", 1)[-1]
        ref = size.get(first.split("@", 1)[1])
        same = "–" if k == first or not k.startswith("ours") or not size else (
            "yes" if size[t].get("assignment") == ref.get("assignment") and
            size[t].get("left_float") == ref.get("left_float") else "**no**")
        outs = fid.get(k, {}).get("outputs", []) if "error" not in fid else []
        cos = min((o["cosine"] for o in outs), default=None)
        top1 = [o["top1"] for o in outs if o.get("top1") is not None]
        acc = fid.get(k, {}).get("accuracy")
        a = v["assignment"]
        lines.append(f"| {row['name']} | {k} | {row['n']} | {v['wall']:.2f} | {v['cpu']:.2f} | "
                     f"{'/'.join(str(x) for x in v['load'])} | {ratio} | {same} | "
                     f"{', '.join(f'{i}/{q}' for i, q in v['per_run'])} | "
                     f"{'–' if t not in size else str(len(size[t]['assignment']['int8_ops'])) + '/' + str(len(size[t]['assignment']['quantized']))} | "
                     f"{'–' if cos is None else f'{cos:.6f}'} | {f'{min(top1):.4f}' if top1 else '–'} | "
                     f"{'–' if acc is None else f'{acc * 100:.2f}'} |")
    size = row.get("size", {})
    if size and not any(v["runs"] for v in c.values()):       # --repeats 0: the size check alone
        ref = size.get(first.split("@", 1)[1], {})
        for t, r in size.items():
            a = r.get("assignment")
            lines.append(f"| {row['name']} | ours@{t} objective=size | {row['n']} | {r.get('seconds', 0):.2f} | "
                         f"{r.get('cpu_seconds', 0):.2f} | {r['load']:.1f} | – | "
                         f"{'yes' if a == ref.get('assignment') and r.get('left_float') == ref.get('left_float') else '**no**'}"
                         f" | – | {len(a['int8_ops']) if a else '–'}/{len(a['quantized']) if a else '–'} | | | |")
    return lines


HEADER = ["| model | config | N | wall s | CPU s | load at each run | / ort:minmax wall (CPU) | same size assignment "
          "| int8 ops/tensors per run | objective=size int8 ops/tensors | cosine | top-1 | accuracy % |",
          "|---|---|---:|---:|---:|---|---|---|---|---|---:|---:|---:|"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trees", nargs="+", default=[f"this={ROOT}"], help="label=path of graphopt checkouts")
    ap.add_argument("--models", nargs="*", default=[], help="substrings selecting bench_quantize's models")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (fresh process per run)")
    ap.add_argument("--eval-max", type=int, default=400, help="at most this many held-out samples for fidelity")
    ap.add_argument("--work", type=Path, help="keep calibration sets and outputs here")
    ap.add_argument("--json", type=Path, help="dump the raw figures here")
    ap.add_argument("--size-check", action="store_true",
                    help="also one objective=size run per tree: the fidelity search's assignment, compared")
    args = ap.parse_args(argv)
    trees = {t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in args.trees}
    notes: list[str] = []
    cases = bq.local_models(notes) + bq.fetched_models(notes, True) + bq.built_models(notes)
    cases = [c for c in cases if any(s in c.name for s in args.models)] if args.models else cases
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_qtime_"))
    env = bq.environment()
    print(f"{env['cpu']}, onnxruntime {env['onnxruntime']}; work {work}", file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    for case in cases:
        rows.append(bench_case(case, trees, args.repeats, work, args.eval_max, args.size_check))
        if args.json:
            args.json.write_text(json.dumps({"env": env, "argv": sys.argv[1:], "rows": rows}, indent=1, default=str))
    first = f"ours@{next(iter(trees))}"
    print("\n".join(HEADER + [line for r in rows for line in summary(r, first)]))
    print(f"\n{len(rows)} models in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
