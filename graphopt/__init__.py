"""graphopt: make trained ONNX models smaller and faster after export, validated in onnxruntime.

``optimize(model_or_path, passes=[...], calib_data=..., ...) -> (model, report)`` is the Python API; the CLI
(``python -m graphopt``) wraps it. Passes live in the top-level ``passes`` package, calibration in ``calibration``.
"""

__version__ = "0.1.0"

from .api import optimize  # noqa: E402
from .errors import GraphoptError, ValidationFailed  # noqa: E402

__all__ = ["optimize", "GraphoptError", "ValidationFailed", "__version__"]
