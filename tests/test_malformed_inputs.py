"""Malformed input, generated (hypothesis), through the whole CLI: random option strings for every pass, random
npz contents (dtypes, shapes, NaN/Inf, no rows, extra and misspelled keys, labels of any shape).

Property: exit 0 with a model onnx.checker accepts, or exit 1/2 with one line on stderr and nothing written —
never exit 3, never a traceback. (Generated graphs: tests/test_generated_graphs.py; every declared option value:
tests/test_every_option.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from graphopt.pipeline import registry
from graphs import conv_model

BUILTIN = sorted(name for name in registry() if not name.startswith("test-"))
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _holds(res, out: Path) -> None:
    assert res.code in (0, 1, 2), res.err
    event(f"exit {res.code}" + (": " + res.err.split(".npz")[-1][:70] if res.code else ""))
    assert "Traceback" not in res.err
    if res.code == 0:
        onnx.checker.check_model(onnx.load(out))
    else:
        assert len([line for line in res.err.splitlines() if line.strip()]) == 1, res.err
        assert not out.exists()


@st.composite
def option_strings(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(BUILTIN + ["quantise", ""]))
    keys = [s.name for s in registry()[name].option_specs()] if name in registry() else []
    key = st.one_of(st.sampled_from(keys or ["ratio"]), st.text("abcdefgh-_=:", max_size=6))
    value = st.one_of(st.sampled_from(["true", "false", "none", "auto", "0", "1", "-1", "0.5", "1e9", "nan", "inf",
                                       "", "gptq", "minmax", "global", "conv1", "*", "1/2"]),
                      st.text(max_size=5))
    items = draw(st.lists(st.tuples(key, value), max_size=3))
    sep = draw(st.sampled_from([":", "::", ""]))
    return name + (sep + ",".join(f"{k}={v}" for k, v in items) if items else "")


@SETTINGS
@given(text=option_strings())
def test_random_option_strings(cli, tmp_path: Path, text: str):
    model, data, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    if not model.exists():
        onnx.save(conv_model(), model)
        np.savez(data, x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    out.unlink(missing_ok=True)
    _holds(cli(model, out, "--pass", text, "--calib-data", data, "--latency-runs", "0"), out)


@st.composite
def npz_contents(draw: st.DrawFn) -> dict[str, np.ndarray]:
    rows = draw(st.sampled_from([0, 1, 3, 16]))
    shape = draw(st.sampled_from([(rows, 3, 8, 8)] * 4 + [(rows, 8, 8, 3), (rows, 3, 8), (rows, 3, 9, 8), (rows,)]))
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int64", "uint8", "bool"]))
    x = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(shape) * draw(st.sampled_from([1, 255]))
    if draw(st.booleans()) and x.size:
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with np.errstate(invalid="ignore", over="ignore"):
        arrays = {draw(st.sampled_from(["x"] * 4 + ["X", "input"])): x.astype(dtype)}
    if draw(st.booleans()):
        arrays[draw(st.sampled_from(["__labels__", "labels", "extra"]))] = draw(st.sampled_from([
            np.zeros(rows, np.int64), np.eye(5, dtype=np.int64)[np.zeros(rows, int)], np.full(rows, 0.5),
            np.zeros((rows, 2, 2))]))
    return arrays


@SETTINGS
@given(arrays=npz_contents(), flag=st.sampled_from(["--calib-data", "--val-data"]),
       passes=st.sampled_from([[], ["--pass", "quantize"], ["--pass", "svd:data-aware=true,ratio=0.5"]]))
def test_random_npz_contents(cli, tmp_path: Path, arrays: dict[str, np.ndarray], flag: str, passes: list[str]):
    model, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    if not model.exists():
        onnx.save(conv_model(), model)
    out.unlink(missing_ok=True)
    np.savez(data, **arrays)
    extra = ["--calib-data", data] if passes and flag == "--val-data" else []
    _holds(cli(model, out, *passes, flag, data, *extra, "--latency-runs", "0"), out)
