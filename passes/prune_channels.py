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
from .autosearch import no_targets, search
from .pruning.reconstruct import reconstruct
from .pruning.selection import conv_block, make_plan, select
from .pruning.shapes import analysis_shapes, reinfer

log = logging.getLogger("graphopt")

RATIOS = tuple(k / 20 for k in range(20))     # ratio=auto's candidates: 0 (no change), 0.05, ..., 0.95
RATIO_CHOSEN = "ratio chosen"                  # PassResult.counts key

__all__ = ["PruneChannels", "RATIO_CHOSEN", "GROUPS", "GROUPS_PRUNED", "CHANNELS_REMOVED", "CHANNELS_IN_PRUNABLE_GROUPS",
           "LAYERS_RECONSTRUCTED"]


@register
class PruneChannels(Pass):
    name = "prune-channels"
    summary = ("Structured pruning of output channels with dependency groups (residuals, Concat, depthwise, "
               "Flatten->Gemm); optional least-squares reconstruction from calibration data.")
    exact = False
    must_not_follow = {"quantize": "pruning edits float weights and channel counts; quantize after pruning"}
    Options = config.Options

    def needs_calibration(self) -> bool:
        return self.options.reconstruct is True or self.options.ratio == "auto"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        quantized = quantized_ops(graph)
        return f"quantized ({', '.join(quantized)}); prune before quantizing" if quantized else None

    def plan(self, graph: gs.Graph, before: onnx.ModelProto, ctx: PassContext, res: PassResult,
             o: config.Options | None = None) -> Plan:
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
        return make_plan(an, select(an, o, res))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        if o.ratio == "auto":
            reason = no_targets(ctx, "ratio")
            if reason:
                res.decline("model", f"{reason}; give a ratio")
                return res
            found = search(RATIOS, lambda g, r, c: self.prune(g, c, dataclasses.replace(o, ratio=r), PassResult()),
                           graph, ctx, self.name)
            o = dataclasses.replace(o, ratio=RATIOS[found.index])
            res.counts[RATIO_CHOSEN] = o.ratio
            res.notes.append(found.note("ratio", f"{o.ratio:.2f}", ctx.targets))
        self.prune(graph, ctx, o, res)
        return res

    def prune(self, graph: gs.Graph, ctx: PassContext, o: config.Options, res: PassResult) -> None:
        """Prune ``graph`` in place with options ``o`` (a numeric ratio), reporting into ``res``."""
        graph.toposort()
        before = export(graph, ctx.original)
        plan = self.plan(graph, before, ctx, res, o)
        if not plan.keep:
            res.notes.append("nothing to prune" if o.ratio == 0 and not o.layers else
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
