"""Shared fixtures: small models built with onnx.helper, and an in-process CLI runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def conv_model(opset: int = 17, batch: int | str = "N", constant_nodes: bool = True) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(w*2, pads 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N,5].

    With ``constant_nodes`` the conv weight and the factor 2 sit in Constant nodes, as exporters like Paddle do.
    """
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 4)).astype(np.float32)
    fcb = rng.standard_normal(5).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])
    nodes = []
    inits = [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(fcb, "fc_b")]
    if constant_nodes:
        nodes += [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
                  helper.make_node("Constant", [], ["two"], value_float=2.0)]
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes += [helper.make_node("Mul", ["w", "two"], ["w2"]),
              helper.make_node("Conv", ["x", "w2"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: object) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "in.onnx"
    onnx.save(conv_model(), p)
    return p


def assert_one_line_error(res: CliResult, code: int, *needles: str) -> None:
    assert res.code == code, (res.code, res.err)
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    assert "Traceback" not in res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
