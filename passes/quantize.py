"""``quantize``: int8 QDQ (QuantizeLinear/DequantizeLinear) placed so onnxruntime's CPU provider runs integer kernels.

What gets quantized (each choice is what onnxruntime's QDQ fusions need to produce QLinear*/MatMulInteger kernels):
  * weighted units: Conv, Gemm (alpha = beta = 1) and MatMul with a constant 2-D weight — weights int8 symmetric
    [-127, 127], per output channel (axis 0 for Conv and Gemm transB=1, axis 1 for Gemm transB=0 and MatMul) from
    opset 13, scale absmax/127, rounded to nearest or, with ``rounding=gptq``, by GPTQ (``calibration/gptq.py``:
    each weight's rounding error moved onto the weights not yet rounded, given the second moments H = Σ x xᵀ of the
    layer's inputs, streamed in the same calibration run; to nearest where the data has fewer than 8 input vectors
    per input dimension); bias int32 with scale s_x·s_w and zero point 0, corrected (``bias-correction``,
    ``calibration/bias_correction.py``): less the rounding's mean output error ΔW·E[x] over the calibration
    inputs' mean patch (Conv and Gemm, which get a bias where they had none and the correction needs one; a MatMul
    has no bias to take it), then, on every model built, by the steps that match each int8 layer's output mean
    to float's, layer by layer from the inputs on (the activations' shifts included; on the first calibration
    samples, as many as REFIT_BUDGET_S modelled seconds allow); MatMul of two activations (attention).
    A Conv/Gemm whose only consumer is Relu or Clip (constant bounds) forms one unit with it: no QDQ between them,
    the output range is observed after the activation, so it starts at 0 and onnxruntime folds the activation into
    the requantization. A Gemm's or MatMul's output is quantized only where another planned op reads it: onnxruntime
    runs DequantizeLinear → Gemm/MatMul with a float output as QGemm / MatMulIntegerToFloat, integer all the same,
    so a classifier's logits (a graph output) or a dense layer's output before a float bias Add or Softmax carry
    no rounding (a Conv needs its output quantized to run QLinearConv);
  * residual Add of two activations and Concat (inputs and output share one scale, so Concat needs no rescale);
  * pooling and pass-through ops (MaxPool, AveragePool, GlobalAveragePool, Reshape, Transpose, Flatten, Squeeze,
    Unsqueeze, Resize) when their input is already quantized; pass-through outputs share their input's scale so
    onnxruntime can drop the Q/DQ pair and move int8 data;
  * every other op (LayerNormalization, Softmax, Sigmoid, ...) stays float: it reads the DequantizeLinear output.
Activations: per tensor, uint8 asymmetric by default; ranges from calibration (``calibration/``) over one streamed
histogram per tensor: mse (the default: the clip c minimising the expected squared error of 8-bit rounding,
sum over clipped bins of (x - c)² + (in-range count) · step² / 12), minmax, kl (Migacz 2017) or percentile.
With ``method=percentile``, ``percentile=auto`` builds and brings to the targets (below) the ranges of the 99.99th
percentile of |x| first and, unless that keeps every tensor int8, also of the 99.999th, and keeps whichever leaves
the most units int8. Through the fallback mse and percentile=auto measured a draw at the fidelity floors (README);
mse is the default as one candidate (faster where the fallback runs) that weighs, tensor by tensor, what clipping
an outlier costs against what the wider step costs every other value, with no tuned constant.

Never ship a broken model: after quantizing, the output cosine and, for class-score outputs ([N, C] made by
Softmax or LogSoftmax, per position for [N, T, C] over the last axis; in a model without those, the [N, C] logits
of a final Gemm/MatMul), the top-1 agreement against the float model are measured on calibration data; below
``min-cosine`` or ``min-top1`` each quantized activation tensor's sensitivity (outputs with only that tensor
quantized, with the int8 weights of the layers that read it, as a real build runs a layer with float weights when
its input stays float; on 1 to 8 samples as a time budget allows, on one past it; the budget is spent in modelled
seconds, a fixed cost per MAC, so the result does not depend on the machine or its load) is measured and the most
harmful tensors (by the top-1 agreement lost first where every tensor int8 misses the top-1 check, else by the
cosine lost first; ``harm_order``) are left float, fewest first (binary search over that order), until both
targets hold. Both targets are checked with a margin, since a model stopped at a target on calibration data is
as likely below it as above on other data: n rows must agree on top-1 at least t + 1.645·√(t(1−t)/n) (a one-sided
95% test that the agreement on other data is above t; at most (n−1)/n, ``top1_required``), and the output cosine
less 1.645 of its standard error over the samples (jackknife, ``OutputStats.cosine_se``) must reach min-cosine (the
search, on fewer samples, steers by the targets themselves).
The report lists the tensors with their sensitivity and the layers that run float.
Before planning, Constant-node weights become initializers and BatchNormalization / per-channel Mul/Add after a Conv
are folded into it (both exact, as the fold-constants and fold-bn passes do).
Declined: models already quantized (QDQ, QLinear*, *Integer ops); opset < 10 that cannot be converted.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt.calibration.bias_correction import (
    BiasSite,
    PatchMeanObserver,
    refit_biases,
    rounding_offset,
)
from graphopt.calibration.collector import collect
from graphopt.calibration.gptq import (
    MIN_ROWS_PER_DIM,
    ConvGeometry,
    Fanout,
    HessianObserver,
    gptq_round,
)
from graphopt.calibration.observers import HistogramObserver, MinMaxObserver
from graphopt.calibration.qparams import qparams, qrange, quantize
from graphopt.calibration.ranges import compute_range
from graphopt.calibration.readers import Batch
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.fold_bn import FoldBatchNorm
from graphopt.passes.fold_constants import lower_constant_nodes
from graphopt.passes.options import option

from graphopt.errors import UsageError
from graphopt.graph import (
    export,
    import_graph,
    infer_shapes,
    quantized_ops,
    replace_graph,
)
from graphopt.runtime import count_macs, make_session
from graphopt.validate import (
    Thresholds,
    class_score_outputs,
    sequence_score_outputs,
    top1_counts,
    validate,
)

STANDARD = ("", "ai.onnx", None)
WEIGHTED = {"Conv", "Gemm", "MatMul"}
# Weighted ops whose integer kernels can write float (QGemm, MatMulIntegerToFloat): their output needs no QDQ
FLOAT_OUTPUT = {"Gemm", "MatMul"}


FUSABLE_ACTIVATIONS = {"Relu", "Clip"}
SHARED_SCALE = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize"}
OWN_SCALE = {"AveragePool", "GlobalAveragePool"}
# The fallback checks its targets on up to 256 calibration samples (at most 256 MB of inputs held): with 64, the
# top-1 agreement of a 1000-class head that the search stopped at (EfficientNet-Lite0: 0.953) was 0.938 on all 256.
FALLBACK_SAMPLES = 256
FALLBACK_INPUT_BYTES = 256 << 20
SEARCH_SAMPLES = 64         # the binary search itself, on at most this many (as its time budget allows)
SENSITIVITY_SAMPLES = 8
SENSITIVITY_BUDGET_S = 30.0
# The cost model the budgets are spent in (sample_cost): the switchable model measured 6-10 GMAC/s on an AMD
# EPYC Zen 2 core pair (PP-OCRv4 det 8.3, rec 9.3, MiniLM 10.5; MNIST 6, where the ~0.5 ms per run dominates).
RUN_MACS_PER_S = 8e9
RUN_OVERHEAD_S = 5e-4
SEARCH_BUDGET_S = 15.0      # for the binary search over how many tensors stay float
RESEARCH_BUDGET_S = 120.0   # for searching again on the check's samples when the check disagrees with the search
REFIT_BUDGET_S = 4.0        # for the full mean correction of each real build (bias-correction)
REFIT_RUNS = 2.5            # ... which runs the float model and the quantized one (fake quantization, ~1.5x)
REFIT_FEED_BYTES = 16 << 20  # ... on feeds of at most this many input bytes (one row at least)
MAX_NOTES = 12              # "left float" lines in the printed report; --report has them all
INT32_BIAS_LIMIT = 2.0**30  # headroom below 2**31 for the accumulator the bias is added to
BOUNDED = {"Softmax", "Sigmoid", "HardSigmoid", "Tanh"}
# percentile=auto tries these in order (benchmarks/RESULTS.md, results/ranges.md): with every layer int8, 99.99 is
# better than 99.999 where they differ on the convolutional models (PP-OCRv4 rec eval cosine 0.985 / 0.988 against
# 0.978 / 0.971, PP-OCR cls top-1 agreement 0.977 / 0.977 against 0.932 / 0.977); a transformer's LayerNorm outputs
# carry outlier features that 99.99 clips, and there 99.999 keeps every unit int8 (MiniLM: 48 of 48, against about
# half with 99.99).
AUTO_PERCENTILES = (99.99, 99.999)
# The fallback's check asks for what a one-sided 95% test needs to put the targets' true values above them, on
# other data drawn like the calibration samples: stopping exactly at min-top1 on 256 calibration crops left
# EfficientNet-Lite0 at 0.941 on other photos (``top1_required``), and PP-OCRv4 det stopped at cosine 0.9832 on its
# 47 calibration windows (standard error 0.0044) read 0.9795 on the other documents' windows.
MARGIN_Z = 1.645


class Quality(NamedTuple):
    """How a quantized model's outputs agree with float's on calibration samples (the fallback's yardstick): the
    worst output cosine, the worst top-1 agreement of class-score outputs, the worst margin of an agreement over
    what the check asks of its rows (``top1_required``), and the worst cosine less 1.645 of its standard error over
    the samples (a one-sided 95% lower bound for other data drawn like these)."""

    cosine: float
    top1: float
    top1_margin: float
    cosine_low: float


@dataclass
class Unit:
    """A weighted op (with its fused activation) that is quantized or left float as a whole."""

    node: gs.Node
    act: gs.Node | None
    weight_axis: int | None      # None: activation x activation MatMul

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def output(self) -> gs.Tensor:
        return (self.act or self.node).outputs[0]


class _Trial(NamedTuple):
    """One candidate set of ranges, built and (if the fallback ran) brought to the targets."""

    label: str
    ranges: dict[str, tuple[float, float]]
    builder: "_Builder"
    model: onnx.ModelProto
    floated: dict[str, str]      # tensors the fallback left float, with the reason
    result: PassResult           # the fallback's counts and notes

    @property
    def rank(self) -> tuple[int, int]:
        """Most units int8 first, then fewest tensors float."""
        return len(self.builder.int8_units), -len(self.floated)


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    others: list[gs.Node] = field(default_factory=list)   # Add, Concat, pooling, pass-through candidates


def _is_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant)


def _float(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) in (np.dtype(np.float32),)


@functools.lru_cache(maxsize=1)
def int8_kernel_saturates() -> bool:
    """Whether this CPU's onnxruntime u8·s8 integer kernel saturates, measured on a 1x64 by 64x1 QDQ MatMul.

    x86 without VNNI multiplies with vpmaddubsw, which sums each adjacent pair of u8·s8 products in int16:
    255·127·2 = 64770 clamps to 32767, so the kernel is not the integer product the QDQ graph describes. With 7-bit
    weights (|w| <= 63) a pair is at most 255·63·2 = 32130 and always exact. VNNI (vpdpbusd) and other CPUs add in
    int32. The probe runs the kernel itself, so it holds whatever the CPU flags or the onnxruntime build.
    """
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    inits = [numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w"),
             numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx"), numpy_helper.from_array(np.array(0, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "saturation_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = make_session(model, "saturation probe").run(None, {"x": np.full((1, k), 255, np.float32)})[0]
    return float(y.ravel()[0]) != 255.0 * 127 * k


_AUTO_WHY = {True: " (auto: this CPU's u8·s8 kernel saturates in int16)",
             False: " (auto: this CPU's u8·s8 kernel adds in int32)"}


def reduce_range_auto() -> bool:
    """7-bit weights exactly where the CPU's u8·s8 kernel saturates (``int8_kernel_saturates``)."""
    return int8_kernel_saturates()


@register
class Quantize(Pass):
    name = "quantize"
    summary = "int8 QDQ quantization with minmax/kl/percentile calibration and a sensitivity-guided float fallback."
    exact = False
    must_not_follow = {"fuse-conv-relu": "onnxruntime's int8 kernels match plain Conv; a FusedConv made before "
                                         "quantize stays float — run fuse-conv-relu without quantize"}

    @dataclass(frozen=True)
    class Options:
        method: Literal["minmax", "kl", "percentile", "mse"] = option(
            "mse", "activation range method (mse: the clip with the least expected 8-bit squared error)")
        percentile: float | Literal["auto"] = option(
            "auto", "percentile of |x| for method=percentile; auto: 99.99, or 99.999 where that keeps more layers int8 "
            "after the fallback", lo=50, hi=100, lo_open=True)
        bins: int = option(2048, "histogram bins per sign (a power of two)", lo=128, hi=1 << 16)
        per_channel: bool = option(True, "per-output-channel weight scales (needs opset 13; upgraded if possible)")
        activations: Literal["uint8", "int8"] = option("uint8", "activation integer type")
        reduce_range: Literal["auto", "true", "false"] = option(
            "auto", "7-bit weights; auto: where this CPU's u8s8 kernel saturates (x86 without VNNI; probed)")
        exclude: tuple[str, ...] = option((), "node names or op types to keep float (repeat the key)")
        samples: int | None = option(None, "use at most this many calibration samples", lo=1)
        rounding: Literal["nearest", "gptq"] = option(
            "nearest", "weight rounding: nearest, or gptq (each weight's rounding error compensated by the weights not "
            "yet rounded, from the calibration inputs' second moments; better int8 CNN classifiers, but fitted to the "
            "calibration data: see the README)")
        bias_correction: bool = option(
            True, "correct the int8 layers' biases for their mean output error on calibration data: the weights' "
            "rounding ΔW·E[x], then each layer's output mean matched to float's, layer by layer")
        min_cosine: float = option(0.98, "fallback target: output cosine vs float on calibration data (0: off)",
                                   lo=0, hi=1)
        min_top1: float = option(0.95, "fallback target: top-1 agreement with float of class-score outputs "
                                 "([N, C] from Softmax/LogSoftmax, [N, T, C]: per position; without those, a final "
                                 "Gemm/MatMul's [N, C] logits) on calibration data, with a one-sided 95% margin for "
                                 "the rows checked (0: off, e.g. for a regression or embedding head)", lo=0, hi=1)

        def __post_init__(self) -> None:
            if self.bins & (self.bins - 1):
                raise ValueError(f"option 'bins': {self.bins} is not a power of two")
            if self.percentile != "auto" and self.method != "percentile":
                raise ValueError(f"option 'percentile' is read by method=percentile only (method is {self.method}); "
                                 "add method=percentile")

    def needs_calibration(self) -> bool:
        return True

    def targets(self) -> Thresholds:
        return Thresholds(self.options.min_cosine or None, self.options.min_top1 or None)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        already = quantized_ops(graph)
        return f"already quantized ({', '.join(already)}); not quantizing twice" if already else None

    # ------------------------------------------------------------------------------------------------ run

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        per_channel = o.per_channel
        if graph.opset < 13:
            upgraded = self._upgrade(graph, ctx, res, 13 if per_channel else 10)
            if not upgraded:
                if graph.opset < 10:
                    res.decline("model", f"opset {graph.opset} has no QuantizeLinear and conversion failed")
                    return res
                per_channel = False
                res.notes.append(f"opset {graph.opset}: per-tensor weights (per-channel needs opset 13)")
        reduce = reduce_range_auto() if o.reduce_range == "auto" else o.reduce_range == "true"
        # Exporters such as Paddle keep weights in Constant nodes; as initializers they can be quantized.
        lower_constant_nodes(graph, res)
        graph.cleanup()             # shape inference fails on the lowered Constant nodes' leftovers
        # dtypes (only float32 tensors are quantized; unknown ones stay float) and shapes (fold-bn needs them for
        # a MatMul's bias). Folding keeps every surviving tensor's dtype and shape, so once is enough.
        infer_shapes(graph, ctx.original)
        # A BatchNormalization (or per-channel Mul/Add) after a Conv would sit between the integer Conv and its
        # requantization, forcing a dequantize and float work per layer: fold it first (exact).
        folded = FoldBatchNorm(FoldBatchNorm.Options()).run(graph, ctx)
        for key, n in folded.counts.items():
            res.count(key, n)
        graph.cleanup()
        plan = self._plan(graph, res)
        if not plan.units:
            res.decline("model", "no Conv, Gemm or MatMul to quantize")
            return res
        float_model = export(graph, ctx.original)
        candidates, hessians, means = self._calibrate(graph, float_model, plan, ctx, res)
        fallback = (o.min_cosine > 0 or o.min_top1 > 0) and ctx.calib is not None
        if not fallback and (o.min_cosine > 0 or o.min_top1 > 0):
            res.notes.append("sensitivity fallback skipped: no calibration data to measure it on")
        # Each candidate set of ranges (in order of preference) is built and, if the fallback runs, brought to the
        # targets; the one that keeps the most units int8 (then the fewest tensors float) wins. A candidate that
        # meets the targets with every tensor int8 cannot be beaten, so the search stops there.
        best: _Trial | None = None
        tried: list[str] = []
        # The full mean correction of every real build runs on the first calibration samples, as many as fit
        # REFIT_BUDGET_S modelled seconds (taken once, when a build first has a bias to correct).
        refit = (float_model, functools.cache(lambda: _refit_feeds(float_model, ctx.calib))) \
            if o.bias_correction and ctx.calib is not None else None
        for label, ranges in candidates:
            builder = _Builder(graph, plan, ranges, ctx.original, per_channel=per_channel, reduce_range=reduce,
                               activations=o.activations, hessians=hessians, means=means, refit=refit)
            trial = _Trial(label, ranges, builder, builder.build(set()), {}, PassResult())
            if fallback:
                model, floated = self._fallback(builder, float_model, trial.model, ctx, trial.result)
                trial = trial._replace(model=model, floated=floated)
            tried.append(f"{label}: {len(builder.int8_units)} of {len(plan.units)} units int8, "
                         f"{len(trial.floated)} tensors float")
            if best is None or trial.rank > best.rank:
                best = trial
            if not trial.floated:
                break
        assert best is not None
        label, ranges, builder, model, floated = best.label, best.ranges, best.builder, best.model, best.floated
        res.counts.update(best.result.counts)
        res.notes += best.result.notes
        if len(tried) > 1:
            res.notes.append(f"percentile=auto: {label} kept the most int8 ({'; '.join(tried)})")
        method = f"percentile {label}" if o.method == "percentile" and label != "loaded" else o.method
        replace_graph(graph, import_graph(model))
        res.changed = True
        for u in plan.units:
            inputs = [t.name for t in u.node.inputs[:1 if u.weight_axis is not None else 2]]
            why = [f"input '{t}' left float" for t in inputs if t in floated]
            status = "int8" if u.name in builder.int8_units else "float: " + ("; ".join(why) or "input not "
                                                                                "quantized")
            res.layers.append({"layer": u.name, "op": u.node.op + (f"+{u.act.op}" if u.act else ""),
                               "weights": "per-channel" if per_channel and u.weight_axis is not None else
                               ("per-tensor" if u.weight_axis is not None else "activation"), "status": status})
        res.counts["units int8"] = len(builder.int8_units)
        if len(builder.int8_units) < len(plan.units):
            res.counts["units float"] = len(plan.units) - len(builder.int8_units)
        res.counts["tensors quantized"] = len(builder.last_tensors)
        if builder.corrected:
            res.counts["biases corrected"] = len(builder.corrected)
        if builder.refit_skipped:
            res.notes.append(f"bias correction: layer-by-layer mean matching skipped ({builder.refit_skipped}); the "
                             "weights' rounding offsets stay corrected")
        elif o.bias_correction and ctx.calib is None and builder.int8_units:
            res.notes.append("bias correction skipped: no calibration data to take the layers' mean inputs from "
                             "(give --calib-data with --load-calibration)")
        gptq = [u for u in builder.int8_units if u in builder.hessians]
        if gptq:
            res.counts["weights gptq-rounded"] = len(gptq)
        if o.rounding == "gptq":
            few = [u.name for u in plan.units if u.name in builder.int8_units and u.weight_axis is not None
                   and u.name not in builder.hessians]
            if few:
                res.notes.append(f"weights rounded to nearest in {len(few)} layer(s) ({', '.join(few[:3])}"
                                 f"{', ...' if len(few) > 3 else ''}): fewer than {MIN_ROWS_PER_DIM} calibration "
                                 "input vectors per input dimension, no calibration data, or a Conv with auto_pad "
                                 "SAME on an input of unknown size")
        res.notes.append(f"method={method}, activations={o.activations}, reduce-range={'on' if reduce else 'off'}"
                         f"{_AUTO_WHY[reduce] if o.reduce_range == 'auto' else ''}"
                         f", weights {'per-channel' if per_channel else 'per-tensor'}")
        for name, why in list(floated.items())[:MAX_NOTES]:
            res.notes.append(f"left float: tensor '{name}': {why}")
        if len(floated) > MAX_NOTES:
            res.notes.append(f"left float: {len(floated) - MAX_NOTES} more tensors (--report lists them all)")
            res.artifacts["tensors left float"] = floated
        slow = [row for row in res.layers if row["status"] != "int8"]
        for row in slow[:MAX_NOTES]:
            res.notes.append(f"layer {row['layer']} ({row['op']}) runs float: {row['status'][7:]}")
        if len(slow) > MAX_NOTES:
            res.notes.append(f"{len(slow) - MAX_NOTES} more layers run float (--report lists every layer)")
        res.artifacts["calibration"] = {"method": method, "ranges": {k: list(v) for k, v in ranges.items()}}
        return res

    def _upgrade(self, graph: gs.Graph, ctx: PassContext, res: PassResult, target: int) -> bool:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(export(graph, ctx.original), target)
            onnx.checker.check_model(converted)
        except Exception as e:
            res.notes.append(f"opset upgrade {graph.opset} -> {target} failed: {str(e).splitlines()[0][:120]}")
            return False
        res.notes.append(f"opset upgraded {graph.opset} -> {target}")
        replace_graph(graph, import_graph(converted))
        return True

    # ----------------------------------------------------------------------------------------------- plan

    def _excluded(self, node: gs.Node) -> bool:
        return node.name in self.options.exclude or node.op in self.options.exclude

    def _plan(self, graph: gs.Graph, res: PassResult) -> Plan:
        plan = Plan()
        outputs = {t.name for t in graph.outputs}
        for node in graph.nodes:
            if node.domain not in STANDARD:
                continue
            if node.op in WEIGHTED | {"Add", "Concat"} | SHARED_SCALE | OWN_SCALE and self._excluded(node):
                res.decline(f"{node.op} '{node.name}'", "excluded by option")
                continue
            if node.op in WEIGHTED:
                unit = self._unit(node, outputs, res)
                if unit is not None:
                    plan.units.append(unit)
            elif node.op in {"Add", "Concat"} | SHARED_SCALE | OWN_SCALE:
                plan.others.append(node)
        return plan

    def _unit(self, node: gs.Node, outputs: set[str], res: PassResult) -> Unit | None:
        site = f"{node.op} '{node.name}'"
        x = node.inputs[0]
        if not _float(x):
            res.decline(site, "input is not float32")
            return None
        w = node.inputs[1]
        axis: int | None
        if node.op == "Conv":
            if not _is_const(w):
                res.decline(site, "weight is not a constant")
                return None
            axis = 0
        elif node.op == "Gemm":
            if not _is_const(w) or w.values.ndim != 2:
                res.decline(site, "weight is not a constant matrix")
                return None
            if node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0 or node.attrs.get(
                    "transA", 0):
                res.decline(site, "alpha/beta != 1 or transA")
                return None
            axis = 0 if node.attrs.get("transB", 0) else 1
        else:  # MatMul
            if _is_const(w):
                if w.values.ndim != 2:
                    res.decline(site, f"constant weight of rank {w.values.ndim} (need 2)")
                    return None
                axis = 1
            elif _float(w):
                axis = None
            else:
                res.decline(site, "second input is not float32")
                return None
        if _is_const(w) and w.values.dtype != np.float32:
            res.decline(site, f"weight dtype {w.values.dtype}")
            return None
        act = None
        out = node.outputs[0]
        if node.op != "MatMul" and len(out.outputs) == 1 and out.name not in outputs:
            nxt = out.outputs[0]
            if nxt.op in FUSABLE_ACTIVATIONS and nxt.domain in STANDARD and not self._excluded(nxt):
                if nxt.op == "Relu" or all(_is_const(t) for t in nxt.inputs[1:] if not t.is_empty()):
                    act = nxt
        return Unit(node, act, axis)

    # ------------------------------------------------------------------------------------------ calibrate

    def _calibrate(self, graph: gs.Graph, float_model: onnx.ModelProto, plan: Plan, ctx: PassContext,
                   res: PassResult) -> tuple[list[tuple[str, dict[str, tuple[float, float]]]],
                                             dict[str, HessianObserver], dict[str, PatchMeanObserver]]:
        """(lo, hi) of every tensor any build may quantize, as candidate sets ``[(label, ranges)]`` in order of
        preference: one, except for ``percentile=auto`` (``AUTO_PERCENTILES``, all from the same histograms); and,
        streamed in the same run, by unit name: for ``rounding=gptq`` each weighted unit's input second moments,
        for ``bias-correction`` each Conv's and Gemm's mean input patch. With ``--load-calibration`` the data runs
        only for those (when there is data)."""
        o = self.options
        wanted = _Builder.candidate_tensors(graph, plan)
        loaded = ctx.calibration_ranges
        if loaded is not None:
            missing = [t for t in wanted if t not in loaded]
            if missing:
                raise UsageError(f"--load-calibration has no range for {len(missing)} tensor(s) this model needs, "
                                 f"e.g. '{missing[0]}'; calibrate again")
            res.notes.append(f"ranges loaded for {len(wanted)} tensors")
        observers: dict[str, MinMaxObserver] = {} if loaded is not None else {
            t: (MinMaxObserver() if o.method == "minmax" else HistogramObserver(o.bins)) for t in wanted}
        readers: dict[str, list[Any]] = {t: [obs] for t, obs in observers.items()}
        # One observer per (input, geometry): layers reading the same tensor the same way (attention's Q/K/V)
        # share it.
        hessians: dict[str, HessianObserver] = {}
        means: dict[str, PatchMeanObserver] = {}
        shared: dict[tuple[str, ConvGeometry | None, type], Any] = {}
        for u in plan.units if ctx.calib is not None else []:
            geometry = _conv_geometry(u.node) if u.node.op == "Conv" else None
            if u.weight_axis is None or (u.node.op == "Conv" and geometry is None):
                continue
            x = u.node.inputs[0].name
            for kind, wanted_here, by_unit in ((HessianObserver, o.rounding == "gptq", hessians),
                                               (PatchMeanObserver, o.bias_correction and u.node.op != "MatMul",
                                                means)):
                if not wanted_here:
                    continue
                if (x, geometry, kind) not in shared:
                    shared[x, geometry, kind] = kind(geometry)
                    readers.setdefault(x, []).append(shared[x, geometry, kind])
                by_unit[u.name] = shared[x, geometry, kind]
        if readers:
            fanned: dict[str, Any] = {t: obs[0] if len(obs) == 1 else Fanout(obs) for t, obs in readers.items()}
            feed_names = {i.name for i in graph.inputs}
            fetch = [t for t in fanned if t not in feed_names]
            batches = _with_inputs_observed(ctx.require_calib(self.name), fanned, feed_names)
            seen = collect(float_model, fetch, batches, fanned, max_samples=o.samples)
            res.counts["calibration samples"] = seen
        if loaded is not None:
            return [("loaded", {t: tuple(loaded[t]) for t in wanted})], hessians, means  # type: ignore[misc]
        # Never clip a graph output (what the user reads) or a bounded activation's output (Softmax/Sigmoid: their
        # large values are the signal): those use their observed min and max, whatever the method for the rest.
        keep = {t.name for t in graph.outputs} | {n.outputs[0].name for n in graph.nodes
                                                   if n.op in BOUNDED and n.outputs}

        def ranges_at(p: float) -> dict[str, tuple[float, float]]:
            return {t: compute_range(obs, "minmax" if t in keep else o.method, p) for t, obs in observers.items()}

        if o.method != "percentile":
            return [(o.method, ranges_at(AUTO_PERCENTILES[0]))], hessians, means  # percentile reads percentile
        percentiles = AUTO_PERCENTILES if o.percentile == "auto" else (o.percentile,)
        return [(str(p), ranges_at(p)) for p in percentiles], hessians, means

    # ------------------------------------------------------------------------------------------- fallback

    def _fallback(self, builder: "_Builder", float_model: onnx.ModelProto, model: onnx.ModelProto,
                  ctx: PassContext, res: PassResult) -> tuple[onnx.ModelProto, dict[str, str]]:
        """Leave the most harmful activation tensors float until the targets hold: the worst output cosine reaches
        ``min-cosine`` and the worst top-1 agreement of class-score outputs (``class_score_outputs``) reaches
        ``min-top1``.

        The search runs on one switchable model (a boolean input per quantized tensor), so each candidate costs a
        run, not a model build and session; the sensitivity sweep uses as many samples (1 to 8) as fit a time
        budget, spent in modelled seconds (``sample_cost``) so that the same model and data give the same
        choice on any machine and load. The chosen model is then built for real and checked on up to 256 samples.
        """
        batches = _take(ctx.calib, FALLBACK_SAMPLES, FALLBACK_INPUT_BYTES)
        o = self.options
        # Output roles from the user's model: an opset upgrade before planning may have turned a [N, T, C] Softmax
        # into Flatten -> Softmax -> Reshape, which no longer reads as scores per position.
        scores = class_score_outputs(ctx.original)
        sequences = sequence_score_outputs(ctx.original)
        ref = make_session(float_model, "float model")   # one float session for every check below

        checked: dict[str, int] = {}     # class-score output -> rows its top-1 agreement is checked on

        def judged(cosines: list[tuple[float, float]], agree: list[tuple[int, int]]) -> Quality:
            """``Quality`` from per-output (cosine, its standard error) and (agreeing, rows) of class-score
            outputs."""
            return Quality(min((c for c, _ in cosines), default=1.0), min((a / n for a, n in agree if n), default=1.0),
                           min((a / n - top1_required(o.min_top1, n) for a, n in agree if n), default=1.0),
                           min((c - MARGIN_Z * se for c, se in cosines), default=1.0))

        def meets(q: Quality, confident: bool = True) -> bool:
            """The targets hold with the check's margins (``confident``), or at the targets alone (the search's
            guide on fewer samples, confirmed by a confident check)."""
            if confident:
                return q.cosine_low >= o.min_cosine and q.top1_margin >= 0
            return q.cosine >= o.min_cosine and q.top1 >= o.min_top1

        def quality(m: onnx.ModelProto) -> Quality:
            """``judged`` for the model against float on the fallback samples."""
            v = validate(float_model, m, batches, exact=False, thresholds=Thresholds(),
                         sessions=(ref, make_session(m, "quantized model")), roles=ctx.original)
            checked.update({s.name: s.top1_rows for i, s in enumerate(v.outputs) if s.top1 is not None and i in scores})
            return judged([(s.cosine, s.cosine_se) for s in v.outputs if s.cosine is not None],
                          [(s.top1_agree, s.top1_rows) for i, s in enumerate(v.outputs)
                           if s.top1 is not None and i in scores])

        def said(q: Quality) -> str:
            return f"cosine {q.cosine:.4f}" + (f", top-1 {q.top1:.3f}" if q.top1 < 1.0 else "")

        def record(q: Quality, top1: bool) -> None:
            res.counts["output cosine (calibration)"] = round(q.cosine, 6)
            if o.min_cosine > 0:
                res.counts["output cosine, 95% lower bound (calibration)"] = round(q.cosine_low, 6)
            if top1:
                res.counts["top-1 agreement (calibration)"] = round(q.top1, 4)

        full = quality(model)
        record(full, full.top1 < 1.0)
        if o.min_top1 > 0 and checked:
            rows = min(checked.values())
            res.notes.append(f"top-1 agreement checked on {rows} calibration rows: at least "
                             f"{top1_required(o.min_top1, rows):.4f} asked (min-top1 {o.min_top1} plus a one-sided "
                             "95% margin for rows not seen)")
        if meets(full):
            return model, {}
        sites = list(builder.last_tensors)
        switched = builder.build(set(), switchable=True)
        switches = dict(builder.switches)
        sess = make_session(switched, "switchable quantized model")

        ref_cache: dict[int, list[Any]] = {}

        def q_switched(quantized: set[str], feeds: list[Batch]) -> Quality:
            """``judged`` for the switched model against float (outputs cached per feed)."""
            flags = {name: np.array(t in quantized) for t, name in switches.items()}
            dots: dict[int, list[float]] = {}
            agree: dict[int, list[int]] = {}
            for b in feeds:
                if id(b) not in ref_cache:
                    ref_cache[id(b)] = ref.run(None, b.feed)
                outs = sess.run(None, {**b.feed, **flags})
                for i, (r, out) in enumerate(zip(ref_cache[id(b)], outs)):
                    if isinstance(r, np.ndarray) and r.dtype.kind == "f":
                        r64, o64 = r.astype(np.float64).ravel(), out.astype(np.float64).ravel()
                        acc = dots.setdefault(i, [0.0, 0.0, 0.0])
                        acc[0] += float(r64 @ o64)
                        acc[1] += float(r64 @ r64)
                        acc[2] += float(o64 @ o64)
                        counts = top1_counts(r, out, i in sequences) if i in scores else None
                        if counts is not None:
                            a = agree.setdefault(i, [0, 0])
                            a[0] += counts[0]
                            a[1] += counts[1]
            cosines = [(float(d / np.sqrt(a * b)) if a > 0 and b > 0 else float(a == b), 0.0)
                       for d, a, b in dots.values()]
            return judged(cosines, [(a, n) for a, n in agree.values()])

        one = _first_row(batches)
        per_sample = sample_cost(float_model, one, lambda: q_switched(set(sites), one))
        n = int(min(SENSITIVITY_SAMPLES, max(1, SENSITIVITY_BUDGET_S / (per_sample * len(sites)))))
        few = _rows(batches, n)
        # The search itself takes few steps, so it can afford more samples than the per-tensor sweep: top-1 flips
        # are rare events that 8 samples seldom show.
        steps = math.ceil(math.log2(max(len(sites), 2))) + 1
        search = _rows(batches, int(min(SEARCH_SAMPLES, max(n, SEARCH_BUDGET_S / (per_sample * steps)))))
        spent = [0.0]      # the budget is spent in modelled seconds, so the sweep does not depend on machine load

        def measure(t: str, quick: bool) -> Quality:
            feeds = one if quick and n > 1 else few
            spent[0] += per_sample * sum(b.rows for b in feeds)
            return q_switched({t}, feeds)

        sens, late = sensitivity_sweep(sites, measure, SENSITIVITY_BUDGET_S, clock=lambda: spent[0])
        if late and n > 1:
            res.notes.append(f"sensitivity of {late} of {len(sites)} tensors measured on 1 sample (time budget "
                             f"{SENSITIVITY_BUDGET_S:.0f} s)")
        order = harm_order(sites, sens, top1_misses=full.top1_margin < 0)
        # Smallest k such that leaving the k most harmful tensors float meets the targets (binary search on the
        # switchable model), then confirmed on the real model. If the check (on more samples than the search)
        # disagrees, the search runs once more above k on the check's samples (where that fits RESEARCH_BUDGET_S
        # modelled seconds); if the check still disagrees (the integer kernels round differently from the
        # switchable model's fake quantization), tensors are added.

        def smallest_k(lo: int, feeds: list[Batch], confident: bool) -> int:
            hi = len(order)
            while lo < hi:
                mid = (lo + hi) // 2
                if meets(q_switched(set(order[mid:]), feeds), confident):
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        k = smallest_k(1, search, confident=False)
        check_rows = sum(b.rows for b in batches)
        research = (check_rows > sum(b.rows for b in search)
                    and per_sample * check_rows * steps <= RESEARCH_BUDGET_S)
        while True:
            model = builder.build(set(order[:k]))
            q = quality(model)
            if meets(q) or k >= len(order):
                break
            if research:
                research = False
                k = smallest_k(k + 1, batches, confident=True)
            else:
                k = min(len(order), max(k + 1, int(k * 1.5)))
        if k >= len(order) or not builder.int8_units:
            res.notes.append(f"fallback: min-cosine {o.min_cosine} and min-top1 {o.min_top1} hold only with "
                             f"{'every tensor' if k >= len(order) else 'every layer'} float, so nothing runs int8; "
                             "lower them to accept int8 error")
        record(q, q.top1 < 1.0 or full.top1 < 1.0)
        res.notes.append(f"sensitivity measured on {sum(b.rows for b in few)} sample(s) per tensor, "
                         f"search on {sum(b.rows for b in search)}")
        reasons = {t: f"quantizing it alone gives {said(sens[t])} (all int8: {said(full)}; targets "
                      f"min-cosine {o.min_cosine}, min-top1 {o.min_top1})" for t in order[:k]}
        reasons.update({t: "no op next to it runs int8 once the tensors above stay float (a quantize/dequantize "
                           "pair there would only add error)" for t in builder.idle_dropped if t not in reasons})
        res.counts["tensors left float"] = len(reasons)
        return model, reasons


def harm_order(sites: list[str], sens: dict[str, Quality], top1_misses: bool) -> list[str]:
    """``sites`` most harmful first, by their sensitivity (cosine, top-1 with only that tensor int8), for the target
    that fails: top-1 first (then cosine) when every tensor int8 misses the top-1 check, else cosine first (then
    top-1). A recogniser whose top-1 per position already holds with every tensor int8 is then not steered by the
    single flips the sweep sees on one or two lines (PP-OCRv4 rec, AMD EPYC Zen 4: 23 tensors float, 41 of 51 layers
    int8, instead of 7 and 49 for the same cosine target)."""
    return sorted(sites, key=lambda t: (sens[t].top1, sens[t].cosine) if top1_misses else (sens[t].cosine,
                                                                                          sens[t].top1))


def top1_required(target: float, rows: int, z: float = MARGIN_Z) -> float:
    """Top-1 agreement the fallback's check asks of ``rows`` calibration rows for a target ``target``: the target
    plus z standard errors of an agreement at the target, t + z·√(t(1−t)/n) (a one-sided test at 95% for z = 1.645:
    an agreement measured at the target itself is as likely below it as above on other data), but never more than
    (n−1)/n, so that one disagreement is always allowed and small calibration sets are judged on the target alone.
    """
    if rows <= 0 or target <= 0:
        return target
    return max(target, min(target + z * math.sqrt(target * (1 - target) / rows), (rows - 1) / rows))


def sample_cost(float_model: onnx.ModelProto, one: list[Batch], run: Callable[[], Any]) -> float:
    """Seconds one sample of the switchable model is taken to cost, from a fixed cost model of the float model's
    MACs on ``one`` (RUN_OVERHEAD_S + MACs / RUN_MACS_PER_S), so the fallback's sample counts, and hence its result,
    depend on the model and the data only, not on the machine or its load. Timed (second ``run``) only where the
    MACs cannot be counted."""
    modelled = modelled_cost(float_model, one)
    if modelled is not None:
        return modelled
    run()   # fills the reference cache; the second run is the one timed
    t0 = time.perf_counter()
    run()
    return max(time.perf_counter() - t0, 1e-4)


def modelled_cost(float_model: onnx.ModelProto, one: list[Batch]) -> float | None:
    """RUN_OVERHEAD_S + MACs / RUN_MACS_PER_S: the modelled seconds of one run of the float model on ``one`` (a
    one-row batch, ``_first_row``); None where the MACs cannot be counted."""
    macs = count_macs(float_model, one[0].feed) if one else None
    return RUN_OVERHEAD_S + macs / RUN_MACS_PER_S if macs else None


def sensitivity_sweep(sites: list[str], measure: Callable[[str, bool], tuple[float, float]], budget_s: float,
                      clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, tuple[float, float]], int]:
    """Each site's sensitivity, from the outputs backwards: ``measure(site, quick)``, quick (one sample) once the
    time budget is spent. Every site is measured: one left out would count as harmless and sort last, so the
    search could only reach it by leaving everything float. Returns the sensitivities and how many were quick."""
    sens: dict[str, tuple[float, float]] = {}
    deadline = clock() + budget_s
    quick = 0
    for t in reversed(sites):
        late = clock() > deadline
        quick += late
        sens[t] = measure(t, late)
    return sens, quick


