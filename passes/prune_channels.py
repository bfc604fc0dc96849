"""``prune-channels``: dependency-aware structured pruning of output channels, with optional least-squares
reconstruction from calibration data.

Analysis (``passes/_channel_graph.py``): every Conv/ConvTranspose (group 1), Gemm and MatMul with a constant weight
is a prunable layer; its output channels are followed through everything that sees them (BatchNormalization,
per-channel constants, activations, pooling, Resize, Pad, depthwise Conv, Concat, Split, Slice, Flatten/Reshape into
a Gemm, ...). Residual Add/Sub/Mul/... of two variable tensors couple the layers behind them into one *group*, pruned
with one index set. A group touching anything the analysis does not understand (a graph output, a Reshape with a
computed shape, a Shape read of the channel count, an unknown op, a channel-axis reduction, a grouped Conv that is
not depthwise) is declined with the reason. Weights must be initializers: run ``fold-constants`` first on exports
that keep them in Constant nodes (Paddle). Declined: quantized models (prune before quantizing).

Importance of a channel (one prunable index of a group), from every coupled tensor, each normalised by its mean:
  * ``l1`` / ``l2``: (sum over the layers producing the channel of the norm of its filter, times |γ/σ| of a BN that
    reads the layer) x (sum over the layers reading the channel of the norm of their input-weight columns). A product,
    so a channel that is zero or that nothing reads scores 0;
  * ``bn-gamma``: sum of |γ| of the BatchNormalizations on the channel (groups without BN fall back to l2).
Selection: ``scope=layer`` removes ``ratio`` of each group's channels; ``scope=global`` ranks every channel of every
group (importance normalised to mean 1 per group) and removes the lowest ``ratio`` overall, keeping at least
``min-channels`` per group. Where a group has at least ``round-to`` channels, the kept count is the nearest multiple
of ``round-to`` (or all channels when that is nearer): onnxruntime's fast CPU convolutions (MLAS NCHWc) work on
blocks of 16 channels with AVX-512 and 8 with AVX2, and a layer cut to a count off that block runs about as long as
before (32 -> 24 channels on AVX-512 runs as 32), so ``round-to=auto`` (the default) is this CPU's block: measured
on AVX-512, 16 meets "latency reduction >= 0.7 x MAC reduction" in 15 of 15 model/ratio pairs and 8 in 6
(benchmarks/results/prune.md). A group of exactly ``round-to`` channels is not pruned; smaller groups are pruned
without rounding. ``layers=NAME:RATIO`` (repeat the key; NAME may be a glob pattern over node names) sets a group's
ratio; ``exclude=NAME`` keeps the channels a layer produces.

Then every affected tensor shrinks: weights (out- and in-channel axes), biases, BN parameters, per-channel constants,
depthwise ``group``, Split sizes, Slice bounds, constant Reshape shapes and Resize sizes; shapes are re-inferred.

Reconstruction (``reconstruct=true``, needs calibration data): every layer whose input channels shrank is refitted, in
topological order, so that its output on the pruned model's inputs matches the teacher's output at that point
(channel-pruning feature-map distillation in closed form, as in He et al. 2017 / ThiNet). Streaming over calibration
batches it accumulates AᵀA and AᵀY, A = [im2col patches | 1] of the pruned model's input to the layer (Gemm/MatMul:
the features) and Y the teacher's output of the layer (bias included; kept output channels only; for a MatMul whose
bias sits in the Add after it, the Add's output, and the Add's constant is refitted), then solves the ridge system
``(AᵀA + λD) W = AᵀY + λD W0``, regularised towards the pruned weights W0 with λ = ``damping`` · mean diag(AᵀA) and
D the identity without the bias. Later layers see the refitted earlier ones. The teacher is the original model where
the tensor exists there with the same values (checked on the first calibration row), else the model before this
pass. At most ``rows-per-sample`` output positions per sample are used, so memory holds one batch and one
(K+1)x(K+1) matrix per layer. The report gives each layer's relative RMS error (on the calibration data) before and
after the refit. Refitted: Conv 1-D/2-D with group 1, ConvTranspose whose kernel equals its stride (each kernel
phase a linear map of one input pixel; one shared bias), Gemm, MatMul with a constant 2-D weight; others are noted.
Channels of a depthwise Conv are not refitted (they pass through; their readers are).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from graphopt.calibration.readers import RandomSource, model_inputs
from graphopt.passes.base import Pass, PassContext, PassResult, register
from graphopt.passes.options import option

from graphopt.errors import one_line
from graphopt.graph import export, import_graph, quantized_ops, replace_graph
from graphopt.runtime import cpu_info, make_session

from ._channel_graph import ChannelGraph, Group, Term, analyze, keep_masks

log = logging.getLogger("graphopt")

STANDARD = ("", "ai.onnx", None)
MAX_REFIT_NOTES = 12


def conv_block() -> int:
    """Channels per block of onnxruntime's NCHWc float convolutions on this CPU (MlasNchwcGetBlockSize): 16 with
    AVX-512F, 8 otherwise."""
    return 16 if "AVX-512" in cpu_info()["isa"] else 8


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """``NAME:RATIO`` -> (name pattern, ratio in [0, 1)); the last ':' separates (names may contain ':')."""
    name, sep, value = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"option 'layers': '{text}' is not NAME:RATIO")
    try:
        r = float(value)
    except ValueError:
        raise ValueError(f"option 'layers': ratio '{value}' in '{text}' is not a number") from None
    if not 0 <= r < 1:
        raise ValueError(f"option 'layers': ratio {r} in '{text}' is out of range [0, 1)")
    return name, r


@register
class PruneChannels(Pass):
    name = "prune-channels"
    summary = ("Structured pruning of output channels with dependency groups (residuals, Concat, depthwise, "
               "Flatten->Gemm); optional least-squares reconstruction from calibration data.")
    exact = False
    must_not_follow = {"quantize": "pruning edits float weights and channel counts; quantize after pruning"}

    @dataclass(frozen=True)
    class Options:
        ratio: float = option(0.25, "fraction of channels to remove", lo=0, hi=1, hi_open=True)
        scope: Literal["layer", "global"] = option("layer", "ratio per group (layer) or over all groups (global)")
        criterion: Literal["l1", "l2", "bn-gamma"] = option("l1", "channel importance")
        round_to: int | Literal["auto"] = option(
            "auto", "keep a multiple of this many channels where the group has at least as many; auto = "
            "onnxruntime's convolution block on this CPU (16 with AVX-512, else 8)", lo=1)
        min_channels: int = option(1, "keep at least this many channels per group", lo=1)
        exclude: tuple[str, ...] = option((), "node names (glob patterns) whose output channels stay (repeat)")
        layers: tuple[str, ...] = option((), "per-layer ratio NAME:RATIO, NAME a node name or glob (repeat)")
        reconstruct: bool = option(False, "refit consumer layers by least squares on calibration data")
        samples: int = option(512, "calibration samples used for reconstruction", lo=1)
        damping: float = option(1e-3, "ridge strength relative to mean diag(AᵀA), towards the pruned weights",
                                lo=0)
        rows_per_sample: int = option(1024, "reconstruction: output positions sampled per sample per layer",
                                      lo=1)

        def __post_init__(self) -> None:
            for item in self.layers:
                parse_layer_ratio(item)

    def needs_calibration(self) -> bool:
        return self.options.reconstruct

    # ------------------------------------------------------------------------------------------------ run

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        o = self.options
        quantized = quantized_ops(graph)
        if quantized:
            res.decline("model", f"quantized ({', '.join(quantized)}); prune before quantizing")
            return res
        graph.toposort()
        before = export(graph, ctx.original)
        shapes = _infer_shapes(before)
        _observe_missing(before, shapes, ctx, res)
        cg = analyze(graph, shapes)
        if o.round_to == "auto":
            res.notes.append(f"round-to=auto: {conv_block()} (onnxruntime's convolution block on this CPU)")
        plan = self._select(cg, res)
        masks = keep_masks(cg, plan)
        if not masks:
            res.notes.append("nothing to prune" if o.ratio == 0 and not o.layers else
                             "no channel selected for removal")
            return res
        for edit in cg.edits:
            edit(masks.get)
        res.changed = True
        _reinfer(graph, ctx)
        if o.reconstruct:
            self._reconstruct(graph, ctx, cg, masks, before, res)
        return res

    # ------------------------------------------------------------------------------------------ selection

    def _matches(self, patterns: tuple[str, ...] | list[str], group: Group) -> bool:
        names = [s.node.name for s in group.sources if s.node is not None and s.node.name]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

    def _select(self, cg: ChannelGraph, res: PassResult) -> np.ndarray:
        """The union-find roots of the channels to remove; fills the report's layers and declines."""
        o = self.options
        per_layer = [parse_layer_ratio(x) for x in o.layers]
        candidates: list[tuple[Group, float | None]] = []
        for g in cg.groups:
            site = f"group '{g.name}'" + (f" (+{len(g.sources) - 1} coupled)" if len(g.sources) > 1 else "")
            if g.blocked:
                res.decline(site, "; ".join(g.blocked[:3]) + (f"; +{len(g.blocked) - 3} more"
                                                                 if len(g.blocked) > 3 else ""))
                res.layers.append(self._row(g, len(g.classes), len(g.classes), "declined"))
                continue
            if o.exclude and self._matches(o.exclude, g):
                res.decline(site, "excluded by option")
                res.layers.append(self._row(g, len(g.classes), len(g.classes), "excluded"))
                continue
            ratio = next((r for pat, r in per_layer if self._matches([pat], g)), None)
            candidates.append((g, ratio))
        unmatched = [pat for pat, _ in per_layer if not any(self._matches([pat], g) for g in cg.groups)]
        for pat in unmatched:
            res.notes.append(f"layers={pat}: matches no prunable layer")
        importance, fallback = _importance(cg, [g for g, _ in candidates], o.criterion)
        if fallback:
            res.notes.append(f"criterion bn-gamma: {len(fallback)} group(s) without BatchNormalization use l2 "
                             f"({', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''})")
        chosen: dict[int, np.ndarray] = {}
        global_pool = []
        for g, ratio in candidates:
            if ratio is None and o.scope == "global":
                global_pool.append(g)
                continue
            r = o.ratio if ratio is None else ratio
            keep = self._round_keep(len(g.classes), len(g.classes) - int(math.floor(r * len(g.classes) + 1e-9)))
            chosen[g.index] = self._lowest(g, importance[g.index], len(g.classes) - keep)
        if global_pool and o.ratio > 0:
            total = sum(len(g.classes) for g in global_pool)
            target = int(math.floor(o.ratio * total + 1e-9))
            scores = np.concatenate([importance[g.index] for g in global_pool])
            owner = np.concatenate([np.full(len(g.classes), i) for i, g in enumerate(global_pool)])
            order = np.argsort(scores, kind="stable")
            counts = [0] * len(global_pool)
            limit = [len(g.classes) - max(o.min_channels, 1) for g in global_pool]
            taken = 0
            for j in order:
                if taken >= target:
                    break
                i = int(owner[j])
                if counts[i] < limit[i]:
                    counts[i] += 1
                    taken += 1
            for i, g in enumerate(global_pool):
                keep = self._round_keep(len(g.classes), len(g.classes) - counts[i])
                chosen[g.index] = self._lowest(g, importance[g.index], len(g.classes) - keep)
        else:
            for g in global_pool:
                chosen[g.index] = g.classes[:0]
        _no_empty_tensors(cg, chosen, importance)
        removed = 0
        for g, _ in candidates:
            pruned = chosen[g.index]
            n = len(g.classes)
            res.layers.append(self._row(g, n, n - len(pruned), "pruned" if len(pruned) else "kept"))
            removed += len(pruned)
        res.counts["groups"] = len(cg.groups)
        res.counts["groups pruned"] = sum(1 for g, _ in candidates if len(chosen[g.index]))
        res.counts["channels removed"] = removed
        res.counts["channels in prunable groups"] = sum(len(g.classes) for g, _ in candidates)
        if any(len(v) for v in chosen.values()):
            return np.concatenate([v for v in chosen.values()])
        return np.zeros(0, np.int64)

    def _row(self, g: Group, before: int, after: int, status: str) -> dict[str, Any]:
        return {"group": g.name, "layers": [s.name for s in g.sources if not s.fixed], "channels": before,
                "kept": after, "status": status}

    def _round_keep(self, c: int, keep: int) -> int:
        o = self.options
        if keep >= c:
            return c            # nothing asked: never let rounding prune
        lo = min(c, max(o.min_channels, 1))
        keep = min(c, max(keep, lo))
        q = conv_block() if o.round_to == "auto" else o.round_to
        if q > 1 and c >= q:
            # the nearest multiple of q (ties keep more); c itself when that is nearer or no multiple fits
            r = max(q, q * int(math.floor(keep / q + 0.5)))
            while r < lo:
                r += q
            keep = c if r >= c or (c - keep) <= abs(keep - r) else r
        return keep

    @staticmethod
    def _lowest(g: Group, scores: np.ndarray, n: int) -> np.ndarray:
        if n <= 0:
            return g.classes[:0]
        order = np.argsort(scores, kind="stable")
        return g.classes[order[:n]]

    # -------------------------------------------------------------------------------------- reconstruction

    def _reconstruct(self, graph: gs.Graph, ctx: PassContext, cg: ChannelGraph, masks: dict[str, np.ndarray],
                     before: onnx.ModelProto, res: PassResult) -> None:
        o = self.options
        calib = ctx.require_calib(self.name)
        # the graph was re-imported after shape inference: find the consumers by their output tensor
        pending = {c.node.outputs[0].name for c in cg.consumers if c.tensor in masks}
        order = [n for n in graph.nodes if n.outputs and n.outputs[0].name in pending]
        if not order:
            return
        fits: list[tuple[gs.Node, _Fit | str]] = [(n, _Fit.make(n)) for n in order]   # each refit writes only its node
        targets = [f.target for _, f in fits if not isinstance(f, str)]
        teacher_graphs = self._teachers(ctx, before, targets, calib, res) if targets else {}
        rng = np.random.default_rng(ctx.seed)
        refits: list[tuple[str, float, float, int, int]] = []
        for node, fit in fits:
            site = f"{node.op} '{node.name or node.outputs[0].name}'"
            if isinstance(fit, str):
                res.notes.append(f"reconstruction skipped {site}: {fit}")
                continue
            y_name = fit.target
            student = _prefix_session(import_graph(export(graph, ctx.original)), node.inputs[0].name)
            teacher = _prefix_session(teacher_graphs[y_name], y_name)
            cols = masks.get(y_name)
            seen = 0
            for batch in calib:
                x = student.run(None, batch.feed)[0]
                y = teacher.run(None, batch.feed)[0]
                if cols is not None:
                    y = np.compress(cols, y, axis=1)
                n = x.shape[0] if x.ndim else 1
                fit.update(x, y, rng, max(n * o.rows_per_sample, 1))
                first = next(iter(batch.feed.values()))
                seen += first.shape[0] if first.ndim else 1
                if seen >= o.samples:
                    break
            before_err, after_err = fit.solve(o.damping)
            fit.write(cg)
            res.layers.append({"layer": node.name or y_name, "op": node.op, "refit rows": fit.rows,
                               "rel error before": round(before_err, 6), "rel error after": round(after_err, 6)})
            refits.append((site, before_err, after_err, fit.rows, seen))
            res.count("layers reconstructed")
        if len(refits) <= MAX_REFIT_NOTES:
            for site, e0, e1, rows, seen in refits:
                res.notes.append(f"reconstructed {site}: relative RMS error on calibration data {e0:.4f} -> "
                                 f"{e1:.4f} ({rows} rows, {seen} samples)")
        elif refits:
            e0s, e1s = np.array([r[1] for r in refits]), np.array([r[2] for r in refits])
            worst = refits[int(np.argmax(e1s))]
            res.notes.append(f"reconstructed {len(refits)} layers: relative RMS error on calibration data, median "
                             f"{np.median(e0s):.4f} -> {np.median(e1s):.4f}, worst after {worst[0]} {worst[1]:.4f} "
                             f"-> {worst[2]:.4f} (every layer in the report's layers)")

    def _teachers(self, ctx: PassContext, before: onnx.ModelProto, names: list[str], calib: Any,
                  res: PassResult) -> dict[str, gs.Graph]:
        """Per target tensor: the original model where it has the same values there, else the pre-pass model."""
        g_before = import_graph(before)
        out = {n: g_before for n in names}
        if ctx.original is before:
            return out
        try:
            g_orig = import_graph(ctx.original)
            have = g_orig.tensors()
            common = [n for n in names if n in have and not isinstance(have[n], gs.Constant)]
            if not common:
                res.notes.append("reconstruction teacher: the model before this pass (names differ from the "
                                 "original)")
                return out
            feed = next(iter(calib)).feed
            one = {k: v[:1] if getattr(v, "ndim", 0) else v for k, v in feed.items()}   # one row: little memory
            try:
                a = _run_outputs(ctx.original, common, one)
                b = _run_outputs(before, common, one)
            except Exception:
                a = _run_outputs(ctx.original, common, feed)
                b = _run_outputs(before, common, feed)
        except Exception as e:  # the original is the better teacher, not a required one
            res.notes.append(f"reconstruction teacher: the model before this pass ({one_line(e)})")
            return out
        used = 0
        for n in common:
            x, y = a.get(n), b.get(n)
            if x is not None and y is not None and x.shape == y.shape and np.allclose(x, y, rtol=1e-3, atol=1e-4 *
                                                                                       float(np.abs(y).max() + 1e-12)):
                out[n] = g_orig
                used += 1
        rest = "" if used == len(names) else ", the model before this pass for the rest"
        res.notes.append(f"reconstruction teacher: the original model for {used} of {len(names)} layers{rest}")
        return out


