"""Bad input: each case ends with a one-line error, the contract's exit code, no traceback, and no OUT left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import graphopt
import graphopt.io
from graphs import assert_one_line_error, conv_model


def _no_output(folder: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers


def test_missing_file(cli, tmp_path):
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli(tmp_path / "nope.onnx", out), 2, "no such file")
    _no_output(tmp_path, out)


def test_empty_file(cli, tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "empty")
    _no_output(tmp_path, tmp_path / "out.onnx")


def test_random_bytes(cli, tmp_path):
    p = tmp_path / "rand.onnx"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "not an ONNX model")
    _no_output(tmp_path, tmp_path / "out.onnx")


def test_truncated_model(cli, tmp_path, model_path):
    data = model_path.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) * 2 // 3])
    res = cli(p, tmp_path / "out.onnx")
    assert_one_line_error(res, 2, str(p))
    _no_output(tmp_path, tmp_path / "out.onnx")


def test_directory(cli, tmp_path):
    assert_one_line_error(cli(tmp_path, tmp_path / "out.onnx"), 2, "directory")


def test_text_file(cli, tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is a text file, not a model\n" * 20)
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "not an ONNX model")
    _no_output(tmp_path, tmp_path / "out.onnx")


def _external_model(tmp_path: Path, location: str) -> Path:
    model = conv_model(constant_nodes=False)
    for t in model.graph.initializer:
        if t.name == "fc_w":
            data = numpy_helper.to_array(t).tobytes()
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", "0"), ("length", str(len(data)))):
                e = t.external_data.add()
                e.key, e.value = k, v
    p = tmp_path / "ext.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def test_external_data_loads(cli, tmp_path):
    model = conv_model(constant_nodes=False)
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc_w"))
    p = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(fc.tobytes())
    loaded = graphopt.io.load_model(p)
    got = numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "fc_w"))
    np.testing.assert_array_equal(got, fc)
    res = cli(p, tmp_path / "out.onnx", "--latency-runs", "0")
    assert res.code == 0, res.err


def test_missing_external_data(cli, tmp_path):
    p = _external_model(tmp_path, "weights.bin")
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "weights.bin", "not found")
    _no_output(tmp_path, tmp_path / "out.onnx")


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link/secret.bin"])
def test_external_data_escaping_folder(cli, tmp_path, location):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 80)
    (model_dir / "link").symlink_to(tmp_path)  # a symlink out of the model's folder
    p = _external_model(model_dir, location)
    res = cli(p, model_dir / "out.onnx")
    assert_one_line_error(res, 2, location)
    assert "outside" in res.err or "absolute" in res.err
    _no_output(model_dir, model_dir / "out.onnx")


def test_unsupported_opset(cli, tmp_path):
    model = conv_model()
    model.opset_import[0].version = 99
    p = tmp_path / "future.onnx"
    p.write_bytes(model.SerializeToString())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "opset 99")


def test_unsupported_ir_version(cli, tmp_path):
    model = conv_model()
    model.ir_version = 99
    p = tmp_path / "future_ir.onnx"
    p.write_bytes(model.SerializeToString())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "IR version 99")


def test_unknown_pass(cli, tmp_path, model_path):
    res = cli(model_path, tmp_path / "out.onnx", "--pass", "fold-everything")
    assert_one_line_error(res, 2, "unknown pass 'fold-everything'", "fold-constants")
    _no_output(tmp_path, tmp_path / "out.onnx")


def test_unknown_option(cli, tmp_path, model_path):
    from graphopt.passes.base import Pass, register
    from tests_support_pass import ensure_test_pass  # noqa: F401  (registers 'test-scale')

    res = cli(model_path, tmp_path / "out.onnx", "--pass", "test-scale:factr=2")
    assert_one_line_error(res, 2, "no option 'factr'", "valid options", "factor", "ratio")
    del Pass, register


@pytest.mark.parametrize("value, needle", [("abc", "not a number"), ("1.5", "out of range"), ("nan", "finite"),
                                           ("-0.1", "out of range")])
def test_bad_option_value(cli, tmp_path, model_path, value, needle):
    import tests_support_pass  # noqa: F401

    res = cli(model_path, tmp_path / "out.onnx", "--pass", f"test-scale:ratio={value}")
    assert_one_line_error(res, 2, "ratio", needle, "[0, 1]")
    _no_output(tmp_path, tmp_path / "out.onnx")


def test_bad_choice_names_choices(cli, tmp_path, model_path):
    import tests_support_pass  # noqa: F401

    res = cli(model_path, tmp_path / "out.onnx", "--pass", "test-scale:mode=diagonal")
    assert_one_line_error(res, 2, "'diagonal'", "weights", "outputs")


def test_out_folder_missing(cli, tmp_path, model_path):
    out = tmp_path / "no" / "such" / "out.onnx"
    assert_one_line_error(cli(model_path, out), 2, "does not exist")
    assert not out.parent.exists()


def test_out_not_writable(cli, tmp_path, model_path):
    if os.geteuid() == 0:
        out = Path("/sys/graphopt-out.onnx")  # sysfs refuses new files even to root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out.onnx"
    assert_one_line_error(cli(model_path, out), 2, "not writable")
    assert not out.exists()


def test_out_equal_to_in(cli, model_path):
    before = model_path.read_bytes()
    assert_one_line_error(cli(model_path, model_path), 2, "overwrite the input")
    assert model_path.read_bytes() == before
    # the same file through another spelling and through a symlink
    alias = model_path.parent / "." / model_path.name
    assert cli(model_path, alias).code == 2
    link = model_path.parent / "link.onnx"
    link.symlink_to(model_path)
    assert_one_line_error(cli(model_path, link), 2, "overwrite the input")
    assert model_path.read_bytes() == before


def test_out_is_input_external_data(cli, tmp_path):
    model = conv_model(constant_nodes=False)
    fc = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc_w"))
    p = _external_model(tmp_path, "out.onnx")  # weights stored in a file named like the output
    (tmp_path / "out.onnx").write_bytes(fc.tobytes())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "overwrite the input")
    assert (tmp_path / "out.onnx").read_bytes() == fc.tobytes()


def test_interrupted_save_leaves_nothing(cli, tmp_path, model_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(graphopt.io.os, "fsync", interrupt)
    res = cli(model_path, out, "--latency-runs", "0")
    assert_one_line_error(res, 130, "interrupted", "nothing written")
    _no_output(tmp_path, out)


def test_interrupted_save_keeps_previous_out(cli, tmp_path, model_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(graphopt.io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    res = cli(model_path, out, "--latency-runs", "0")
    assert res.code == 130
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")] == []


def test_checker_invalid_model(cli, tmp_path):
    model = conv_model()
    model.graph.node[2].input[0] = "does_not_exist"
    p = tmp_path / "broken.onnx"
    p.write_bytes(model.SerializeToString())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "invalid ONNX model")


def test_bad_data_file(cli, tmp_path, model_path):
    bad = tmp_path / "data.npz"
    np.savez(bad, x=np.zeros((4, 3, 5, 5), np.float32))
    assert_one_line_error(cli(model_path, tmp_path / "out.onnx", "--val-data", bad), 2, "shape", "'x'")
    np.savez(bad, wrong_name=np.zeros((4, 3, 8, 8), np.float32))
    assert_one_line_error(cli(model_path, tmp_path / "out.onnx", "--val-data", bad), 2, "no array for model input 'x'")
    assert_one_line_error(cli(model_path, tmp_path / "out.onnx", "--val-data", tmp_path / "x.npz"), 2, "no such")


def test_bad_usage(cli, tmp_path, model_path):
    assert_one_line_error(cli(model_path), 2, "expected IN.onnx OUT.onnx")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--bogus-flag"), 2, "--bogus-flag")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--input-shape", "x=1xAx8"), 2, "--input-shape")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--input-shape", "nope=1x3x8x8"), 2, "nope")


def test_subprocess_no_traceback(tmp_path):
    """The real entry point, as a user runs it: one line on stderr, exit 2."""
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\x08\x07junk")
    r = subprocess.run([sys.executable, "-m", "graphopt", str(p), str(tmp_path / "o.onnx")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_opset_too_old(cli, tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 5)])
    m.ir_version = 3
    p = tmp_path / "old.onnx"
    p.write_bytes(m.SerializeToString())
    assert_one_line_error(cli(p, tmp_path / "out.onnx"), 2, "opset 5")


def test_version_and_info_help(cli, capsys):
    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"graphopt {graphopt.__version__}"
    with pytest.raises(SystemExit) as e:
        cli("info", "--help")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: graphopt info")


def test_info_refuses_options_it_does_not_use_and_names_its_data(cli, model_path, tmp_path):
    assert_one_line_error(cli("info", model_path, "--pass", "svd"), 2, "unrecognized arguments: --pass svd",
                          "graphopt info --help")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 8, 8), np.float32))
    res = cli("info", model_path, "--val-data", data)
    assert res.code == 0 and "per run on {'x': [1, 3, 8, 8]} from d.npz" in res.out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--min-cosine", "--min-top1", "--max-rel-error"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)))
def test_targets_out_of_range_are_usage_errors(cli, model_path, tmp_path, flag, value):
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        number = None
    valid = number is not None and np.isfinite(number) and (
        number >= 0 if flag == "--max-rel-error" else 0 <= number <= 1)
    if valid or text.startswith("-") and number is None:
        return   # a valid target, or text argparse reads as another option
    out = tmp_path / "o.onnx"
    res = cli(model_path, out, flag, text, "--latency-runs", "0")
    assert_one_line_error(res, 2, flag)
    assert not out.exists()


def test_negative_latency_runs_and_zero_threads(cli, model_path, tmp_path):
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--latency-runs", "-1"), 2,
                          "--latency-runs must be 0 (skip latency) or more")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--threads", "0"), 2, "--threads must be positive")


def test_save_calibration_without_a_calibrating_pass_is_refused_before_any_work(cli, model_path, tmp_path):
    out, ranges = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli(model_path, out, "--pass", "svd", "--save-calibration", ranges)
    assert_one_line_error(res, 2, "--save-calibration: no pass in this pipeline calibrates ranges", "quantize")
    assert not out.exists() and not ranges.exists()


def test_a_reader_that_stops_reading_is_no_internal_error(tmp_path):
    """`graphopt ... | head -1`: the pipe closes under the report; the run goes on and writes its model (the report
    is a by-product), exit 0, no traceback, no 'internal error' line."""
    out = tmp_path / "o.onnx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "graphopt", str(Path(__file__).resolve().parents[1] / "models" / "mnist_mlp.onnx"),
           str(out), "--latency-runs", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()          # the reader goes away after the first line
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == "", err
    assert out.exists()
