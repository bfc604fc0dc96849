"""graphopt: make trained ONNX models smaller and faster after export, validated in onnxruntime.

``optimize(model_or_path, passes=[...], calib_data=..., ...) -> (model, report)`` is the Python API; the CLI
(``python -m graphopt``) wraps it. Passes live in the top-level ``passes`` package, calibration in ``calibration``.
"""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from .errors import GraphoptError, ValidationFailed  # noqa: E402

__all__ = ["optimize", "GraphoptError", "ValidationFailed", "__version__"]


def __getattr__(name: str) -> Any:
    # optimize is imported on first use: graphopt.api imports calibration, which imports graphopt.io, so an eager
    # import here made `import calibration.readers` (before graphopt) fail on the circle.
    if name == "optimize":
        from .api import optimize
        return optimize
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
