"""The second moments H = Σ x xᵀ of the sites' inputs on the calibration data (one streamed run of the model with
those inputs as extra outputs, ``calibration.collector.collect``), one ``HessianObserver`` per input tensor: what
gptq and awq need. Memory: K² float64 per distinct input (Q, K and V share theirs), whatever the sample count.
"""

from __future__ import annotations

from typing import Any, Iterator

import onnx
import onnx_graphsurgeon as gs

from graphopt.calibration.collector import collect
from graphopt.calibration.gptq import HessianObserver
from graphopt.calibration.readers import DataSource

from .sites import WeightSite


def input_moments(model: onnx.ModelProto, graph: gs.Graph, sites: list[WeightSite], calib: DataSource,
                  samples: int | None) -> tuple[dict[str, HessianObserver], int]:
    """({input tensor name: its observer}, samples seen)."""
    obs = {s.x.name: HessianObserver() for s in sites}
    inputs = {t.name for t in graph.inputs}

    def batches() -> Iterator[Any]:
        for b in calib:
            for name in inputs & obs.keys():
                if name in b.feed:
                    obs[name].update(b.feed[name])
            yield b

    seen = collect(model, [n for n in obs if n not in inputs], batches(), obs, max_samples=samples)
    return obs, seen
