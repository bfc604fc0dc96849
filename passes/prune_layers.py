"""``prune-layers``: remove whole residual blocks (``y = x + f(x)`` becomes ``y = x``), the least harmful first, and
refit the layers after each by least squares on the calibration data.

Which blocks (``layers/blocks.py`` finds them): each block is removed alone on a copy of the graph and the copy
judged against the original model on the calibration samples (``judge.Judge``: worst output cosine and its
one-sided 95% low bound, top-1 agreement of class-score outputs, the accuracy drop where the samples have labels);
blocks are then removed least harmful first (the highest cosine low bound, then top-1), ``count`` of them, or with
``count=auto`` the most whose model keeps the pipeline's targets (``autosearch.search``: candidates fitted on half
the calibration batches and judged on the other half, with the margins). Removing a block changes what the next
layers see; each first Conv/Gemm/MatMul after a removed block (``blocks.next_layers``) is refitted so that its
output on the pruned model's inputs matches the original model's there: ridge least squares over the calibration
data (``pruning.reconstruct``, the same refit as prune-channels' reconstruction: ``min ‖A·W' − Y‖² + λ‖W' − W‖²``,
A the layer's inputs in the pruned model, Y the original outputs). ``refit=false`` skips it.

Report: a layers row per residual block (its Add, branch nodes and weights, the cosine and top-1 with it removed
alone, removed or kept), declines with reasons (Adds that are not residual blocks, blocks excluded by option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import onnx_graphsurgeon as gs

from graphopt.graph import cleanup, export, infer_model, tensor_shapes

from .autosearch import no_targets, search
from .base import Pass, PassContext, PassResult, register
from .judge import Judge, judge_samples
from .layers.blocks import Block, branch_weights, find_blocks, next_layers, remove
from .options import option, unmatched
from .pruning.config import Options as FitOptions
from .pruning.edits import Names, Plan
from .pruning.reconstruct import reconstruct

BLOCKS_REMOVED = "residual blocks removed"
NODES_REMOVED = "nodes removed"


@register
class PruneLayers(Pass):
    name = "prune-layers"
    summary = "Remove whole residual blocks (y = x + f(x) -> y = x) by their measured effect; refit the next layers."
    exact = False
    prerequisites = ("fold-constants",)    # exporters (PaddleOCR's) keep weights in Constant nodes
    must_not_follow = {"quantize": "refitting needs the float weights; remove layers first, then quantize"}

    @dataclass(frozen=True)
    class Options:
        count: int | Literal["auto"] = option(
            "auto", "residual blocks to remove, least harmful first; auto: the most that keep the pipeline's "
            "targets on the calibration data, with a one-sided margin", lo=1)
        refit: bool = option(True, "refit the first layers after each removed block by least squares on "
                                   "--calib-data")
        exclude: tuple[str, ...] = option((), "names of the Add nodes of blocks to keep (repeat the key)")

    def searches(self) -> bool:
        return self.options.count == "auto"

    def needs_calibration(self) -> bool:
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        calib = ctx.require_calib(self.name)
        blocks = self._blocks(graph, ctx, res)
        if not blocks:
            if not any(d["site"] == "model" for d in res.declined):
                res.decline("model", "no residual blocks (an Add of an activation x and a branch computed from x)")
            return res
        if self.options.count == "auto" and (why := no_targets(ctx, "count")):
            res.decline("model", f"{why}; give a count")
            return res
        weights = {b.name: branch_weights(b) for b in blocks}
        judge = Judge(ctx.original, ctx.original, judge_samples(calib), ctx.targets)
        alone = {b.name: judge.quality(_without(graph, ctx, [b])) for b in blocks}
        order = sorted(blocks, key=lambda b: (alone[b.name].cosine_low, alone[b.name].top1,
                                              -alone[b.name].accuracy_drop), reverse=True)
        names = [b.name for b in order]
        if self.options.count == "auto":
            found = search(range(len(order) + 1), lambda g, k, c: self._remove(g, c, names[:k], PassResult()),
                           graph, ctx, self.name)
            k = found.index
            res.notes.append(found.note("count", f"{k} of {len(order)} blocks", ctx.targets))
        else:
            k = min(int(self.options.count), len(order))
            if k < self.options.count:
                res.notes.append(f"count={self.options.count}: the model has {len(order)} residual blocks; "
                                 f"removing all of them")
        if k:
            self._remove(graph, ctx, names[:k], res)
        for b, name in zip(order, names):     # the names taken before removal (a removed Add has no output)
            q = alone[name]
            res.layers.append({"layer": name, "op": "Add", "branch nodes": len(b.branch),
                               "branch weights": weights[name], "cosine alone": round(q.cosine, 6),
                               "top-1 alone": round(q.top1, 6), "status": "removed" if name in names[:k] else "kept"})
        return res

    def _blocks(self, graph: gs.Graph, ctx: PassContext, res: PassResult) -> list[Block]:
        """The residual blocks that may be removed; the others declined."""
        inferred = infer_model(export(graph, ctx.original))
        blocks, declined = find_blocks(graph, tensor_shapes(inferred) if inferred is not None else {})
        for site, why in declined:
            res.decline(site, why)
        res.notes.extend(unmatched(self.name, "exclude", self.options.exclude, [b.name for b in blocks],
                                   what="residual Add"))
        kept = [b for b in blocks if b.name not in self.options.exclude]
        for b in blocks:
            if b.name in self.options.exclude:
                res.decline(b.desc, "excluded by option")
        return kept

    def _remove(self, graph: gs.Graph, ctx: PassContext, names: list[str], res: PassResult) -> None:
        """Remove the blocks whose Adds are named ``names`` (found again: ``graph`` may be a copy) and refit."""
        before = export(graph, ctx.original)
        start = len(graph.nodes)
        refit: list[str] = []
        for name in names:
            # found again after each removal: removing x1 = x0 + f(x0) rewires the next block x1 + g(x1) to x0
            cleanup(graph)
            block = {b.name: b for b in find_blocks(graph, {})[0]}.get(name)
            if block is None or not block.add.outputs:
                continue
            after = next_layers(block.add.outputs[0]) if self.options.refit else []
            if remove(graph, block):
                res.count(BLOCKS_REMOVED)
                res.notes.append(f"removed the residual block of {block.desc} ({len(block.branch)} branch nodes)")
                refit.extend(n.outputs[0].name for n in after if n.outputs and n.outputs[0].name not in refit)
        cleanup(graph).toposort()
        alive = {t.name for n in graph.nodes for t in n.outputs}    # a later removal may take a layer to refit
        refit = [name for name in refit if name in alive]
        res.changed = res.counts.get(BLOCKS_REMOVED, 0) > 0
        res.count(NODES_REMOVED, start - len(graph.nodes))
        if refit and res.changed:
            plan = Plan(removed=(), edits=(), keep={}, refit=tuple(refit))
            reconstruct(graph, ctx, plan, before, Names(graph), FitOptions(), res)


def _without(graph: gs.Graph, ctx: PassContext, blocks: list[Block]) -> Any:
    """The model with ``blocks`` removed (a copy; no refit)."""
    copy = graph.copy()
    found = {b.name: b for b in find_blocks(copy, {})[0]}
    for b in blocks:
        remove(copy, found[b.name])
    cleanup(copy)
    return export(copy, ctx.original)

