"""A small lossy pass registered only in tests, to exercise option parsing and lossy validation gates.

``test-scale`` multiplies the first ceil(ratio · N) output rows of every constant-weight Gemm (transB=1) by
``factor``; with mode=outputs it scales the matching bias entries too. ``skip`` names Gemm nodes to leave alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.options import option


@register
class ScaleGemm(Pass):
    name = "test-scale"
    summary = "Test-only: scale Gemm output rows (lossy)."
    exact = False

    @dataclass(frozen=True)
    class Options:
        factor: float = option(1.0, "multiplier", lo=0, lo_open=True)
        ratio: float = option(1.0, "fraction of rows scaled", lo=0, hi=1)
        mode: Literal["weights", "outputs"] = option("weights", "what to scale")
        skip: tuple[str, ...] = option((), "Gemm node names to skip")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        for node in graph.nodes:
            if node.op != "Gemm" or not isinstance(node.inputs[1], gs.Constant):
                continue
            if node.name in o.skip:
                res.decline(node.name, "skipped by option")
                continue
            w = node.inputs[1].values.copy()
            rows = math.ceil(o.ratio * w.shape[0])
            w[:rows] *= np.float32(o.factor)
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_scaled", w)
            if o.mode == "outputs" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                b = node.inputs[2].values.copy()
                b[:rows] *= np.float32(o.factor)
                node.inputs[2] = gs.Constant(node.inputs[2].name + "_scaled", b)
            res.count("gemms scaled")
            res.changed = True
        return res


ensure_test_pass = ScaleGemm
