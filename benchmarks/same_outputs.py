"""Do two checkouts of graphopt write the same models? The check behind a refactor that promises no change.

    python benchmarks/same_outputs.py OLD_CHECKOUT NEW_CHECKOUT [--out DIR] [--only NAME ...] [--no-fetch]

For every model of ``models/`` and every model ``benchmarks/fetch_models.py`` provides (with its ``_calib.npz`` and
``_eval.npz``), each checkout runs, one job at a time from an empty working directory with ``PYTHONPATH`` set to
it (so its own code is imported):
    python -m graphopt IN OUT --val-data EVAL --latency-runs 0                                   (default pipeline)
    python -m graphopt IN OUT --pass quantize --calib-data CALIB --val-data EVAL --latency-runs 0
Each pair of outputs is then ``same bytes``, ``same graph`` (the same nodes, initializers, inputs, outputs, opsets
and IR version; in another node order, or with other model metadata such as the producer) or ``DIFFERENT``; exit codes that differ are reported too. The models are
read from NEW_CHECKOUT's ``models/`` for both, so only the code differs. Prints one line per output and a summary;
exits 1 when anything is DIFFERENT.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402  (benchmarks/)

LOCAL = {"mnist_cnn": "mnist", "mnist_mlp": "mnist", "mnist_vit": "mnist", "mnist_wide": "mnist64"}


def cases(checkout: Path, no_fetch: bool) -> dict[str, tuple[Path, Path, Path]]:
    """{name: (model, calib, eval)} for the local models and the fetched ones."""
    models = checkout / "models"
    out = {name: (models / f"{name}.onnx", models / f"{data}_calib.npz", models / f"{data}_eval.npz")
           for name, data in LOCAL.items()}
    fetched, note = fetch_models.for_benchmark(no_fetch)
    if note:
        print(note, file=sys.stderr)
    out.update({name: (e["onnx"], e["calib"], e["eval"]) for name, e in fetched.items()})
    return out


def run(checkout: Path, model: Path, calib: Path, val: Path, job: str, out: Path) -> int:
    args = [sys.executable, "-m", "graphopt", str(model), str(out), "--val-data", str(val), "--latency-runs", "0",
            "-q"]
    if job == "quantize":
        args += ["--pass", "quantize", "--calib-data", str(calib)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True).returncode


def _graph(m: onnx.ModelProto) -> tuple:
    g = m.graph
    unordered = [sorted(x.SerializeToString(deterministic=True) for x in xs) for xs in (g.node, g.initializer)]
    ordered = [[x.SerializeToString(deterministic=True) for x in xs] for xs in (g.input, g.output, m.opset_import)]
    return (*unordered, *ordered, m.ir_version)


def compare(a: Path, b: Path) -> str:
    if not a.exists() or not b.exists():
        return "missing " + " and ".join(str(p) for p in (a, b) if not p.exists())
    if hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest():
        return "same bytes"
    ma, mb = onnx.load(a), onnx.load(b)
    if _graph(ma) != _graph(mb):
        return f"DIFFERENT (nodes {len(ma.graph.node)} -> {len(mb.graph.node)})"
    if [n.SerializeToString() for n in ma.graph.node] != [n.SerializeToString() for n in mb.graph.node]:
        return "same graph, other node order"
    return "same graph, other model metadata (producer, ...)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--out", type=Path, help="keep the outputs here (default: a temporary folder)")
    p.add_argument("--only", nargs="*", help="only these models")
    p.add_argument("--no-fetch", action="store_true", help="only models already in the fetch cache")
    args = p.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="same_outputs."))
    different = 0
    for name, (model, calib, val) in cases(args.new.resolve(), args.no_fetch).items():
        if args.only and name not in args.only:
            continue
        for job in ("default", "quantize"):
            outs, codes = [], []
            for side, checkout in (("old", args.old), ("new", args.new)):
                (work / side).mkdir(parents=True, exist_ok=True)
                outs.append(work / side / f"{name}.{job}.onnx")
                codes.append(run(checkout.resolve(), model, calib, val, job, outs[-1]))
            verdict = (compare(*outs) if codes == [0, 0] else f"both exit {codes[0]}" if codes[0] == codes[1]
                       else f"exit codes {codes[0]} -> {codes[1]}")
            different += verdict.startswith(("DIFFERENT", "exit", "missing"))
            print(f"{name:<24} {job:<9} {verdict}", flush=True)
    print(f"{different} output(s) differ; outputs in {work}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
