"""The second moments H = Σ x xᵀ of the sites' inputs on the calibration data (one streamed run of the model with
those inputs as extra outputs, ``calibration.collector.collect``), one ``HessianObserver`` per input tensor: what
gptq and awq need. Memory: K² float64 per distinct input (Q, K and V share theirs), whatever the sample count.
"""

from __future__ import annotations

import onnx

from graphopt.calibration.collector import collect_tensors
from graphopt.calibration.gptq import HessianObserver
from graphopt.calibration.readers import DataSource

from .sites import WeightSite


def input_moments(model: onnx.ModelProto, sites: list[WeightSite], calib: DataSource,
                  samples: int | None) -> tuple[dict[str, HessianObserver], int]:
    """({input tensor name: its observer}, samples seen)."""
    obs = {s.x.name: HessianObserver() for s in sites}
    return obs, collect_tensors(model, obs, calib, max_samples=samples)
