"""Pipeline, options, recipes, validation gates, report and API, end to end through the CLI and optimize()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader

import graphopt
import tests_support_pass  # noqa: F401  (registers the lossy 'test-scale' pass)
from graphs import assert_one_line_error, conv_model
from graphopt.errors import UsageError, ValidationFailed
from graphopt.pipeline import PassSpec, check_order, make_spec, parse_pass_arg, registry
from graphopt.runtime import cpu_info


def test_parse_pass_arg_types_and_lists():
    spec = parse_pass_arg("test-scale:factor=2.5,ratio=0.25,mode=OUTPUTS,skip=a,skip=b")
    assert spec.options.factor == 2.5 and spec.options.ratio == 0.25
    assert spec.options.mode == "outputs"
    assert spec.options.skip == ("a", "b")
    assert str(spec) == "test-scale:factor=2.5,ratio=0.25,mode=outputs,skip=a,skip=b"
    assert str(parse_pass_arg(str(spec))) == str(spec)  # the printed form parses back to the same pass
    with pytest.raises(UsageError, match="given twice"):
        parse_pass_arg("test-scale:ratio=0.1,ratio=0.2")
    with pytest.raises(UsageError, match="expected key=value"):
        parse_pass_arg("test-scale:ratio")
    with pytest.raises(UsageError, match="out of range"):
        parse_pass_arg("test-scale:factor=0")  # open lower bound


def test_order_refused_with_reason(monkeypatch):
    cls = registry()["test-scale"]
    monkeypatch.setattr(cls, "must_not_follow", {"fold-constants": "test rule"})
    with pytest.raises(UsageError, match="'test-scale' cannot run after 'fold-constants': test rule"):
        check_order([make_spec("fold-constants", {}), make_spec("test-scale", {})])
    check_order([make_spec("test-scale", {}), make_spec("fold-constants", {})])


def test_list_passes(cli):
    res = cli("--list-passes")
    assert res.code == 0
    assert "fold-constants  [exact, default]" in res.out
    assert "ratio: float in [0, 1] = 1.0" in res.out
    assert "mode: weights|outputs = 'weights'" in res.out


def test_default_run_report_json_and_dump(cli, tmp_path, model_path):
    out, rep, dump = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "dumps"
    res = cli(model_path, out, "--report", rep, "--dump-dir", dump, "--latency-runs", "5",
              "--input-shape", "x=2x3x8x8")
    assert res.code == 0, res.err
    assert "validation on random inputs" in res.out and "PASSED" in res.out
    assert "latency ms (1 thr)" in res.out
    isa = ", ".join(cpu_info()["isa"]) or "no AVX2"    # the report names what this CPU has, or says it lacks AVX2
    assert f"({isa}; {cpu_info()['cores']} cores)" in res.out.splitlines()[0]
    onnx.checker.check_model(onnx.load(out))
    data = json.loads(rep.read_text())
    assert data["validation"]["passed"] and data["validation"]["exact"]
    assert data["before"]["op_counts"]["Constant"] == 2 and "Constant" not in data["after"]["op_counts"]
    # MACs of conv_model on a 2-row feed cut to one row: conv 8*8*4 outputs x 27 taps + gemm 5x4
    assert data["before"]["macs"] == 8 * 8 * 4 * 27 + 20 == data["after"]["macs"]
    assert data["latency_ms"]["before"] > 0 and data["environment"]["onnxruntime"]
    # the shape was given, nothing guessed: only the line saying the data was synthetic
    assert [w for w in data["warnings"] if "synthetic data" not in w] == [] and len(data["warnings"]) == 1
    dumped = sorted(p.name for p in dump.iterdir())
    assert dumped[0].startswith("01-fold-constants")
    onnx.checker.check_model(onnx.load(dump / dumped[0]))


def test_recipe(cli, tmp_path, model_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n\n[[pass]]\nname = "test-scale"\nfactor = 1.0\n'
                      'skip = ["none"]\n')
    res = cli(model_path, tmp_path / "o.onnx", "--recipe", recipe, "--latency-runs", "0")
    assert res.code == 0, res.err
    assert "test-scale" in res.out
    recipe.write_text('[[pass]]\nname = "test-scale"\nfactr = 1\n')
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--recipe", recipe), 2, "no option 'factr'")
    recipe.write_text("[[pass]\n")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--recipe", recipe), 2, "not valid TOML")
    assert_one_line_error(cli(model_path, tmp_path / "o.onnx", "--recipe", recipe, "--pass", "fold-constants"), 2,
                          "not both")


def test_lossy_gate_fails_and_writes_nothing(cli, tmp_path, model_path):
    out = tmp_path / "o.onnx"
    res = cli(model_path, out, "--pass", "test-scale:factor=3,ratio=0.4",
              "--min-cosine", "0.999", "--latency-runs", "0")
    assert res.code == 1
    assert "FAILED" in res.out and "below --min-cosine" in res.err
    assert not out.exists()
    # without a threshold the lossy pass passes; with --force it is written and still exits 1
    assert cli(model_path, out, "--pass", "test-scale:factor=3,ratio=0.4", "--latency-runs", "0").code == 0
    out.unlink()
    res = cli(model_path, out, "--pass", "test-scale:factor=3,ratio=0.4", "--min-cosine", "0.999", "--force",
              "--latency-runs", "0")
    assert res.code == 1 and out.exists() and "written anyway" in res.err


def test_exact_pipeline_outside_tolerance_fails(monkeypatch, tmp_path, cli, model_path):
    cls = registry()["test-scale"]
    monkeypatch.setattr(cls, "exact", True)  # pretend the lossy pass claims exactness: validation must catch it
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "test-scale:factor=1.001", "--latency-runs", "0")
    assert res.code == 1 and "exact pipeline" in res.err
    assert not (tmp_path / "o.onnx").exists()


def _npz(tmp_path: Path, n: int = 10, labels: bool = True) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        # labels = the float model's own predictions for half the samples, so accuracy is known: 100% -> ...
        arrays["__labels__"] = np.zeros(n, np.int64)
    p = tmp_path / "data.npz"
    np.savez_compressed(p, **arrays)
    return p


def test_accuracy_reported_with_labels(cli, tmp_path, model_path):
    data = _npz(tmp_path)
    rep = tmp_path / "r.json"
    res = cli(model_path, tmp_path / "o.onnx", "--val-data", data, "--report", rep, "--latency-runs", "0")
    assert res.code == 0, res.err
    v = json.loads(rep.read_text())["validation"]
    assert v["samples"] == 10
    model = onnx.load(model_path)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.load(data)["x"]
    expected = float(np.mean(sess.run(None, {"x": x})[0].argmax(1) == 0))
    assert v["accuracy_before"] == pytest.approx(expected) == v["accuracy_after"]
    assert "accuracy on labels (10 samples)" in res.out


class _Reader(CalibrationDataReader):
    def __init__(self, n: int) -> None:
        self.items = [{"x": np.full((1, 3, 8, 8), i, np.float32)} for i in range(n)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]


@pytest.mark.parametrize("kind", ["npz", "list", "generator", "reader"])
def test_api_data_sources(tmp_path, kind):
    model = conv_model()
    if kind == "npz":
        data = _npz(tmp_path, n=5, labels=False)
    elif kind == "list":
        data = [{"x": np.ones((2, 3, 8, 8), np.float32)} for _ in range(5)]
    elif kind == "generator":
        data = ({"x": np.ones((1, 3, 8, 8), np.float32)} for _ in range(5))
    else:
        data = _Reader(5)
    out, report = graphopt.optimize(model, calib_data=data, latency_runs=0)
    assert report.validation.feeds >= 1
    assert report.validation.passed
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]


def test_api_passes_forms_and_validation_error():
    model = conv_model()
    out, report = graphopt.optimize(model, [("fold-constants", {}), PassSpec("fold-constants", make_spec(
        "fold-constants", {}).options)], latency_runs=0)
    assert len(report.passes) == 2
    with pytest.raises(ValidationFailed) as e:
        graphopt.optimize(model, ["test-scale:factor=5"], min_cosine=0.9999, latency_runs=0)
    assert e.value.report.validation.failures and e.value.model is not None


def test_info(cli, model_path):
    res = cli("info", model_path)
    assert res.code == 0
    assert "nodes 8:" in res.out and "input  x: float[N, 3, 8, 8]" in res.out and "MACs 6.93 k" in res.out


def test_overwrites_existing_output_only_when_complete(cli, tmp_path, model_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    assert cli(model_path, out, "--latency-runs", "0").code == 0
    onnx.checker.check_model(onnx.load(out))


def test_large_model_saved_with_external_data(tmp_path, monkeypatch):
    import graphopt.io as gio

    monkeypatch.setattr(gio, "EXTERNAL_DATA_THRESHOLD", 1000)  # pretend the model is over 2 GB
    model = conv_model(constant_nodes=False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "table"))
    written = gio.save_model(model, tmp_path / "big.onnx")
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    loaded = gio.load_model(tmp_path / "big.onnx")
    assert {t.name for t in loaded.graph.initializer} == {t.name for t in model.graph.initializer}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("after_ms, warned", [(1.5, True), (1.05, False), (0.5, False)])
def test_slowdown_is_warned(monkeypatch, after_ms, warned):
    """A rewritten model measured clearly (> 10 %) slower than the original gets a warning in the report."""
    import graphopt.api as api
    monkeypatch.setattr(api, "measure_latency", lambda models, feed, **kw: [1.0, after_ms])
    _, report = api.optimize(conv_model(), ["fold-bn"], latency_runs=3)
    hits = [w for w in report.warnings if "slower than the original" in w]
    assert bool(hits) == warned
    if warned:
        assert "1.50x slower" in hits[0] and "int8" not in hits[0]
        assert "int8 kernels" in (api.slowdown_warning(1.0, 2.0, ["fold-bn", "quantize"]) or "")


def test_json_report_holds_every_pass_option_and_reproduces_the_run(cli, tmp_path, model_path):
    rep = tmp_path / "r.json"
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "fold-bn:mul-add=false", "--pass", "test-scale:factor=1.0",
              "--report", rep, "--latency-runs", "0", "--input-shape", "x=2x3x8x8")
    assert res.code == 0, res.err
    steps = json.loads(rep.read_text())["passes"]
    assert [s["pass"] for s in steps] == ["fold-constants", "fold-bn:mul-add=false", "test-scale"]
    assert steps[1]["options"] == {"mul-add": False}
    assert steps[2]["options"] == {"factor": 1.0, "ratio": 1.0, "mode": "weights", "skip": []}
    for s in steps:   # the recorded options, defaults included, rebuild the same pass
        name = s["pass"].split(":")[0]
        assert str(make_spec(name, {k: v for k, v in s["options"].items() if v != []})) == s["pass"]


def test_output_model_names_graphopt_its_producer(cli, tmp_path, model_path):
    out = tmp_path / "o.onnx"
    assert cli(model_path, out, "--latency-runs", "0", "--input-shape", "x=2x3x8x8").code == 0
    m = onnx.load(out)
    assert (m.producer_name, m.producer_version) == ("graphopt", graphopt.__version__)


def test_a_failed_lossy_pipeline_says_which_pass_lost_what(cli, tmp_path, model_path):
    """Two lossy passes: the first loses nothing, the second scales half the Gemm rows; the error names the second,
    and the report gives each pass's fidelity against its own input and against the original."""
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli(model_path, out, "--pass", "test-scale", "--pass", "test-scale:factor=3,ratio=0.5",
              "--min-cosine", "0.999", "--report", rep, "--latency-runs", "0", "--input-shape", "x=2x3x8x8")
    assert_one_line_error(res, 1, "by pass: test-scale cosine 1.0000", "most was lost by test-scale:factor=3.0,ratio=0.5")
    assert not out.exists()
    losses = json.loads(rep.read_text())["losses_by_pass"]
    assert [s["pass"] for s in losses] == ["test-scale", "test-scale:factor=3.0,ratio=0.5"]
    assert losses[0]["vs_input"]["cosine"] == pytest.approx(1.0) and losses[1]["vs_input"]["cosine"] < 0.999
    assert losses[1]["vs_original"]["cosine"] == pytest.approx(losses[1]["vs_input"]["cosine"])


def test_validating_on_the_calibration_data_is_said(cli, tmp_path, model_path):
    data = tmp_path / "c.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "test-scale", "--calib-data", data, "--latency-runs", "0")
    assert res.code == 0, res.err
    assert "warning: validated on the calibration data itself (no --val-data)" in res.out


def test_each_step_is_reported_as_it_finishes(cli, tmp_path, model_path):
    rows: list[dict] = []
    _, report = graphopt.optimize(onnx.load(model_path), ["fold-bn", "test-scale"], on_step=rows.append,
                                  input_shapes={"x": [2, 3, 8, 8]}, latency_runs=0)
    assert rows == report.passes and [r["pass"] for r in rows] == ["fold-constants", "fold-bn", "test-scale"]
    res = cli(model_path, tmp_path / "o.onnx", "--pass", "test-scale", "--latency-runs", "0",
              "--input-shape", "x=2x3x8x8")
    lines = res.out.splitlines()
    assert lines[0].startswith("graphopt ") and lines[1] == "pipeline:" and lines[2].lstrip().startswith("test-scale")
    assert res.out.count("pipeline:") == 1 and res.out.count("graphopt 0.1.0 |") == 1