# ---------------------------------------------------------------------------------------------- importance


def _importance(cg: ChannelGraph, groups: list[Group], criterion: str) -> tuple[dict[int, np.ndarray], list[str]]:
    """Per group, the importance of each class (aligned with ``group.classes``), normalised to mean 1."""

    def sides(p: int) -> dict[str, np.ndarray]:
        acc = {kind: np.zeros(len(cg.root)) for kind in ("out", "in", "bn")}
        for term in cg.terms:
            _accumulate(cg, term, p, acc[term.kind])
        return acc

    norms = sides(1 if criterion == "l1" else 2)
    has_bn = np.zeros(len(cg.root), bool)
    for term in cg.terms:
        if term.kind == "bn":
            has_bn[cg.root[term.ids]] = True
    result: dict[int, np.ndarray] = {}
    fallback: list[str] = []
    for g in groups:
        if criterion == "bn-gamma" and has_bn[g.classes].any():
            s = norms["bn"][g.classes]
        else:
            if criterion == "bn-gamma":
                fallback.append(g.name)     # no BatchNormalization in the group: l2 (bn-gamma sides are l2)
            s = norms["out"][g.classes] * norms["in"][g.classes]
        mean = float(s.mean()) if s.size else 0.0
        result[g.index] = s / mean if mean > 0 else s
    return result, fallback


