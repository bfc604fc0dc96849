"""--fix-input NAME=VALUE (graphopt.fixed_inputs): the input becomes a constant, fold-constants inlines the If it
decides, and every bad value is one line with exit 2."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphs import assert_one_line_error, parse_model, run
from graphopt.errors import UsageError
from graphopt.fixed_inputs import parse_fix_input, with_fixed_inputs

# A VAD-like model: the whole network sits in an If on the sample rate, an input fixed in deployment.
VAD = """
agraph (float[N, 4] input, int64 sr, float[2, 3] table) => (float[N, 4] out) {
    is16 = Equal(sr, k16)
    out = If (is16) <then_branch = g1 () => (float[N, 4] a) { a = MatMul(input, w16) },
                     else_branch = g2 () => (float[N, 4] b) { b = MatMul(input, w8) }>
}
"""


def vad() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return parse_model(VAD, k16=np.array(16000, np.int64), w16=rng.standard_normal((4, 4)).astype(np.float32),
                       w8=rng.standard_normal((4, 4)).astype(np.float32))


def test_fixed_sample_rate_inlines_the_branch(cli, tmp_path):
    src, out = tmp_path / "vad.onnx", tmp_path / "out.onnx"
    model = vad()
    onnx.save(model, src)
    data = tmp_path / "d.npz"
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    np.savez(data, input=x, sr=np.array(16000, np.int64), table=np.zeros((8, 2, 3), np.float32))
    res = cli(src, out, "--fix-input", "sr=16000", "--pass", "fold-constants", "--val-data", data, "--latency-runs",
              "0")
    assert res.code == 0, res.err
    assert "'sr' matches no model input and is ignored" in res.out     # the data's value for a fixed input
    assert "declined" not in res.out
    got = onnx.load(out)
    assert [n.op_type for n in got.graph.node] == ["MatMul"]
    assert [i.name for i in got.graph.input] == ["input", "table"]
    table = np.zeros((2, 3), np.float32)
    np.testing.assert_array_equal(run(got, {"input": x, "table": table})[0],
                                  run(model, {"input": x, "sr": np.array(16000, np.int64), "table": table})[0])


def test_api_fix_inputs_takes_numbers():
    out, report = graphopt.optimize(vad(), ["fold-constants"], fix_inputs={"sr": 8000}, latency_runs=0)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert out.graph.node[0].input[1] == "w8"


@pytest.mark.parametrize("flag, needle", [
    ("rate=16000", "the model has no input 'rate' (inputs: input, sr, table)"),
    ("sr=16000.5", "not a whole number"),
    ("sr=fast", "not a number"),
    ("sr=1,2", "has shape [], 1 value(s); got 2"),
    ("input=1,2,3,4", "input 'input' has dynamic dims [N, 4]"),
    ("table=1,2,3,4,5", "has shape [2, 3], 6 value(s); got 5"),
    ("table=1,2,3,4,5,nan", "not a finite number"),
    ("sr", "expected NAME=VALUE"),
    ("sr=", "expected NAME=VALUE"),
])
def test_bad_values_are_one_line(cli, tmp_path, flag, needle):
    src = tmp_path / "vad.onnx"
    onnx.save(vad(), src)
    res = cli(src, tmp_path / "out.onnx", "--fix-input", flag)
    assert_one_line_error(res, 2, needle)
    assert not (tmp_path / "out.onnx").exists()


def test_same_input_twice(cli, tmp_path):
    src = tmp_path / "vad.onnx"
    onnx.save(vad(), src)
    assert_one_line_error(cli(src, tmp_path / "o.onnx", "--fix-input", "sr=1", "--fix-input", "sr=2"), 2,
                          "names input 'sr' twice")


DTYPES = ["int8", "uint8", "int32", "int64", "float32", "float64", "bool"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                                          st.text(max_size=6), st.booleans()))
def test_any_value_fits_or_is_refused(dtype, value):
    """For each input class, a value is stored exactly (floats: as the dtype rounds them) or refused with a
    UsageError naming the input; never another exception."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["v"], ["o"])], "g",
        [onnx.helper.make_tensor_value_info("v", elem, [])], [onnx.helper.make_tensor_value_info("o", elem, [])]))
    for given_as in (value, [str(value)]):
        try:
            fixed = with_fixed_inputs(model, {"v": given_as})
        except UsageError as e:
            assert "input 'v'" in str(e) and "\n" not in str(e)
            continue
        (init,) = fixed.graph.initializer
        stored = onnx.numpy_helper.to_array(init)
        assert init.name == "v" and stored.dtype == np.dtype(dtype) and stored.shape == ()
        assert not fixed.graph.input
        if np.dtype(dtype).kind in "iub" and not isinstance(given_as, (list, str)):
            assert stored == value
        assert np.isfinite(stored)


def test_parse_fix_input():
    assert parse_fix_input("sr=16000") == ("sr", ["16000"])
    assert parse_fix_input("w=1, 2,3") == ("w", ["1", "2", "3"])
