"""graphopt sweep: the values of one option (ranges in decimal arithmetic, lists), the refusals before any work, one
row per value measured as the main command measures it (row 0 the input), the Pareto front and the knee, and the
CSV / JSON / PNG written atomically, never over the input and with no model unless --keep-dir."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

import graphopt.cli as cli_module
import graphopt.sweep as sweep_module
from graphopt.errors import UsageError
from graphopt.plot import render
from graphopt.sweep import Row, Sweep, SweepResult, expand, knee, pareto
from graphs import assert_one_line_error, calib, conv_net, parse_model, rand

MODELS = Path(__file__).resolve().parent.parent / "models"


def _mlp() -> onnx.ModelProto:
    """x[N,32] -> Gemm 32x48 -> Relu -> Gemm 48x10 -> y[N,10]: two layers svd can factorize (with min-size=0)."""
    w1 = rand(48, 32, seed=1) @ np.diag(np.linspace(1, 0.05, 32)).astype(np.float32)   # a decaying spectrum
    return parse_model("""
        agraph (float[N, 32] x) => (float[N, 10] y) {
            h = Gemm <transB = 1> (x, w1, b1)
            r = Relu (h)
            y = Gemm <transB = 1> (r, w2, b2)
        }""", w1=w1.astype(np.float32), b1=rand(48, seed=2), w2=rand(10, 48, seed=3), b2=rand(10, seed=4))


@pytest.fixture
def conv(tmp_path):
    """conv_net on disk with calibration data and labelled validation data."""
    m, data, val = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "v.npz"
    onnx.save(conv_net(), m)
    x = np.concatenate([d["x"] for d in calib(32)])
    np.savez(data, x=x)
    np.savez(val, x=x[:16], __labels__=np.arange(16) % 10)
    return m, data, val


def test_ranges_are_decimal_inclusive_and_lists_literal():
    assert expand("0.1:0.6:0.1", True, "w") == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"]   # no 0.30000000000000004
    assert expand("8:32:8", True, "w") == ["8", "16", "24", "32"]
    assert expand("0.999:0.99:-0.003", True, "w") == ["0.999", "0.996", "0.993", "0.99"]
    assert expand("0.1:0.35:0.1", True, "w") == ["0.1", "0.2", "0.3"]   # stop not on the grid: the last below it
    assert expand("minmax|kl", False, "w") == ["minmax", "kl"]
    assert expand("0.3", True, "w") is None and expand("a:b", False, "w") is None   # one value; not a number option
    for bad, needle in (("0.1:0.6", "start:stop:step"), ("1:x:1", "start:stop:step"), ("0.1:0.5:0", "non-zero"),
                        ("0.5:0.1:0.1", "towards stop"), ("0:100:1", "more than 50"), ("a||b", "empty item"),
                        ("1:inf:1", "start:stop:step")):
        with pytest.raises(UsageError, match=needle):
            expand(bad, True, "w")


@settings(max_examples=60, deadline=None)
@given(st.integers(-10**4, 10**4), st.integers(1, 10**4), st.integers(0, 49), st.integers(0, 3), st.booleans())
def test_a_range_reaches_its_stop_exactly(start, step, n, places, down):
    scale = Decimal(10) ** -places
    a, s = Decimal(start) * scale, Decimal(step) * scale * (-1 if down else 1)
    b = a + n * s
    values = expand(f"{a}:{b}:{s}", True, "w")
    assert len(values) == n + 1 and Decimal(values[0]) == a and Decimal(values[-1]) == b
    assert all(Decimal(y) - Decimal(x) == s for x, y in zip(values, values[1:]))


def test_pareto_front_and_knee():
    rows = [Row("input", True, accuracy=98.0, latency_ratio=1.0), Row("a", True, accuracy=98.1, latency_ratio=0.9),
            Row("b", True, accuracy=97.0, latency_ratio=0.95), Row("c", False, accuracy=90.0, latency_ratio=0.5),
            Row("d", True, accuracy=97.5, latency_ratio=0.6), Row("e", False, reason="refused")]
    assert [r.value for r in pareto(rows, "latency_ratio", "accuracy")] == ["c", "d", "a"]   # b and input dominated
    assert knee(rows, "latency_ratio").value == "d" and knee(rows, "size_bytes") is None


def test_plot_of_cosines_with_a_value_off_the_scale_and_one_that_did_not_run():
    rows = [Row("input", True, cosine=1.0, latency_ratio=1.0, size_bytes=4096, macs=10**6),
            Row("0.9", True, cosine=0.99, latency_ratio=0.7, size_bytes=2048, macs=5 * 10**5),
            Row("0.99", False, cosine=0.2, latency_ratio=0.5, size_bytes=1024, macs=2 * 10**5, reason="cosine"),
            Row("0.999", False, reason="refused")]
    sweep = Sweep("quantize", "min-cosine", ("0.9", "0.99", "0.999"), (), "quantize:min-cosine=<min-cosine>")
    png = render(SweepResult("m.onnx", sweep, rows, {"min_cosine": 0.98, "min_top1": None,
                                                     "max_accuracy_drop": 1.0}))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("args, needle", [
    (["--pass", "prune-channels:ratio=0.3"], "no option of a --pass carries a range"),
    (["--pass", "prune-channels:ratio=0.1:0.3:0.1,min-channels=1|2"], "values given for both 'ratio' and 'min-channels'"),
    (["--pass", "prune-channels:ratio=0.1:0.3"], "is not start:stop:step"),
    (["--pass", "prune-channels:ratio=0.5:1.5:0.5"], "1.0 is out of range"),
    (["--pass", "shrink:ratio=0.1:0.3:0.1"], "unknown pass 'shrink'"),
    (["--pass", "prune-channels:rate=0.1:0.3:0.1"], "has no option 'rate'"),
    (["--pass", "svd:rank=8.5:9:0.5"], "'8.5' is not an integer"),
    (["--pass", "quantize:method=minmax|fast"], "'fast' is not a valid choice"),
    (["--pass", "prune-channels:ratio=0.1|0.2", "--latency-runs", "-1"], "--latency-runs"),
])
def test_bad_sweeps_are_one_line_before_any_work(cli, tmp_path, conv, args, needle, monkeypatch):
    monkeypatch.setattr(sweep_module, "optimize", lambda *a, **k: pytest.fail("work started"))
    m, data, val = conv
    res = cli("sweep", m, *args, "--calib-data", data, "--csv", tmp_path / "s.csv")
    assert_one_line_error(res, 2, needle)
    assert res.out == "" and not (tmp_path / "s.csv").exists()


def test_plot_without_matplotlib_and_outputs_over_the_input(cli, tmp_path, conv, monkeypatch):
    monkeypatch.setattr(sweep_module, "optimize", lambda *a, **k: pytest.fail("work started"))
    m, data, _ = conv
    monkeypatch.setattr(cli_module.plot, "HAVE_MATPLOTLIB", False)
    assert_one_line_error(cli("sweep", m, "--pass", "prune-channels:ratio=0.1|0.2", "--calib-data", data, "--plot",
                              tmp_path / "c.png"), 2, "pip install 'graphopt[plot]'")
    assert_one_line_error(cli("sweep", m, "--pass", "prune-channels:ratio=0.1|0.2", "--calib-data", data, "--csv",
                              m), 2, "would overwrite the input")
    res = cli("sweep", m, "--pass", "svd:data-aware=false|true")     # the second value needs calibration data
    assert_one_line_error(res, 2, "'svd:data-aware=true' needs calibration data")
    assert res.out == ""


def test_data_the_input_cannot_take_stops_the_sweep_before_any_value(cli, tmp_path, conv, monkeypatch):
    m, data, _ = conv
    real = sweep_module.optimize
    monkeypatch.setattr(sweep_module, "optimize", lambda model, passes, **kw: real(model, passes, **kw) if not passes
                        else pytest.fail("a value ran"))
    res = cli("sweep", m, "--pass", "prune-channels:ratio=0.1|0.2", "--val-data", tmp_path / "missing.npz")
    assert_one_line_error(res, 2, "missing.npz")    # opened for row 0, before any value
    assert res.out == ""


def test_prune_sweep_rows_tables_and_plot(cli, tmp_path, conv):
    m, data, val = conv
    before = m.read_bytes()
    out = {k: tmp_path / f"curve.{k}" for k in ("csv", "json", "png")}
    res = cli("sweep", m, "--pass", "prune-channels:ratio=0.25:0.5:0.25,round-to=1,reconstruct=false", "--calib-data", data,
              "--val-data", val, "--latency-runs", "0", "--csv", out["csv"], "--json", out["json"], "--plot",
              out["png"])
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert [ln.split()[0] for ln in lines[2:5]] == ["input", "ratio=0.25", "ratio=0.5"], res.out
    assert any(ln.startswith("knee by latency: not measured") for ln in lines)   # --latency-runs 0
    assert any(ln.startswith("knee by size:") for ln in lines)
    rows = list(csv.DictReader(out["csv"].open()))
    assert [r["value"] for r in rows] == ["input", "0.25", "0.5"] and rows[0]["latency_ms"] == ""
    assert int(rows[2]["parameters"]) < int(rows[1]["parameters"]) < int(rows[0]["parameters"])
    assert all(r["accuracy"] for r in rows)            # the validation data has __labels__
    report = json.loads(out["json"].read_text())
    assert report["sweep"] == "prune-channels:ratio" and report["quality"] == "accuracy"
    assert report["targets"] == {"min_cosine": 0.98, "min_top1": 0.95, "max_accuracy_drop": 1.0}
    for row in report["rows"][1:]:   # the verdict is the targets' verdict, with its reason
        assert row["passed"] == (row["cosine"] >= 0.98 and row["top1"] >= 95 and
                                 row["accuracy"] >= report["rows"][0]["accuracy"] - 1.0)
        assert row["passed"] or row["reason"]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["c.npz", "curve.csv", "curve.json", "curve.png", "m.onnx", "v.npz"])   # no model written


def test_svd_rank_sweep_keeps_one_model_per_value(cli, tmp_path):
    m, data = tmp_path / "mlp.onnx", tmp_path / "c.npz"
    onnx.save(_mlp(), m)
    np.savez(data, x=rand(64, 32, seed=5))
    keep = tmp_path / "kept"
    res = cli("sweep", m, "--pass", "svd:rank=4|16,min-size=0,min-reduction=0", "--calib-data", data,
              "--latency-runs", "0", "--no-gate", "--keep-dir", keep)
    assert res.code == 0, res.err
    kept = sorted(keep.iterdir())
    assert [p.name for p in kept] == ["01-svd-rank=4.onnx", "02-svd-rank=16.onnx"]
    for p, rank in zip(kept, (4, 16)):
        model = onnx.load(p)
        onnx.checker.check_model(model)
        assert rank in {d for t in model.graph.initializer for d in t.dims}
    assert "rank=4" in res.out and "rank=16" in res.out and "validated on the calibration data" in res.out


def test_svd_max_error_and_quantize_min_cosine_sweeps(cli, tmp_path, conv):
    m, data, val = conv
    mlp = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), mlp)
    res = cli("sweep", mlp, "--pass", "svd:max-error=0.05|0.6,min-size=0,min-reduction=0", "--calib-data",
              _npz(tmp_path, rand(32, 32, seed=6)), "--latency-runs", "0", "--json", tmp_path / "s.json")
    assert res.code == 0, res.err
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[0]["cosine"] == pytest.approx(1.0) and rows[1]["cosine"] > rows[2]["cosine"]   # larger error
    assert rows[1]["parameters"] > rows[2]["parameters"]                                   # keeps smaller ranks
    res = cli("sweep", m, "--pass", "quantize:min-cosine=0.9|0.9999", "--calib-data", data, "--val-data", val,
              "--latency-runs", "0", "--csv", tmp_path / "q.csv")
    assert res.code == 0, res.err
    q = list(csv.DictReader((tmp_path / "q.csv").open()))
    assert [r["value"] for r in q] == ["input", "0.9", "0.9999"]
    assert int(q[1]["size_bytes"]) <= int(q[2]["size_bytes"])   # a stricter target keeps more of the model float


def _npz(tmp_path: Path, x: np.ndarray) -> Path:
    p = tmp_path / "x.npz"
    np.savez(p, x=x)
    return p


def test_a_value_the_pipeline_refuses_is_a_row(cli, tmp_path, conv, monkeypatch):
    m, data, val = conv
    real = sweep_module.optimize

    def refusing(model, passes, **kw):
        if passes and passes[0].options.ratio == 0.5:
            raise UsageError("pass 'prune-channels': refused for this value")
        return real(model, passes, **kw)

    monkeypatch.setattr(sweep_module, "optimize", refusing)
    res = cli("sweep", m, "--pass", "prune-channels:ratio=0.25|0.5,round-to=1", "--calib-data", data, "--val-data",
              val, "--latency-runs", "0", "--csv", tmp_path / "s.csv")
    assert res.code == 0, res.err
    assert "ratio=0.5              error   pass 'prune-channels': refused for this value" in res.out
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert rows[2]["passed"] == "False" and rows[2]["size_bytes"] == "" and "refused" in rows[2]["reason"]


def test_mnist_wide_through_the_cli(cli, tmp_path):
    val = tmp_path / "eval100.npz"     # 100 of the 1000 held-out samples: the test's time
    with np.load(MODELS / "mnist64_eval.npz") as d:
        np.savez(val, **{k: d[k][:100] for k in d.files})
    res = cli("sweep", MODELS / "mnist_wide.onnx", "--pass", "prune-channels:ratio=0.1|0.5,reconstruct=false",
              "--val-data", val, "--latency-runs", "0", "--json", tmp_path / "w.json")
    assert res.code == 0, res.err
    rows = json.loads((tmp_path / "w.json").read_text())["rows"]
    assert rows[0]["accuracy"] > 95 and rows[1]["macs"] < rows[0]["macs"] and rows[2]["macs"] < rows[1]["macs"]
    assert rows[1]["passed"], rows[1]["reason"]
    assert not rows[2]["passed"] and "accuracy" in rows[2]["reason"]   # half the channels, not reconstructed
    assert "knee by size: ratio=0.1" in res.out