def _accumulate(cg: ChannelGraph, term: Term, p: int, side: np.ndarray) -> None:
    """Add one tensor's per-class norms (normalised by their mean) to ``side`` (indexed by union-find root)."""
    v = np.moveaxis(np.asarray(term.values, np.float64), term.axis, 0).reshape(len(term.ids), -1)
    per_pos = np.abs(v).sum(1) if p == 1 else (v * v).sum(1)
    if term.kind == "bn":
        per_pos = np.abs(v[:, 0])
    elif term.scale is not None and len(term.scale) == len(per_pos):
        per_pos = per_pos * (term.scale if p == 1 else term.scale ** 2)
    roots = cg.root[term.ids]
    uniq, inv = np.unique(roots, return_inverse=True)
    agg = np.zeros(len(uniq))
    np.add.at(agg, inv, per_pos)
    if p == 2 and term.kind != "bn":
        agg = np.sqrt(agg)
    mean = agg.mean() if agg.size else 0.0
    if mean > 0:
        side[uniq] += agg / mean


def _no_empty_tensors(cg: ChannelGraph, chosen: dict[int, np.ndarray], importance: dict[int, np.ndarray]) -> None:
    """No tensor may lose all its channels (a Slice or Split piece inside one group): put back its best channel."""
    group_of = {}
    for g in cg.groups:
        for k, c in enumerate(g.classes.tolist()):
            group_of[c] = (g.index, k)
    while True:
        pruned = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, np.int64)
        if pruned.size == 0:
            return
        pset = set(pruned.tolist())
        fixed = False
        for ids in cg.ids.values():
            roots = cg.root[ids]
            if len(roots) and all(r in pset for r in roots.tolist()):
                best = max(set(roots.tolist()), key=lambda r: importance[group_of[r][0]][group_of[r][1]])
                gi = group_of[best][0]
                chosen[gi] = chosen[gi][chosen[gi] != best]
                fixed = True
                break
        if not fixed:
            return


