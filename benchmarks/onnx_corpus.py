"""Run graphopt's default pipeline over the onnx package's own operator test corpus.

The corpus is every case of ``onnx.backend.test.case.node.collect_testcases()`` (about 1,900 single-operator
models, each with its inputs and expected outputs) from the installed onnx. It is written once to a cache folder
(default ``~/.cache/graphopt-bench/onnx-node-corpus``)::

    <name>/model.onnx                   the test's model
    <name>/test_data_set_<i>/*.pb       its inputs and expected outputs in onnx's own test-data format
    <name>/inputs/feed_<i>.npz          the same inputs in graphopt's folder format (one feed per file, keys = input
                                        names), when numpy can hold every input
    <name>/meta.json                    rtol/atol, names, and why the inputs do not fit .npz (if they do not)

Then ``python -m graphopt model.onnx OUT --val-data inputs/ --latency-runs 0 -q`` runs in-process for every model
(``graphopt.cli.main``), in 2 worker processes with a per-model timeout (a hang or a dead worker is recorded, the
run goes on). Cases whose inputs .npz cannot hold (sequences, optionals, bfloat16, float8, int4, ...) go through
the Python API instead, ``graphopt.api.optimize(model, val_data=[feed])`` with the test's own inputs, errors mapped
to exit codes as the CLI maps them. For a model that ends written, the output is checked independently: its
outputs on the test's inputs must equal the original model's (the test's rtol/atol for floats, exact for
everything else, element by element for sequences and optionals), and must equal the test's expected outputs
wherever the original model's do.

Outcomes: ``ok`` (written and validated), ``exit-1`` (validation failed), ``exit-2`` (refused with a message),
``crash`` (exit 3, another exit code, or a dead worker), ``timeout``, ``mismatch`` (written but outputs differ).
Crashes, exit 1, timeouts and mismatches are bugs in graphopt; the script exits 1 when there is any.

    python benchmarks/onnx_corpus.py [--cache DIR] [--only SUBSTR] [--json FILE] [--markdown FILE]
                                     [--timeout S] [--workers N] [--top N]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io as _io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE = Path.home() / ".cache" / "graphopt-bench" / "onnx-node-corpus"
MARKER = "CORPUS.json"
FORMAT = 2  # bump when the folder layout changes
BUGS = ("exit-1", "crash", "timeout", "mismatch")
OUTCOMES = ("ok", "exit-1", "exit-2", "crash", "timeout", "mismatch")


# ------------------------------------------------------------------------------------------------ the corpus


def _storable(value: Any) -> tuple[np.ndarray | None, str | None]:
    """``value`` as an array .npz can hold, or the reason it cannot be stored."""
    from onnx import TensorProto, numpy_helper

    if value is None:
        return None, "optional input"
    if isinstance(value, (list, tuple, dict)):
        return None, "sequence/map input"
    if isinstance(value, TensorProto):
        value = numpy_helper.to_array(value)
    arr = np.asarray(value)
    if arr.dtype.kind == "V" or arr.dtype.type.__module__ != "numpy":
        return None, f"dtype {arr.dtype} cannot be stored in .npz"
    if arr.dtype.kind == "O":
        if not all(isinstance(x, (str, bytes)) for x in arr.ravel()):
            return None, "object array that is not strings"
        arr = arr.astype(str)
    return arr, None


def _to_proto(value: Any, vi: Any) -> bytes:
    """One input or output in the onnx test-data format (what onnx's backend-test-tools writes)."""
    from onnx import TensorProto, numpy_helper

    t = vi.type
    if t.HasField("map_type"):
        return numpy_helper.from_dict(value, vi.name).SerializeToString()
    if t.HasField("sequence_type"):
        return numpy_helper.from_list(value, vi.name).SerializeToString()
    if t.HasField("optional_type"):
        return numpy_helper.from_optional(value, vi.name).SerializeToString()
    if isinstance(value, TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), vi.name).SerializeToString()


def _from_proto(data: bytes, vi: Any) -> Any:
    import onnx
    from onnx import numpy_helper

    t = vi.type
    if t.HasField("map_type"):
        return numpy_helper.to_dict(onnx.MapProto.FromString(data))
    if t.HasField("sequence_type"):
        return numpy_helper.to_list(onnx.SequenceProto.FromString(data))
    if t.HasField("optional_type"):
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(data))
    return numpy_helper.to_array(onnx.TensorProto.FromString(data))


