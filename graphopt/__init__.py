"""graphopt: make trained ONNX models smaller and faster after export, validated in onnxruntime.

``optimize(model_or_path, passes=[...], calib_data=..., ...) -> (model, report)`` is the Python API; the CLI
(``python -m graphopt``) wraps it. The passes are ``graphopt.passes``, calibration ``graphopt.calibration``: in
the repository they are the folders passes/ and calibration/ beside this one, which an install puts inside it
(pyproject's package-dir) and a source checkout reaches through this package's ``__path__``.

Layers, each importing only those below it: errors, io, graph (the onnx-graphsurgeon toolkit); runtime
(onnxruntime sessions, MACs, latency), validate (output comparison); calibration.readers (data); calibration;
passes (over passes.base); pipeline, report, api, cli.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import GraphoptError, ValidationFailed

__version__ = "0.1.0"
__all__ = ["optimize", "GraphoptError", "ValidationFailed", "__version__"]

_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "passes").is_dir() and (_CHECKOUT / "passes" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # a source checkout: graphopt.passes is ../passes


def __getattr__(name: str) -> Any:
    # ``optimize`` sits at the top layer (it imports every pass); importing a lower layer such as graphopt.graph
    # need not load them all, so it is imported on first use.
    if name == "optimize":
        from .api import optimize
        return optimize
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