# ------------------------------------------------------------------------------------------------- shapes


def _infer_shapes(model: onnx.ModelProto) -> dict[str, list[Any] | None]:
    """Tensor shapes from onnx shape inference (ints where static, strings for symbols, None unknown dims)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:
        log.info("  shape inference failed: %s", one_line(e))
    shapes: dict[str, list[Any] | None] = {}
    for vi in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        t = vi.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            continue
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in t.tensor_type.shape.dim]
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _observe_missing(model: onnx.ModelProto, shapes: dict[str, list[Any] | None], ctx: PassContext,
                     res: PassResult) -> None:
    """Shapes onnx inference left unknown (exporters' Shape-computed reshapes lose them), observed by running the
    model once in onnxruntime on the first calibration batch, else on seeded random inputs."""
    produced = [o for n in model.graph.node for o in n.output if o]
    missing = [t for t in produced if shapes.get(t) is None]
    if not missing:
        return
    try:
        if ctx.calib is not None:
            feed = next(iter(ctx.calib)).feed
        else:
            feed = next(iter(RandomSource(model_inputs(model), ctx.input_shapes, ctx.seed, n_feeds=1))).feed
        try:   # one row is enough and keeps memory small; a fixed batch size needs the whole feed
            values = _run_outputs(model, missing, {k: v[:1] if getattr(v, "ndim", 0) else v for k, v in feed.items()})
        except Exception:
            values = _run_outputs(model, missing, feed)
    except Exception as e:
        res.notes.append(f"{len(missing)} tensor shapes unknown (shape inference) and not observable: "
                         f"{one_line(e)[:160]}")
        return
    n = 0
    for name, v in values.items():
        if isinstance(v, np.ndarray):
            shapes[name] = list(v.shape)
            n += 1
    res.notes.append(f"{n} tensor shapes that shape inference left unknown were observed in onnxruntime")


def _reinfer(graph: gs.Graph, ctx: PassContext) -> None:
    """Forget every intermediate shape (they may be stale) and infer them again."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in keep:
            t.shape = None
    graph.cleanup(remove_unused_graph_inputs=False)
    model = export(graph, ctx.original)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        log.info("  shape inference after pruning failed: %s", one_line(e))
        return
    replace_graph(graph, import_graph(model))


# ------------------------------------------------------------------------------------------ reconstruction


def _prefix_session(graph: gs.Graph, name: str) -> ort.InferenceSession:
    """A session computing only tensor ``name`` (the part of the graph it depends on)."""
    g = graph.copy()
    t = g.tensors()[name]
    g.outputs = [t]
    g.cleanup(remove_unused_graph_inputs=False)
    model = gs.export_onnx(g, do_type_check=False)
    return make_session(model, "model for reconstruction")


def _run_outputs(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    sess = make_session(probe, "model for reconstruction")
    return dict(zip(names, sess.run(names, feed)))


class _Fit:
    """Streaming ridge least squares for one Conv (1-D/2-D, group 1) or Gemm/MatMul (rank-2, constant weight)."""

    def __init__(self, node: gs.Node, w: np.ndarray, b: np.ndarray | None, bias: bool) -> None:
        self.node = node
        self.w0 = w                   # as fitted: [K, M]
        self.b0 = b                   # [M] or None
        self.bias = bias
        k = w.shape[0] + (1 if bias else 0)
        self.ata = np.zeros((k, k))
        self.aty = np.zeros((k, w.shape[1]))
        self.yy = 0.0
        self.rows = 0
        self.sol: np.ndarray | None = None
        self.target = node.outputs[0].name            # the teacher tensor the layer's output must match
        self.bias_add: tuple[gs.Node, int] | None = None   # MatMul: the Add that holds its bias

    @staticmethod
    def make(node: gs.Node) -> "_Fit | str":
        w_t = node.inputs[1]
        if not isinstance(w_t, gs.Constant):
            return "weight is not a constant"
        w = np.asarray(w_t.values, np.float64)
        b_t = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        if node.op == "Conv":
            if int(node.attrs.get("group", 1)) != 1 or w.ndim not in (3, 4):
                return "only 1-D/2-D Conv with group 1 is refitted"
            m = w.shape[0]
            b = np.asarray(b_t.values, np.float64) if b_t is not None else np.zeros(m)
            fit = _ConvFit(node, w.reshape(m, -1).T, b, True)
            fit.kernel = w.shape[2:]
            return fit
        if node.op == "ConvTranspose":
            why = _ConvTFit.unsupported(node, w)
            if why:
                return why
            c_in, c_out, phases = w.shape[0], w.shape[1], int(np.prod(w.shape[2:]))
            b = np.asarray(b_t.values, np.float64) if b_t is not None else np.zeros(c_out)
            wk = w.reshape(c_in, c_out, phases).transpose(0, 2, 1).reshape(c_in, phases * c_out)
            tfit = _ConvTFit(node, wk, np.tile(b, phases), True)
            tfit.kernel, tfit.c_out = tuple(w.shape[2:]), c_out
            return tfit
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                return "transA=1"
            alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
            wk = (w.T if node.attrs.get("transB", 0) else w) * alpha
            m = wk.shape[1]
            if b_t is not None:
                bv = np.asarray(b_t.values, np.float64) * beta
                if bv.size not in (1, m) or (bv.ndim == 2 and bv.shape[0] != 1):
                    return f"bias of shape {list(bv.shape)}"
                b = np.broadcast_to(bv.reshape(-1), (m,)).copy()
            else:
                b = np.zeros(m)
            return _Fit(node, wk, b, True)
        if node.op == "MatMul":
            add, index = _bias_add(node, w.shape[1])
            if add is None:
                return _Fit(node, w, None, False)
            bv = np.asarray(add.inputs[index].values, np.float64).reshape(-1)
            fit = _Fit(node, w, np.broadcast_to(bv, (w.shape[1],)).copy(), True)
            fit.bias_add = (add, index)
            fit.target = add.outputs[0].name
            return fit
        return f"{node.op} is not refitted"

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        x = x.reshape(x.shape[0], -1)
        y = y.reshape(y.shape[0], -1)
        if x.shape[0] > cap:
            pick = rng.choice(x.shape[0], cap, replace=False)
            x, y = x[pick], y[pick]
        return x, y

    def update(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int) -> None:
        """Add one batch: products in float32 (BLAS), sums kept in float64; the bias column handled apart."""
        a, yy = self.rows_of(x, y, rng, cap)
        a32, y32 = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(yy, np.float32)
        k = a.shape[1]
        self.ata[:k, :k] += a32.T @ a32
        self.aty[:k] += a32.T @ y32
        if self.bias:
            sa = a.sum(0, dtype=np.float64)
            self.ata[k, :k] += sa
            self.ata[:k, k] += sa
            self.ata[k, k] += a.shape[0]
            self.aty[k] += yy.sum(0, dtype=np.float64)
        self.yy += float(np.square(yy, dtype=np.float64).sum())
        self.rows += a.shape[0]

    def _w0(self) -> np.ndarray:
        return np.vstack([self.w0, self.b0[None, :]]) if self.bias else self.w0

    def _err(self, w: np.ndarray) -> float:
        e = float(np.einsum("ij,ik,kj->", w, self.ata, w) - 2 * np.einsum("ij,ij->", w, self.aty) + self.yy)
        return math.sqrt(max(e, 0.0) / self.yy) if self.yy > 0 else 0.0

    def solve(self, damping: float) -> tuple[float, float]:
        w0 = self._w0()
        k = self.w0.shape[0]
        d = np.ones(self.ata.shape[0])
        if self.bias:
            d[-1] = 0.0
        lam = damping * float(np.mean(np.diag(self.ata)[:k])) if k else 0.0
        a = self.ata + np.diag(lam * d)
        rhs = self.aty + (lam * d)[:, None] * w0
        if self.bias and self.rows:
            a[-1, -1] += 1e-12 * self.rows
        try:
            sol = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        before, after = self._err(w0), self._err(sol)
        if not np.all(np.isfinite(sol)) or after > before:
            sol, after = w0, before
        self.sol = sol
        return before, after

    def write(self, cg: ChannelGraph) -> None:
        assert self.sol is not None
        node = self.node
        k = self.w0.shape[0]
        w, b = self.sol[:k], (self.sol[k] if self.bias else None)
        w_t = node.inputs[1]
        dtype = np.asarray(w_t.values).dtype
        if node.op == "Conv":
            shape = np.asarray(w_t.values).shape
            new_w = w.T.reshape(shape)
        elif node.op == "ConvTranspose":
            shape = np.asarray(w_t.values).shape
            new_w = w.reshape(shape[0], -1, shape[1]).transpose(0, 2, 1).reshape(shape)
            b = b[:shape[1]] if b is not None else None     # one bias, shared by every phase
        elif node.op == "Gemm":
            new_w = w.T if node.attrs.get("transB", 0) else w
            node.attrs["alpha"] = 1.0
            node.attrs["beta"] = 1.0
        else:
            new_w = w
        node.inputs[1] = gs.Constant(cg.new_name(w_t.name), np.ascontiguousarray(new_w.astype(dtype)))
        if b is not None and self.bias_add is not None:
            add, index = self.bias_add
            old = add.inputs[index]
            shape = np.asarray(old.values).shape
            add.inputs[index] = gs.Constant(cg.new_name(old.name), np.ascontiguousarray(b.reshape(shape).astype(dtype)))
        elif b is not None:
            b_old = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
            base = b_old.name if b_old is not None else (node.name or node.outputs[0].name) + "_bias"
            c = gs.Constant(cg.new_name(base), np.ascontiguousarray(b.astype(dtype)))
            if len(node.inputs) > 2:
                node.inputs[2] = c
            else:
                node.inputs.append(c)


def _bias_add(node: gs.Node, m: int) -> tuple[gs.Node | None, int]:
    """The Add of a constant bias ([M] or [1, M]) that alone reads a MatMul's output (exporters split Gemm so)."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None, 0
    add = out.outputs[0]
    if add.op != "Add" or add.domain not in STANDARD or len(add.inputs) != 2:
        return None, 0
    index = 1 if add.inputs[0] is out else 0
    c = add.inputs[index]
    if not isinstance(c, gs.Constant) or np.asarray(c.values).dtype.kind != "f":
        return None, 0
    shape = np.asarray(c.values).shape
    if shape not in ((m,), (1, m)):
        return None, 0
    return add, index


class _ConvFit(_Fit):
    kernel: tuple[int, ...] = ()

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        node = self.node
        if x.ndim == 3:                                   # Conv1d as 2-D with H = 1
            x, y = x[:, :, None, :], y[:, :, None, :]
        kernel = tuple(self.kernel) if len(self.kernel) == 2 else (1, *self.kernel)
        nd = len(self.kernel)
        strides = list(node.attrs.get("strides", [1] * nd))
        dil = list(node.attrs.get("dilations", [1] * nd))
        pads = list(node.attrs.get("pads", [0] * (2 * nd)))
        auto = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto, bytes):
            auto = auto.decode()
        if nd == 1:
            strides, dil, pads = [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
        n, c, h, w = x.shape
        ho, wo = y.shape[2], y.shape[3]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for i, (size, out, k, s, d) in enumerate(zip((h, w), (ho, wo), kernel, strides, dil)):
                total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
                small, big = total // 2, total - total // 2
                pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
        elif auto == "VALID":
            pads = [0, 0, 0, 0]
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        total = n * ho * wo
        pick = rng.choice(total, cap, replace=False) if total > cap else np.arange(total)
        bi, rest = np.divmod(pick, ho * wo)
        oi, oj = np.divmod(rest, wo)
        cols = np.empty((len(pick), c, kernel[0], kernel[1]), dtype=np.float32)
        for a in range(kernel[0]):
            for b in range(kernel[1]):
                cols[:, :, a, b] = xp[bi, :, oi * strides[0] + a * dil[0], oj * strides[1] + b * dil[1]]
        ys = y[bi, :, oi, oj]
        return cols.reshape(len(pick), -1), ys


class _ConvTFit(_Fit):
    """ConvTranspose whose kernel equals its stride (2x2 stride 2 upsampling: DB heads, U-Nets): every output pixel
    reads one input pixel, so each of the kernel's phases (a, b) is a linear map of the same input rows. The weight is
    fitted as [C_in, phases·C_out] columns, then the bias is shared: the mean of the phases' biases, with the
    weights refitted for it."""

    kernel: tuple[int, ...] = ()
    c_out: int = 0

    @staticmethod
    def unsupported(node: gs.Node, w: np.ndarray) -> str | None:
        nd = w.ndim - 2
        if nd not in (1, 2) or int(node.attrs.get("group", 1)) != 1:
            return "only 1-D/2-D ConvTranspose with group 1 is refitted"
        k = list(w.shape[2:])
        auto = node.attrs.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if (list(node.attrs.get("strides", [1] * nd)) != k or any(node.attrs.get("pads", [0] * 2 * nd))
                or any(d != 1 for d in node.attrs.get("dilations", [1] * nd))
                or any(node.attrs.get("output_padding", [0] * nd)) or "output_shape" in node.attrs
                or auto not in ("NOTSET", "VALID")):
            return "ConvTranspose refitted only when its kernel equals its stride (no padding or dilation)"
        return None

    def rows_of(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, cap: int
                ) -> tuple[np.ndarray, np.ndarray]:
        kernel = self.kernel if len(self.kernel) == 2 else (1, *self.kernel)
        if x.ndim == 3:
            x, y = x[:, :, None, :], y[:, :, None, :]
        n, _, h, w = x.shape
        total = n * h * w
        pick = rng.choice(total, cap, replace=False) if total > cap else np.arange(total)
        bi, rest = np.divmod(pick, h * w)
        i, j = np.divmod(rest, w)
        xs = x[bi, :, i, j]
        ys = np.concatenate([y[bi, :, i * kernel[0] + a, j * kernel[1] + b]
                             for a in range(kernel[0]) for b in range(kernel[1])], axis=1)
        return xs, ys

    def solve(self, damping: float) -> tuple[float, float]:
        before, _ = super().solve(damping)
        assert self.sol is not None
        k, c = self.w0.shape[0], self.c_out
        bias = np.tile(self.sol[k].reshape(-1, c).mean(0), self.sol.shape[1] // c)
        lam = damping * float(np.mean(np.diag(self.ata)[:k])) if k else 0.0
        rhs = self.aty[:k] - self.ata[:k, k:k + 1] * bias[None, :] + lam * self.w0
        try:
            w = np.linalg.solve(self.ata[:k, :k] + lam * np.eye(k), rhs)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(self.ata[:k, :k] + lam * np.eye(k), rhs, rcond=None)[0]
        sol = np.vstack([w, bias[None, :]])
        after = self._err(sol)
        if not np.all(np.isfinite(sol)) or after > before:
            sol, after = self._w0(), before
        self.sol = sol
        return before, after
