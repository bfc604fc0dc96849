"""Shared fixtures: an in-process CLI runner and a small model on disk (models are built in tests/graphs.py)."""

from __future__ import annotations

import os

# One BLAS thread before numpy loads: OpenBLAS's spinning workers make the SVD/least-squares tests up to 5x slower
# when the two cores are shared, and a fixed thread count keeps the floating-point reductions the same from run to run.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from graphopt.cli import main
from graphs import conv_model


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
