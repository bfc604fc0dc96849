"""A model over 2 GB through the CLI, measured: wall time and peak RSS of the whole run (validation included).

    python benchmarks/bench_bigmodel.py build DIR            # DIR/big.onnx + DIR/big.onnx.data (2.55 GB)
    python benchmarks/bench_bigmodel.py run DIR NAME -- ARGS  # /usr/bin/time -v python -m graphopt DIR/big.onnx
                                                              #   DIR/NAME.onnx ARGS; one JSON line on stdout

The model is a stack of 19 transformer-FFN-like blocks ``x·W_up (1024x16384) -> Relu -> ·W_down (16384x1024) ->
Relu`` (a Relu after every MatMul, so that no two MatMuls form a factor pair svd leaves alone) with random float32
weights (38 tensors of 64 MiB: 2.55 GB in one external-data file), then a per-feature scale
computed by a small constant subgraph (``Constant + Add``, for fold-constants). Random weights suit memory and
time, not fidelity: their spectra are flat, so ``svd`` at a small rank loses most of the output (measure it with
``--no-gate``). The weights are written one at a time (64 KiB-aligned, as graphopt writes them), so building the
model needs one tensor's memory. Peak RSS is ``Maximum resident set size`` of ``/usr/bin/time -v``: the whole
process (interpreter, imports, onnxruntime sessions, page-cache pages it maps). Measured runs (one at a time, each
holds ~2.5 GB): ``--pass fold-constants``, ``--pass quantize-dynamic``, ``--pass quantize-weights``, ``--pass
svd:rank=32 --no-gate`` (benchmarks/results/bigmodel.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HIDDEN, FFN, BLOCKS = 1024, 16384, 19
ALIGN = 1 << 16


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def build(folder: Path) -> Path:
    """Write DIR/big.onnx and its data file, one weight at a time; return the model's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path, data_name = folder / "big.onnx", "big.onnx.data"
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    with open(folder / data_name, "wb") as f:
        for b in range(BLOCKS):
            for kind, (k, n) in (("up", (HIDDEN, FFN)), ("down", (FFN, HIDDEN))):
                w = ((rng.random((k, n), dtype=np.float32) * 2 - 1) * np.float32(np.sqrt(6 / k))).astype(np.float32)
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset = f.tell()
                w.tofile(f)
                name = f"W_{kind}{b}"
                inits.append(_external(name, [k, n], data_name, offset, w.nbytes))
                out = f"{kind}{b}"
                nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"mm_{kind}{b}"))
                x = out
                nodes.append(helper.make_node("Relu", [x], [f"relu_{kind}{b}"]))   # no MatMul pair is low-rank
                x = f"relu_{kind}{b}"
    nodes += [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
                  np.full(HIDDEN, 0.5, np.float32))),
              helper.make_node("Add", ["c", "one"], ["scale"]),
              helper.make_node("Mul", [x, "scale"], ["y"])]
    inits.append(onnx.numpy_helper.from_array(np.ones(HIDDEN, np.float32), "one"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path


def run(folder: Path, name: str, args: list[str]) -> dict:
    """The CLI on DIR/big.onnx under /usr/bin/time -v: exit code, wall time, peak RSS, the CLI's last lines."""
    out = folder / f"{name}.onnx"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "graphopt", str(folder / "big.onnx"), str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr)
    size_in = sum(p.stat().st_size for p in folder.glob("big.onnx*"))
    size_out = sum(p.stat().st_size for p in folder.glob(f"{name}.onnx*"))
    return {"args": args, "code": proc.returncode, "wall_s": round(wall, 1),
            "user_s": float(user.group(1)) if user else None, "system_s": float(system.group(1)) if system else None,
            "peak_rss_gb": int(rss.group(1)) / 1e6 if rss else None, "input_gb": size_in / 1e9,
            "output_gb": size_out / 1e9, "peak_over_input": (int(rss.group(1)) * 1e3 / size_in) if rss else None,
            "stdout": proc.stdout.strip().splitlines()[-12:],
            "stderr": [ln for ln in proc.stderr.splitlines() if "\t" not in ln][-5:]}


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "build":
        print(build(Path(sys.argv[2])))
    elif len(sys.argv) >= 4 and sys.argv[1] == "run":
        rest = sys.argv[4:]
        print(json.dumps(run(Path(sys.argv[2]), sys.argv[3], rest[1:] if rest[:1] == ["--"] else rest)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
