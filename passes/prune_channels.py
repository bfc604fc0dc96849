"""The ``prune-channels`` pass: analyse channel dependencies, choose channels, print and apply the plan, re-infer
shapes, optionally reconstruct.

The work is done by the modules of ``passes/pruning`` (their docstrings state the cases and the math). Steps:
shapes for the analysis (``shapes``), the channel analysis (``analysis``: groups and edit records), the
selection (``selection``, scores from ``importance``), the plan (``edits.Plan``: removed channels per group and the
edits that apply; logged at INFO, i.e. with ``-v``), ``edits.apply``, shape re-inference, and the least-squares
refit of the layers whose inputs shrank (``reconstruct``). A quantized model is declined before ``run``
(``requires``): prune before quantizing.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import onnx_graphsurgeon as gs
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.options import unmatched

from graphopt.graph import export, quantized_ops

from .pruning import config
from .pruning.config import (CHANNELS_IN_PRUNABLE_GROUPS, CHANNELS_REMOVED, GROUPS, GROUPS_PRUNED,
                             LAYERS_RECONSTRUCTED, parse_layer_ratio)
from .pruning.analysis import analyze
from .pruning.edits import Names, Plan, apply
from .autosearch import halves, no_targets, search
from .pruning.reconstruct import reconstruct
from .pruning.allocate import SEARCH_SAMPLES, SENSITIVITY_SAMPLES, Allocation, levels, measure, path, sensitivity_lines
from .pruning.selection import conv_block, find_candidates, make_plan, select
from .pruning.shapes import analysis_shapes, reinfer

log = logging.getLogger("graphopt")

RATIO_CHOSEN = "ratio chosen"      # PassResult.counts key: ratio=auto's fraction of the prunable channels removed

__all__ = ["PruneChannels", "RATIO_CHOSEN", "GROUPS", "GROUPS_PRUNED", "CHANNELS_REMOVED", "CHANNELS_IN_PRUNABLE_GROUPS",
           "LAYERS_RECONSTRUCTED"]


@register
class PruneChannels(Pass):
    name = "prune-channels"
    summary = ("Structured pruning of output channels with dependency groups (residuals, Concat, depthwise, "
               "Flatten->Gemm); optional least-squares reconstruction from calibration data.")
    exact = False
    prerequisites = ("fold-constants",)    # exporters (PaddleOCR's) keep weights in Constant nodes
    must_not_follow = {"quantize": "pruning edits float weights and channel counts; quantize after pruning"}
    Options = config.Options

    def needs_calibration(self) -> bool:
        return self.options.reconstruct is True or self.options.ratio == "auto"

    def searches(self) -> bool:
        return self.options.ratio == "auto"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        quantized = quantized_ops(graph)
        return f"quantized ({', '.join(quantized)}); prune before quantizing" if quantized else None

    def plan(self, graph: gs.Graph, before: onnx.ModelProto, ctx: PassContext, res: PassResult,
             o: config.Options | None = None, ratios: dict[str, float] | None = None) -> Plan:
        """The pruning plan for ``graph`` (topologically sorted; ``before`` is its export) with options ``o`` (the
        pass's by default); fills the report's rows, declines, notes and counts. The graph is not changed."""
        shapes = analysis_shapes(before, ctx, res)
        an = analyze(graph, shapes)
        # an exclude or layers entry that names no layer (likely a typo) is said first
        layers = [s.node.name for g in an.groups for s in g.sources if s.node is not None]
        o = o or self.options
        for key, patterns in (("exclude", o.exclude), ("layers", [parse_layer_ratio(x)[0] for x in o.layers])):
            res.notes.extend(unmatched(self.name, key, patterns, layers, glob=True, what="prunable layer"))
        if o.round_to == "auto":
            res.notes.append(f"round-to=auto: {conv_block()} (onnxruntime's convolution block on this CPU)")
        return make_plan(an, select(an, o, res, ratios))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        if o.ratio == "auto":
            reason = no_targets(ctx, "ratio")
            if reason:
                res.decline("model", f"{reason}; give a ratio")
                return res
            chosen = self.allocate(graph, ctx, res)
            o = dataclasses.replace(o, ratio=0.0, objective="latency")
            self.prune(graph, ctx, o, res, dict(chosen.ratios))
            res.counts[RATIO_CHOSEN] = round(chosen.removed, 3)
            return res
        self.prune(graph, ctx, o, res)
        return res

    def allocate(self, graph: gs.Graph, ctx: PassContext, res: PassResult) -> Allocation:
        """ratio=auto: the strongest allocation on the path of passes/pruning/allocate.py that keeps the
        pipeline's targets; its notes go to ``res``."""
        o = dataclasses.replace(self.options, ratio=0.0, objective="latency")
        graph.toposort()
        probe = PassResult()
        an = analyze(graph, analysis_shapes(export(graph, ctx.original), ctx, probe))
        sizes = {g.name: len(g.classes) for g, _ in find_candidates(an, o, probe)}
        split = halves(ctx, self.name)
        # candidates are refitted on fewer samples than the model written (which can only do better): to rank
        # the levels, SENSITIVITY_SAMPLES; in the search, SEARCH_SAMPLES
        quick = dataclasses.replace(o, samples=min(o.samples, SENSITIVITY_SAMPLES))
        found = measure(graph, ctx, split[0], levels(list(sizes.items()), o),
                        lambda g, ratios, c: self.prune(g, c, quick, PassResult(), ratios), self.options.objective)
        steps = path(found, sizes)
        checked = dataclasses.replace(o, samples=min(o.samples, SEARCH_SAMPLES))
        searched = search(steps, lambda g, a, c: self.prune(g, c, checked, PassResult(), dict(a.ratios)), graph,
                          ctx, self.name, split)
        chosen = steps[searched.index]
        res.notes.append(f"ratio=auto, objective={self.options.objective}: {len(sizes)} prunable group(s), "
                         f"{len(found)} level(s) measured alone, {len(steps) - 1} step(s) on the path; "
                         + "; ".join(sensitivity_lines(found, self.options.objective)))
        res.notes.append(searched.note("ratio", f"{chosen.removed:.3f} of the prunable channels", ctx.targets))
        return chosen

    def prune(self, graph: gs.Graph, ctx: PassContext, o: config.Options, res: PassResult,
              ratios: dict[str, float] | None = None) -> None:
        """Prune ``graph`` in place with options ``o`` (a numeric ratio) or per-group ``ratios``, reporting into
        ``res``."""
        graph.toposort()
        before = export(graph, ctx.original)
        plan = self.plan(graph, before, ctx, res, o, ratios)
        if not plan.keep:
            res.notes.append("no prunable group: the output channels of every weighted layer are declined, each "
                             "with its reason" if not res.counts.get(CHANNELS_IN_PRUNABLE_GROUPS) else
                             "nothing to prune" if o.ratio == 0 and not o.layers and not ratios else
                             "no channel selected for removal")
            return
        log.info("  plan:")
        for line in plan.lines():
            log.info("    %s", line)
        names = Names(graph)
        apply(plan.edits, plan.keep, names)
        res.changed = True
        reinfer(graph, ctx)
        if o.reconstruct is True or (o.reconstruct == "auto" and ctx.calib is not None):
            reconstruct(graph, ctx, plan, before, names, o, res)
        elif o.reconstruct == "auto":
            res.notes.append("reconstruct=auto: no calibration data, so the layers after pruned channels are not "
                             "refitted (give --calib-data: it usually keeps most of the accuracy)")
