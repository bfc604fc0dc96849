"""``quantize``: int8 QDQ (QuantizeLinear/DequantizeLinear) placed so onnxruntime's CPU provider runs integer kernels.

What the pass does, in order (each step's module says how, with the math):
  * prerequisites: fold-constants (Constant-node weights, as Paddle exports keep them, become initializers) and
    fold-bn (a BatchNormalization or per-channel Mul/Add after a Conv would sit between the integer Conv and its
    requantization, forcing a dequantize and float work per layer) run right before, unless the pipeline ran them
    earlier; both are exact. Below opset 13 the model is converted to opset 13 for per-channel weights (to 10 with
    per-channel=false); where that fails, weights are per tensor (opset 10-12) or the model is declined (< 10);
  * zero Pads read only by Conv nodes folded into their ``pads`` (``pads``; exact), so no Pad splits an int8 run;
  * plan (``plan``): the units (Conv, Gemm, MatMul, with a fused Relu/Clip) and the other ops that can run int8;
  * calibrate (``calibrate``): activation ranges per tensor, mse by default (minmax, kl, percentile; with
    ``method=percentile``, ``percentile=auto`` tries 99.99 and 99.999 and keeps whichever leaves the most units
    int8); for ``rounding=gptq`` and ``bias-correction`` the weights' statistics in the same run;
  * build (``build``, ``weights``): int8 per-channel weights (rounded to nearest or by GPTQ), int32 biases corrected
    for the rounding's mean output error and then, layer by layer, for each int8 layer's output mean against
    float's; ``reduce-range=auto`` gives 7-bit weights where the CPU's u8·s8 kernel saturates (``cpu``);
  * fallback (``fallback``): never ship a broken model. The output cosine and, for class-score outputs, the top-1
    agreement against float are measured on calibration data; below ``min-cosine`` or ``min-top1`` (checked with a
    one-sided 95% margin for data not seen) the most harmful activation tensors, by their measured sensitivity, are
    left float, fewest first, until both targets hold. Its budgets are modelled seconds, so the result does not
    depend on the machine or its load;
  * objective=latency (``latency``, the default): first, right after calibration, the all-int8 build without the
    mean correction is timed against float; where int8 does not pay there, the model is written float without the
    fallback (``latency.choose_early``: what that rules out). Else the int8 regions of the fallback's build are
    timed on this CPU, alone and together, and only those measured faster stay int8, or the fallback's contiguous
    candidate (one float run at the input or output end, one boundary) where it measures fastest (where that
    candidate already measures as fast as all int8, the fallback's scattered search is not run:
    ``latency.scattered_skipped``); where nothing is faster the model is written float (the input after the exact
    passes). objective=size: int8 wherever the targets hold;
  * report (``report``): the layers that run float and why (fidelity or speed), the tensors left float with their
    sensitivity, the measured latency of the choice against all int8 and all float.
If branches that stay (a condition computed at run time) are quantized as models of their own, calibrated on the
outer values they read (``branches``), and Loop/Scan bodies on their values at every iteration (``loops``).
LSTMs (in the model and in If/Loop/Scan bodies) get int8 weights as DynamicQuantizeLSTM where that meets the targets
and, with objective=latency, measures faster (``recurrent``); GRU/RNN stay float (no integer kernel).
Declined: models already quantized (QDQ, QLinear*, *Integer ops); opset < 10 that cannot be converted.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.fold_constants import lower_constant_nodes
from graphopt.passes.options import option, unmatched
from onnx import version_converter

from graphopt.graph import cleanup, export, import_graph, infer_shapes, quantized_ops, replace_graph
from graphopt.runtime import LatencySessions
from graphopt.validate import Thresholds

from .judge import Judge, judge_samples
from .quantization.branches import quantize_branches
from .quantization.build import Builder, Built, Refit
from .quantization.calibrate import Calibration, Ranges, calibrate
from .quantization.cpu import reduce_range_auto
from .quantization.fallback import fall_back
from .quantization.latency import Choice, choose, choose_early, reusable, scattered_skipped, timing_feed
from .quantization.pads import fold_pads
from .quantization.pertensor import PerTensor, try_per_tensor
from .quantization.plan import WEIGHTED, Plan, make_plan
from .quantization.recurrent import quantize_recurrent, recurrent_sites
from .quantization.report import NO_UNITS, SPEEDUP, Setup, Trial, Upgrade, declined, kept_float, opset_declined, report
from .quantization.samples import refit_feeds
from .subgraphs import graphs, subgraph_rows

DEFAULT_BINS = 2048
IN_SUBGRAPH = "float: in a subgraph the pass does not calibrate"    # ``branches`` gives each subgraph's reason


def judge_targets(ctx: PassContext, o: Any) -> Thresholds:
    """The targets the fallback (and per-channel=auto's candidate) is judged against on calibration data."""
    return dataclasses.replace(ctx.targets, min_cosine=o.min_cosine, min_top1=o.min_top1, max_accuracy_drop=None)


@register
class Quantize(Pass):
    name = "quantize"
    summary = "int8 QDQ quantization with minmax/kl/percentile calibration and a sensitivity-guided float fallback."
    exact = False
    prerequisites = ("fold-constants", "fold-bn")
    calibrates = True
    must_not_follow = {"fuse-conv-relu": "onnxruntime's int8 kernels match plain Conv; a FusedConv made before "
                                         "quantize stays float — run fuse-conv-relu without quantize"}

    @dataclass(frozen=True)
    class Options:
        objective: Literal["latency", "size"] = option(
            "latency", "latency: int8 only in the regions measured faster on this CPU (onnxruntime's default "
            "optimizations), float where nothing is: never a model measured slower than the input; size: int8 "
            "wherever the targets hold")
        method: Literal["minmax", "kl", "percentile", "mse"] = option(
            "mse", "activation range method (mse: the clip with the least expected 8-bit squared error)")
        percentile: float | Literal["auto"] = option(
            "auto", "percentile of |x| for method=percentile; auto: 99.99, or 99.999 where that keeps more layers int8 "
            "after the fallback", lo=50, hi=100, lo_open=True)
        bins: int = option(DEFAULT_BINS, "histogram bins per sign (a power of two) of methods kl, percentile and mse",
                           lo=128, hi=1 << 16)
        per_channel: Literal["auto", "true", "false"] = option(
            "auto", "per-output-channel weight scales (needs opset 13; upgraded if possible); auto: per channel, and "
            "with objective=latency one scale per tensor on the int8 Gemm/MatMul layers where that errs little, meets "
            "the targets and measures faster (onnxruntime's kernels pay per call for per-channel scales)")
        activations: Literal["uint8", "int8"] = option("uint8", "activation integer type")
        reduce_range: Literal["auto", "true", "false"] = option(
            "auto", "7-bit weights; auto: where this CPU's u8s8 kernel saturates (x86 without VNNI; probed)")
        exclude: tuple[str, ...] = option((), "node names or op types to keep float (repeat the key)")
        samples: int | None = option(None, "use at most this many calibration samples", lo=1)
        rounding: Literal["nearest", "gptq"] = option(
            "nearest", "weight rounding: nearest, or gptq (each weight's rounding error compensated by the weights not "
            "yet rounded, from the calibration inputs' second moments; better int8 CNN classifiers, but fitted to the "
            "calibration data: see docs/quantize.md)")
        bias_correction: bool = option(
            True, "correct the int8 layers' biases for their mean output error on calibration data: the weights' "
            "rounding ΔW·E[x], then each layer's output mean matched to float's, layer by layer")
        min_cosine: float | None = option(
            None, "fallback target: output cosine vs float on calibration data; none: the pipeline's --min-cosine "
            "(default 0.98); 0: off", lo=0, hi=1)
        min_top1: float | None = option(
            None, "fallback target: top-1 agreement with float of class-score outputs ([N, C] from Softmax/"
            "LogSoftmax, [N, T, C]: per position; without those, a final Gemm/MatMul's [N, C] logits) on calibration "
            "data, with a one-sided 95% margin for the rows checked; none: the pipeline's --min-top1 (default 0.95); "
            "0: off, e.g. for a regression or embedding head", lo=0, hi=1)

        def __post_init__(self) -> None:
            if self.bins & (self.bins - 1):
                raise ValueError(f"option 'bins': {self.bins} is not a power of two")
            if self.bins != DEFAULT_BINS and self.method == "minmax":
                raise ValueError("option 'bins' is read by method=kl, percentile or mse only (method is minmax)")
            if self.percentile != "auto" and self.method != "percentile":
                raise ValueError(f"option 'percentile' is read by method=percentile only (method is {self.method}); "
                                 "add method=percentile")

    def needs_calibration(self) -> bool:
        return True

    def searches(self) -> bool:
        return self.options.min_cosine is None or self.options.min_top1 is None   # the fallback, on the pipeline's

    def targets(self) -> Thresholds:
        """The targets the fallback searches against when set on the pass itself (0: off), checked on the
        validation data too; None where it takes the pipeline's."""
        return Thresholds(self.options.min_cosine, self.options.min_top1)

    def searched(self, ctx: PassContext) -> Any:
        """The options with the targets the fallback searches against: the pass's own, else the pipeline's."""
        o = self.options
        return dataclasses.replace(
            o, min_cosine=o.min_cosine if o.min_cosine is not None else ctx.targets.min_cosine or 0.0,
            min_top1=o.min_top1 if o.min_top1 is not None else ctx.targets.min_top1 or 0.0)

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        already = quantized_ops(graph)
        return f"already quantized ({', '.join(already)}); not quantizing twice" if already else None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # An exclude entry that names no node (likely a typo) is said first, whatever the pass then does.
        nodes = [n for g in graphs(graph) for n in g.nodes]       # If branches are quantized too (``branches``)
        weighted = [n.name for n in nodes if n.op in WEIGHTED]
        notes = unmatched(self.name, "exclude", self.options.exclude, weighted + [n.name for n in nodes],
                          ops={n.op for n in nodes})
        reference = export(graph, ctx.original) if recurrent_sites(graph) else None   # what LSTMs are judged against
        o = self.searched(ctx)
        res = self._everywhere(graph, ctx, o)
        res.notes[:0] = notes
        if reference is not None:       # LSTM weights int8 where that meets the targets and measures faster
            quantize_recurrent(graph, reference, ctx, o, judge_targets(ctx, o), res)
        return res

    def _everywhere(self, graph: gs.Graph, ctx: PassContext, o: Any) -> PassResult:
        """The pass on ``graph``, then in its If branches, each as a model of its own (``branches``; this method
        again, for the Ifs nested there); one float row per subgraph it leaves."""
        res = self._quantize(graph, ctx, o)
        done = quantize_branches(graph, ctx, WEIGHTED, lambda g, c: self._everywhere(g, c, o))
        done.merge_into(res, NO_UNITS)
        res.layers += subgraph_rows(graph, WEIGHTED, IN_SUBGRAPH, done.why)
        return res

    def _quantize(self, graph: gs.Graph, ctx: PassContext, o: Any) -> PassResult:
        # objective=latency: the input after the exact passes, the model written where int8 is not faster
        before = export(graph, ctx.original) if o.objective == "latency" and ctx.calib is not None else None
        upgrade = self._upgrade(graph, ctx, 13 if o.per_channel != "false" else 10) if graph.opset < 13 else None
        failed = upgrade is not None and upgrade.error is not None
        reduce = reduce_range_auto() if o.reduce_range == "auto" else o.reduce_range == "true"
        targets = o.min_cosine > 0 or o.min_top1 > 0 or ctx.targets.metric_targets
        setup = Setup(o, upgrade, o.per_channel != "false" and not failed, reduce, ctx.calib is not None,
                      targets and ctx.calib is not None)
        if failed and graph.opset < 10:
            return declined(setup, None, opset_declined(graph.opset))
        # dtypes (only float32 tensors are quantized; unknown ones stay float) and shapes (a Conv's SAME padding)
        infer_shapes(graph, ctx.original)
        fold_pads(graph)            # exact: a Pad between QDQ pairs would break the int8 run (``pads``)
        plan = make_plan(graph, o.exclude)
        if not plan.units:
            return declined(setup, plan, NO_UNITS)
        float_model = export(graph, ctx.original)
        # one judge for the fallback of every candidate and for per-channel=auto: the float model's session and
        # its outputs on the judge's samples, made once, the outputs beside calibration (``Judge.start``)
        judge = Judge(float_model, ctx.original, judge_samples(ctx.require_calib(self.name)),
                      judge_targets(ctx, o)) if setup.fallback else None
        if judge is not None and before is None:
            judge.start()       # objective=latency: after the early decision (its runs would share the timing's CPU)
        calibration = calibrate(graph, float_model, plan, o, ctx, self.name)
        refit = self._refit_feeds(o, ctx, judge, float_model)
        first = self._builder(graph, plan, calibration.candidates[0][1], setup, calibration, ctx, refit)
        kept = LatencySessions((before,)) if before is not None else None     # each timed more than once
        early = self._early(first, before, ctx, kept) if before is not None else None
        if early is not None and early[1].written == "float":
            replace_graph(graph, import_graph(before))
            label, ranges = calibration.candidates[0]
            return kept_float(setup, plan, Trial(label, ranges, early[0], None), early[1])
        if judge is not None and before is not None:
            judge.start()
        skip = self._skip(early[0], before, ctx, kept) if early is not None and before is not None else None
        best, tried, builder = self._trials(graph, plan, calibration, float_model, first, setup, ctx, judge, refit,
                                            skip)
        choice = None
        contiguous = best.fallback.contiguous if best.fallback is not None else None
        per_tensor = None
        if before is not None and (best.built.int8_units or contiguous is not None):
            assert kept is not None
            kept.models[id(best.built.model)] = best.built.model
            reuse = reusable(*early, best.built, contiguous is not None) if early is not None else None
            best, choice, keep = self._fastest(best, builder, before, ctx, kept, reuse)
            if choice.written == "float":
                replace_graph(graph, import_graph(before))
                return kept_float(setup, plan, best, choice)
            if o.per_channel == "auto" and setup.per_channel:
                best, per_tensor = self._per_tensor(best, keep, builder, plan, before, judge, kept, setup,
                                                    timing_feed(ctx.require_calib(self.name)))
        replace_graph(graph, import_graph(best.built.model))
        res = report(setup, plan, calibration, best, tried, choice)
        if per_tensor is not None:
            res.notes.append(per_tensor.line())
            tensor_units = {u for u, _ in per_tensor.units} if per_tensor.written else set()
            if tensor_units:
                res.notes = [n.replace(", weights per-channel", f", weights per-channel ({len(tensor_units)} "
                                       "Gemm/MatMul per-tensor)") for n in res.notes]
            for row in res.layers:
                if row.get("layer") in tensor_units:
                    row["weights"] = "per-tensor"
            if per_tensor.written and per_tensor.timings is not None:
                res.counts[SPEEDUP] = round(per_tensor.timings[0].median / per_tensor.timings[2].median, 3)
        return res

    @staticmethod
    def _per_tensor(best: Trial, keep: set[str], builder: Builder, plan: Plan, before: onnx.ModelProto,
                    judge: Judge | None, kept: LatencySessions, setup: Setup, feed: dict[str, np.ndarray]
                    ) -> tuple[Trial, PerTensor]:
        """per-channel=auto (``pertensor``): the chosen assignment with per-tensor Gemm/MatMul weights where that
        meets the targets (the fallback's judge; None: no targets) and measures faster than per channel on ``feed``
        (against ``before``, the float model written where int8 is not faster; ``kept``: the latency sessions)."""
        built, decision = try_per_tensor(plan, best.built, setup.reduce_range,
                                         lambda units, refit: builder.build(keep, per_tensor=units, refit=refit),
                                         judge, before, feed, kept)
        return best._replace(built=built), decision

    @staticmethod
    def _early(first: Builder, before: onnx.ModelProto, ctx: PassContext, kept: LatencySessions | None
               ) -> tuple[Built, Choice] | None:
        """objective=latency's early decision (``latency.choose_early``): the all-int8 build without the full mean
        correction and its choice against ``before``, timed before the fidelity search; None where it has no int8
        unit."""
        built = first.build(refit=False)
        if not built.int8_units:
            return None
        assert kept is not None
        kept.models[id(built.model)] = built.model
        return built, choose_early(built, before, lambda extra: first.build(extra, refit=False).model,
                                   timing_feed(ctx.require_calib("quantize")), kept)

    @staticmethod
    def _skip(every: Built, before: onnx.ModelProto, ctx: PassContext, kept: LatencySessions | None
              ) -> Callable[[Built], str | None]:
        """The fallback's test of its contiguous candidate against ``every`` (the early all-int8 build):
        ``latency.scattered_skipped``, the candidate's session kept for the choice after the search."""
        def skip(run: Built) -> str | None:
            if kept is not None:
                kept.models[id(run.model)] = run.model
            return scattered_skipped(every.model, run.model, before, timing_feed(ctx.require_calib("quantize")), kept)
        return skip

    @staticmethod
    def _fastest(best: Trial, builder: Builder, before: onnx.ModelProto, ctx: PassContext, kept: LatencySessions,
                 reuse: Choice | None = None) -> tuple[Trial, Choice, set[str]]:
        """objective=latency (``latency``): the trial with the regions measured slower left float, the choice
        (``reuse``: the early one, for the same regions), and the tensors that build leaves float."""
        keep = set(best.floated)
        alt = best.fallback.contiguous if best.fallback is not None else None
        choice = reuse or choose(best.built, before, lambda extra: builder.build(keep | extra, refit=False).model,
                                 timing_feed(ctx.require_calib("quantize")),
                                 alt.built.model if alt is not None else None, kept)
        if choice.written == "contiguous":
            assert alt is not None
            best = best._replace(built=alt.built, fallback=alt)
            keep = set(alt.floated)
        if choice.written == "chosen":
            keep |= {t for r, on in zip(choice.regions, choice.int8) if not on for t in r.tensors}
            best = best._replace(built=builder.build(keep))
        return best, choice, keep

    @staticmethod
    def _refit_feeds(o: Any, ctx: PassContext, judge: Judge | None, float_model: onnx.ModelProto) -> Refit | None:
        """The full mean correction of every real build runs on the first calibration samples, as many as fit its
        budget in modelled seconds (taken once, when a build first has a bias to correct), from the judge's
        samples where there is a judge (the same first samples, read once)."""
        samples = judge.batches if judge is not None else ctx.calib
        return (float_model, functools.cache(lambda: refit_feeds(float_model, samples))) \
            if o.bias_correction and ctx.calib is not None else None

    @staticmethod
    def _builder(graph: gs.Graph, plan: Plan, ranges: Ranges, setup: Setup, calibration: Calibration,
                 ctx: PassContext, refit: Refit | None) -> Builder:
        return Builder(graph, plan, ranges, ctx.original, per_channel=setup.per_channel,
                       reduce_range=setup.reduce_range, activations=setup.options.activations,
                       hessians=calibration.hessians, means=calibration.means, refit=refit)

    def _trials(self, graph: gs.Graph, plan: Plan, calibration: Calibration, float_model: onnx.ModelProto,
                first: Builder, setup: Setup, ctx: PassContext, judge: Judge | None, refit: Refit | None,
                skip: Callable[[Built], str | None] | None = None) -> tuple[Trial, list[Trial], Builder]:
        """Each candidate set of ranges (in order of preference) built (``first``: the first one's builder) and, if
        the fallback runs, brought to the targets; the best (most units int8, then fewest tensors float), all those
        tried and the best's builder. A candidate that meets the targets with every tensor int8 cannot be beaten,
        so the search stops there."""
        o = setup.options
        best: Trial | None = None
        best_builder: Builder | None = None
        tried: list[Trial] = []
        for i, (label, ranges) in enumerate(calibration.candidates):
            builder = first if i == 0 else self._builder(graph, plan, ranges, setup, calibration, ctx, refit)
            built = builder.build()
            fb = fall_back(builder, built, float_model, ctx.original, ctx.require_calib(self.name),
                           judge_targets(ctx, o),
                           contiguous=o.objective == "latency" and ctx.calib is not None, judge=judge,
                           skip=skip) \
                if setup.fallback else None
            trial = Trial(label, ranges, fb.built if fb is not None else built, fb)
            tried.append(trial)
            if best is None or trial.rank > best.rank:
                best, best_builder = trial, builder
            if not trial.floated:
                break
        assert best is not None and best_builder is not None
        return best, tried, best_builder

    @staticmethod
    def _upgrade(graph: gs.Graph, ctx: PassContext, target: int) -> Upgrade:
        """Convert the graph (in place) to opset ``target``. The converter runs after the prerequisites and may
        write Constant nodes (a Clip's bounds from opset < 11): they become initializers as fold-constants makes
        them, since the plan reads weights and Clip bounds as constants."""
        old = graph.opset
        try:
            converted = version_converter.convert_version(export(graph, ctx.original), target)
            onnx.checker.check_model(converted)
        except Exception as e:
            return Upgrade(old, target, str(e) or type(e).__name__)
        replace_graph(graph, import_graph(converted))
        lower_constant_nodes(graph, PassResult())
        cleanup(graph)              # shape inference fails on the lowered Constant nodes' leftovers
        return Upgrade(old, target, None)