def load_data_set(folder: Path, model: Any, i: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inputs and expected outputs of data set ``i`` of a materialised case, by name."""
    d = folder / f"test_data_set_{i}"
    inputs = {vi.name: _from_proto((d / f"input_{j}.pb").read_bytes(), vi)
              for j, vi in enumerate(model.graph.input) if (d / f"input_{j}.pb").is_file()}
    outputs = {vi.name: _from_proto((d / f"output_{j}.pb").read_bytes(), vi)
               for j, vi in enumerate(model.graph.output) if (d / f"output_{j}.pb").is_file()}
    return inputs, outputs


def materialise_case(case: Any, folder: Path) -> dict[str, Any]:
    """Write one test case into ``folder`` (created); return its meta record.

    Always: ``model.onnx`` and ``test_data_set_<i>/input_<j>.pb, output_<j>.pb`` (onnx's own test-data format, which
    holds sequences, optionals and every dtype). Also, when every input is an array numpy can store,
    ``inputs/feed_<i>.npz`` (graphopt's folder format, keys = input names) for the command line's --val-data.
    """
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(case.model, str(folder / "model.onnx"))
    g = case.model.graph
    meta: dict[str, Any] = {"name": case.name, "rtol": float(case.rtol), "atol": float(case.atol),
                            "inputs": [vi.name for vi in g.input], "outputs": [vi.name for vi in g.output],
                            "npz": None, "feeds": len(case.data_sets)}
    feeds = []
    for i, (inputs, outputs) in enumerate(case.data_sets):
        d = folder / f"test_data_set_{i}"
        d.mkdir(exist_ok=True)
        for j, value in enumerate(inputs):
            (d / f"input_{j}.pb").write_bytes(_to_proto(value, g.input[j]))
        for j, value in enumerate(outputs):
            (d / f"output_{j}.pb").write_bytes(_to_proto(value, g.output[j]))
        feed = {}
        for vi, value in zip(g.input, inputs):
            arr, why = _storable(value)
            if why:
                meta["npz"] = meta["npz"] or f"input '{vi.name}': {why}"
            feed[vi.name] = arr
        feeds.append(feed)
    if meta["npz"] is None:
        (folder / "inputs").mkdir(exist_ok=True)
        for i, feed in enumerate(feeds):
            np.savez(folder / "inputs" / f"feed_{i:03d}.npz", **feed)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def collect(only: str | None = None) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases(None)
    return [c for c in cases if only is None or only in c.name]


def materialise(cache: Path) -> list[Path]:
    """Write the corpus into ``cache`` unless it is already there for the installed onnx; return case folders."""
    import onnx

    marker = cache / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("onnx") == onnx.__version__ and info.get("format") == FORMAT:
            return [cache / n for n in info["cases"]]
    t0 = time.perf_counter()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    cases = collect()
    for case in cases:
        materialise_case(case, tmp / case.name)
    info = {"onnx": onnx.__version__, "format": FORMAT, "cases": [c.name for c in cases]}
    (tmp / MARKER).write_text(json.dumps(info) + "\n")
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    print(f"wrote {len(cases)} test cases to {cache} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return [cache / c.name for c in cases]


# ---------------------------------------------------------------------------------------------- one model


def run_graphopt(args: list[str]) -> tuple[int, str]:
    """``graphopt.cli.main(args)`` in this process; its exit code and what it wrote to stderr (one line is the
    contract for an error; more lines are kept, joined with " / ", so that the summary shows them)."""
    from graphopt.cli import main

    err = _io.StringIO()
    out = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main(args)
        except SystemExit as e:  # argparse --help and friends; should not happen
            rc = e.code if isinstance(e.code, int) else 3
        except BaseException as e:  # noqa: BLE001  main() must never raise
            return 3, f"main() raised {type(e).__name__}: {e}"
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return rc, " / ".join(lines)


def run_graphopt_api(model: Path, out: Path, feeds: list[dict[str, Any]]) -> tuple[int, str]:
    """The CLI's work through the Python API, for inputs .npz cannot hold (sequences, optionals, bfloat16...):
    ``optimize(model, val_data=feeds)`` then ``io.save_model``, errors mapped to exit codes as the CLI does."""
    from graphopt import io as gio
    from graphopt.api import optimize
    from graphopt.errors import GraphoptError, ValidationFailed, one_line

    with contextlib.redirect_stderr(_io.StringIO()), contextlib.redirect_stdout(_io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rewritten, _ = optimize(gio.load_model(model), val_data=feeds, latency_runs=0)
            gio.save_model(rewritten, out)
            return 0, ""
        except ValidationFailed as e:
            return 1, f"error: {e} (nothing written; --force writes anyway)"
        except GraphoptError as e:
            kind = "internal error" if e.exit_code == 3 else "error"
            return e.exit_code, f"{kind}: {one_line(e)}"
        except Exception as e:  # noqa: BLE001
            return 3, f"internal error: {type(e).__name__}: {one_line(e)}"


def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _equal(a: Any, b: Any, rtol: float, atol: float) -> str | None:
    """None when ``b`` equals ``a`` (floats within rtol/atol, NaN where NaN; everything else exact); sequences,
    optionals (None) and maps element by element."""
    if a is None or b is None:
        return None if a is None and b is None else f"{'empty' if b is None else 'a value'} vs " \
                                                      f"{'empty' if a is None else 'a value'}"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return "map keys differ"
        return next((f"[{k}] {d}" for k in a if (d := _equal(a[k], b[k], rtol, atol))), None)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return f"sequence of {len(b) if isinstance(b, (list, tuple)) else 'no'} items vs " \
                   f"{len(a) if isinstance(a, (list, tuple)) else 'no'}"
        return next((f"[{i}] {d}" for i, (x, y) in enumerate(zip(a, b)) if (d := _equal(x, y, rtol, atol))), None)
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shape {list(b.shape)} vs {list(a.shape)}"
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        if a.dtype != b.dtype:
            return f"dtype {b.dtype} vs {a.dtype}"
        wide = np.complex128 if a.dtype.kind == "c" else np.float64
        ok = np.isclose(b.astype(wide), a.astype(wide), rtol=rtol, atol=atol, equal_nan=True)
        bad = int(np.count_nonzero(~ok))
        return f"{bad} of {a.size} values differ" if bad else None
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        bad = int(np.count_nonzero(a.astype(str) != b.astype(str)))
    else:
        if a.dtype != b.dtype:
            return f"dtype {b.dtype} vs {a.dtype}"
        bad = int(np.count_nonzero(a != b))
    return f"{bad} of {a.size} values differ" if bad else None


def check_outputs(folder: Path, out_model: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Run original and rewritten on the test's inputs; compare with each other and with the expected outputs."""
    import onnx

    model = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
    rtol, atol = meta["rtol"], meta["atol"]
    ref, new = _session(folder / "model.onnx"), _session(out_model)
    names = [o.name for o in ref.get_outputs()]
    if [o.name for o in new.get_outputs()] != names:
        return {"problem": f"outputs {[o.name for o in new.get_outputs()]} instead of {names}"}
    result: dict[str, Any] = {"problem": None, "original_vs_expected": None}
    for i in range(meta["feeds"]):
        feed, expected = load_data_set(folder, model, i)
        r, o = ref.run(None, feed), new.run(None, feed)
        for name, x, y in zip(names, r, o):
            diff = _equal(x, y, rtol, atol)
            if diff:
                result["problem"] = f"output '{name}' differs from the original's: {diff}"
                return result
            if name not in expected:
                continue
            if _equal(expected[name], x, rtol, atol) is None:
                result["original_vs_expected"] = result["original_vs_expected"] or "match"
                diff = _equal(expected[name], y, rtol, atol)
                if diff:
                    result["problem"] = f"output '{name}' differs from the test's expected output: {diff}"
                    return result
            else:
                result["original_vs_expected"] = "differ"
    return result


def _count_nodes(path: Path) -> int:
    import onnx

    return len(onnx.load_model(str(path), load_external_data=False).graph.node)


def run_case(folder: Path, out_root: Path) -> dict[str, Any]:
    """graphopt on one materialised case: the CLI with --val-data when its inputs fit .npz, else the API."""
    meta = json.loads((folder / "meta.json").read_text())
    out = out_root / f"{meta['name']}.onnx"
    rec: dict[str, Any] = {"name": meta["name"], "outcome": None, "exit": None, "message": "",
                           "via": "api" if meta["npz"] else "cli", "npz": meta["npz"]}
    t0 = time.perf_counter()
    if meta["npz"] is None:
        rc, msg = run_graphopt([str(folder / "model.onnx"), str(out), "--val-data", str(folder / "inputs"),
                                "--latency-runs", "0", "-q"])
    else:
        import onnx

        model = onnx.load_model(str(folder / "model.onnx"), load_external_data=False)
        feeds = [load_data_set(folder, model, i)[0] for i in range(meta["feeds"])]
        rc, msg = run_graphopt_api(folder / "model.onnx", out, feeds)
    rec["exit"], rec["message"] = rc, msg
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    if rc == 0 and not out.is_file():
        rec["outcome"], rec["message"] = "crash", "exit 0 but no output file written"
    elif rc == 0:
        try:
            check = check_outputs(folder, out, meta)
        except Exception as e:  # noqa: BLE001
            check = {"problem": f"checking the outputs failed: {type(e).__name__}: {str(e).splitlines()[0]}"}
        rec["original_vs_expected"] = check.get("original_vs_expected")
        rec["nodes"] = [_count_nodes(folder / "model.onnx"), _count_nodes(out)]
        if check["problem"]:
            rec["outcome"], rec["message"] = "mismatch", check["problem"]
        else:
            rec["outcome"] = "ok"
    else:
        rec["outcome"] = {1: "exit-1", 2: "exit-2"}.get(rc, "crash")
    out.unlink(missing_ok=True)
    return rec


# -------------------------------------------------------------------------------------------------- workers


def _worker(conn: Any, out_root: str, log_path: str) -> None:
    # C-level noise from onnxruntime goes to a log file, not the terminal.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    warnings.simplefilter("ignore")
    import graphopt.cli  # noqa: F401  (import once, before the first task)

    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_case(Path(task), Path(out_root)))


class _Worker:
    def __init__(self, ctx: Any, out_root: Path, log_path: Path) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, str(out_root), str(log_path)), daemon=True)
        self.proc.start()
        child.close()
        self.task: Path | None = None
        self.started = 0.0

    def send(self, task: Path) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(str(task))

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_all(folders: list[Path], workers: int = 2, timeout: float = 60.0, progress: bool = True
            ) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out_root = Path(tempfile.mkdtemp(prefix="graphopt-corpus-"))
    log_path = out_root / "worker-stderr.log"
    pool = [_Worker(ctx, out_root, log_path) for _ in range(max(1, min(workers, len(folders))))]
    pending = collections.deque(folders)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(rec: dict[str, Any]) -> None:
        results.append(rec)
        if progress and (len(results) % 100 == 0 or len(results) == len(folders)):
            print(f"  {len(results)}/{len(folders)} models, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    try:
        while pending or any(w.task is not None for w in pool):
            for w in pool:
                if w.task is None and pending:
                    w.send(pending.popleft())
            busy = [w for w in pool if w.task is not None]
            ready = wait([w.conn for w in busy], timeout=1.0)
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                name = w.task.name
                dead = None
                if w.conn in ready:
                    try:
                        done(w.conn.recv())
                        w.task = None
                        continue
                    except (EOFError, OSError):
                        dead = "crash"
                elif not w.proc.is_alive():
                    dead = "crash"
                elif time.monotonic() - w.started > timeout:
                    dead = "timeout"
                if dead:
                    w.stop(kill=True)
                    msg = (f"no result after {timeout:g} s" if dead == "timeout"
                           else f"worker process died (exit code {w.proc.exitcode})")
                    done({"name": name, "outcome": dead, "exit": None, "message": msg, "via": None, "npz": None})
                    pool[i] = _Worker(ctx, out_root, log_path)
    finally:
        for w in pool:
            w.stop()
        shutil.rmtree(out_root, ignore_errors=True)
    return sorted(results, key=lambda r: r["name"])


# -------------------------------------------------------------------------------------------------- summary


def normalise(msg: str) -> str:
    """A message with the parts that differ between models (paths, quoted names, numbers) blanked out."""
    msg = re.sub(r"^(internal )?error: ", "", msg)
    msg = re.sub(r"(?<![\w.])/[^\s:'\"]+", "<path>", msg)
    msg = re.sub(r"'[^']*'", "'…'", msg)
    msg = re.sub(r"\"[^\"]*\"", "\"…\"", msg)
    msg = re.sub(r"\b\d+\b", "N", msg)
    msg = re.sub(r"tensor\(\w+\)", "tensor(…)", msg)
    return msg


def summarise(results: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    counts = collections.Counter(r["outcome"] for r in results)
    exit2 = collections.Counter(normalise(r["message"]) for r in results if r["outcome"] == "exit-2")
    bugs = [r for r in results if r["outcome"] in BUGS]
    vs_expected = collections.Counter(r.get("original_vs_expected") for r in results if r["outcome"] == "ok")
    via_api = collections.Counter(r["outcome"] for r in results if r.get("via") == "api")
    rewritten = sum(1 for r in results if r["outcome"] == "ok" and r["nodes"][0] != r["nodes"][1])
    return {"total": len(results), "counts": {k: counts.get(k, 0) for k in OUTCOMES},
            "top_exit2": exit2.most_common(top), "bugs": bugs, "ok_original_vs_expected": dict(vs_expected),
            "via_api": dict(via_api), "ok_rewritten": rewritten}


LABELS = {"ok": "written + validated, outputs equal the original's", "exit-1": "exit 1 (validation failed)",
          "exit-2": "exit 2 (refused with a message)", "crash": "crash (exit 3 / dead worker)",
          "timeout": "timeout", "mismatch": "exit 0 but outputs differ"}


def print_summary(s: dict[str, Any]) -> None:
    print(f"{s['total']} models")
    for k in OUTCOMES:
        print(f"  {s['counts'][k]:5d}  {LABELS[k]}")
    print(f"  of the {s['counts']['ok']} written: {s['ok_rewritten']} have fewer or more nodes than the original "
          "(the pipeline changed them), the rest are unchanged")
    vs = s["ok_original_vs_expected"]
    print(f"  of the {s['counts']['ok']} written: the original model's outputs equal the test's expected outputs "
          f"for {vs.get('match', 0)}, differ in onnxruntime itself for {vs.get('differ', 0)}")
    api = s["via_api"]
    if api:
        print(f"  run through the Python API (inputs .npz cannot hold: sequences, optionals, bfloat16, float8, "
              f"int4...): {sum(api.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(api.items()))})")
    print(f"\nmost common exit-2 messages (of {s['counts']['exit-2']}; paths, quoted names and numbers blanked):")
    for msg, n in s["top_exit2"]:
        print(f"  {n:5d}  {msg}")
    print(f"\nbugs ({len(s['bugs'])}):" if s["bugs"] else "\nno crashes, validation failures, timeouts or mismatches")
    for r in s["bugs"]:
        print(f"  {r['outcome']:8s} {r['name']}: {r['message']}")


def _cpu_model() -> str:
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def markdown(s: dict[str, Any], seconds: float, workers: int) -> str:
    """A results section for benchmarks/results/corpus.md."""
    import datetime

    import onnx
    import onnxruntime

    from graphopt.pipeline import default_pipeline

    lines = [f"## {datetime.date.today().isoformat()}: onnx {onnx.__version__} node test corpus", "",
             f"- onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, CPU: {_cpu_model()}",
             f"- default pipeline: {', '.join(default_pipeline())}; {s['total']} models, {seconds:.0f} s with "
             f"{workers} workers (`python benchmarks/onnx_corpus.py`)", "",
             "| outcome | models |", "|---|---:|"]
    lines += [f"| {LABELS[k]} | {s['counts'][k]} |" for k in OUTCOMES]
    vs = s["ok_original_vs_expected"]
    api = s["via_api"]
    lines += ["", f"Of the {s['counts']['ok']} written models, {s['ok_rewritten']} were changed by the pipeline "
              f"(node count differs). The original model's outputs equal the test's expected outputs for "
              f"{vs.get('match', 0)} of them and differ in onnxruntime itself for {vs.get('differ', 0)}; graphopt's "
              "outputs were compared with the original's for every written model. "
              f"{sum(api.values())} cases have inputs .npz cannot hold (sequences, optionals, bfloat16, float8, "
              f"int4...) and ran through the Python API with the test's inputs "
              f"({', '.join(f'{k}: {v}' for k, v in sorted(api.items()))}).", "",
              "Most common exit-2 messages (paths, quoted names and numbers blanked):", "",
              "| models | message |", "|---:|---|"]
    lines += [f"| {n} | {m.replace('|', '∣')} |" for m, n in s["top_exit2"]]
    if s["bugs"]:
        lines += ["", "Bugs:", ""] + [f"- {r['outcome']} {r['name']}: {r['message']}" for r in s["bugs"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"corpus folder (default {DEFAULT_CACHE})")
    p.add_argument("--only", metavar="SUBSTR", help="run only test cases whose name contains SUBSTR")
    p.add_argument("--json", metavar="FILE", help="write the raw per-model results here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per model (default 60)")
    p.add_argument("--top", type=int, default=15, help="how many exit-2 messages to list (default 15)")
    p.add_argument("--markdown", metavar="FILE", help="append a results section (date, versions, CPU, counts, "
                   "top messages) to FILE, e.g. benchmarks/results/corpus.md")
    args = p.parse_args(argv)
    folders = materialise(args.cache.expanduser())
    if args.only:
        folders = [f for f in folders if args.only in f.name]
    if not folders:
        print("no test cases match", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run_all(folders, args.workers, args.timeout)
    s = summarise(results, args.top)
    print_summary(s)
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.0f} s with {args.workers} workers")
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        head = "" if md.is_file() else "# graphopt over the onnx operator test corpus\n\n"
        with md.open("a") as f:
            f.write(head + markdown(s, seconds, args.workers) + "\n")
    if args.json:
        import onnx
        import onnxruntime

        Path(args.json).write_text(json.dumps({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                                               "summary": {k: v for k, v in s.items() if k != "bugs"},
                                               "results": results}, indent=1) + "\n")
    return 1 if s["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