def _conv_geometry(node: gs.Node) -> ConvGeometry | None:
    """A 1-D or 2-D Conv's (group, kernel, strides, pads, dilations) as its input patches need them; for auto_pad
    SAME_* the pads onnx's formula gives for the input's static size. None for other ranks and for SAME_* on an
    input of unknown size: such layers round to nearest and keep their bias as it is."""
    w = node.inputs[1]
    rank = w.values.ndim - 2 if isinstance(w, gs.Constant) else 0
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if rank not in (1, 2) or auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return None
    a = node.attrs
    kernel = tuple(int(k) for k in w.values.shape[2:])
    strides = tuple(int(v) for v in a.get("strides", [1] * rank))
    dilations = tuple(int(v) for v in a.get("dilations", [1] * rank))
    if auto_pad.startswith("SAME"):
        shape = node.inputs[0].shape
        spatial = list(shape[2:]) if shape is not None and len(shape) == rank + 2 else []
        if len(spatial) != rank or not all(isinstance(d, int) and d > 0 for d in spatial):
            return None
        # total = max((ceil(in / s) - 1) * s + (k - 1) * d + 1 - in, 0); SAME_UPPER puts the odd one at the end
        total = [max((-(-n // st) - 1) * st + (k - 1) * d + 1 - n, 0)
                 for n, k, st, d in zip(spatial, kernel, strides, dilations)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        pads = tuple(begin) + tuple(t - b for t, b in zip(total, begin))
    else:
        pads = tuple(int(p) for p in a.get("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else (0,) * (2 * rank)
    return (int(a.get("group", 1)), kernel, strides, pads[:rank], pads[rank:], dilations)


def _with_inputs_observed(calib: Any, observers: dict[str, MinMaxObserver], feed_names: set[str]) -> Any:
    """Batches of ``calib`` with the graph inputs that are observed fed to their observers on the way through."""
    for batch in calib:
        for name in feed_names & observers.keys():
            if name in batch.feed:
                observers[name].update(batch.feed[name])
        yield batch


def _refit_feeds(float_model: onnx.ModelProto, calib: Any) -> list[dict[str, np.ndarray]]:
    """The first calibration samples, as many as the full mean correction can run in REFIT_BUDGET_S modelled
    seconds (``modelled_cost``; it runs the float and the quantized model), in feeds of at most
    REFIT_FEED_BYTES of inputs (at least one row), since it holds a feed's live tensors at every cut."""
    batches = _take(calib, FALLBACK_SAMPLES, FALLBACK_INPUT_BYTES)
    per_sample = modelled_cost(float_model, _first_row(batches)) or 1.0
    feeds = []
    for b in _rows(batches, int(min(FALLBACK_SAMPLES, max(1, REFIT_BUDGET_S / (REFIT_RUNS * per_sample))))):
        arrays = [v for v in b.feed.values() if isinstance(v, np.ndarray)]
        cuttable = b.rows > 1 and all(v.ndim and v.shape[0] == b.rows for v in arrays)
        step = max(1, REFIT_FEED_BYTES * b.rows // max(sum(v.nbytes for v in arrays), 1)) if cuttable else b.rows
        feeds += [{k: v[i:i + step] for k, v in b.feed.items()} if cuttable else b.feed
                  for i in range(0, b.rows, step)]
    return feeds


def _with_bias_steps(model: onnx.ModelProto, steps: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with ``steps`` (int, per channel) subtracted from the int32 bias initializers they name."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name in steps and steps[t.name].any():
            b = numpy_helper.to_array(t).astype(np.int64) - steps[t.name]
            t.CopyFrom(numpy_helper.from_array(np.clip(b, -(2**31), 2**31 - 1).astype(np.int32), t.name))
    return model


def _rows(batches: list[Batch], n: int) -> list[Batch]:
    """The first ``n`` samples of ``batches``, cutting the last batch where every input has rows to cut."""
    out: list[Batch] = []
    left = n
    for b in batches:
        if left <= 0:
            break
        rows = b.rows
        if rows > left and all(isinstance(v, np.ndarray) and v.ndim and v.shape[0] == rows for v in b.feed.values()):
            b = Batch({k: v[:left] for k, v in b.feed.items()}, None if b.labels is None else b.labels[:left])
            rows = left
        out.append(b)
        left -= rows
    return out


def _first_row(batches: list[Batch]) -> list[Batch]:
    """The first sample of ``batches`` as a one-row batch without labels ([] when there is none)."""
    first = _rows(batches, 1)
    return [Batch({k: v[:1] for k, v in first[0].feed.items()}, None)] if first else []


def _take(source: Any, n: int, max_bytes: int | None = None) -> list[Batch]:
    """The first batches of ``source`` up to ``n`` samples (and, given ``max_bytes``, up to that many bytes of
    inputs; always at least one batch)."""
    out: list[Batch] = []
    seen = held = 0
    for b in source:
        size = sum(v.nbytes for v in b.feed.values() if isinstance(v, np.ndarray))
        if out and max_bytes is not None and held + size > max_bytes:
            break
        out.append(b)
        seen += b.rows
        held += size
        if seen >= n:
            break
    return out


# ------------------------------------------------------------------------------------------------ builder


class _Builder:
    """Builds the QDQ model for a given set of units kept float, from the float graph and fixed ranges."""

    def __init__(self, graph: gs.Graph, plan: Plan, ranges: dict[str, tuple[float, float]],
                 template: onnx.ModelProto, *, per_channel: bool, reduce_range: bool, activations: str,
                 hessians: dict[str, HessianObserver] | None = None,
                 means: dict[str, PatchMeanObserver] | None = None,
                 refit: tuple[onnx.ModelProto, Callable[[], list[dict[str, np.ndarray]]]] | None = None) -> None:
        self.graph = graph.copy()
        # (float model, its feeds): every build that is not switchable gets the full mean correction on them
        self.refit = refit
        self.bias_sites: dict[str, BiasSite] = {}   # unit -> its int32 bias, for the full mean correction
        self.refit_skipped: str | None = None           # why the full mean correction could not run
        self._reference_means: dict[str, list[np.ndarray]] = {}   # the float side of it, kept across builds
        # unit name -> its input's second moments where they determine GPTQ (rounding=gptq): those units' weights
        # are GPTQ-rounded; the rounded weights are kept by (unit, scales) across builds
        self.hessians = {k: h for k, h in (hessians or {}).items() if h.enough_rows()}
        self._rounded: dict[tuple[str, bytes], np.ndarray] = {}
        # unit name -> its mean input patch (bias-correction): those units' biases absorb ΔW·E[x]
        self.means = {k: m for k, m in (means or {}).items() if m.mean() is not None}
        self.plan = plan
        self.ranges = ranges
        self.template = template
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.activations = activations
        self.last_tensors: list[str] = []
        self.int8_units: list[str] = []
        self.corrected: list[str] = []       # units whose int32 bias the corrections changed
        self.idle_dropped: list[str] = []
        self._taken: set[str] = set()
        self.switches: dict[str, str] = {}
        self._switchable = False

    @staticmethod
    def candidate_tensors(graph: gs.Graph, plan: Plan) -> list[str]:
        """Every float activation tensor a build could quantize (inputs and outputs of planned ops)."""
        names: list[str] = []
        read = _Builder.plan_reads(plan)
        for u in plan.units:
            names += [t.name for t in u.node.inputs[:2] if not _is_const(t) and _float(t)]
            if u.node.op not in FLOAT_OUTPUT or u.output.name in read:
                names.append(u.output.name)
        for n in plan.others:
            data = _Builder.int8_data(n)
            if data:
                names += [t.name for t in data] + [t.name for t in n.outputs[:1] if _float(t)]
        return list(dict.fromkeys(names))

    @staticmethod
    def int8_data(node: gs.Node) -> list[gs.Tensor]:
        """An Add's, Concat's or pass-through's data inputs if it can run int8 (every one a float activation; an Add
        of two), else []."""
        data = [t for t in (node.inputs if node.op in {"Add", "Concat"} else node.inputs[:1]) if not t.is_empty()]
        if not data or not all(_float(t) and not _is_const(t) for t in data) or (node.op == "Add" and len(data) != 2):
            return []
        return data

    @classmethod
    def plan_reads(cls, plan: Plan) -> set[str]:
        """The tensors a planned op can read as int8: a unit's first two inputs, the data inputs of the other ops
        that can run int8 (``int8_data``)."""
        read = {t.name for u in plan.units for t in u.node.inputs[:2]}
        for n in plan.others:
            read |= {t.name for t in cls.int8_data(n)}
        return read

    def build(self, keep_float: set[str], switchable: bool = False) -> onnx.ModelProto:
        """The QDQ model with the tensors in ``keep_float`` left float. ``switchable``: every quantized tensor passes
        through ``Where(switch, dequantized, float)`` with a boolean graph input per tensor (``self.switches``), so
        one session can evaluate any subset of tensors quantized (fake-quant in float, for the fallback search)."""
        self.switches: dict[str, str] = {}
        self._switchable = switchable
        g = self.graph.copy()
        tensors = g.tensors()
        self._taken = set(tensors) | {n.name for n in g.nodes}
        # map plan nodes (of the original graph) to this copy by output tensor name
        by_out = {n.outputs[0].name: n for n in g.nodes if n.outputs}
        units = [(u, by_out[u.node.outputs[0].name], by_out[u.act.outputs[0].name] if u.act else None)
                 for u in self.plan.units]
        qdq: dict[str, None] = {}            # tensors to quantize, in order
        inner: set[str] = set()              # conv outputs inside a fused unit: never quantized
        read = self.plan_reads(self.plan)
        for u, node, act in units:
            for t in node.inputs[:2]:
                if not _is_const(t) and _float(t):
                    qdq[t.name] = None
            if node.op not in FLOAT_OUTPUT or (act or node).outputs[0].name in read:
                qdq[(act or node).outputs[0].name] = None
            if act is not None:
                inner.add(node.outputs[0].name)
        # Other ops follow: quantized when a data input is already quantized (in topological order).
        shared: list[tuple[str, str]] = []
        others_io: list[tuple[list[str], str, bool]] = []   # (data inputs, output, True) of the other ops quantized
        for n in self.plan.others:
            node = by_out.get(n.outputs[0].name)
            if node is None:
                continue
            data = self.int8_data(node)
            if not any(t.name in qdq for t in data):
                continue
            for t in data:
                qdq[t.name] = None
            out = node.outputs[0]
            qdq[out.name] = None
            others_io.append(([t.name for t in data], out.name, True))
            if node.op in SHARED_SCALE or node.op == "Concat":
                shared += [(t.name, out.name) for t in data]
        for name in inner | keep_float:
            qdq.pop(name, None)
        params = self._activation_params([t for t in qdq if t in self.ranges], shared)
        for name in list(qdq):
            if name not in params:
                qdq.pop(name)
        unit_inputs = {u.name: [t.name for t in node.inputs[:1 if u.weight_axis is not None else 2]]
                       for u, node, _ in units}
        self.idle_dropped = self._drop_idle(qdq, [(unit_inputs[u.name], None if node.op in FLOAT_OUTPUT else
                                                   (act or node).outputs[0].name, False)
                                                  for u, node, act in units] + others_io)
        for name in qdq:
            self._insert_qdq(g, tensors[name], *params[name])
        self.int8_units = []
        self.corrected = []
        self.bias_sites = {}
        for u, node, act in units:
            x_names = unit_inputs[u.name]
            if not all(t in qdq for t in x_names):
                continue  # an input stays float: the unit cannot run integer, so its weights stay float too
            if u.weight_axis is not None:
                self._quantize_weights(g, node, u.weight_axis, params[x_names[0]][0],
                                       switch=self.switches.get(x_names[0]), hessian=self.hessians.get(u.name),
                                       mean=self.means.get(u.name), unit=u.name, reference=u.node.outputs[0].name)
            self.int8_units.append(u.name)
        self.last_tensors = list(qdq)
        g.cleanup().toposort()
        model = export(g, self.template)
        if self.refit is not None and not switchable and self.bias_sites:
            try:
                steps = refit_biases(model, self.refit[0], list(self.bias_sites.values()), self.refit[1](),
                                     self._reference_means)
            except Exception as e:      # a model onnxruntime cannot run cut in pieces keeps the weights' offsets
                self.refit_skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                steps = {}
            model = _with_bias_steps(model, steps)
            self.corrected += [u for u, site in self.bias_sites.items()
                               if steps.get(site.bias, np.zeros(1)).any() and u not in self.corrected]
        return model

    @staticmethod
    def _drop_idle(qdq: dict[str, None], ops_io: list[tuple[list[str], str | None, bool]]) -> list[str]:
        """Drop (in place) the quantized tensors that no integer kernel reads or writes; return them.

        ``ops_io``: (data inputs, output, whether the output must be quantized too). A unit runs int8 when its data
        inputs are quantized (its quantized output is its QLinearConv's output; a Gemm's or MatMul's output, None
        here, is kept only where an integer kernel reads it); another op (QLinearAdd, a pass-through) when its data
        inputs and its output are. Where the fallback leaves a tensor's neighbours float, its QuantizeLinear /
        DequantizeLinear pair would feed float ops: rounding error and two extra ops for nothing (PP-OCRv4 det with
        every unit float kept one such tensor, before a hard-swish, at cosine 0.974 on its evaluation set). One pass
        suffices: the ops that run int8 keep all their tensors, so dropping the others idles none of them."""
        live = [(ins, out) for ins, out, needs_out in ops_io if all(t in qdq for t in ins) and (out in qdq or not
                                                                                               needs_out)]
        used = {t for ins, _ in live for t in ins} | {out for _, out in live if out is not None}
        idle = [t for t in qdq if t not in used]
        for t in idle:
            qdq.pop(t)
        return idle

    def _activation_params(self, names: list[str], shared: list[tuple[str, str]]
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        # Union-find over tensors that must share one scale (pass-through in/out, Concat inputs and output).
        parent = {n: n for n in names}

        def find(a: str) -> str:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, b in shared:
            if a in parent and b in parent:
                parent[find(a)] = find(b)
        group_range: dict[str, list[float]] = {}
        for n in names:
            lo, hi = self.ranges[n]
            r = group_range.setdefault(find(n), [math.inf, -math.inf])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        out = {}
        for n in names:
            lo, hi = group_range[find(n)]
            out[n] = qparams(lo, hi, self.activations, symmetric=False)
        return out

    def _name(self, base: str) -> str:
        """A tensor or node name derived from ``base`` that the graph being built does not use yet."""
        name = base
        for i in itertools.count(1):
            if name not in self._taken:
                break
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def _insert_qdq(self, g: gs.Graph, t: gs.Variable, scale: np.ndarray, zp: np.ndarray) -> None:
        s = gs.Constant(self._name(f"{t.name}_scale"), np.asarray(scale, np.float32).reshape(()))
        z = gs.Constant(self._name(f"{t.name}_zero_point"), np.asarray(zp).reshape(()))
        consumers = list(t.outputs)
        q = gs.Variable(self._name(f"{t.name}_quantized"), dtype=z.values.dtype, shape=t.shape)
        dq = gs.Variable(self._name(f"{t.name}_dequantized"), dtype=np.float32, shape=t.shape)
        g.nodes.append(gs.Node("QuantizeLinear", name=self._name(f"{t.name}_QuantizeLinear"),
                               inputs=[t, s, z], outputs=[q]))
        g.nodes.append(gs.Node("DequantizeLinear", name=self._name(f"{t.name}_DequantizeLinear"),
                               inputs=[q, s, z], outputs=[dq]))
        out = dq
        if self._switchable:
            sw = gs.Variable(self._name(f"graphopt_switch_{len(self.switches)}"), dtype=np.bool_, shape=[])
            g.inputs.append(sw)
            self.switches[t.name] = sw.name
            out = gs.Variable(self._name(f"{t.name}_switched"), dtype=np.float32, shape=t.shape)
            g.nodes.append(gs.Node("Where", name=self._name(f"{t.name}_Where"), inputs=[sw, dq, t], outputs=[out]))
        for c in consumers:
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = out
        if t in g.outputs:
            name = t.name
            t.name = self._name(f"{name}_float")
            out.name = name
            g.outputs = [out if o is t else o for o in g.outputs]

    def _quantize_weights(self, g: gs.Graph, node: gs.Node, axis: int, x_scale: np.ndarray,
                          switch: str | None = None, hessian: HessianObserver | None = None,
                          mean: PatchMeanObserver | None = None, unit: str = "", reference: str = "") -> None:
        """int8 symmetric weights (per output channel on ``axis`` or per tensor) and int32 bias, scale s_x·s_w.

        The weights are rounded to nearest, or given the unit's input second moments ``hessian`` by GPTQ
        (``calibration.gptq``; the scales are the same either way). Given the unit's mean input patch ``mean``, the
        bias absorbs the rounding's mean output error: b − ΔW·E[x] (``calibration.bias_correction``; a Conv or
        Gemm without a bias gets one where the correction is not zero at the bias's scale).

        A channel whose weights are near zero but whose bias is not would need a bias beyond int32 at scale
        s_x·s_w; its weight scale is raised until the bias fits (its weights, ~0, stay ~0).
        ``switch`` (switchable builds): the boolean input of the unit's input tensor; the weights and bias pass
        through ``Where(switch, dequantized, float)``, so that, as in a real build, a unit whose input is left float
        runs with float weights."""
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            return
        values = np.asarray(w.values, dtype=np.float32)
        n_out = values.shape[axis]
        if self.per_channel:
            red = tuple(i for i in range(values.ndim) if i != axis)
            absmax = np.abs(values).max(axis=red)
            dq_axis: int | None = axis
        else:
            absmax = np.array(np.abs(values).max())
            dq_axis = None
        w_scale, w_zp = qparams(-absmax, absmax, "int8", symmetric=True, reduce_range=self.reduce_range)
        bias = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
        b = np.asarray(bias.values, dtype=np.float64) if bias is not None else None
        if b is not None and b.ndim == 1 and b.shape[0] == n_out:
            need = np.abs(b) / (float(x_scale) * INT32_BIAS_LIMIT)
            need = need if dq_axis is not None else np.array(need.max())
            w_scale = np.maximum(w_scale, need).astype(np.float32)
        else:
            b = None
        if hessian is not None:
            row_scale = np.broadcast_to(w_scale, (n_out,))
            key = (unit, row_scale.tobytes())
            if key not in self._rounded:
                self._rounded[key] = self._gptq(values, axis, row_scale, hessian)
            qw = self._rounded[key]
        else:
            qw = quantize(values, w_scale, w_zp, "int8", axis=dq_axis)
        # Bias: int32, scale s_x * s_w, zero point 0 (Conv input 2; Gemm C when it is a vector over outputs).
        b_scale = (np.float32(x_scale) * np.broadcast_to(w_scale, (n_out,))).astype(np.float32)
        b_scale = np.where(b_scale > 0, b_scale, np.float32(1.0)).astype(np.float32)
        if mean is not None and (b is not None or len(node.inputs) < 3 or node.inputs[2].is_empty()):
            shape = [1] * values.ndim
            if dq_axis is not None:
                shape[dq_axis] = -1
            delta = qw.astype(np.float64) * np.asarray(w_scale, np.float64).reshape(shape) - values
            rows = delta if axis == 0 else delta.T                         # [O, C/g · taps] or [O, K]
            offset = rounding_offset(rows, mean.mean(), int(node.attrs.get("group", 1)))
            if np.any(np.rint(offset / b_scale)):           # else the int32 bias would not change
                self.corrected.append(unit)
                if b is None:
                    bias = gs.Constant(self._name(f"{node.name or w.name}_bias"), np.zeros(n_out, np.float32))
                    b = np.zeros(n_out)
                    if len(node.inputs) < 3:
                        node.inputs.append(bias)
                    else:
                        node.inputs[2] = bias
                b = b - offset
        wq = gs.Constant(self._name(f"{w.name}_quantized"), qw)
        attrs = {"axis": dq_axis} if dq_axis is not None else {}
        s = gs.Constant(self._name(f"{w.name}_scale"), w_scale if dq_axis is not None else w_scale.reshape(()))
        z = gs.Constant(self._name(f"{w.name}_zero_point"), w_zp if dq_axis is not None else w_zp.reshape(()))
        wdq = gs.Variable(self._name(f"{w.name}_dequantized"), dtype=np.float32, shape=list(values.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=self._name(f"{w.name}_DequantizeLinear"),
                               inputs=[wq, s, z], outputs=[wdq], attrs=attrs))
        node.inputs[1] = self._switched(g, switch, wdq, w)
        if b is None or bias is None:
            return
        qb = np.clip(np.rint(b / b_scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        bq = gs.Constant(self._name(f"{bias.name}_quantized"), qb)
        bs = gs.Constant(self._name(f"{bias.name}_scale"), b_scale if dq_axis is not None else b_scale[:1].reshape(()))
        bz = gs.Constant(self._name(f"{bias.name}_zero_point"),
                         np.zeros(n_out if dq_axis is not None else (), np.int32))
        bdq = gs.Variable(self._name(f"{bias.name}_dequantized"), dtype=np.float32, shape=[n_out])
        g.nodes.append(gs.Node("DequantizeLinear", name=self._name(f"{bias.name}_DequantizeLinear"),
                               inputs=[bq, bs, bz], outputs=[bdq], attrs={"axis": 0} if dq_axis is not None else {}))
        node.inputs[2] = self._switched(g, switch, bdq, bias)
        if switch is None and reference:
            self.bias_sites[unit] = BiasSite(node.outputs[0].name, reference, bq.name, b_scale)

    def _gptq(self, values: np.ndarray, axis: int, scale: np.ndarray, hessian: HessianObserver) -> np.ndarray:
        """int8 weights of ``values`` (Conv [O, C/g, *k] with axis 0; Gemm/MatMul [K, O] with axis 1 or [O, K] with
        axis 0) rounded by GPTQ, in the weight's own layout."""
        assert hessian.h is not None
        groups = hessian.h.shape[0]
        rows = values if axis == 0 else values.T                         # [O, D·groups]
        w = rows.reshape(groups, rows.shape[0] // groups, -1)
        qmin, qmax = qrange("int8", symmetric=True, reduce_range=self.reduce_range)
        q = gptq_round(w, scale.reshape(groups, -1), hessian.h, qmin, qmax).reshape(rows.shape)
        return (q if axis == 0 else q.T).astype(np.int8)

    def _switched(self, g: gs.Graph, switch: str | None, quantized: gs.Variable, original: gs.Tensor) -> gs.Tensor:
        """``quantized``, or in a switchable build ``Where(switch, quantized, original)``."""
        if switch is None:
            return quantized
        sw = next(t for t in g.inputs if t.name == switch)
        out = gs.Variable(self._name(f"{original.name}_switched"), dtype=np.float32, shape=quantized.shape)
        g.nodes.append(gs.Node("Where", name=self._name(f"{original.name}_Where"), inputs=[sw, quantized, original],
                               outputs=[out]))
        return out
